//! The ViWorkS control plane: accepts gateway agents over mutually authenticated WebSocket,
//! dispatches commands to them, and stores results, telemetry and a hash-chained audit trail.
//!
//! `main.rs` only parses arguments; everything runs from this library, so tests start the real
//! server in-process with [`start`].

pub mod agents;
pub mod api;
pub mod audit;
pub mod cli;
/// The monotonic wall clock shared with the agent.
pub use viworks_gateway::clock;
pub mod config;
pub mod control;
pub mod local_agent;
pub mod metrics;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, ConfigError, StoreUrl};
use crate::control::Control;
use crate::metrics::Metrics;
use crate::store::AnyStore;
use crate::store::postgres::{PostgresOptions, PostgresStore};
use crate::store::sqlite::SqliteStore;
use crate::store::{Role, Store, StoreError, TokenRecord};
use crate::tls::{InitOptions, Pki, TlsError};

/// Why the host could not start or an operator command failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HostError {
    /// The configuration is invalid; every problem is listed.
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigError>),
    /// Certificates or keys could not be created or read.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A command that reads an existing database found none where the configuration points.
    #[error("no database at {}: nothing to read (check the data directory or the store URL)", .0.display())]
    NoDatabase(std::path::PathBuf),
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A host running in this process.
pub struct RunningHost {
    /// Where the REST API listens.
    pub api_addr: SocketAddr,
    /// Where agents connect.
    pub agent_addr: SocketAddr,
    control: Control<AnyStore>,
    store: AnyStore,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl RunningHost {
    /// The control plane, for tests and tooling.
    pub fn control(&self) -> &Control<AnyStore> {
        &self.control
    }

    /// Stops gracefully: stops accepting, closes agent sessions with `going_away`, lets
    /// in-flight writes commit, and closes the store. Waits at most 15 seconds for sessions.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(15), drain).await.is_err() {
            tracing::warn!("sessions did not close within 15 s; stopping anyway");
            self.tasks.abort_all();
        }
        self.control.shutdown().await;
        self.store.close().await;
    }
}

/// Opens the configured store.
pub async fn open_store(url: &StoreUrl, postgres: PostgresOptions) -> Result<AnyStore, HostError> {
    match url {
        StoreUrl::Sqlite(path) => Ok(AnyStore::Sqlite(SqliteStore::open(path)?)),
        StoreUrl::Postgres(url) => Ok(AnyStore::Postgres(PostgresStore::connect(url, postgres).await?)),
    }
}

/// Starts a host: loads the PKI from the data directory, opens the store, rebuilds the
/// dispatcher, and binds both listeners.
pub async fn start(config: &Config) -> Result<RunningHost, HostError> {
    let pki = Pki::load(&config.data_dir)?;
    let store = open_store(&config.store, config.postgres).await?;
    let control = Control::start(
        store.clone(),
        pki.master_key().clone(),
        config.control,
        Metrics::new(),
        config.instance_name.clone(),
    )
    .await?;
    let agent_listener = TcpListener::bind(config.agent_addr).await.map_err(|source| HostError::Bind {
        what: "agents",
        addr: config.agent_addr,
        source,
    })?;
    let api_listener = TcpListener::bind(config.api_addr).await.map_err(|source| HostError::Bind {
        what: "the API",
        addr: config.api_addr,
        source,
    })?;
    let agent_addr = agent_listener.local_addr().unwrap_or(config.agent_addr);
    let api_addr = api_listener.local_addr().unwrap_or(config.api_addr);
    let (shutdown, signal) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let agent_tls = tls::agent_server_config(&pki)?;
    tasks.spawn(agents::serve(
        agent_listener,
        agent_tls,
        control.clone(),
        agents::EndpointConfig::default(),
        signal.clone(),
    ));
    let api_tls = if config.api_tls { Some(tls::api_server_config(&pki)?) } else { None };
    let state = std::sync::Arc::new(api::ApiState {
        control: control.clone(),
        rate_limits: config.rate_limits,
        pki: std::sync::Arc::new(pki),
        public_url: config.public_url.clone(),
        limiter: api::Limiter::default(),
        shutdown: signal.clone(),
    });
    tasks.spawn(api::serve(api_listener, api_tls, state, signal.clone()));
    let scheme = if config.api_tls { "https" } else { "http" };
    tracing::info!(agents = %agents::describe(agent_addr), api = %format!("{scheme}://{api_addr}"), "host started");
    Ok(RunningHost { api_addr, agent_addr, control, store, shutdown, tasks })
}

/// Runs a host until `signal` resolves, then shuts it down gracefully.
pub async fn run(config: Config, signal: impl std::future::Future<Output = ()>) -> Result<(), HostError> {
    let host = start(&config).await?;
    signal.await;
    tracing::info!("shutting down");
    host.shutdown().await;
    Ok(())
}

/// What [`init`] created.
#[derive(Debug)]
pub struct Initialized {
    /// The PKI.
    pub pki: Pki,
    /// The first admin token; only its hash is stored.
    pub admin_token: String,
}

/// Creates a data directory: CA, host certificate, master key, database, and a first admin
/// token. Refuses to overwrite anything that exists.
pub async fn init(data_dir: &Path, store: &StoreUrl, options: &InitOptions) -> Result<Initialized, HostError> {
    let pki = Pki::init(data_dir, options)?;
    let store = open_store(store, PostgresOptions::default()).await?;
    let admin_token = create_token(&store, Role::Admin, "admin").await?;
    let detail = serde_json::json!({ "host_pin": pki.host_pin().to_string() });
    let entry = store::NewAudit {
        ts: clock::Clock::start().now(),
        req_id: String::new(),
        actor: "init".to_owned(),
        action: "host.initialized".to_owned(),
        args_hash: audit::chain::args_hash(&detail),
        targets: vec!["admin".to_owned()],
        rc: "ok".to_owned(),
        duration_ms: 0,
        detail,
    };
    audit::record(&store, entry).await;
    store.close().await;
    Ok(Initialized { pki, admin_token })
}

/// Creates an API token with `role`, stores its hash, and returns the token.
pub async fn create_token<S: Store>(store: &S, role: Role, name: &str) -> Result<String, HostError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| StoreError::Database(format!("no OS randomness: {e}")))?;
    let token = format!("vwk_{}", secret.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let record = TokenRecord {
        token_hash: token_hash(&token),
        name: name.to_owned(),
        role,
        created_at: clock::Clock::start().now(),
        revoked: false,
    };
    store.create_token(&record).await?;
    Ok(token)
}

/// The stored form of an API token: BLAKE3 of its text, hex.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};
    use crate::store::AgentFilter;

    /// The host started on a Postgres URL: the PKI on disk, everything else in Postgres.
    #[tokio::test]
    async fn a_host_starts_and_serves_on_postgres() {
        let Some((pg, _name)) = store::pg_cluster::fresh_database().await else { return };
        let (Some(tokio_postgres::config::Host::Tcp(host)), Some(port), Some(user), Some(db)) =
            (pg.get_hosts().first(), pg.get_ports().first(), pg.get_user(), pg.get_dbname())
        else {
            panic!("the test cluster is reached over TCP");
        };
        let url = format!("postgres://{user}@{host}:{port}/{db}");
        let dir = tempfile::tempdir().expect("dir");
        let overrides = Overrides {
            data_dir: Some(dir.path().join("data")),
            api_addr: Some("127.0.0.1:0".into()),
            agent_addr: Some("127.0.0.1:0".into()),
            store: Some(url),
        };
        let config = FileConfig::default().resolve(&overrides).expect("valid config");
        assert!(matches!(config.store, StoreUrl::Postgres(_)));
        let initialized = init(&config.data_dir, &config.store, &InitOptions::default()).await.expect("init");
        assert!(initialized.admin_token.starts_with("vwk_"));

        let host = start(&config).await.expect("starts on Postgres");
        let store = host.control().store();
        assert_eq!(store.kind(), "postgres");
        store.ping().await.expect("ping");
        let id: viworks_core::wire::AgentId = "gw-pg".parse().expect("id");
        store
            .enroll_agent(&store::AgentRecord::enrolled(id.clone(), "lab", host.control().now()))
            .await
            .expect("enroll");
        let agents = store.agents(&AgentFilter::default()).await.expect("agents");
        assert_eq!(agents.iter().map(|a| &a.agent_id).collect::<Vec<_>>(), vec![&id]);
        assert!(matches!(store.verify_audit().await.expect("verify"), store::ChainVerdict::Intact { .. }));
        host.shutdown().await;
    }
}
