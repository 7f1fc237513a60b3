//! The stores a run measures the host on: SQLite in the data directory, and Postgres, either a
//! database the operator names (`--postgres-url`) or a durable throwaway cluster started from
//! this machine's own binaries with the store tests' `pg_cluster.rs`, and stopped at the end.

use std::fmt;
use std::path::Path;

use super::LoadgenError;

// The store tests' cluster, included by path as `viworks-host/tests/cluster.rs` does; the
// tests' shared fast cluster in it is not used here.
#[allow(dead_code, unreachable_pub)]
#[path = "../../../viworks-host/src/store/pg_cluster.rs"]
mod pg_cluster;

/// Connections in the host's Postgres pool (`[store] pool_size`, the host's default): on two
/// cores the server's backends and the host share the CPU, and 16 concurrent commits already
/// share each WAL flush.
pub const POSTGRES_POOL: usize = 16;

/// Which database the host stores into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// One SQLite file in the data directory (the host's default).
    Sqlite,
    /// A Postgres database.
    Postgres,
}

impl StoreKind {
    /// `sqlite` or `postgres` (surrounding spaces and case ignored); `None` otherwise.
    pub fn parse(name: &str) -> Option<StoreKind> {
        match name.trim().to_ascii_lowercase().as_str() {
            "sqlite" => Some(StoreKind::Sqlite),
            "postgres" => Some(StoreKind::Postgres),
            _ => None,
        }
    }

    /// Its name, as `--stores` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SQLite store's URL in `data_dir`.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("viworks.db").display())
}

/// What the SQLite store promises, in the report: the host's own settings, not configurable.
pub const SQLITE_SETTINGS: &str = "WAL, synchronous=FULL, one writer with group commit";

/// Where the Postgres store is: a database `--postgres-url` names, a durable cluster this run
/// started, or nowhere (no Postgres on this machine).
pub struct Postgres(Source);

enum Source {
    /// A cluster this run started, stopped by [`Postgres::stop`], and the host's database in it.
    Started { cluster: Box<pg_cluster::Cluster>, url: String },
    /// The database `--postgres-url` names.
    Given(String),
    /// Why there is none.
    Missing(String),
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        match &self.0 {
            Source::Started { .. } => f.write_str("Postgres(started)"),
            Source::Given(_) => f.write_str("Postgres(--postgres-url)"),
            Source::Missing(reason) => write!(f, "Postgres(missing: {reason})"),
        }
    }
}

impl Postgres {
    /// The database `url` names when given; otherwise a new durable cluster with an empty
    /// database. Takes a few seconds (`initdb`, the server's start). A machine without Postgres
    /// gives a `Postgres` whose [`url`](Self::url) is the reason, except under `CI=true` (the
    /// store tests' rule), where it is an error, as is any other failure to start the cluster.
    pub async fn prepare(url: Option<&str>) -> Result<Postgres, LoadgenError> {
        if let Some(url) = url {
            return Ok(Postgres(Source::Given(url.to_owned())));
        }
        let starting = tokio::task::spawn_blocking(|| pg_cluster::Cluster::start(pg_cluster::Durability::Durable));
        let started =
            starting.await.map_err(|e| LoadgenError::Internal { what: "starting Postgres", reason: e.to_string() })?;
        let cluster = match started {
            Ok(cluster) => cluster,
            Err(reason) if pg_cluster::required() => return Err(LoadgenError::Postgres { reason }),
            Err(reason) => return Ok(Postgres(Source::Missing(reason))),
        };
        match cluster.create_database("loadgen").await {
            Ok(database) => {
                let url = cluster.url(&database);
                Ok(Postgres(Source::Started { cluster: Box::new(cluster), url }))
            }
            Err(reason) => {
                let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
                Err(LoadgenError::Postgres { reason })
            }
        }
    }

    /// The host's connection string, or why there is none.
    pub fn url(&self) -> Result<&str, &str> {
        match &self.0 {
            Source::Started { url, .. } | Source::Given(url) => Ok(url),
            Source::Missing(reason) => Err(reason),
        }
    }

    /// The process id of the cluster this run started, to measure its CPU time; `None` for a
    /// database named by `--postgres-url`, which may be elsewhere.
    pub fn server_pid(&self) -> Option<u32> {
        match &self.0 {
            Source::Started { cluster, .. } => cluster.server_pid(),
            _ => None,
        }
    }

    /// Stops and deletes the cluster this run started (nothing otherwise); logs a failure.
    pub async fn stop(self) {
        if let Source::Started { cluster, .. } = self.0 {
            match tokio::task::spawn_blocking(move || cluster.stop()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "stopping the Postgres cluster"),
                Err(error) => tracing::warn!(%error, "stopping the Postgres cluster"),
            }
        }
    }

    /// Where the database is and what it promises, for the report: the server's version and
    /// durability settings as it reports them, and the host's pool. Never the URL.
    pub async fn settings(&self) -> String {
        let source = match &self.0 {
            Source::Started { .. } => "a throwaway cluster on loopback",
            Source::Given(_) => "--postgres-url",
            Source::Missing(reason) => return format!("skipped: {reason}"),
        };
        let server = match self.url() {
            Ok(url) => server_settings(url).await.unwrap_or_else(|e| format!("settings unreadable: {e}")),
            Err(reason) => reason.to_owned(),
        };
        format!("{source}, {server}, host pool of {POSTGRES_POOL}")
    }
}

/// The server's version and its durability settings.
async fn server_settings(url: &str) -> Result<String, String> {
    let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
    let connecting = config.connect(tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
        .await
        .map_err(|_| "no answer in 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let names = ["server_version", "fsync", "synchronous_commit", "full_page_writes"];
    let query = "SELECT current_setting('server_version'), current_setting('fsync'), \
                 current_setting('synchronous_commit'), current_setting('full_page_writes')";
    let row = client.query_one(query, &[]).await.map_err(|e| e.to_string());
    drop(client);
    let _ = connection.await;
    let row = row?;
    let mut values = Vec::with_capacity(names.len());
    for (at, name) in names.iter().enumerate() {
        let value: String = row.try_get(at).map_err(|e| e.to_string())?;
        values.push(if at == 0 { format!("PostgreSQL {value}") } else { format!("{name}={value}") });
    }
    Ok(values.join(", "))
}
