//! The Postgres store: the same tables and semantics as the SQLite store, for several host
//! instances sharing one database. Each call runs on a pooled connection, writes in their own
//! transaction, so `Ok` means committed; serialisation that SQLite gets from its single writer
//! comes here from row locks, unique constraints and transaction-scoped advisory locks.
//!
//! ```text
//!   futures ──▶ deadpool (N connections) ──▶ one transaction per write ──▶ COMMIT ──▶ reply
//!   open    ──▶ pg_advisory_xact_lock(migrations) ──▶ pending migrations ──▶ COMMIT
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{IsolationLevel, NoTls, Row};
use viworks_core::Timestamp;
use viworks_core::idempotency::{
    DEFAULT_TTL, IdempotencyError, IdempotencyKey, IdempotencyRecord, JobId, Recorded, RequestDigest, Resolution,
    ResultDigest, classify_result, resolve,
};
use viworks_core::session::{CommandRecord, CommandState, DeadLetter, NewCommand, Terminal};
use viworks_core::wire::{AgentId, CommandId, CommandResult, Hello, MetricKey, ResultError, ResultStatus, Verb};

mod cluster;

use super::columns::{
    PER_TARGET_COUNTS, StateColumns, check_bounds, corrupt, id_from, json_from, json_text, limit_sql, millis_of, now,
    session_from, targets, ts_from, ts_sql, u32_from, u64_from, u64_sql,
};
use super::{
    AgentFilter, AgentRecord, AuditEntry, AuditFilter, CancelOutcome, ChainVerdict, ClaimScope, CommandFilter,
    DeadLetterRow, InstanceRecord, JobInsert, JobRecord, NewAudit, PoolStatus, PresenceClaim, QueueBounds, Role, Store,
    StoreError, StoreStats, StoredCommand, StoredResult, TelemetryQuery, TelemetryRow, TokenRecord, Wakeup,
};
use crate::audit::chain::{self, Link, Prepared};

/// The schema, one entry per version: entry `i` takes the database from version `i` to `i + 1`.
/// Append only; never edit an entry that has shipped.
const MIGRATIONS: &[&str] = &[
    // Version 1. Times are BIGINT milliseconds since the Unix epoch; JSON is TEXT, kept byte for
    // byte (the audit chain hashes it). Keys compare bytewise (`COLLATE "C"`), as in SQLite, so
    // order and keyset pagination do not depend on the server's locale.
    r#"
    CREATE TABLE agents (
        agent_id        TEXT COLLATE "C" PRIMARY KEY,
        site            TEXT COLLATE "C" NOT NULL,
        hostname        TEXT NOT NULL,
        version         TEXT NOT NULL,
        capabilities    TEXT NOT NULL,
        max_concurrency BIGINT NOT NULL,
        revoked         BOOLEAN NOT NULL,
        maintenance     BOOLEAN NOT NULL,
        enrolled_at     BIGINT NOT NULL,
        last_seen       BIGINT,
        connected       BOOLEAN NOT NULL
    );
    CREATE INDEX agents_site ON agents (site, connected, agent_id);

    CREATE TABLE jobs (
        job_id          TEXT COLLATE "C" PRIMARY KEY,
        req_id          TEXT NOT NULL,
        actor           TEXT NOT NULL,
        verb            TEXT NOT NULL,
        args            TEXT NOT NULL,
        created_at      BIGINT NOT NULL,
        idempotency_key TEXT COLLATE "C" UNIQUE,
        request_digest  TEXT
    );

    CREATE TABLE commands (
        command_id        TEXT COLLATE "C" PRIMARY KEY,
        job_id            TEXT COLLATE "C" NOT NULL REFERENCES jobs (job_id),
        agent_id          TEXT COLLATE "C" NOT NULL,
        verb              TEXT COLLATE "C" NOT NULL,
        args              TEXT NOT NULL,
        timeout_ms        BIGINT NOT NULL,
        state             TEXT COLLATE "C" NOT NULL,
        not_before        BIGINT,
        session           BIGINT,
        deadline          BIGINT,
        terminal_reason   TEXT,
        terminal_attempts BIGINT,
        attempts          BIGINT NOT NULL,
        submitted_at      BIGINT NOT NULL,
        updated_at        BIGINT NOT NULL,
        order_seq         BIGINT NOT NULL UNIQUE
    );
    CREATE INDEX commands_agent ON commands (agent_id, order_seq);
    CREATE INDEX commands_state ON commands (state, order_seq);
    CREATE INDEX commands_job ON commands (job_id, order_seq);

    CREATE TABLE command_results (
        correlation_id TEXT COLLATE "C" PRIMARY KEY,
        agent_id       TEXT COLLATE "C" NOT NULL,
        status         TEXT NOT NULL,
        exit_code      BIGINT,
        output         TEXT NOT NULL,
        error          TEXT,
        duration_ms    BIGINT NOT NULL,
        digest         TEXT NOT NULL,
        received_at    BIGINT NOT NULL
    );

    CREATE TABLE telemetry (
        agent_id   TEXT COLLATE "C" NOT NULL,
        ts         BIGINT NOT NULL,
        metric_key TEXT COLLATE "C" NOT NULL,
        value      DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (agent_id, ts, metric_key)
    );
    CREATE INDEX telemetry_metric ON telemetry (agent_id, metric_key, ts);
    -- The newest sample time, kept per batch, so that stats need not scan the table.
    CREATE TABLE telemetry_watermark (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        latest_ts BIGINT NOT NULL
    );

    CREATE TABLE audit_log (
        seq         BIGINT PRIMARY KEY,
        ts          BIGINT NOT NULL,
        req_id      TEXT NOT NULL,
        actor       TEXT COLLATE "C" NOT NULL,
        action      TEXT COLLATE "C" NOT NULL,
        args_hash   TEXT NOT NULL,
        targets     TEXT NOT NULL,
        rc          TEXT NOT NULL,
        duration_ms BIGINT NOT NULL,
        detail      TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        hash        TEXT NOT NULL
    );
    CREATE INDEX audit_action ON audit_log (action, seq);
    CREATE INDEX audit_actor ON audit_log (actor, seq);

    CREATE TABLE dead_letters (
        -- Insertion order, the tie-break of "newest first" (SQLite's rowid).
        id         BIGINT GENERATED ALWAYS AS IDENTITY,
        command_id TEXT COLLATE "C" PRIMARY KEY REFERENCES commands (command_id),
        agent_id   TEXT COLLATE "C" NOT NULL,
        reason     TEXT NOT NULL,
        attempts   BIGINT NOT NULL,
        at         BIGINT NOT NULL
    );
    CREATE INDEX dead_letters_at ON dead_letters (at, id);

    CREATE TABLE api_tokens (
        token_hash TEXT COLLATE "C" PRIMARY KEY,
        name       TEXT NOT NULL,
        role       TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        revoked    BOOLEAN NOT NULL
    );
    "#,
    // Version 2: instances sharing the database, the presence of each connected agent, and
    // which instance holds each unfinished command.
    r#"
    CREATE TABLE instances (
        instance_id TEXT COLLATE "C" PRIMARY KEY,
        name        TEXT NOT NULL,
        started_at  BIGINT NOT NULL,
        lease_until BIGINT NOT NULL
    );

    CREATE TABLE presence (
        agent_id    TEXT COLLATE "C" PRIMARY KEY,
        instance_id TEXT COLLATE "C" NOT NULL,
        session     BIGINT NOT NULL,
        since       BIGINT NOT NULL
    );
    CREATE INDEX presence_instance ON presence (instance_id);

    ALTER TABLE commands ADD COLUMN owner TEXT COLLATE "C";
    CREATE INDEX commands_unfinished ON commands (agent_id) WHERE state IN ('queued', 'sent', 'acked');
    CREATE INDEX commands_owner ON commands (owner) WHERE owner IS NOT NULL;
    "#,
];

/// The states a command leaves; every other state name is terminal.
const UNFINISHED: &str = "('queued', 'sent', 'acked')";

/// Rows per multi-row telemetry upsert: 4 parameters each, under the protocol's 65,535.
const TELEMETRY_CHUNK: usize = 4096;

/// Rows per multi-row audit insert: 12 parameters each, under the protocol's 65,535.
const AUDIT_CHUNK: usize = 256;

/// One audit row's parameters, in [`AUDIT_COLUMNS`] order.
struct AuditColumns<'a> {
    seq: i64,
    ts: i64,
    req_id: Cow<'a, str>,
    actor: Cow<'a, str>,
    action: Cow<'a, str>,
    args_hash: Cow<'a, str>,
    targets: &'a str,
    rc: Cow<'a, str>,
    duration_ms: i64,
    detail: &'a str,
    prev_hash: String,
    hash: String,
}

/// Advisory lock keys `(namespace, key)` of this store. The namespace keeps them apart from
/// any other user of advisory locks in the same database.
const LOCK_NAMESPACE: i32 = 0x5657_5331;
/// Held while migrating, so that instances starting at once migrate exactly once.
const LOCK_MIGRATIONS: i32 = 1;
/// Held while appending to the audit chain, so that no two appends share a predecessor.
const LOCK_AUDIT: i32 = 2;
/// Held while a job is checked against the queue bounds and numbered, so that the bounds and
/// the order hold across instances.
const LOCK_SUBMIT: i32 = 3;
/// The channel instances notify each other on (see [`Wakeup`](super::Wakeup)).
const CHANNEL: &str = "viworks_dispatch";
/// Namespace of the per-key locks taken while resolving an idempotency key.
const LOCK_NAMESPACE_IDEMPOTENCY: i32 = 0x5657_5332;

/// How the store is sized. [`Default`]: 16 connections, 5 s to connect, 30 s per statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Most connections open at once, hence calls running at once (at least 1).
    pub pool_size: usize,
    /// How long opening one connection may take, used when the connection string sets none.
    pub connect_timeout: Duration,
    /// The server cancels a statement running longer than this (`statement_timeout`); `None`
    /// leaves the server's setting.
    pub statement_timeout: Option<Duration>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// The Postgres implementation of [`Store`]. Cheap to clone: clones share one pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// For the listening connection, which lives outside the pool.
    config: Arc<tokio_postgres::Config>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresStore")
            .field("connections", &status.size)
            .field("idle", &status.available)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database named by `url` (a `postgres://` URL or `key=value` string),
    /// applies pending migrations and returns the store.
    ///
    /// Fails with [`StoreError::Database`] when the URL is invalid or the database cannot be
    /// reached or migrated, and with [`StoreError::SchemaTooNew`] when a newer build migrated it.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let config = url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| StoreError::Database(format!("invalid Postgres connection string: {e}")))?;
        Self::connect_with(config, options).await
    }

    /// [`connect`](Self::connect) with a parsed configuration.
    pub async fn connect_with(
        mut config: tokio_postgres::Config,
        options: PostgresOptions,
    ) -> Result<Self, StoreError> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if let Some(timeout) = options.statement_timeout {
            let setting = format!("-c statement_timeout={}", millis_of(timeout).max(1));
            let combined = match config.get_options() {
                Some(existing) if !existing.is_empty() => format!("{existing} {setting}"),
                _ => setting,
            };
            config.options(combined);
        }
        let listen_config = Arc::new(config.clone());
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .create_timeout(Some(options.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Database(format!("cannot build the connection pool: {e}")))?;
        let store = PostgresStore { pool, config: listen_config };
        store.migrate().await?;
        Ok(store)
    }

    /// Closes the pool: idle connections close now, busy ones when their call ends. Calls
    /// through any clone after this fail with [`StoreError::Closed`].
    pub async fn close(self) {
        self.pool.close();
        // Give calls still running a moment to hand their connections back and close them.
        for _ in 0..100 {
            if self.pool.status().size == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Closed => StoreError::Closed,
            PoolError::Backend(e) => StoreError::Database(format!("cannot connect: {e}")),
            other => StoreError::Database(format!("no database connection: {other}")),
        })
    }

    /// Applies pending migrations in one transaction under an advisory lock: instances opening
    /// the same database at once wait for each other, and the later ones find nothing to do.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NAMESPACE, &LOCK_MIGRATIONS]).await.db()?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .db()?;
        let found: i64 = get(
            &tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await.db()?,
            0,
            "schema_migrations",
        )?;
        let found = u32::try_from(found)
            .map_err(|_| corrupt("schema_migrations", format!("version {found} is out of range")))?;
        let supported = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        for (version, sql) in (1..).zip(MIGRATIONS.iter()).skip(usize::try_from(found).unwrap_or(usize::MAX)) {
            let version: u32 = version;
            tx.batch_execute(sql)
                .await
                .map_err(|e| StoreError::Database(format!("migration {version} failed: {e}")))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[&i64::from(version), &ts_sql(now())],
            )
            .await
            .db()?;
            tracing::info!(version, "applied database migration");
        }
        tx.commit().await.db()
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions between domain values and columns

/// `.db()`: a driver error as a store error.
trait PgResult<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> PgResult<T> for Result<T, tokio_postgres::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Database(describe(&e)))
    }
}

/// The server's own message when there is one, else the driver's.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// An insert's error: a unique violation is [`StoreError::Exists`] of `what`, which is given
/// the violated constraint's name.
fn insert_error(e: &tokio_postgres::Error, what: impl FnOnce(&str) -> String) -> StoreError {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::UNIQUE_VIOLATION => StoreError::Exists(what(db.constraint().unwrap_or(""))),
        _ => StoreError::Database(describe(e)),
    }
}

/// Column `index` of `row`: a value of the wrong type or an unexpected NULL is a corrupt row.
fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize, table: &'static str) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| {
        let column = row.columns().get(index).map_or("?", |c| c.name());
        corrupt(table, format!("column {column}: {e}"))
    })
}

/// The second half of a two-key advisory lock for an idempotency key.
fn key_lock(key: &IdempotencyKey) -> i32 {
    let hash = blake3::hash(key.as_str().as_bytes());
    let bytes = hash.as_bytes();
    i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Parameters of a query built at run time.
#[derive(Default)]
struct Params(Vec<Box<dyn ToSql + Sync + Send>>);

impl Params {
    /// Adds `value` and returns its placeholder, `$n`.
    fn push(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.0.push(Box::new(value));
        format!("${}", self.0.len())
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
    }
}

/// The `VALUES` list of a multi-row insert: `rows` groups of `width` placeholders numbered
/// from `$1`, as in `($1, $2), ($3, $4)`.
fn values(rows: usize, width: usize) -> String {
    let row = |r: usize| {
        let placeholders: Vec<String> = (1..=width).map(|c| format!("${}", r * width + c)).collect();
        format!("({})", placeholders.join(", "))
    };
    (0..rows).map(row).collect::<Vec<_>>().join(", ")
}

/// Runs `sql` and decodes every row with `decode`.
async fn collect<C: GenericClient, T>(
    client: &C,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    decode: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let statement = client.prepare_cached(sql).await.db()?;
    let rows = client.query(&statement, params).await.db()?;
    rows.iter().map(decode).collect()
}

// ---------------------------------------------------------------------------------------------
// Agents

const AGENT_COLUMNS: &str = "agent_id, site, hostname, version, capabilities, max_concurrency, revoked, maintenance, \
                             enrolled_at, last_seen, connected";

fn decode_agent(row: &Row) -> Result<AgentRecord, StoreError> {
    const T: &str = "agents";
    Ok(AgentRecord {
        agent_id: id_from(get(row, 0, T)?, T, "agent_id")?,
        site: get(row, 1, T)?,
        hostname: get(row, 2, T)?,
        version: get(row, 3, T)?,
        capabilities: json_from(get(row, 4, T)?, T, "capabilities")?,
        max_concurrency: u32_from(get(row, 5, T)?, T, "max_concurrency")?,
        revoked: get(row, 6, T)?,
        maintenance: get(row, 7, T)?,
        enrolled_at: ts_from(get(row, 8, T)?, T, "enrolled_at")?,
        last_seen: get::<Option<i64>>(row, 9, T)?.map(|t| ts_from(t, T, "last_seen")).transpose()?,
        connected: get(row, 10, T)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Commands

const COMMAND_COLUMNS: &str = "c.command_id, c.job_id, c.agent_id, c.verb, c.args, c.timeout_ms, c.state, \
                               c.not_before, c.session, c.deadline, c.terminal_reason, c.terminal_attempts, \
                               c.attempts, c.submitted_at, c.updated_at, c.order_seq";
const RESULT_COLUMNS: &str = "r.correlation_id, r.status, r.exit_code, r.output, r.error, r.duration_ms, r.received_at";

/// The state from columns 6 to 11 of a command row.
fn decode_state(row: &Row) -> Result<CommandState, StoreError> {
    const T: &str = "commands";
    let state: String = get(row, 6, T)?;
    let need = |index: usize, column: &str| -> Result<i64, StoreError> {
        get::<Option<i64>>(row, index, T)?.ok_or_else(|| corrupt(T, format!("state {state} without {column}")))
    };
    let terminal = match state.as_str() {
        "queued" => return Ok(CommandState::Queued { not_before: ts_from(need(7, "not_before")?, T, "not_before")? }),
        "sent" => return Ok(CommandState::Sent { session: session_from(need(8, "session")?) }),
        "acked" => return Ok(CommandState::Acked { deadline: ts_from(need(9, "deadline")?, T, "deadline")? }),
        "succeeded" => Terminal::Succeeded,
        "failed" => Terminal::Failed,
        "timed_out" => Terminal::TimedOut,
        "interrupted" => Terminal::Interrupted,
        "rejected" => Terminal::Rejected,
        "cancelled" => Terminal::Cancelled,
        "dead_lettered" => Terminal::DeadLettered(match get::<Option<&str>>(row, 10, T)? {
            Some("attempts_exhausted") => {
                DeadLetter::AttemptsExhausted(u32_from(need(11, "terminal_attempts")?, T, "terminal_attempts")?)
            }
            Some("queue_expired") => DeadLetter::QueueExpired,
            Some("no_result") => DeadLetter::NoResult,
            other => return Err(corrupt(T, format!("unknown dead-letter reason {other:?}"))),
        }),
        other => return Err(corrupt(T, format!("unknown state {other:?}"))),
    };
    Ok(CommandState::Done(terminal))
}

/// Columns 0 to 15: the record, its job and when it last changed.
fn decode_command(row: &Row) -> Result<(CommandRecord, JobId, Timestamp), StoreError> {
    const T: &str = "commands";
    let state = decode_state(row)?;
    let record = CommandRecord {
        command: NewCommand {
            command_id: id_from(get(row, 0, T)?, T, "command_id")?,
            agent_id: id_from(get(row, 2, T)?, T, "agent_id")?,
            verb: id_from(get(row, 3, T)?, T, "verb")?,
            args: json_from(get(row, 4, T)?, T, "args")?,
            timeout: Duration::from_millis(u64_from(get(row, 5, T)?, T, "timeout_ms")?),
        },
        state,
        attempts: u32_from(get(row, 12, T)?, T, "attempts")?,
        submitted_at: ts_from(get(row, 13, T)?, T, "submitted_at")?,
        order: u64_from(get(row, 15, T)?, T, "order_seq")?,
    };
    let job_id: &str = get(row, 1, T)?;
    let job_id = JobId::new(job_id).map_err(|e| corrupt(T, format!("job_id {job_id:?}: {e}")))?;
    Ok((record, job_id, ts_from(get(row, 14, T)?, T, "updated_at")?))
}

/// A command row followed by the result columns of a `LEFT JOIN command_results`.
fn decode_stored(row: &Row) -> Result<StoredCommand, StoreError> {
    const T: &str = "command_results";
    let (record, job_id, updated_at) = decode_command(row)?;
    let correlation: Option<&str> = get(row, 16, T)?;
    let result = match correlation {
        None => None,
        Some(_) => {
            let status: String = get(row, 17, T)?;
            let status: ResultStatus = serde_json::from_value(serde_json::Value::String(status.clone()))
                .map_err(|_| corrupt(T, format!("unknown status {status:?}")))?;
            let exit_code = get::<Option<i64>>(row, 18, T)?
                .map(|code| i32::try_from(code).map_err(|_| corrupt(T, format!("exit_code {code} is out of range"))))
                .transpose()?;
            let error: Option<ResultError> =
                get::<Option<&str>>(row, 20, T)?.map(|e| json_from(e, T, "error")).transpose()?;
            Some(StoredResult {
                result: CommandResult {
                    command_id: record.command.command_id.clone(),
                    status,
                    exit_code,
                    output: json_from(get(row, 19, T)?, T, "output")?,
                    error,
                    duration_ms: u64_from(get(row, 21, T)?, T, "duration_ms")?,
                },
                received_at: ts_from(get(row, 22, T)?, T, "received_at")?,
            })
        }
    };
    Ok(StoredCommand { record, job_id, updated_at, result })
}

/// A command record encoded for its row, built before any connection is taken.
struct PreparedCommand {
    command_id: String,
    agent_id: String,
    verb: String,
    args: String,
    timeout_ms: i64,
    state: StateColumns,
    attempts: i64,
    submitted_at: i64,
    order: i64,
}

impl PreparedCommand {
    fn of(record: &CommandRecord) -> Result<Self, StoreError> {
        Ok(PreparedCommand {
            command_id: record.command.command_id.as_str().to_owned(),
            agent_id: record.command.agent_id.as_str().to_owned(),
            verb: record.command.verb.as_str().to_owned(),
            args: json_text(&record.command.args)?,
            timeout_ms: u64_sql(millis_of(record.command.timeout)),
            state: StateColumns::of(&record.state),
            attempts: i64::from(record.attempts),
            submitted_at: ts_sql(record.submitted_at),
            order: u64_sql(record.order),
        })
    }
}

/// Unfinished commands stored now: in all, and for each target agent of `records` that has any.
async fn unfinished_counts<C: GenericClient>(
    client: &C,
    records: &[CommandRecord],
) -> Result<(u64, std::collections::BTreeMap<String, u64>), StoreError> {
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let total: i64 =
        client.query_one(&format!("SELECT COUNT(*) FROM commands WHERE state IN {UNFINISHED}"), &[]).await.db()?.get(0);
    let agents = targets(records);
    let rows = if agents.len() <= PER_TARGET_COUNTS {
        let sql = format!(
            "SELECT agent_id, COUNT(*) FROM commands WHERE agent_id = ANY($1) AND state IN {UNFINISHED} GROUP BY agent_id"
        );
        client.query(&sql, &[&agents]).await.db()?
    } else {
        let sql = format!("SELECT agent_id, COUNT(*) FROM commands WHERE state IN {UNFINISHED} GROUP BY agent_id");
        client.query(&sql, &[]).await.db()?
    };
    let mut per_agent = std::collections::BTreeMap::new();
    for row in rows {
        per_agent.insert(get::<String>(&row, 0, "commands")?, count(get(&row, 1, "commands")?));
    }
    Ok((count(total), per_agent))
}

/// Writes an unfinished command's new state (and its dead letter, when that is the state),
/// returning whether it did. A terminal state is final: a stale or repeated record never
/// reopens or re-finishes a command, so each command keeps exactly one terminal state; the
/// command's content, order and submission time were fixed by create_job. With `releasing`,
/// only a command that instance holds is written, and it is let go of.
async fn write_state<C: GenericClient>(
    client: &C,
    command: &PreparedCommand,
    at: i64,
    releasing: Option<&str>,
) -> Result<bool, StoreError> {
    let s = &command.state;
    let update = client
        .prepare_cached(&format!(
            "UPDATE commands SET state = $2, not_before = $3, session = $4, deadline = $5, \
             terminal_reason = $6, terminal_attempts = $7, attempts = $8, updated_at = $9, \
             owner = CASE WHEN $10::text IS NULL THEN owner END \
             WHERE command_id = $1 AND state IN {UNFINISHED} AND ($10::text IS NULL OR owner = $10::text)"
        ))
        .await
        .db()?;
    let changed = client
        .execute(
            &update,
            &[
                &command.command_id,
                &s.name,
                &s.not_before,
                &s.session,
                &s.deadline,
                &s.reason,
                &s.reason_attempts,
                &command.attempts,
                &at,
                &releasing,
            ],
        )
        .await
        .db()?;
    if changed > 0 {
        insert_dead_letter(client, command, at).await?;
    }
    Ok(changed > 0)
}

const INSERT_DEAD_LETTER: &str = "INSERT INTO dead_letters (command_id, agent_id, reason, attempts, at) \
                                  VALUES ($1, $2, $3, $4, $5) ON CONFLICT (command_id) DO NOTHING";

async fn insert_dead_letter<C: GenericClient>(
    client: &C,
    command: &PreparedCommand,
    at: i64,
) -> Result<(), StoreError> {
    if let Some(reason) = command.state.reason {
        let statement = client.prepare_cached(INSERT_DEAD_LETTER).await.db()?;
        client
            .execute(&statement, &[&command.command_id, &command.agent_id, &reason, &command.attempts, &at])
            .await
            .db()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Jobs

fn decode_job(row: &Row) -> Result<JobRecord, StoreError> {
    const T: &str = "jobs";
    let key: Option<&str> = get(row, 6, T)?;
    let digest: Option<&str> = get(row, 7, T)?;
    let idempotency = match (key, digest) {
        (Some(key), Some(digest)) => Some((
            IdempotencyKey::new(key).map_err(|e| corrupt(T, format!("idempotency_key {key:?}: {e}")))?,
            RequestDigest::from_hex(digest).map_err(|e| corrupt(T, format!("request_digest: {e}")))?,
        )),
        (Some(_), None) => return Err(corrupt(T, "idempotency_key without request_digest")),
        // A key released after it expired leaves its digest behind.
        (None, _) => None,
    };
    let job_id: &str = get(row, 0, T)?;
    Ok(JobRecord {
        job_id: JobId::new(job_id).map_err(|e| corrupt(T, format!("job_id {job_id:?}: {e}")))?,
        req_id: get(row, 1, T)?,
        actor: get(row, 2, T)?,
        verb: id_from::<Verb>(get(row, 3, T)?, T, "verb")?,
        args: json_from(get(row, 4, T)?, T, "args")?,
        created_at: ts_from(get(row, 5, T)?, T, "created_at")?,
        idempotency,
    })
}

// ---------------------------------------------------------------------------------------------
// Audit

const AUDIT_COLUMNS: &str =
    "seq, ts, req_id, actor, action, args_hash, targets, rc, duration_ms, detail, prev_hash, hash";

fn decode_audit(row: &Row) -> Result<AuditEntry, StoreError> {
    const T: &str = "audit_log";
    let seq: i64 = get(row, 0, T)?;
    Ok(AuditEntry {
        seq: u64::try_from(seq).map_err(|_| corrupt(T, format!("seq {seq} is negative")))?,
        content: NewAudit {
            ts: ts_from(get(row, 1, T)?, T, "ts")?,
            req_id: get(row, 2, T)?,
            actor: get(row, 3, T)?,
            action: get(row, 4, T)?,
            args_hash: get(row, 5, T)?,
            targets: json_from(get(row, 6, T)?, T, "targets")?,
            rc: get(row, 7, T)?,
            duration_ms: u64_from(get(row, 8, T)?, T, "duration_ms")?,
            detail: json_from(get(row, 9, T)?, T, "detail")?,
        },
        prev_hash: get(row, 10, T)?,
        hash: get(row, 11, T)?,
    })
}

fn decode_telemetry(row: &Row) -> Result<TelemetryRow, StoreError> {
    const T: &str = "telemetry";
    Ok(TelemetryRow {
        agent_id: id_from(get(row, 0, T)?, T, "agent_id")?,
        ts: ts_from(get(row, 1, T)?, T, "ts")?,
        metric_key: id_from::<MetricKey>(get(row, 2, T)?, T, "metric_key")?,
        value: get(row, 3, T)?,
    })
}

// ---------------------------------------------------------------------------------------------
// The store

impl Store for PostgresStore {
    async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.db()?;
        Ok(start.elapsed())
    }

    async fn enroll_agent(&self, agent: &AgentRecord) -> Result<(), StoreError> {
        let capabilities = json_text(&agent.capabilities)?;
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "INSERT INTO agents ({AGENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            ))
            .await
            .db()?;
        client
            .execute(
                &statement,
                &[
                    &agent.agent_id.as_str(),
                    &agent.site,
                    &agent.hostname,
                    &agent.version,
                    &capabilities,
                    &i64::from(agent.max_concurrency),
                    &agent.revoked,
                    &agent.maintenance,
                    &ts_sql(agent.enrolled_at),
                    &agent.last_seen.map(ts_sql),
                    &agent.connected,
                ],
            )
            .await
            .map_err(|e| insert_error(&e, |_| format!("agent {}", agent.agent_id)))?;
        Ok(())
    }

    async fn agent(&self, id: &AgentId) -> Result<Option<AgentRecord>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = $1");
        let rows = collect(&client, &sql, &[&id.as_str()], decode_agent).await?;
        Ok(rows.into_iter().next())
    }

    async fn agents_named(&self, ids: &[AgentId]) -> Result<Vec<AgentRecord>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(AgentId::as_str).collect();
        let client = self.client().await?;
        let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ANY($1)");
        collect(&client, &sql, &[&ids], decode_agent).await
    }

    async fn agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>, StoreError> {
        let mut sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE TRUE");
        let mut params = Params::default();
        if let Some(site) = &filter.site {
            sql.push_str(&format!(" AND site = {}", params.push(site.clone())));
        }
        if let Some(capability) = &filter.capability {
            let p = params.push(capability.clone());
            sql.push_str(&format!(" AND capabilities::jsonb @> jsonb_build_array({p}::text)"));
        }
        if let Some(connected) = filter.connected {
            sql.push_str(&format!(" AND connected = {}", params.push(connected)));
        }
        if !filter.include_revoked {
            sql.push_str(" AND NOT revoked");
        }
        if let Some(after) = &filter.after {
            sql.push_str(&format!(" AND agent_id > {}", params.push(after.as_str().to_owned())));
        }
        sql.push_str(&format!(" ORDER BY agent_id LIMIT {}", params.push(limit_sql(filter.limit, 1000))));
        let client = self.client().await?;
        collect(&client, &sql, &params.refs(), decode_agent).await
    }

    async fn agent_connected(&self, hello: &Hello, at: Timestamp) -> Result<bool, StoreError> {
        let capabilities = json_text(&hello.capabilities)?;
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE agents SET hostname = $2, version = $3, capabilities = $4, max_concurrency = $5, \
                 connected = TRUE, last_seen = $6 WHERE agent_id = $1",
            )
            .await
            .db()?;
        let changed = client
            .execute(
                &statement,
                &[
                    &hello.agent_id.as_str(),
                    &hello.hostname.as_str(),
                    &hello.version.as_str(),
                    &capabilities,
                    &i64::from(hello.max_concurrency),
                    &ts_sql(at),
                ],
            )
            .await
            .db()?;
        Ok(changed > 0)
    }

    async fn agent_disconnected(&self, id: &AgentId, at: Timestamp) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("UPDATE agents SET connected = FALSE, last_seen = $2 WHERE agent_id = $1")
            .await
            .db()?;
        client.execute(&statement, &[&id.as_str(), &ts_sql(at)]).await.db()?;
        Ok(())
    }

    async fn set_revoked(&self, id: &AgentId, revoked: bool) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached("UPDATE agents SET revoked = $2 WHERE agent_id = $1").await.db()?;
        Ok(client.execute(&statement, &[&id.as_str(), &revoked]).await.db()? > 0)
    }

    async fn set_maintenance(&self, id: &AgentId, on: bool) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client.prepare_cached("UPDATE agents SET maintenance = $2 WHERE agent_id = $1").await.db()?;
        Ok(client.execute(&statement, &[&id.as_str(), &on]).await.db()? > 0)
    }

    async fn create_job(
        &self,
        job: &JobRecord,
        commands: &[CommandRecord],
        bounds: QueueBounds,
        claimant: Option<&str>,
    ) -> Result<JobInsert, StoreError> {
        let args = json_text(&job.args)?;
        let records = commands;
        let mut commands = commands.iter().map(PreparedCommand::of).collect::<Result<Vec<_>, _>>()?;
        let mut client = self.client().await?;
        // Dropping the transaction on any error below rolls it back: all or nothing.
        let tx = client.transaction().await.db()?;
        if let Some((key, digest)) = &job.idempotency {
            // Two instances resolving the same key wait for each other here, so the second
            // sees the first's job instead of racing it to the unique index.
            tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NAMESPACE_IDEMPOTENCY, &key_lock(key)])
                .await
                .db()?;
            let earlier = tx
                .query_opt(
                    "SELECT job_id, request_digest, created_at FROM jobs WHERE idempotency_key = $1",
                    &[&key.as_str()],
                )
                .await
                .db()?;
            let earlier = earlier
                .map(|row| {
                    const T: &str = "jobs";
                    let job_id: &str = get(&row, 0, T)?;
                    let stored: Option<&str> = get(&row, 1, T)?;
                    let stored = stored.ok_or_else(|| corrupt(T, "idempotency_key without request_digest"))?;
                    Ok::<_, StoreError>(IdempotencyRecord {
                        key: key.clone(),
                        digest: RequestDigest::from_hex(stored)
                            .map_err(|e| corrupt(T, format!("request_digest: {e}")))?,
                        job_id: JobId::new(job_id).map_err(|e| corrupt(T, format!("job_id {job_id:?}: {e}")))?,
                        created_at: ts_from(get(&row, 2, T)?, T, "created_at")?,
                    })
                })
                .transpose()?;
            // The job's acceptance time is the `now` of the rule: the store reads no clock for
            // decisions a test must be able to replay.
            match resolve(earlier.as_ref(), key, *digest, job.created_at, DEFAULT_TTL) {
                Ok(Resolution::Existing(job_id)) => return Ok(JobInsert::Existing(job_id)),
                Ok(Resolution::New) => {
                    if let Some(expired) = earlier {
                        // The key expired: release it from the old job so this one can take it.
                        tx.execute(
                            "UPDATE jobs SET idempotency_key = NULL WHERE job_id = $1",
                            &[&expired.job_id.as_str()],
                        )
                        .await
                        .db()?;
                    }
                }
                Err(IdempotencyError::Conflict { key }) => return Err(StoreError::IdempotencyConflict(key)),
                Err(other) => return Err(StoreError::Database(other.to_string())),
            }
        }
        let (key, digest) = match &job.idempotency {
            Some((key, digest)) => (Some(key.as_str()), Some(digest.to_hex())),
            None => (None, None),
        };
        let created_at = ts_sql(job.created_at);
        tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NAMESPACE, &LOCK_SUBMIT]).await.db()?;
        let (total, per_agent) = unfinished_counts(&tx, records).await?;
        check_bounds(records, total, &per_agent, bounds)?;
        let first: i64 = tx.query_one("SELECT COALESCE(MAX(order_seq), -1) + 1 FROM commands", &[]).await.db()?.get(0);
        for (command, order) in commands.iter_mut().zip(first..) {
            command.order = order;
        }
        // The agents whose presence the claimant holds: their commands are stored held by it.
        let present: HashSet<String> = match claimant {
            Some(id) => {
                let agents: Vec<&str> = commands.iter().map(|c| c.agent_id.as_str()).collect();
                let rows = tx
                    .query(
                        "SELECT agent_id FROM presence WHERE instance_id = $1 AND agent_id = ANY($2)",
                        &[&id, &agents],
                    )
                    .await
                    .db()?;
                rows.iter().map(|row| get::<String>(row, 0, "presence")).collect::<Result<_, _>>()?
            }
            None => HashSet::new(),
        };
        let owner = |command: &PreparedCommand| claimant.filter(|_| present.contains(&command.agent_id));
        tx.execute(
            "INSERT INTO jobs (job_id, req_id, actor, verb, args, created_at, idempotency_key, request_digest) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[&job.job_id.as_str(), &job.req_id, &job.actor, &job.verb.as_str(), &args, &created_at, &key, &digest],
        )
        .await
        .map_err(|e| insert_error(&e, |_| format!("job {}", job.job_id)))?;
        let insert = tx
            .prepare_cached(
                "INSERT INTO commands (command_id, job_id, agent_id, verb, args, timeout_ms, state, not_before, \
                 session, deadline, terminal_reason, terminal_attempts, attempts, submitted_at, updated_at, \
                 order_seq, owner) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            )
            .await
            .db()?;
        let job_id = job.job_id.as_str();
        // Sent at once and answered in order: one round trip for the whole job.
        let inserts = commands.iter().map(|command| {
            let s = &command.state;
            let (tx, insert) = (&tx, &insert);
            async move {
                tx.execute(
                    insert,
                    &[
                        &command.command_id,
                        &job_id,
                        &command.agent_id,
                        &command.verb,
                        &command.args,
                        &command.timeout_ms,
                        &s.name,
                        &s.not_before,
                        &s.session,
                        &s.deadline,
                        &s.reason,
                        &s.reason_attempts,
                        &command.attempts,
                        &command.submitted_at,
                        &created_at,
                        &command.order,
                        &owner(command),
                    ],
                )
                .await
                .map_err(|e| {
                    insert_error(&e, |constraint| {
                        if constraint.contains("order_seq") {
                            format!("command order {}", command.order)
                        } else {
                            format!("command {}", command.command_id)
                        }
                    })
                })
            }
        });
        futures_util::future::try_join_all(inserts).await?;
        for command in &commands {
            insert_dead_letter(&tx, command, created_at).await?;
        }
        let mut claimed = Vec::new();
        for (command, record) in commands.iter().zip(records) {
            if owner(command).is_some() {
                claimed
                    .push(CommandRecord { order: u64_from(command.order, "commands", "order_seq")?, ..record.clone() });
            }
        }
        if claimed.len() < commands.len() {
            // Delivered to every listening instance when, and only if, the job commits.
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("job:{job_id}")]).await.db()?;
        }
        tx.commit().await.db()?;
        Ok(JobInsert::Created { claimed })
    }

    async fn save_commands(&self, records: &[CommandRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let commands = records.iter().map(PreparedCommand::of).collect::<Result<Vec<_>, _>>()?;
        let at = ts_sql(now());
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let known = tx.prepare_cached("SELECT 1 FROM commands WHERE command_id = $1").await.db()?;
        for command in &commands {
            if write_state(&tx, command, at, None).await? {
                continue;
            }
            if tx.query_opt(&known, &[&command.command_id]).await.db()?.is_none() {
                return Err(StoreError::Database(format!(
                    "command {} is not stored; create_job stores commands before their lifecycle is saved",
                    command.command_id
                )));
            }
        }
        tx.commit().await.db()
    }

    async fn max_order(&self) -> Result<Option<u64>, StoreError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT MAX(order_seq) FROM commands", &[]).await.db()?;
        let max: Option<i64> = get(&row, 0, "commands")?;
        max.map(|n| u64_from(n, "commands", "order_seq")).transpose()
    }

    async fn unfinished_commands(&self) -> Result<Vec<CommandRecord>, StoreError> {
        let client = self.client().await?;
        let sql =
            format!("SELECT {COMMAND_COLUMNS} FROM commands c WHERE c.state IN {UNFINISHED} ORDER BY c.order_seq");
        collect(&client, &sql, &[], |row| decode_command(row).map(|(record, _, _)| record)).await
    }

    async fn command(&self, id: &CommandId) -> Result<Option<StoredCommand>, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {COMMAND_COLUMNS}, {RESULT_COLUMNS} FROM commands c \
             LEFT JOIN command_results r ON r.correlation_id = c.command_id WHERE c.command_id = $1"
        );
        Ok(collect(&client, &sql, &[&id.as_str()], decode_stored).await?.into_iter().next())
    }

    async fn commands(&self, filter: &CommandFilter) -> Result<Vec<StoredCommand>, StoreError> {
        let mut sql = format!(
            "SELECT {COMMAND_COLUMNS}, {RESULT_COLUMNS} FROM commands c \
             LEFT JOIN command_results r ON r.correlation_id = c.command_id WHERE TRUE"
        );
        let mut params = Params::default();
        if let Some(status) = &filter.status {
            sql.push_str(&format!(" AND c.state = {}", params.push(status.clone())));
        }
        if let Some(agent) = &filter.agent {
            sql.push_str(&format!(" AND c.agent_id = {}", params.push(agent.as_str().to_owned())));
        }
        if let Some(verb) = &filter.verb {
            sql.push_str(&format!(" AND c.verb = {}", params.push(verb.as_str().to_owned())));
        }
        if let Some(before) = filter.before {
            sql.push_str(&format!(" AND c.order_seq < {}", params.push(u64_sql(before))));
        }
        sql.push_str(&format!(" ORDER BY c.order_seq DESC LIMIT {}", params.push(limit_sql(filter.limit, 1000))));
        let client = self.client().await?;
        collect(&client, &sql, &params.refs(), decode_stored).await
    }

    async fn job(&self, id: &JobId) -> Result<Option<(JobRecord, Vec<StoredCommand>)>, StoreError> {
        let mut client = self.client().await?;
        // One snapshot for the job and its commands.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .db()?;
        let job = collect(
            &tx,
            "SELECT job_id, req_id, actor, verb, args, created_at, idempotency_key, request_digest \
             FROM jobs WHERE job_id = $1",
            &[&id.as_str()],
            decode_job,
        )
        .await?;
        let Some(job) = job.into_iter().next() else { return Ok(None) };
        let sql = format!(
            "SELECT {COMMAND_COLUMNS}, {RESULT_COLUMNS} FROM commands c \
             LEFT JOIN command_results r ON r.correlation_id = c.command_id \
             WHERE c.job_id = $1 ORDER BY c.order_seq"
        );
        let commands = collect(&tx, &sql, &[&id.as_str()], decode_stored).await?;
        tx.commit().await.db()?;
        Ok(Some((job, commands)))
    }

    async fn save_result(
        &self,
        agent: &AgentId,
        result: &CommandResult,
        at: Timestamp,
    ) -> Result<Recorded, StoreError> {
        let digest = ResultDigest::of(result);
        let output = json_text(&result.output)?;
        let error = result.error.as_ref().map(json_text).transpose()?;
        let client = self.client().await?;
        // The first delivery inserts; a concurrent second one waits for it on the primary key
        // and then does nothing, so exactly one is `New` and the first is kept.
        let insert = client
            .prepare_cached(
                "INSERT INTO command_results (correlation_id, agent_id, status, exit_code, output, error, \
                 duration_ms, digest, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (correlation_id) DO NOTHING",
            )
            .await
            .db()?;
        let inserted = client
            .execute(
                &insert,
                &[
                    &result.command_id.as_str(),
                    &agent.as_str(),
                    &result.status.as_str(),
                    &result.exit_code.map(i64::from),
                    &output,
                    &error,
                    &u64_sql(result.duration_ms),
                    &digest.to_hex(),
                    &ts_sql(at),
                ],
            )
            .await
            .db()?;
        if inserted > 0 {
            return Ok(Recorded::New);
        }
        let select =
            client.prepare_cached("SELECT digest FROM command_results WHERE correlation_id = $1").await.db()?;
        let row = client.query_opt(&select, &[&result.command_id.as_str()]).await.db()?;
        let stored = row
            .map(|row| {
                let hex: &str = get(&row, 0, "command_results")?;
                ResultDigest::from_hex(hex).map_err(|e| corrupt("command_results", format!("digest: {e}")))
            })
            .transpose()?;
        match stored {
            Some(stored) => Ok(classify_result(Some(stored), digest)),
            None => Err(StoreError::Database(format!(
                "the result of {} conflicted with a stored one that is gone",
                result.command_id
            ))),
        }
    }

    async fn save_telemetry(&self, rows: &[TelemetryRow]) -> Result<usize, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        // One row per key, the batch's last value winning (an upsert may not touch a row twice
        // in one statement), sorted by key so that concurrent batches lock rows in one order
        // and cannot deadlock.
        let mut samples: HashMap<(&str, i64, &str), f64> = HashMap::with_capacity(rows.len());
        for row in rows {
            samples.insert((row.agent_id.as_str(), ts_sql(row.ts), row.metric_key.as_str()), row.value);
        }
        let mut samples: Vec<_> = samples.into_iter().collect();
        samples.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let latest = samples.iter().map(|((_, ts, _), _)| *ts).max().unwrap_or(0);
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let mut written = 0;
        for chunk in samples.chunks(TELEMETRY_CHUNK) {
            let mut sql =
                format!("INSERT INTO telemetry (agent_id, ts, metric_key, value) VALUES {}", values(chunk.len(), 4));
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(chunk.len() * 4);
            for ((agent, ts, key), value) in chunk {
                params.extend([agent as &(dyn ToSql + Sync), ts, key, value]);
            }
            sql.push_str(" ON CONFLICT (agent_id, ts, metric_key) DO UPDATE SET value = excluded.value");
            written += tx.execute(sql.as_str(), &params).await.db()?;
        }
        // Last, so that the one watermark row is locked as briefly as possible.
        tx.execute(
            "INSERT INTO telemetry_watermark (id, latest_ts) VALUES (1, $1) \
             ON CONFLICT (id) DO UPDATE SET latest_ts = GREATEST(telemetry_watermark.latest_ts, excluded.latest_ts)",
            &[&latest],
        )
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(usize::try_from(written).unwrap_or(usize::MAX))
    }

    async fn telemetry(&self, query: &TelemetryQuery) -> Result<Vec<TelemetryRow>, StoreError> {
        let mut params = Params::default();
        let mut sql = format!(
            "SELECT agent_id, ts, metric_key, value FROM telemetry WHERE agent_id = {}",
            params.push(query.agent_id.as_str().to_owned())
        );
        if let Some(metric) = &query.metric {
            sql.push_str(&format!(" AND metric_key = {}", params.push(metric.as_str().to_owned())));
        }
        if let Some(from) = query.from {
            sql.push_str(&format!(" AND ts >= {}", params.push(ts_sql(from))));
        }
        if let Some(to) = query.to {
            sql.push_str(&format!(" AND ts < {}", params.push(ts_sql(to))));
        }
        sql.push_str(&format!(" ORDER BY ts DESC, metric_key LIMIT {}", params.push(limit_sql(query.limit, 10_000))));
        let client = self.client().await?;
        collect(&client, &sql, &params.refs(), decode_telemetry).await
    }

    async fn latest_telemetry(&self, agent: &AgentId) -> Result<Vec<TelemetryRow>, StoreError> {
        let client = self.client().await?;
        // The newest row per metric, found through the (agent_id, metric_key, ts) index.
        let sql = "SELECT DISTINCT ON (metric_key) agent_id, ts, metric_key, value FROM telemetry \
                   WHERE agent_id = $1 ORDER BY metric_key, ts DESC";
        collect(&client, sql, &[&agent.as_str()], decode_telemetry).await
    }

    async fn append_audits(&self, records: Arc<[Prepared]>) -> Result<Vec<Link>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        // Held until the commit: appends from every instance follow each other, each reading
        // the head its predecessor committed, so no two share a predecessor.
        tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NAMESPACE, &LOCK_AUDIT]).await.db()?;
        let last = tx.query_opt("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1", &[]).await.db()?;
        let mut tip = match last {
            None => chain::Tip::EMPTY,
            Some(row) => {
                let seq: i64 = get(&row, 0, "audit_log")?;
                let hash: &str = get(&row, 1, "audit_log")?;
                chain::Tip::from_stored(seq, hash).map_err(|e| corrupt("audit_log", e))?
            }
        };
        let links: Vec<Link> = records.iter().map(|record| tip.link(record)).collect();
        let columns: Vec<AuditColumns<'_>> = records
            .iter()
            .zip(&links)
            .map(|(record, link)| AuditColumns {
                seq: u64_sql(link.seq),
                ts: ts_sql(record.ts()),
                req_id: record.req_id(),
                actor: record.actor(),
                action: record.action(),
                args_hash: record.args_hash(),
                targets: record.targets_json(),
                rc: record.rc(),
                duration_ms: u64_sql(record.duration_ms()),
                detail: record.detail_json(),
                prev_hash: chain::to_hex(&link.prev),
                hash: chain::to_hex(&link.hash),
            })
            .collect();
        for columns in columns.chunks(AUDIT_CHUNK) {
            let sql = format!("INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES {}", values(columns.len(), 12));
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(columns.len() * 12);
            for c in columns {
                params.extend([
                    &c.seq as &(dyn ToSql + Sync),
                    &c.ts,
                    &c.req_id,
                    &c.actor,
                    &c.action,
                    &c.args_hash,
                    &c.targets,
                    &c.rc,
                    &c.duration_ms,
                    &c.detail,
                    &c.prev_hash,
                    &c.hash,
                ]);
            }
            tx.execute(sql.as_str(), &params).await.db()?;
        }
        tx.commit().await.db()?;
        Ok(links)
    }

    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE TRUE");
        let mut params = Params::default();
        if let Some(action) = &filter.action {
            sql.push_str(&format!(" AND action = {}", params.push(action.clone())));
        }
        if let Some(actor) = &filter.actor {
            sql.push_str(&format!(" AND actor = {}", params.push(actor.clone())));
        }
        if let Some(before) = filter.before {
            sql.push_str(&format!(" AND seq < {}", params.push(u64_sql(before))));
        }
        sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", params.push(limit_sql(filter.limit, 1000))));
        let client = self.client().await?;
        collect(&client, &sql, &params.refs(), decode_audit).await
    }

    async fn verify_audit(&self) -> Result<ChainVerdict, StoreError> {
        use futures_util::StreamExt;

        let client = self.client().await?;
        // One statement is one snapshot: appends committed meanwhile are not seen. Rows stream
        // from the server to a blocking task that walks the chain, never all in memory.
        let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq");
        let rows = client.query_raw(sql.as_str(), std::iter::empty::<i64>()).await.db()?;
        let (send, mut receive) = tokio::sync::mpsc::channel::<AuditEntry>(256);
        let walker = tokio::task::spawn_blocking(move || chain::verify(std::iter::from_fn(|| receive.blocking_recv())));
        let mut rows = std::pin::pin!(rows);
        let mut stopped: Option<Result<ChainVerdict, StoreError>> = None;
        while let Some(row) = rows.next().await {
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    stopped = Some(Err(StoreError::Database(describe(&e))));
                    break;
                }
            };
            let seq = row.try_get::<_, i64>(0).unwrap_or(-1);
            match decode_audit(&row) {
                Ok(entry) => {
                    if send.send(entry).await.is_err() {
                        // The walker stopped at a broken link: its verdict is the answer.
                        break;
                    }
                }
                Err(e) => {
                    // A row that cannot even be read was altered: that is a broken link, not a
                    // failure to check.
                    let seq = u64::try_from(seq).unwrap_or(0);
                    let reason = format!("the record cannot be read: {e}");
                    stopped = Some(Ok(ChainVerdict::Broken { seq, reason }));
                    break;
                }
            }
        }
        drop(send);
        let verdict = walker.await.map_err(|e| StoreError::Database(format!("the chain walk failed: {e}")))?;
        match (verdict, stopped) {
            (broken @ ChainVerdict::Broken { .. }, _) => Ok(broken),
            (_, Some(stopped)) => stopped,
            (intact, None) => Ok(intact),
        }
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetterRow>, StoreError> {
        let client = self.client().await?;
        collect(
            &client,
            "SELECT command_id, agent_id, reason, attempts, at FROM dead_letters ORDER BY at DESC, id DESC LIMIT $1",
            &[&limit_sql(limit, 1000)],
            |row| {
                const T: &str = "dead_letters";
                Ok(DeadLetterRow {
                    command_id: id_from(get(row, 0, T)?, T, "command_id")?,
                    agent_id: id_from(get(row, 1, T)?, T, "agent_id")?,
                    reason: get(row, 2, T)?,
                    attempts: u32_from(get(row, 3, T)?, T, "attempts")?,
                    at: ts_from(get(row, 4, T)?, T, "at")?,
                })
            },
        )
        .await
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO api_tokens (token_hash, name, role, created_at, revoked) VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .db()?;
        client
            .execute(
                &statement,
                &[&token.token_hash, &token.name, &token.role.as_str(), &ts_sql(token.created_at), &token.revoked],
            )
            .await
            // The secret's hash is not repeated in the error: it names the token by its name.
            .map_err(|e| insert_error(&e, |_| format!("a token like {:?}", token.name)))?;
        Ok(())
    }

    async fn token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let client = self.client().await?;
        let rows = collect(
            &client,
            "SELECT token_hash, name, role, created_at, revoked FROM api_tokens WHERE token_hash = $1",
            &[&token_hash],
            |row| {
                const T: &str = "api_tokens";
                let role: &str = get(row, 2, T)?;
                Ok(TokenRecord {
                    token_hash: get(row, 0, T)?,
                    name: get(row, 1, T)?,
                    role: Role::parse(role).ok_or_else(|| corrupt(T, format!("unknown role {role:?}")))?,
                    created_at: ts_from(get(row, 3, T)?, T, "created_at")?,
                    revoked: get(row, 4, T)?,
                })
            },
        )
        .await?;
        Ok(rows.into_iter().next())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .db()?;
        let unfinished_by_state = collect(
            &tx,
            &format!("SELECT state, COUNT(*) FROM commands WHERE state IN {UNFINISHED} GROUP BY state ORDER BY state"),
            &[],
            |row| Ok((get(row, 0, "commands")?, u64_from(get(row, 1, "commands")?, "commands", "count")?)),
        )
        .await?;
        let dead_letters: i64 =
            get(&tx.query_one("SELECT COUNT(*) FROM dead_letters", &[]).await.db()?, 0, "dead_letters")?;
        let latest = tx.query_opt("SELECT latest_ts FROM telemetry_watermark WHERE id = 1", &[]).await.db()?;
        let latest_telemetry = latest
            .map(|row| ts_from(get(&row, 0, "telemetry_watermark")?, "telemetry_watermark", "latest_ts"))
            .transpose()?;
        tx.commit().await.db()?;
        Ok(StoreStats {
            unfinished_by_state,
            dead_letters: u64_from(dead_letters, "dead_letters", "count")?,
            latest_telemetry,
        })
    }

    fn pool_status(&self) -> PoolStatus {
        let status = self.pool.status();
        PoolStatus {
            max: status.max_size,
            in_use: status.size.saturating_sub(status.available),
            waiting: status.waiting,
        }
    }

    async fn register_instance(&self, instance: &InstanceRecord) -> Result<(), StoreError> {
        self.register(instance).await
    }

    async fn renew_instance(&self, instance_id: &str, lease_until: Timestamp) -> Result<bool, StoreError> {
        self.renew(instance_id, lease_until).await
    }

    async fn deregister_instance(&self, instance_id: &str) -> Result<(), StoreError> {
        self.deregister(instance_id).await
    }

    async fn reap_instances(&self, now: Timestamp) -> Result<Vec<String>, StoreError> {
        self.reap(now).await
    }

    async fn instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.list_instances().await
    }

    async fn claim_presence(
        &self,
        agent: &AgentId,
        instance_id: &str,
        session: u64,
        now: Timestamp,
    ) -> Result<PresenceClaim, StoreError> {
        self.presence_claim(agent, instance_id, session, now).await
    }

    async fn release_presence(&self, agent: &AgentId, instance_id: &str, session: u64) -> Result<(), StoreError> {
        self.presence_release(agent, instance_id, session).await
    }

    async fn claim_commands(&self, instance_id: &str, scope: &ClaimScope) -> Result<Vec<CommandRecord>, StoreError> {
        self.commands_claim(instance_id, scope).await
    }

    async fn release_commands(&self, instance_id: &str, records: &[CommandRecord]) -> Result<(), StoreError> {
        self.commands_release(instance_id, records).await
    }

    async fn expire_unowned(&self, now: Timestamp, queue_ttl: Duration) -> Result<Vec<CommandRecord>, StoreError> {
        self.unowned_expire(now, queue_ttl).await
    }

    async fn cancel_unowned(&self, id: &CommandId, now: Timestamp) -> Result<CancelOutcome, StoreError> {
        self.unowned_cancel(id, now).await
    }

    async fn request_cancel(&self, id: &CommandId) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("cancel:{id}")]).await.db()?;
        Ok(())
    }

    fn wakeups(&self) -> Option<tokio::sync::mpsc::Receiver<Wakeup>> {
        Some(self.listen())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::QueueBounds;
    use crate::store::{contract, pg_cluster};

    #[test]
    fn a_values_list_numbers_every_placeholder_once() {
        assert_eq!(values(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values(1, 1), "($1)");
        assert_eq!(values(0, 4), "");
    }

    /// A store on a fresh database of the shared test cluster; the guard is its name.
    pub(crate) async fn fresh() -> Option<(PostgresStore, String)> {
        let (config, name) = pg_cluster::fresh_database().await?;
        let options = PostgresOptions { pool_size: 4, ..PostgresOptions::default() };
        let store = PostgresStore::connect_with(config, options).await.expect("connect to the test database");
        Some((store, name))
    }

    mod contract_postgres {
        crate::store::contract::store_contract_tests!(super::fresh);
    }

    /// A plain connection to `config`'s database, to look at or tamper with it from outside.
    async fn raw(config: &tokio_postgres::Config) -> tokio_postgres::Client {
        let (client, connection) = config.connect(NoTls).await.expect("connect");
        tokio::spawn(connection);
        client
    }

    fn options() -> PostgresOptions {
        PostgresOptions { pool_size: 4, ..PostgresOptions::default() }
    }

    fn audit(n: u64) -> NewAudit {
        NewAudit {
            ts: Timestamp::from_millis(1_000 + n),
            req_id: format!("req-{n}"),
            actor: "admin".into(),
            action: "agent.enrolled".into(),
            args_hash: chain::args_hash(&serde_json::json!({ "n": n })),
            targets: vec![format!("gw-{n}")],
            rc: "201".into(),
            duration_ms: 3,
            detail: serde_json::json!({ "n": n }),
        }
    }

    #[tokio::test]
    async fn instances_starting_at_once_migrate_exactly_once() {
        let Some((config, _name)) = pg_cluster::fresh_database().await else { return };
        let opens = (0..8).map(|_| PostgresStore::connect_with(config.clone(), options()));
        for store in futures_util::future::join_all(opens).await {
            store.expect("every instance opens");
        }
        let versions: Vec<i64> = raw(&config)
            .await
            .query("SELECT version FROM schema_migrations ORDER BY version", &[])
            .await
            .expect("query")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(versions, (1..=i64::try_from(MIGRATIONS.len()).expect("small")).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_database_from_a_newer_build_is_refused() {
        let Some((config, _name)) = pg_cluster::fresh_database().await else { return };
        drop(PostgresStore::connect_with(config.clone(), options()).await.expect("open"));
        raw(&config)
            .await
            .execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)", &[])
            .await
            .expect("insert");
        match PostgresStore::connect_with(config, options()).await {
            Err(StoreError::SchemaTooNew { found: 99, supported }) => {
                assert_eq!(usize::try_from(supported).expect("small"), MIGRATIONS.len());
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn appends_from_several_instances_form_one_chain() {
        let Some((config, _name)) = pg_cluster::fresh_database().await else { return };
        let a = PostgresStore::connect_with(config.clone(), options()).await.expect("open");
        let b = PostgresStore::connect_with(config, options()).await.expect("open");
        let entries: Vec<NewAudit> = (1..=60).map(audit).collect();
        let appends = entries.iter().enumerate().map(|(n, e)| {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            async move { store.append_audit(e).await }
        });
        let mut seqs: Vec<u64> =
            futures_util::future::join_all(appends).await.into_iter().map(|e| e.expect("appended").seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=60).collect::<Vec<_>>(), "each append its own position");
        assert_eq!(a.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 60 });
    }

    #[tokio::test]
    async fn an_audit_row_edited_in_the_database_breaks_the_chain_at_that_row() {
        let Some((config, _name)) = pg_cluster::fresh_database().await else { return };
        let store = PostgresStore::connect_with(config.clone(), options()).await.expect("open");
        for n in 1..=4 {
            store.append_audit(&audit(n)).await.expect("append");
        }
        let tamper = raw(&config).await;
        tamper.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2", &[]).await.expect("tamper");
        let verdict = store.verify_audit().await.expect("verify");
        assert!(matches!(verdict, ChainVerdict::Broken { seq: 2, .. }), "{verdict:?}");
        tamper.execute("UPDATE audit_log SET actor = 'admin' WHERE seq = 2", &[]).await.expect("restore");
        tamper.execute("UPDATE audit_log SET detail = 'not json' WHERE seq = 3", &[]).await.expect("tamper");
        let verdict = store.verify_audit().await.expect("an unreadable row is a verdict, not an error");
        assert!(matches!(verdict, ChainVerdict::Broken { seq: 3, .. }), "{verdict:?}");
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_panicked_on() {
        let Some((config, _name)) = pg_cluster::fresh_database().await else { return };
        let store = PostgresStore::connect_with(config.clone(), options()).await.expect("open");
        store.enroll_agent(&contract::agent_record("gw-1", "fra")).await.expect("enroll");
        let (job, commands) = contract::job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
        store.create_job(&job, &commands, QueueBounds::UNBOUNDED, None).await.expect("create");
        let tamper = raw(&config).await;
        tamper.execute("UPDATE agents SET agent_id = 'not an id!'", &[]).await.expect("tamper");
        tamper.execute("UPDATE commands SET state = 'exploded'", &[]).await.expect("tamper");
        tamper.execute("UPDATE commands SET attempts = -1", &[]).await.expect("tamper");
        assert!(matches!(
            store.agents(&AgentFilter::default()).await,
            Err(StoreError::Corrupt { table: "agents", .. })
        ));
        assert!(matches!(store.unfinished_commands().await, Ok(v) if v.is_empty()), "not an unfinished state");
        let id = CommandId::new("cmd-1").expect("id");
        assert!(matches!(store.command(&id).await, Err(StoreError::Corrupt { table: "commands", .. })));
    }

    #[tokio::test]
    async fn calls_after_close_fail_closed() {
        let Some((store, _name)) = fresh().await else { return };
        let other = store.clone();
        store.append_audit(&audit(1)).await.expect("append");
        store.close().await;
        assert!(matches!(other.append_audit(&audit(2)).await, Err(StoreError::Closed)));
        assert!(matches!(other.ping().await, Err(StoreError::Closed)));
    }

    #[tokio::test]
    async fn a_telemetry_batch_larger_than_one_statement_is_written_whole() {
        let Some((store, _name)) = fresh().await else { return };
        let agent = AgentId::new("gw-1").expect("id");
        let metric = MetricKey::new("cpu").expect("metric");
        // More rows than one statement may bind parameters for (65,535 / 4).
        let rows: Vec<TelemetryRow> = (0..20_000)
            .map(|n| TelemetryRow {
                agent_id: agent.clone(),
                ts: Timestamp::from_millis(n),
                metric_key: metric.clone(),
                value: 1.0,
            })
            .collect();
        assert_eq!(store.save_telemetry(&rows).await.expect("save"), 20_000);
        let query = TelemetryQuery { agent_id: agent, metric: None, from: None, to: None, limit: 10_000 };
        assert_eq!(store.telemetry(&query).await.expect("read").len(), 10_000);
        assert_eq!(store.stats().await.expect("stats").latest_telemetry, Some(Timestamp::from_millis(19_999)));
    }
}
