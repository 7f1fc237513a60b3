//! The embedded SQLite store: one writer thread that commits queued writes in groups, a small
//! pool of read-only connections that never wait for it, and versioned migrations at open.
//!
//! ```text
//!   write futures ──▶ bounded queue ──▶ writer thread: BEGIN; SAVEPOINT per request; COMMIT ──▶ replies
//!   read futures  ──▶ spawn_blocking on one of N read-only connections (WAL snapshots)
//! ```
//! Every write future resolves only after the transaction holding it is committed with
//! `synchronous=FULL`, so `Ok` means durable. One fsync covers a whole group, which is what
//! lets many concurrent writers share the disk's few flushes per second.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::hooks::Wal;
use rusqlite::types::Value as SqlValue;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, MAIN_DB, OpenFlags, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
use tokio::sync::{Semaphore, mpsc, oneshot};
use viworks_core::Timestamp;
use viworks_core::idempotency::{
    DEFAULT_TTL, IdempotencyError, IdempotencyKey, IdempotencyRecord, JobId, Recorded, RequestDigest, Resolution,
    ResultDigest, classify_result, resolve,
};
use viworks_core::session::{CommandRecord, CommandState, DeadLetter, NewCommand, Terminal};
use viworks_core::wire::{AgentId, CommandId, CommandResult, Hello, MetricKey, ResultError, ResultStatus, Verb};

mod cluster;

use super::columns::{
    StateColumns, check_bounds, corrupt, id_from, json_from, json_text, limit_sql, millis_of, now, session_from,
    targets, ts_from, ts_sql, u32_from, u64_from, u64_sql,
};
use super::{
    AgentFilter, AgentRecord, AuditEntry, AuditFilter, CancelOutcome, ChainVerdict, ClaimScope, CommandFilter,
    DeadLetterRow, InstanceRecord, JobInsert, JobRecord, NewAudit, PoolStatus, PresenceClaim, QueueBounds, Role, Store,
    StoreError, StoreStats, StoredCommand, StoredResult, TelemetryQuery, TelemetryRow, TokenRecord, UNFINISHED_STATES,
    Wakeup,
};
use crate::audit::chain::{self, Link, Prepared};

/// The schema, one entry per version: entry `i` takes the database from version `i` to `i + 1`.
/// Append only; never edit an entry that has shipped.
const MIGRATIONS: &[&str] = &[
    // Version 1. STRICT tables: SQLite refuses a value of the wrong type instead of storing it.
    // Times are INTEGER milliseconds since the Unix epoch; JSON is TEXT.
    r#"
    CREATE TABLE agents (
        agent_id        TEXT PRIMARY KEY NOT NULL,
        site            TEXT NOT NULL,
        hostname        TEXT NOT NULL,
        version         TEXT NOT NULL,
        capabilities    TEXT NOT NULL,
        max_concurrency INTEGER NOT NULL,
        revoked         INTEGER NOT NULL,
        maintenance     INTEGER NOT NULL,
        enrolled_at     INTEGER NOT NULL,
        last_seen       INTEGER,
        connected       INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX agents_site ON agents (site, agent_id);

    CREATE TABLE jobs (
        job_id          TEXT PRIMARY KEY NOT NULL,
        req_id          TEXT NOT NULL,
        actor           TEXT NOT NULL,
        verb            TEXT NOT NULL,
        args            TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        idempotency_key TEXT UNIQUE,
        request_digest  TEXT
    ) STRICT;

    CREATE TABLE commands (
        command_id        TEXT PRIMARY KEY NOT NULL,
        job_id            TEXT NOT NULL REFERENCES jobs (job_id),
        agent_id          TEXT NOT NULL,
        verb              TEXT NOT NULL,
        args              TEXT NOT NULL,
        timeout_ms        INTEGER NOT NULL,
        state             TEXT NOT NULL,
        not_before        INTEGER,
        session           INTEGER,
        deadline          INTEGER,
        terminal_reason   TEXT,
        terminal_attempts INTEGER,
        attempts          INTEGER NOT NULL,
        submitted_at      INTEGER NOT NULL,
        updated_at        INTEGER NOT NULL,
        order_seq         INTEGER NOT NULL UNIQUE
    ) STRICT;
    CREATE INDEX commands_agent ON commands (agent_id, order_seq);
    CREATE INDEX commands_state ON commands (state, order_seq);
    CREATE INDEX commands_job ON commands (job_id, order_seq);

    CREATE TABLE command_results (
        correlation_id TEXT PRIMARY KEY NOT NULL,
        agent_id       TEXT NOT NULL,
        status         TEXT NOT NULL,
        exit_code      INTEGER,
        output         TEXT NOT NULL,
        error          TEXT,
        duration_ms    INTEGER NOT NULL,
        digest         TEXT NOT NULL,
        received_at    INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE telemetry (
        agent_id   TEXT NOT NULL,
        ts         INTEGER NOT NULL,
        metric_key TEXT NOT NULL,
        value      REAL NOT NULL,
        PRIMARY KEY (agent_id, ts, metric_key)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX telemetry_metric ON telemetry (agent_id, metric_key, ts);
    -- The newest sample time, kept per batch, so that stats need not scan the table.
    CREATE TABLE telemetry_watermark (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        latest_ts INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE audit_log (
        seq         INTEGER PRIMARY KEY,
        ts          INTEGER NOT NULL,
        req_id      TEXT NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        args_hash   TEXT NOT NULL,
        targets     TEXT NOT NULL,
        rc          TEXT NOT NULL,
        duration_ms INTEGER NOT NULL,
        detail      TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        hash        TEXT NOT NULL
    ) STRICT;
    CREATE INDEX audit_action ON audit_log (action, seq);
    CREATE INDEX audit_actor ON audit_log (actor, seq);

    CREATE TABLE dead_letters (
        command_id TEXT PRIMARY KEY NOT NULL REFERENCES commands (command_id),
        agent_id   TEXT NOT NULL,
        reason     TEXT NOT NULL,
        attempts   INTEGER NOT NULL,
        at         INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX dead_letters_at ON dead_letters (at);

    CREATE TABLE api_tokens (
        token_hash TEXT PRIMARY KEY NOT NULL,
        name       TEXT NOT NULL,
        role       TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked    INTEGER NOT NULL
    ) STRICT;
    "#,
    // Version 2: instances sharing the database, the presence of each connected agent, and
    // which instance holds each unfinished command.
    r#"
    CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL,
        started_at  INTEGER NOT NULL,
        lease_until INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE presence (
        agent_id    TEXT PRIMARY KEY NOT NULL,
        instance_id TEXT NOT NULL,
        session     INTEGER NOT NULL,
        since       INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX presence_instance ON presence (instance_id);

    ALTER TABLE commands ADD COLUMN owner TEXT;
    CREATE INDEX commands_unfinished ON commands (agent_id) WHERE state IN ('queued', 'sent', 'acked');
    CREATE INDEX commands_owner ON commands (owner) WHERE owner IS NOT NULL;
    "#,
    // Version 3: the number of unfinished commands, kept by the statements that change it, so
    // that checking a submission against the global queue bound reads one row instead of
    // counting the queue. (Triggers would keep it too, but a table with triggers makes SQLite
    // journal every statement on it: they tripled the cost of inserting a command.) The row
    // starts at zero; `recount_unfinished`, run at every open after the migrations, fills it in.
    r#"
    CREATE TABLE queue_total (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        unfinished INTEGER NOT NULL
    ) STRICT;
    INSERT INTO queue_total (id, unfinished) VALUES (1, 0);
    "#,
];

/// The states a command leaves; every other state name is terminal.
const UNFINISHED: &str = "('queued', 'sent', 'acked')";

/// Whether a state name is one of [`UNFINISHED`].
fn is_unfinished(state: &str) -> bool {
    UNFINISHED_STATES.contains(&state)
}

/// Rows per multi-row telemetry upsert (4 parameters each, far below SQLite's limit).
const TELEMETRY_CHUNK: usize = 128;

/// Agents named in one read, at most, for it to run in the calling task rather than on the
/// blocking pool (see `SqliteStore::read_here`).
const POINT_READ_ROWS: usize = 8;

/// New WAL pages (4 KiB each) after which the checkpointer thread is woken: SQLite's own
/// automatic-checkpoint interval, moved off the writer.
const CHECKPOINT_EVERY_PAGES: i32 = 1000;

/// WAL pages at which the writer checkpoints itself, as SQLite would: the checkpointer has
/// fallen behind, or writes never paused for long enough to let the log restart (SQLite
/// restarts it only once a checkpoint has copied all of it). Bounds the log at 32 MiB.
const CHECKPOINT_INLINE_PAGES: i32 = 8192;

/// How the store is sized. [`Default`] suits one host of a large fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Read-only connections, hence reads running at once (at least 1).
    pub readers: usize,
    /// Write requests that may wait for the writer; beyond it writers wait for room (at least 1).
    pub queue: usize,
    /// Most write requests committed in one transaction (at least 1).
    pub max_batch: usize,
    /// How long a connection waits for a lock held by another process before failing.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { readers: 4, queue: 8192, max_batch: 512, busy_timeout: Duration::from_secs(5) }
    }
}

/// What the writer has done since the store opened: `requests / transactions` is the mean
/// group size, and the growth of `busy` over a span of time is the share of it the writer
/// spent writing (a writer busy nearly all the time makes every write wait). Exported on
/// `/metrics` as `viworks_store_writer_*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed (or attempted).
    pub transactions: u64,
    /// Write requests handled.
    pub requests: u64,
    /// Time spent in transactions, from BEGIN to the end of the COMMIT (its fsync included).
    pub busy: Duration,
}

/// The SQLite implementation of [`Store`]. Cheap to clone: clones share one writer thread and
/// one read pool.
///
/// Dropping the last clone lets the writer commit everything already queued, then joins it
/// (which blocks the dropping thread for that long); [`close`](Self::close) does the same
/// without blocking an async task.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("writer", &self.writer_stats()).finish_non_exhaustive()
    }
}

struct Inner {
    /// Taken only when the last clone drops, which closes the queue and stops the writer.
    queue: Option<mpsc::Sender<Message>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: ReadPool,
    counters: Arc<Counters>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.queue.take());
        let handle = self.writer.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            // The queue is closed: the writer commits what was queued, then returns.
            if handle.join().is_err() {
                tracing::error!("the SQLite writer thread panicked");
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    requests: AtomicU64,
    busy_nanos: AtomicU64,
}

enum Message {
    Write(Box<dyn WriteOp>),
    Shutdown(oneshot::Sender<()>),
}

impl SqliteStore {
    /// Opens (creating it, and its parent directory, if needed) the database at `path` with
    /// [`SqliteOptions::default`], applies pending migrations and starts the writer thread.
    ///
    /// Blocks on file I/O: call it at start, or inside `spawn_blocking`. Fails with
    /// [`StoreError::SchemaTooNew`] when the database was migrated by a newer build, and with
    /// [`StoreError::Database`] when the file cannot be opened or migrated.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// [`open`](Self::open) with explicit sizing.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref();
        prepare_file(path)?;
        let mut writer = open_connection(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)?;
        configure_writer(&writer, options.busy_timeout)?;
        migrate(&mut writer)?;
        recount_unfinished(&writer)?;
        let checkpointer = start_checkpointer(&mut writer, path, options.busy_timeout)?;
        let mut readers = Vec::with_capacity(options.readers.max(1));
        for _ in 0..options.readers.max(1) {
            let reader = open_connection(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            reader.busy_timeout(options.busy_timeout).db()?;
            reader.pragma_update(None, "query_only", true).db()?;
            readers.push(reader);
        }
        let (queue, requests) = mpsc::channel(options.queue.max(1));
        let counters = Arc::new(Counters::default());
        let writer_counters = Arc::clone(&counters);
        let max_batch = options.max_batch.max(1);
        let handle = std::thread::Builder::new()
            .name("viworks-sqlite-writer".into())
            .spawn(move || run_writer(writer, requests, max_batch, &writer_counters, checkpointer))
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                queue: Some(queue),
                writer: Mutex::new(Some(handle)),
                readers: ReadPool::new(readers),
                counters,
            }),
        })
    }

    /// Commits every write queued so far, stops the writer and waits for it, for graceful
    /// shutdown. Writes through any clone after this fail with [`StoreError::Closed`]; reads
    /// keep working until the last clone drops.
    pub async fn close(self) {
        if let Some(queue) = &self.inner.queue {
            let (done, finished) = oneshot::channel();
            if queue.send(Message::Shutdown(done)).await.is_ok() {
                let _ = finished.await;
            }
        }
        let handle = self.inner.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(())) => {}
                _ => tracing::error!("the SQLite writer thread panicked"),
            }
        }
    }

    /// Transactions and requests the writer has handled.
    pub fn writer_stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.inner.counters.transactions.load(Ordering::Relaxed),
            requests: self.inner.counters.requests.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.inner.counters.busy_nanos.load(Ordering::Relaxed)),
        }
    }

    /// Runs `work` in the writer's next group commit, inside its own savepoint: an error
    /// rolls back this request only. Resolves once the group is durable.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let queue = self.inner.queue.as_ref().ok_or(StoreError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let op: Box<dyn WriteOp> = Box::new(Op { work: Some(work), outcome: None, reply });
        queue.send(Message::Write(op)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `work` on a read-only connection on the blocking pool. Waits only for a free
    /// connection, never for the writer (WAL readers see the last committed snapshot).
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = Arc::clone(&self.inner.readers.permits).acquire_owned().await.map_err(|_| StoreError::Closed)?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // The permit moves here so that it is released only when the connection is back,
            // even if the awaiting future was dropped.
            let _permit = permit;
            let conn = inner.readers.checkout()?;
            work(&conn)
        })
        .await
        .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
    }

    /// Runs `work`, an index lookup of a few rows, on a read-only connection in the calling
    /// task. Such a read takes microseconds from the page cache, less than the handoff to the
    /// blocking pool and back (two context switches); scans, and reads whose size the caller
    /// sets, go through [`Self::read`].
    async fn read_here<T>(&self, work: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let _permit = self.inner.readers.permits.acquire().await.map_err(|_| StoreError::Closed)?;
        let conn = self.inner.readers.checkout()?;
        work(&conn)
    }
}

// ---------------------------------------------------------------------------------------------
// Opening and migrations

fn prepare_file(path: &Path) -> Result<(), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| StoreError::Database(format!("cannot create {}: {e}", parent.display())))?;
    }
    // The database holds token hashes and the audit trail: readable by its owner only. SQLite
    // gives its -wal and -shm files the main file's permissions.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop).map_err(|e| StoreError::Database(format!("cannot open {}: {e}", path.display())))
}

fn open_connection(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    // Each connection is used by one thread at a time (the writer, or a reader checked out of
    // the pool), so SQLite's own per-connection mutex is not needed.
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX).db()?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn configure_writer(conn: &Connection, busy_timeout: Duration) -> Result<(), StoreError> {
    conn.busy_timeout(busy_timeout).db()?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).db()?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Database(format!("cannot switch the database to WAL mode (it is in {mode} mode)")));
    }
    // In WAL mode `synchronous=NORMAL` fsyncs only at checkpoints: a commit survives a crash
    // of this process but not of the machine (power loss, kernel panic), which would lose
    // commands already answered 202. `FULL` fsyncs the WAL at every commit; group commit
    // spreads that one fsync over every request in the batch.
    conn.pragma_update(None, "synchronous", "FULL").db()?;
    conn.pragma_update(None, "foreign_keys", true).db()?;
    // Truncate the WAL back to 64 MiB after checkpoints, so a burst does not leave a huge file.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024).db()?;
    Ok(())
}

/// Moves WAL checkpoints off the writer. SQLite's automatic checkpoint runs inside the commit
/// that crosses its threshold, so every request of that group waits while pages are copied
/// into the database file and it is fsynced: the tail of the commit latency. Instead the
/// writer's WAL hook wakes a thread of its own, whose connection checkpoints PASSIVE (it never
/// blocks the writer) once per [`CHECKPOINT_EVERY_PAGES`] new pages, so commits go on
/// meanwhile; past [`CHECKPOINT_INLINE_PAGES`] the writer checkpoints itself, which bounds the
/// log.
fn start_checkpointer(
    writer: &mut Connection,
    path: &Path,
    busy_timeout: Duration,
) -> Result<Checkpointer, StoreError> {
    let conn = open_connection(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.busy_timeout(busy_timeout).db()?;
    // A connection opens the log only once it has read the database; until then SQLite
    // answers a checkpoint with "not in WAL mode".
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(())).db()?;
    let (wake, woken) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name("viworks-sqlite-checkpoint".into())
        .spawn(move || {
            while let Ok(Wake::Checkpoint) = woken.recv() {
                if let Err(e) = settled(conn.wal_checkpoint_v2(Some(MAIN_DB), CheckpointMode::PASSIVE)) {
                    tracing::warn!(error = %e, "a WAL checkpoint failed; the next one retries");
                }
            }
        })
        .map_err(|e| StoreError::Database(format!("cannot start the checkpoint thread: {e}")))?;
    let stop = wake.clone();
    // The log's size when the checkpointer was last woken.
    let mut woken_at = 0;
    writer
        .wal_hook(Some(move |wal: &mut Wal, pages: i32| {
            if pages < woken_at {
                woken_at = 0; // the log restarted
            }
            if pages >= CHECKPOINT_INLINE_PAGES {
                if let Err(e) = settled(wal.checkpoint_v2(CheckpointMode::PASSIVE)) {
                    tracing::warn!(error = %e, pages, "a WAL checkpoint failed; the next commit retries");
                }
            } else if pages - woken_at >= CHECKPOINT_EVERY_PAGES {
                woken_at = pages;
                // Full means a checkpoint is already due, which covers these pages too.
                let _ = wake.try_send(Wake::Checkpoint);
            }
            // Never an error: the transaction is committed by now, and SQLite would report
            // an error from here as the commit's own.
            Ok(())
        }))
        .db()?;
    Ok(Checkpointer { stop, handle })
}

/// The outcome of a PASSIVE checkpoint, with SQLite's refusal while another connection's
/// checkpoint is under way counted as success: that one does the work.
fn settled(outcome: rusqlite::Result<(i32, i32)>) -> rusqlite::Result<()> {
    match outcome {
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => Ok(()),
        other => other.map(drop),
    }
}

/// The checkpoint thread, as the writer holds it to stop it.
struct Checkpointer {
    stop: std::sync::mpsc::SyncSender<Wake>,
    handle: JoinHandle<()>,
}

impl Checkpointer {
    /// Lets a checkpoint under way finish, then stops the thread and waits for it.
    fn stop(self) {
        // An error means the thread is gone already.
        let _ = self.stop.send(Wake::Stop);
        if self.handle.join().is_err() {
            tracing::error!("the SQLite checkpoint thread panicked");
        }
    }
}

/// What the checkpoint thread is woken for.
enum Wake {
    Checkpoint,
    Stop,
}

/// Sets the kept number of unfinished commands from the commands themselves, so that a count
/// gone wrong (a row edited by hand) is right again from the next start.
fn recount_unfinished(conn: &Connection) -> Result<(), StoreError> {
    conn.execute(
        &format!("UPDATE queue_total SET unfinished = (SELECT COUNT(*) FROM commands WHERE state IN {UNFINISHED})"),
        [],
    )
    .db()?;
    Ok(())
}

/// Moves the kept number of unfinished commands by `delta`, in the caller's transaction.
fn add_unfinished(conn: &Connection, delta: i64) -> Result<(), StoreError> {
    if delta != 0 {
        conn.prepare_cached("UPDATE queue_total SET unfinished = unfinished + ?1 WHERE id = 1")
            .db()?
            .execute([delta])
            .db()?;
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL) STRICT",
    )
    .db()?;
    let supported = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = u32::try_from(index + 1).unwrap_or(u32::MAX);
        // IMMEDIATE takes the write lock first, so two processes opening the same file at once
        // cannot both apply a version; the check is repeated inside the lock.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
        let found: i64 =
            tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |row| row.get(0)).db()?;
        let found = u32::try_from(found)
            .map_err(|_| corrupt("schema_migrations", format!("version {found} is out of range")))?;
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        if found >= version {
            continue;
        }
        tx.execute_batch(sql).map_err(|e| StoreError::Database(format!("migration {version} failed: {e}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, ts_sql(now())],
        )
        .db()?;
        tx.commit().db()?;
        tracing::info!(version, "applied database migration");
    }
    // A database newer than every migration is refused even when this build has none to apply.
    let found: i64 =
        conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |row| row.get(0)).db()?;
    let found =
        u32::try_from(found).map_err(|_| corrupt("schema_migrations", format!("version {found} is out of range")))?;
    if found > supported {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The writer

/// One queued write: applied inside the batch transaction, answered after the commit.
trait WriteOp: Send {
    /// Runs the work on `conn`; true when it succeeded (its savepoint is then released).
    fn apply(&mut self, conn: &Connection) -> bool;
    /// Records a failure that happened around the work (savepoint, aborted transaction).
    fn fail(&mut self, error: StoreError);
    /// Answers the caller once the transaction's fate (`committed`) is known.
    fn finish(self: Box<Self>, committed: Result<(), String>);
}

struct Op<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> WriteOp for Op<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn apply(&mut self, conn: &Connection) -> bool {
        let Some(work) = self.work.take() else { return false };
        // A bug in one request must not take the writer, and every later write, down with it.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(conn)))
            .unwrap_or_else(|_| Err(StoreError::Database("the write panicked and was rolled back".into())));
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn fail(&mut self, error: StoreError) {
        self.outcome = Some(Err(error));
    }

    fn finish(self: Box<Self>, committed: Result<(), String>) {
        let answer = match (self.outcome, committed) {
            (Some(Err(own)), _) => Err(own),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)) | None, Err(why)) => Err(StoreError::Database(why)),
            (None, Ok(())) => Err(StoreError::Database("the write was not applied".into())),
        };
        // The caller may have stopped waiting; the write stands regardless.
        let _ = self.reply.send(answer);
    }
}

fn run_writer(
    conn: Connection,
    mut requests: mpsc::Receiver<Message>,
    max_batch: usize,
    counters: &Counters,
    checkpointer: Checkpointer,
) {
    let mut batch: Vec<Box<dyn WriteOp>> = Vec::with_capacity(max_batch);
    let mut shutdown = None;
    while shutdown.is_none() {
        // None once every sender is gone and the queue is drained: the store was dropped.
        let Some(first) = requests.blocking_recv() else { break };
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Write(op) => batch.push(op),
                Message::Shutdown(done) => {
                    shutdown = Some(done);
                    break;
                }
            }
            if batch.len() < max_batch {
                next = requests.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            commit_batch(&conn, &mut batch, counters);
        }
    }
    // Requests that arrive after a shutdown are refused: dropping them answers `Closed`.
    requests.close();
    while requests.try_recv().is_ok() {}
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the SQLite writer connection failed");
    }
    // The store counts as closed only once no thread of it is left.
    checkpointer.stop();
    if let Some(done) = shutdown {
        let _ = done.send(());
    }
}

/// Applies `batch` in one transaction, each request in its own savepoint, commits once and
/// answers every request.
fn commit_batch(conn: &Connection, batch: &mut Vec<Box<dyn WriteOp>>, counters: &Counters) {
    let started = Instant::now();
    counters.transactions.fetch_add(1, Ordering::Relaxed);
    counters.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let why = format!("cannot begin a transaction: {e}");
        for op in batch.drain(..) {
            op.finish(Err(why.clone()));
        }
        return;
    }
    let mut aborted: Option<String> = None;
    for op in batch.iter_mut() {
        if let Some(why) = &aborted {
            op.fail(StoreError::Database(why.clone()));
            continue;
        }
        if let Err(e) = exec(conn, "SAVEPOINT request") {
            op.fail(StoreError::Database(format!("cannot open a savepoint: {e}")));
            continue;
        }
        let ok = op.apply(conn);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (I/O error, disk full): every request
            // so far is lost, and none after it may run outside a transaction.
            aborted = Some("the transaction was rolled back by SQLite".into());
            continue;
        }
        let ended = if ok {
            exec(conn, "RELEASE request")
        } else {
            exec(conn, "ROLLBACK TO request").and_then(|()| exec(conn, "RELEASE request"))
        };
        if let Err(e) = ended {
            aborted = Some(format!("cannot end a savepoint: {e}"));
        }
    }
    let committed = match aborted {
        Some(why) => Err(why),
        None => exec(conn, "COMMIT").map_err(|e| format!("commit failed: {e}")),
    };
    if committed.is_err() && !conn.is_autocommit() {
        let _ = exec(conn, "ROLLBACK");
    }
    let busy = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counters.busy_nanos.fetch_add(busy, Ordering::Relaxed);
    if let Err(why) = &committed {
        tracing::error!(requests = batch.len(), error = %why, "a SQLite write batch failed");
    }
    for op in batch.drain(..) {
        op.finish(committed.clone());
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

// ---------------------------------------------------------------------------------------------
// The read pool

struct ReadPool {
    size: usize,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: holding one guarantees `idle` is not empty.
    permits: Arc<Semaphore>,
}

impl ReadPool {
    fn new(connections: Vec<Connection>) -> Self {
        let permits = Arc::new(Semaphore::new(connections.len()));
        ReadPool { size: connections.len(), idle: Mutex::new(connections), permits }
    }

    fn checkout(&self) -> Result<PooledConnection<'_>, StoreError> {
        let conn = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let conn = conn.ok_or_else(|| StoreError::Database("no idle read connection".into()))?;
        Ok(PooledConnection { pool: self, conn: Some(conn) })
    }
}

/// A read connection that returns to its pool when dropped, panics included.
struct PooledConnection<'a> {
    pool: &'a ReadPool,
    conn: Option<Connection>,
}

impl std::ops::Deref for PooledConnection<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // Some from construction until drop.
        self.conn.as_ref().unwrap_or_else(|| unreachable!("a pooled connection is present until dropped"))
    }
}

impl Drop for PooledConnection<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conversions between domain values and columns

/// `.db()`: a rusqlite error as a store error.
trait SqlResult<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> SqlResult<T> for rusqlite::Result<T> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(|e| match e {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => {
                StoreError::Corrupt { table: "(row)", detail: e.to_string() }
            }
            other => StoreError::Database(other.to_string()),
        })
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    e.sqlite_error().is_some_and(|e| {
        matches!(e.extended_code, rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    })
}

/// An insert's error: a unique violation is [`StoreError::Exists`] of `what`.
fn insert_error(e: rusqlite::Error, what: impl FnOnce(&rusqlite::Error) -> String) -> StoreError {
    if is_unique_violation(&e) { StoreError::Exists(what(&e)) } else { StoreError::Database(e.to_string()) }
}

/// Collects `sql`'s rows, read by `read` and checked by `decode`.
fn collect<R, T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    read: fn(&Row<'_>) -> rusqlite::Result<R>,
    decode: impl Fn(R) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).db()?;
    let rows = stmt.query_map(params, read).db()?;
    let mut out = Vec::new();
    for row in rows {
        out.push(decode(row.db()?)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Agents

const AGENT_COLUMNS: &str = "agent_id, site, hostname, version, capabilities, max_concurrency, revoked, maintenance, \
                             enrolled_at, last_seen, connected";

struct AgentRow {
    agent_id: String,
    site: String,
    hostname: String,
    version: String,
    capabilities: String,
    max_concurrency: i64,
    revoked: bool,
    maintenance: bool,
    enrolled_at: i64,
    last_seen: Option<i64>,
    connected: bool,
}

impl AgentRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(AgentRow {
            agent_id: row.get(0)?,
            site: row.get(1)?,
            hostname: row.get(2)?,
            version: row.get(3)?,
            capabilities: row.get(4)?,
            max_concurrency: row.get(5)?,
            revoked: row.get(6)?,
            maintenance: row.get(7)?,
            enrolled_at: row.get(8)?,
            last_seen: row.get(9)?,
            connected: row.get(10)?,
        })
    }

    fn decode(self) -> Result<AgentRecord, StoreError> {
        const T: &str = "agents";
        Ok(AgentRecord {
            agent_id: id_from(&self.agent_id, T, "agent_id")?,
            site: self.site,
            hostname: self.hostname,
            version: self.version,
            capabilities: json_from(&self.capabilities, T, "capabilities")?,
            max_concurrency: u32_from(self.max_concurrency, T, "max_concurrency")?,
            revoked: self.revoked,
            maintenance: self.maintenance,
            enrolled_at: ts_from(self.enrolled_at, T, "enrolled_at")?,
            last_seen: self.last_seen.map(|t| ts_from(t, T, "last_seen")).transpose()?,
            connected: self.connected,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Commands

const COMMAND_COLUMNS: &str = "c.command_id, c.job_id, c.agent_id, c.verb, c.args, c.timeout_ms, c.state, \
                               c.not_before, c.session, c.deadline, c.terminal_reason, c.terminal_attempts, \
                               c.attempts, c.submitted_at, c.updated_at, c.order_seq";
const RESULT_COLUMNS: &str = "r.correlation_id, r.status, r.exit_code, r.output, r.error, r.duration_ms, r.received_at";

struct CommandRow {
    command_id: String,
    job_id: String,
    agent_id: String,
    verb: String,
    args: String,
    timeout_ms: i64,
    state: String,
    not_before: Option<i64>,
    session: Option<i64>,
    deadline: Option<i64>,
    terminal_reason: Option<String>,
    terminal_attempts: Option<i64>,
    attempts: i64,
    submitted_at: i64,
    updated_at: i64,
    order_seq: i64,
}

struct ResultRow {
    status: String,
    exit_code: Option<i64>,
    output: String,
    error: Option<String>,
    duration_ms: i64,
    received_at: i64,
}

impl CommandRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(CommandRow {
            command_id: row.get(0)?,
            job_id: row.get(1)?,
            agent_id: row.get(2)?,
            verb: row.get(3)?,
            args: row.get(4)?,
            timeout_ms: row.get(5)?,
            state: row.get(6)?,
            not_before: row.get(7)?,
            session: row.get(8)?,
            deadline: row.get(9)?,
            terminal_reason: row.get(10)?,
            terminal_attempts: row.get(11)?,
            attempts: row.get(12)?,
            submitted_at: row.get(13)?,
            updated_at: row.get(14)?,
            order_seq: row.get(15)?,
        })
    }

    /// A command row followed by the result columns of a `LEFT JOIN command_results`.
    fn read_with_result(row: &Row<'_>) -> rusqlite::Result<(Self, Option<ResultRow>)> {
        let command = CommandRow::read(row)?;
        let correlation: Option<String> = row.get(16)?;
        let result = match correlation {
            None => None,
            Some(_) => Some(ResultRow {
                status: row.get(17)?,
                exit_code: row.get(18)?,
                output: row.get(19)?,
                error: row.get(20)?,
                duration_ms: row.get(21)?,
                received_at: row.get(22)?,
            }),
        };
        Ok((command, result))
    }

    fn state(&self) -> Result<CommandState, StoreError> {
        const T: &str = "commands";
        let need = |value: Option<i64>, column: &str| {
            value.ok_or_else(|| corrupt(T, format!("state {} without {column}", self.state)))
        };
        let terminal = match self.state.as_str() {
            "queued" => {
                return Ok(CommandState::Queued {
                    not_before: ts_from(need(self.not_before, "not_before")?, T, "not_before")?,
                });
            }
            "sent" => return Ok(CommandState::Sent { session: session_from(need(self.session, "session")?) }),
            "acked" => {
                return Ok(CommandState::Acked { deadline: ts_from(need(self.deadline, "deadline")?, T, "deadline")? });
            }
            "succeeded" => Terminal::Succeeded,
            "failed" => Terminal::Failed,
            "timed_out" => Terminal::TimedOut,
            "interrupted" => Terminal::Interrupted,
            "rejected" => Terminal::Rejected,
            "cancelled" => Terminal::Cancelled,
            "dead_lettered" => Terminal::DeadLettered(match self.terminal_reason.as_deref() {
                Some("attempts_exhausted") => DeadLetter::AttemptsExhausted(u32_from(
                    need(self.terminal_attempts, "terminal_attempts")?,
                    T,
                    "terminal_attempts",
                )?),
                Some("queue_expired") => DeadLetter::QueueExpired,
                Some("no_result") => DeadLetter::NoResult,
                other => return Err(corrupt(T, format!("unknown dead-letter reason {other:?}"))),
            }),
            other => return Err(corrupt(T, format!("unknown state {other:?}"))),
        };
        Ok(CommandState::Done(terminal))
    }

    fn decode(self) -> Result<(CommandRecord, JobId, Timestamp), StoreError> {
        const T: &str = "commands";
        let state = self.state()?;
        let record = CommandRecord {
            command: NewCommand {
                command_id: id_from(&self.command_id, T, "command_id")?,
                agent_id: id_from(&self.agent_id, T, "agent_id")?,
                verb: id_from(&self.verb, T, "verb")?,
                args: json_from(&self.args, T, "args")?,
                timeout: Duration::from_millis(u64_from(self.timeout_ms, T, "timeout_ms")?),
            },
            state,
            attempts: u32_from(self.attempts, T, "attempts")?,
            submitted_at: ts_from(self.submitted_at, T, "submitted_at")?,
            order: u64_from(self.order_seq, T, "order_seq")?,
        };
        let job_id = self.job_id.parse().map_err(|e| corrupt(T, format!("job_id {:?}: {e}", self.job_id)))?;
        Ok((record, job_id, ts_from(self.updated_at, T, "updated_at")?))
    }
}

fn decode_stored((command, result): (CommandRow, Option<ResultRow>)) -> Result<StoredCommand, StoreError> {
    const T: &str = "command_results";
    let (record, job_id, updated_at) = command.decode()?;
    let result = match result {
        None => None,
        Some(row) => {
            let status: ResultStatus = serde_json::from_value(serde_json::Value::String(row.status.clone()))
                .map_err(|_| corrupt(T, format!("unknown status {:?}", row.status)))?;
            let exit_code = row
                .exit_code
                .map(|code| i32::try_from(code).map_err(|_| corrupt(T, format!("exit_code {code} is out of range"))))
                .transpose()?;
            let error: Option<ResultError> = row.error.as_deref().map(|e| json_from(e, T, "error")).transpose()?;
            Some(StoredResult {
                result: CommandResult {
                    command_id: record.command.command_id.clone(),
                    status,
                    exit_code,
                    output: json_from(&row.output, T, "output")?,
                    error,
                    duration_ms: u64_from(row.duration_ms, T, "duration_ms")?,
                },
                received_at: ts_from(row.received_at, T, "received_at")?,
            })
        }
    };
    Ok(StoredCommand { record, job_id, updated_at, result })
}

/// The agent with this id, if enrolled.
fn read_agent(conn: &Connection, id: &str) -> Result<Option<AgentRecord>, StoreError> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE agent_id = ?1");
    let row = conn.prepare_cached(&sql).db()?.query_row([id], AgentRow::read).optional().db()?;
    row.map(AgentRow::decode).transpose()
}

/// The agents of `ids` that are enrolled, in the order named.
fn read_agents<'a>(conn: &Connection, ids: impl IntoIterator<Item = &'a str>) -> Result<Vec<AgentRecord>, StoreError> {
    ids.into_iter().filter_map(|id| read_agent(conn, id).transpose()).collect()
}

/// Whether `instance_id` holds the presence of `agent_id`.
fn present_at(conn: &Connection, agent_id: &str, instance_id: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM presence WHERE agent_id = ?1 AND instance_id = ?2")
        .db()?
        .exists(params![agent_id, instance_id])
        .db()
}

/// Inserts a new command row, held by `owner` when given (and its dead letter, should it
/// arrive finished that way).
fn insert_command(
    conn: &Connection,
    job_id: &str,
    command: &PreparedCommand,
    at: i64,
    owner: Option<&str>,
) -> Result<(), StoreError> {
    let s = &command.state;
    conn.prepare_cached(
        "INSERT INTO commands (command_id, job_id, agent_id, verb, args, timeout_ms, state, not_before, session, \
         deadline, terminal_reason, terminal_attempts, attempts, submitted_at, updated_at, order_seq, owner) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )
    .db()?
    .execute(params![
        command.command_id,
        job_id,
        command.agent_id,
        command.verb,
        command.args,
        command.timeout_ms,
        s.name,
        s.not_before,
        s.session,
        s.deadline,
        s.reason,
        s.reason_attempts,
        command.attempts,
        command.submitted_at,
        at,
        command.order,
        owner,
    ])
    .map_err(|e| {
        insert_error(e, |e| {
            if e.to_string().contains("order_seq") {
                format!("command order {}", command.order)
            } else {
                format!("command {}", command.command_id)
            }
        })
    })?;
    insert_dead_letter(conn, command, at)
}

fn insert_dead_letter(conn: &Connection, command: &PreparedCommand, at: i64) -> Result<(), StoreError> {
    if let Some(reason) = command.state.reason {
        conn.prepare_cached(
            "INSERT INTO dead_letters (command_id, agent_id, reason, attempts, at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (command_id) DO NOTHING",
        )
        .db()?
        .execute(params![command.command_id, command.agent_id, reason, command.attempts, at])
        .db()?;
    }
    Ok(())
}

/// Writes an unfinished command's new state (and its dead letter, when that is the state),
/// returning whether it did. A terminal state is final: a stale or repeated record never
/// reopens or re-finishes a command, so each command keeps exactly one terminal state; the
/// command's content, order and submission time were fixed by create_job. With `releasing`,
/// only a command that instance holds is written, and it is let go of.
fn write_state(
    conn: &Connection,
    command: &PreparedCommand,
    at: i64,
    releasing: Option<&str>,
) -> Result<bool, StoreError> {
    let s = &command.state;
    // Two statements rather than one with `owner = CASE …`: an UPDATE that assigns `owner`
    // rewrites its index entry even when the value stays, on every state change.
    const SET: &str = "state = ?2, not_before = ?3, session = ?4, deadline = ?5, terminal_reason = ?6, \
                       terminal_attempts = ?7, attempts = ?8, updated_at = ?9";
    let columns = params![
        command.command_id,
        s.name,
        s.not_before,
        s.session,
        s.deadline,
        s.reason,
        s.reason_attempts,
        command.attempts,
        at
    ];
    let changed = match releasing {
        None => conn
            .prepare_cached(&format!("UPDATE commands SET {SET} WHERE command_id = ?1 AND state IN {UNFINISHED}"))
            .db()?
            .execute(columns),
        Some(owner) => {
            let sql = format!(
                "UPDATE commands SET {SET}, owner = NULL WHERE command_id = ?1 AND state IN {UNFINISHED} AND owner = ?10"
            );
            let mut statement = conn.prepare_cached(&sql).db()?;
            let mut all: Vec<&dyn rusqlite::ToSql> = columns.to_vec();
            all.push(&owner);
            statement.execute(all.as_slice())
        }
    }
    .db()?;
    if changed > 0 {
        // Only unfinished rows match, so a terminal state here is a command leaving the queue.
        if !is_unfinished(s.name) {
            add_unfinished(conn, -1)?;
        }
        insert_dead_letter(conn, command, at)?;
    }
    Ok(changed > 0)
}

/// Unfinished commands stored now: in all, and for each target agent of `records` that has any.
///
/// The total is the kept count (one row). The agents' counts are looked up one target at a
/// time, or, for a job of more targets than there are unfinished commands, read in one pass
/// over the unfinished commands: either way no more index entries than the smaller of the two.
fn unfinished_counts(conn: &Connection, records: &[CommandRecord]) -> Result<(u64, BTreeMap<String, u64>), StoreError> {
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let total: i64 = conn
        .prepare_cached("SELECT unfinished FROM queue_total WHERE id = 1")
        .db()?
        .query_row([], |row| row.get(0))
        .optional()
        .db()?
        .ok_or_else(|| corrupt("queue_total", "the row is missing"))?;
    let total = count(total);
    let mut per_agent = BTreeMap::new();
    if total == 0 {
        return Ok((0, per_agent));
    }
    let agents = targets(records);
    if agents.len() as u64 <= total {
        let mut statement = conn
            .prepare_cached(&format!("SELECT COUNT(*) FROM commands WHERE agent_id = ?1 AND state IN {UNFINISHED}"))
            .db()?;
        for agent in agents {
            let n: i64 = statement.query_row([&agent], |row| row.get(0)).db()?;
            if n > 0 {
                per_agent.insert(agent, count(n));
            }
        }
    } else {
        // The partial index holds exactly the unfinished commands, in agent order: no sort.
        let mut statement = conn
            .prepare_cached(&format!(
                "SELECT agent_id, COUNT(*) FROM commands INDEXED BY commands_unfinished \
                 WHERE state IN {UNFINISHED} GROUP BY agent_id"
            ))
            .db()?;
        let rows = statement.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))).db()?;
        for row in rows {
            let (agent, n) = row.db()?;
            per_agent.insert(agent, count(n));
        }
    }
    Ok((total, per_agent))
}

/// A command record encoded for its row, built before it goes to the writer.
struct PreparedCommand {
    command_id: String,
    agent_id: String,
    verb: String,
    args: String,
    timeout_ms: i64,
    state: StateColumns,
    attempts: u32,
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
            attempts: record.attempts,
            submitted_at: ts_sql(record.submitted_at),
            order: u64_sql(record.order),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Jobs

struct JobRow {
    job_id: String,
    req_id: String,
    actor: String,
    verb: String,
    args: String,
    created_at: i64,
    idempotency_key: Option<String>,
    request_digest: Option<String>,
}

impl JobRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(JobRow {
            job_id: row.get(0)?,
            req_id: row.get(1)?,
            actor: row.get(2)?,
            verb: row.get(3)?,
            args: row.get(4)?,
            created_at: row.get(5)?,
            idempotency_key: row.get(6)?,
            request_digest: row.get(7)?,
        })
    }

    fn decode(self) -> Result<JobRecord, StoreError> {
        const T: &str = "jobs";
        let idempotency = match (self.idempotency_key, self.request_digest) {
            (Some(key), Some(digest)) => Some((
                IdempotencyKey::new(key.as_str()).map_err(|e| corrupt(T, format!("idempotency_key {key:?}: {e}")))?,
                RequestDigest::from_hex(&digest).map_err(|e| corrupt(T, format!("request_digest: {e}")))?,
            )),
            (Some(_), None) => return Err(corrupt(T, "idempotency_key without request_digest")),
            // A key released after it expired leaves its digest behind.
            (None, _) => None,
        };
        Ok(JobRecord {
            job_id: JobId::new(self.job_id.as_str())
                .map_err(|e| corrupt(T, format!("job_id {:?}: {e}", self.job_id)))?,
            req_id: self.req_id,
            actor: self.actor,
            verb: id_from::<Verb>(&self.verb, T, "verb")?,
            args: json_from(&self.args, T, "args")?,
            created_at: ts_from(self.created_at, T, "created_at")?,
            idempotency,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Audit

const AUDIT_COLUMNS: &str =
    "seq, ts, req_id, actor, action, args_hash, targets, rc, duration_ms, detail, prev_hash, hash";

struct AuditRow {
    seq: i64,
    ts: i64,
    req_id: String,
    actor: String,
    action: String,
    args_hash: String,
    targets: String,
    rc: String,
    duration_ms: i64,
    detail: String,
    prev_hash: String,
    hash: String,
}

impl AuditRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(AuditRow {
            seq: row.get(0)?,
            ts: row.get(1)?,
            req_id: row.get(2)?,
            actor: row.get(3)?,
            action: row.get(4)?,
            args_hash: row.get(5)?,
            targets: row.get(6)?,
            rc: row.get(7)?,
            duration_ms: row.get(8)?,
            detail: row.get(9)?,
            prev_hash: row.get(10)?,
            hash: row.get(11)?,
        })
    }

    fn decode(self) -> Result<AuditEntry, StoreError> {
        const T: &str = "audit_log";
        Ok(AuditEntry {
            seq: u64::try_from(self.seq).map_err(|_| corrupt(T, format!("seq {} is negative", self.seq)))?,
            content: NewAudit {
                ts: ts_from(self.ts, T, "ts")?,
                req_id: self.req_id,
                actor: self.actor,
                action: self.action,
                args_hash: self.args_hash,
                targets: json_from(&self.targets, T, "targets")?,
                rc: self.rc,
                duration_ms: u64_from(self.duration_ms, T, "duration_ms")?,
                detail: json_from(&self.detail, T, "detail")?,
            },
            prev_hash: self.prev_hash,
            hash: self.hash,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The store

impl Store for SqliteStore {
    async fn ping(&self) -> Result<Duration, StoreError> {
        if self.inner.queue.as_ref().is_none_or(mpsc::Sender::is_closed) {
            return Err(StoreError::Closed);
        }
        let start = Instant::now();
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).db()).await?;
        Ok(start.elapsed())
    }

    async fn enroll_agent(&self, agent: &AgentRecord) -> Result<(), StoreError> {
        let agent = agent.clone();
        let capabilities = json_text(&agent.capabilities)?;
        self.write(move |conn| {
            conn.prepare_cached(&format!(
                "INSERT INTO agents ({AGENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))
            .db()?
            .execute(params![
                agent.agent_id.as_str(),
                agent.site,
                agent.hostname,
                agent.version,
                capabilities,
                agent.max_concurrency,
                agent.revoked,
                agent.maintenance,
                ts_sql(agent.enrolled_at),
                agent.last_seen.map(ts_sql),
                agent.connected,
            ])
            .map_err(|e| insert_error(e, |_| format!("agent {}", agent.agent_id)))?;
            Ok(())
        })
        .await
    }

    async fn agent(&self, id: &AgentId) -> Result<Option<AgentRecord>, StoreError> {
        self.read_here(|conn| read_agent(conn, id.as_str())).await
    }

    async fn agents_named(&self, ids: &[AgentId]) -> Result<Vec<AgentRecord>, StoreError> {
        if ids.len() <= POINT_READ_ROWS {
            return self.read_here(|conn| read_agents(conn, ids.iter().map(AgentId::as_str))).await;
        }
        let ids: Vec<String> = ids.iter().map(|id| id.as_str().to_owned()).collect();
        // All of them on one read connection, in one trip to the blocking pool.
        self.read(move |conn| read_agents(conn, ids.iter().map(String::as_str))).await
    }

    async fn agents(&self, filter: &AgentFilter) -> Result<Vec<AgentRecord>, StoreError> {
        let mut sql = format!("SELECT {AGENT_COLUMNS} FROM agents WHERE 1 = 1");
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(site) = &filter.site {
            sql.push_str(" AND site = ?");
            args.push(SqlValue::Text(site.clone()));
        }
        if let Some(capability) = &filter.capability {
            sql.push_str(" AND EXISTS (SELECT 1 FROM json_each(agents.capabilities) AS c WHERE c.value = ?)");
            args.push(SqlValue::Text(capability.clone()));
        }
        if let Some(connected) = filter.connected {
            sql.push_str(" AND connected = ?");
            args.push(SqlValue::Integer(i64::from(connected)));
        }
        if !filter.include_revoked {
            sql.push_str(" AND revoked = 0");
        }
        if let Some(after) = &filter.after {
            sql.push_str(" AND agent_id > ?");
            args.push(SqlValue::Text(after.as_str().to_owned()));
        }
        sql.push_str(" ORDER BY agent_id LIMIT ?");
        args.push(SqlValue::Integer(limit_sql(filter.limit, 1000)));
        self.read(move |conn| collect(conn, &sql, params_from_iter(args), AgentRow::read, AgentRow::decode)).await
    }

    async fn agent_connected(&self, hello: &Hello, at: Timestamp) -> Result<bool, StoreError> {
        let id = hello.agent_id.as_str().to_owned();
        let hostname = hello.hostname.as_str().to_owned();
        let version = hello.version.as_str().to_owned();
        let capabilities = json_text(&hello.capabilities)?;
        let max_concurrency = hello.max_concurrency;
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE agents SET hostname = ?2, version = ?3, capabilities = ?4, max_concurrency = ?5, \
                     connected = 1, last_seen = ?6 WHERE agent_id = ?1",
                )
                .db()?
                .execute(params![id, hostname, version, capabilities, max_concurrency, ts_sql(at)])
                .db()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn agent_disconnected(&self, id: &AgentId, at: Timestamp) -> Result<(), StoreError> {
        let id = id.as_str().to_owned();
        self.write(move |conn| {
            conn.prepare_cached("UPDATE agents SET connected = 0, last_seen = ?2 WHERE agent_id = ?1")
                .db()?
                .execute(params![id, ts_sql(at)])
                .db()?;
            Ok(())
        })
        .await
    }

    async fn set_revoked(&self, id: &AgentId, revoked: bool) -> Result<bool, StoreError> {
        let id = id.as_str().to_owned();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached("UPDATE agents SET revoked = ?2 WHERE agent_id = ?1")
                .db()?
                .execute(params![id, revoked])
                .db()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn set_maintenance(&self, id: &AgentId, on: bool) -> Result<bool, StoreError> {
        let id = id.as_str().to_owned();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached("UPDATE agents SET maintenance = ?2 WHERE agent_id = ?1")
                .db()?
                .execute(params![id, on])
                .db()?;
            Ok(changed > 0)
        })
        .await
    }

    async fn create_job(
        &self,
        job: &JobRecord,
        commands: &[CommandRecord],
        bounds: QueueBounds,
        claimant: Option<&str>,
    ) -> Result<JobInsert, StoreError> {
        let job = job.clone();
        let args = json_text(&job.args)?;
        let records = commands.to_vec();
        let claimant = claimant.map(str::to_owned);
        let mut commands = commands.iter().map(PreparedCommand::of).collect::<Result<Vec<_>, _>>()?;
        self.write(move |conn| {
            if let Some((key, digest)) = &job.idempotency {
                let earlier = conn
                    .prepare_cached("SELECT job_id, request_digest, created_at FROM jobs WHERE idempotency_key = ?1")
                    .db()?
                    .query_row([key.as_str()], |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, i64>(2)?))
                    })
                    .optional()
                    .db()?;
                let earlier = earlier
                    .map(|(job_id, stored, created_at)| {
                        const T: &str = "jobs";
                        let stored = stored.ok_or_else(|| corrupt(T, "idempotency_key without request_digest"))?;
                        Ok::<_, StoreError>(IdempotencyRecord {
                            key: key.clone(),
                            digest: RequestDigest::from_hex(&stored)
                                .map_err(|e| corrupt(T, format!("request_digest: {e}")))?,
                            job_id: JobId::new(job_id.as_str())
                                .map_err(|e| corrupt(T, format!("job_id {job_id:?}: {e}")))?,
                            created_at: ts_from(created_at, T, "created_at")?,
                        })
                    })
                    .transpose()?;
                // The job's acceptance time is the `now` of the rule: the store reads no clock
                // for decisions a test must be able to replay.
                match resolve(earlier.as_ref(), key, *digest, job.created_at, DEFAULT_TTL) {
                    Ok(Resolution::Existing(job_id)) => return Ok(JobInsert::Existing(job_id)),
                    Ok(Resolution::New) => {
                        if let Some(expired) = earlier {
                            // The key expired: release it from the old job so this one can take it.
                            conn.prepare_cached("UPDATE jobs SET idempotency_key = NULL WHERE job_id = ?1")
                                .db()?
                                .execute([expired.job_id.as_str()])
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
            conn.prepare_cached(
                "INSERT INTO jobs (job_id, req_id, actor, verb, args, created_at, idempotency_key, request_digest) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .db()?
            .execute(params![
                job.job_id.as_str(),
                job.req_id,
                job.actor,
                job.verb.as_str(),
                args,
                created_at,
                key,
                digest
            ])
            .map_err(|e| insert_error(e, |_| format!("job {}", job.job_id)))?;
            let (total, per_agent) = unfinished_counts(conn, &records)?;
            check_bounds(&records, total, &per_agent, bounds)?;
            let first: i64 = conn
                .prepare_cached("SELECT COALESCE(MAX(order_seq), -1) + 1 FROM commands")
                .db()?
                .query_row([], |row| row.get(0))
                .db()?;
            let mut claimed = Vec::new();
            for ((command, record), order) in commands.iter_mut().zip(&records).zip(first..) {
                command.order = order;
                let owner = match &claimant {
                    Some(id) => present_at(conn, &command.agent_id, id)?.then_some(id.as_str()),
                    None => None,
                };
                insert_command(conn, job.job_id.as_str(), command, created_at, owner)?;
                if owner.is_some() {
                    claimed.push(CommandRecord { order: u64_from(order, "commands", "order_seq")?, ..record.clone() });
                }
            }
            add_unfinished(conn, commands.iter().filter(|c| is_unfinished(c.state.name)).count() as i64)?;
            Ok(JobInsert::Created { claimed })
        })
        .await
    }

    async fn save_commands(&self, records: &[CommandRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let commands = records.iter().map(PreparedCommand::of).collect::<Result<Vec<_>, _>>()?;
        let at = ts_sql(now());
        self.write(move |conn| {
            for command in &commands {
                if write_state(conn, command, at, None)? {
                    continue;
                }
                let known = conn
                    .prepare_cached("SELECT 1 FROM commands WHERE command_id = ?1")
                    .db()?
                    .query_row([&command.command_id], |_| Ok(()))
                    .optional()
                    .db()?;
                if known.is_none() {
                    return Err(StoreError::Database(format!(
                        "command {} is not stored; create_job stores commands before their lifecycle is saved",
                        command.command_id
                    )));
                }
            }
            Ok(())
        })
        .await
    }

    async fn max_order(&self) -> Result<Option<u64>, StoreError> {
        self.read(|conn| {
            let max: Option<i64> = conn
                .query_row("SELECT MAX(order_seq) FROM commands", [], |row| row.get(0))
                .map_err(|e| StoreError::Database(e.to_string()))?;
            Ok(max.map(|n| u64::try_from(n).unwrap_or(0)))
        })
        .await
    }

    async fn unfinished_commands(&self) -> Result<Vec<CommandRecord>, StoreError> {
        self.read(|conn| {
            let sql =
                format!("SELECT {COMMAND_COLUMNS} FROM commands c WHERE c.state IN {UNFINISHED} ORDER BY c.order_seq");
            collect(conn, &sql, [], CommandRow::read, |row| row.decode().map(|(record, _, _)| record))
        })
        .await
    }

    async fn command(&self, id: &CommandId) -> Result<Option<StoredCommand>, StoreError> {
        let id = id.as_str().to_owned();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {COMMAND_COLUMNS}, {RESULT_COLUMNS} FROM commands c \
                 LEFT JOIN command_results r ON r.correlation_id = c.command_id WHERE c.command_id = ?1"
            );
            let row = conn.prepare_cached(&sql).db()?.query_row([id], CommandRow::read_with_result).optional().db()?;
            row.map(decode_stored).transpose()
        })
        .await
    }

    async fn commands(&self, filter: &CommandFilter) -> Result<Vec<StoredCommand>, StoreError> {
        let mut sql = format!(
            "SELECT {COMMAND_COLUMNS}, {RESULT_COLUMNS} FROM commands c \
             LEFT JOIN command_results r ON r.correlation_id = c.command_id WHERE 1 = 1"
        );
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(status) = &filter.status {
            sql.push_str(" AND c.state = ?");
            args.push(SqlValue::Text(status.clone()));
        }
        if let Some(agent) = &filter.agent {
            sql.push_str(" AND c.agent_id = ?");
            args.push(SqlValue::Text(agent.as_str().to_owned()));
        }
        if let Some(verb) = &filter.verb {
            sql.push_str(" AND c.verb = ?");
            args.push(SqlValue::Text(verb.as_str().to_owned()));
        }
        if let Some(before) = filter.before {
            sql.push_str(" AND c.order_seq < ?");
            args.push(SqlValue::Integer(u64_sql(before)));
        }
        sql.push_str(" ORDER BY c.order_seq DESC LIMIT ?");
        args.push(SqlValue::Integer(limit_sql(filter.limit, 1000)));
        self.read(move |conn| collect(conn, &sql, params_from_iter(args), CommandRow::read_with_result, decode_stored))
            .await
    }

    async fn job(&self, id: &JobId) -> Result<Option<(JobRecord, Vec<StoredCommand>)>, StoreError> {
        let id = id.as_str().to_owned();
        self.read(move |conn| {
            // One snapshot for the job and its commands.
            let tx = conn.unchecked_transaction().db()?;
            let job = tx
                .prepare_cached(
                    "SELECT job_id, req_id, actor, verb, args, created_at, idempotency_key, request_digest \
                     FROM jobs WHERE job_id = ?1",
                )
                .db()?
                .query_row([&id], JobRow::read)
                .optional()
                .db()?;
            let Some(job) = job else { return Ok(None) };
            let sql = format!(
                "SELECT {COMMAND_COLUMNS}, {RESULT_COLUMNS} FROM commands c \
                 LEFT JOIN command_results r ON r.correlation_id = c.command_id \
                 WHERE c.job_id = ?1 ORDER BY c.order_seq"
            );
            let commands = collect(&tx, &sql, [&id], CommandRow::read_with_result, decode_stored)?;
            Ok(Some((job.decode()?, commands)))
        })
        .await
    }

    async fn save_result(
        &self,
        agent: &AgentId,
        result: &CommandResult,
        at: Timestamp,
    ) -> Result<Recorded, StoreError> {
        let digest = ResultDigest::of(result);
        let correlation = result.command_id.as_str().to_owned();
        let agent = agent.as_str().to_owned();
        let status = result.status.as_str();
        let exit_code = result.exit_code;
        let output = json_text(&result.output)?;
        let error = result.error.as_ref().map(json_text).transpose()?;
        let duration_ms = u64_sql(result.duration_ms);
        self.write(move |conn| {
            let stored = conn
                .prepare_cached("SELECT digest FROM command_results WHERE correlation_id = ?1")
                .db()?
                .query_row([&correlation], |row| row.get::<_, String>(0))
                .optional()
                .db()?;
            let stored = stored
                .map(|hex| ResultDigest::from_hex(&hex).map_err(|e| corrupt("command_results", format!("digest: {e}"))))
                .transpose()?;
            let recorded = classify_result(stored, digest);
            if recorded == Recorded::New {
                conn.prepare_cached(
                    "INSERT INTO command_results (correlation_id, agent_id, status, exit_code, output, error, \
                     duration_ms, digest, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .db()?
                .execute(params![
                    correlation,
                    agent,
                    status,
                    exit_code,
                    output,
                    error,
                    duration_ms,
                    digest.to_hex(),
                    ts_sql(at)
                ])
                .db()?;
            }
            Ok(recorded)
        })
        .await
    }

    async fn save_telemetry(&self, rows: &[TelemetryRow]) -> Result<usize, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let samples: Vec<(String, i64, String, f64)> = rows
            .iter()
            .map(|r| (r.agent_id.as_str().to_owned(), ts_sql(r.ts), r.metric_key.as_str().to_owned(), r.value))
            .collect();
        let latest = samples.iter().map(|s| s.1).max().unwrap_or(0);
        self.write(move |conn| {
            const UPSERT: &str = "INSERT INTO telemetry (agent_id, ts, metric_key, value) VALUES ";
            const ON_CONFLICT: &str = " ON CONFLICT (agent_id, ts, metric_key) DO UPDATE SET value = excluded.value";
            let mut written = 0;
            let mut chunks = samples.chunks_exact(TELEMETRY_CHUNK);
            if chunks.len() > 0 {
                let values = vec!["(?, ?, ?, ?)"; TELEMETRY_CHUNK].join(", ");
                let mut stmt = conn.prepare_cached(&format!("{UPSERT}{values}{ON_CONFLICT}")).db()?;
                for chunk in &mut chunks {
                    let params = chunk.iter().flat_map(|(agent, ts, key, value)| {
                        [
                            SqlValue::Text(agent.clone()),
                            SqlValue::Integer(*ts),
                            SqlValue::Text(key.clone()),
                            SqlValue::Real(*value),
                        ]
                    });
                    written += stmt.execute(params_from_iter(params)).db()?;
                }
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut stmt = conn.prepare_cached(&format!("{UPSERT}(?1, ?2, ?3, ?4){ON_CONFLICT}")).db()?;
                for (agent, ts, key, value) in rest {
                    written += stmt.execute(params![agent, ts, key, value]).db()?;
                }
            }
            conn.prepare_cached(
                "INSERT INTO telemetry_watermark (id, latest_ts) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET latest_ts = max(latest_ts, excluded.latest_ts)",
            )
            .db()?
            .execute([latest])
            .db()?;
            Ok(written)
        })
        .await
    }

    async fn telemetry(&self, query: &TelemetryQuery) -> Result<Vec<TelemetryRow>, StoreError> {
        let mut sql = String::from("SELECT agent_id, ts, metric_key, value FROM telemetry WHERE agent_id = ?");
        let mut args = vec![SqlValue::Text(query.agent_id.as_str().to_owned())];
        if let Some(metric) = &query.metric {
            sql.push_str(" AND metric_key = ?");
            args.push(SqlValue::Text(metric.as_str().to_owned()));
        }
        if let Some(from) = query.from {
            sql.push_str(" AND ts >= ?");
            args.push(SqlValue::Integer(ts_sql(from)));
        }
        if let Some(to) = query.to {
            sql.push_str(" AND ts < ?");
            args.push(SqlValue::Integer(ts_sql(to)));
        }
        sql.push_str(" ORDER BY ts DESC, metric_key LIMIT ?");
        args.push(SqlValue::Integer(limit_sql(query.limit, 10_000)));
        self.read(move |conn| collect(conn, &sql, params_from_iter(args), read_telemetry, decode_telemetry)).await
    }

    async fn latest_telemetry(&self, agent: &AgentId) -> Result<Vec<TelemetryRow>, StoreError> {
        let agent = agent.as_str().to_owned();
        self.read(move |conn| {
            // SQLite returns the other columns of the row holding MAX(ts) (a documented
            // extension), found per metric through the (agent_id, metric_key, ts) index.
            let sql = "SELECT agent_id, MAX(ts), metric_key, value FROM telemetry WHERE agent_id = ?1 \
                       GROUP BY metric_key ORDER BY metric_key";
            collect(conn, sql, [agent], read_telemetry, decode_telemetry)
        })
        .await
    }

    async fn append_audits(&self, records: Arc<[Prepared]>) -> Result<Vec<Link>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |conn| {
            // Inside the writer, so the chain follows commit order and no two appends share
            // a predecessor.
            let last = conn
                .prepare_cached("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .db()?
                .query_row([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)))
                .optional()
                .db()?;
            let mut tip = match last {
                None => chain::Tip::EMPTY,
                Some((seq, hash)) => chain::Tip::from_stored(seq, &hash).map_err(|e| corrupt("audit_log", e))?,
            };
            let mut insert = conn
                .prepare_cached(&format!(
                    "INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                ))
                .db()?;
            let mut links = Vec::with_capacity(records.len());
            for record in records.iter() {
                let link = tip.link(record);
                insert
                    .execute(params![
                        u64_sql(link.seq),
                        ts_sql(record.ts()),
                        record.req_id(),
                        record.actor(),
                        record.action(),
                        record.args_hash(),
                        record.targets_json(),
                        record.rc(),
                        u64_sql(record.duration_ms()),
                        record.detail_json(),
                        &*chain::hex(&link.prev),
                        &*chain::hex(&link.hash),
                    ])
                    .db()?;
                links.push(link);
            }
            Ok(links)
        })
        .await
    }

    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE 1 = 1");
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(action) = &filter.action {
            sql.push_str(" AND action = ?");
            args.push(SqlValue::Text(action.clone()));
        }
        if let Some(actor) = &filter.actor {
            sql.push_str(" AND actor = ?");
            args.push(SqlValue::Text(actor.clone()));
        }
        if let Some(before) = filter.before {
            sql.push_str(" AND seq < ?");
            args.push(SqlValue::Integer(u64_sql(before)));
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?");
        args.push(SqlValue::Integer(limit_sql(filter.limit, 1000)));
        self.read(move |conn| collect(conn, &sql, params_from_iter(args), AuditRow::read, AuditRow::decode)).await
    }

    async fn verify_audit(&self) -> Result<ChainVerdict, StoreError> {
        self.read(|conn| {
            // One statement is one snapshot: appends committed meanwhile are not seen, and
            // rows stream through the check without being held in memory.
            let mut stmt = conn.prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq")).db()?;
            let mut rows = stmt.query([]).db()?;
            let mut stopped: Option<Result<ChainVerdict, StoreError>> = None;
            let entries = std::iter::from_fn(|| {
                let row = match rows.next() {
                    Ok(Some(row)) => row,
                    Ok(None) => return None,
                    Err(e) => {
                        stopped = Some(Err(StoreError::Database(e.to_string())));
                        return None;
                    }
                };
                let seq = row.get::<_, i64>(0).unwrap_or(-1);
                match AuditRow::read(row).db().and_then(AuditRow::decode) {
                    Ok(entry) => Some(entry),
                    Err(e) => {
                        // A row that cannot even be read was altered: that is a broken link,
                        // not a failure to check.
                        let seq = u64::try_from(seq).unwrap_or(0);
                        let reason = format!("the record cannot be read: {e}");
                        stopped = Some(Ok(ChainVerdict::Broken { seq, reason }));
                        None
                    }
                }
            });
            let verdict = chain::verify(entries);
            match (verdict, stopped) {
                (broken @ ChainVerdict::Broken { .. }, _) => Ok(broken),
                (_, Some(stopped)) => stopped,
                (intact, None) => Ok(intact),
            }
        })
        .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetterRow>, StoreError> {
        let limit = limit_sql(limit, 1000);
        self.read(move |conn| {
            collect(
                conn,
                "SELECT command_id, agent_id, reason, attempts, at FROM dead_letters \
                 ORDER BY at DESC, rowid DESC LIMIT ?1",
                [limit],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, i64>(4)?,
                    ))
                },
                |(command_id, agent_id, reason, attempts, at)| {
                    const T: &str = "dead_letters";
                    Ok(DeadLetterRow {
                        command_id: id_from(&command_id, T, "command_id")?,
                        agent_id: id_from(&agent_id, T, "agent_id")?,
                        reason,
                        attempts: u32_from(attempts, T, "attempts")?,
                        at: ts_from(at, T, "at")?,
                    })
                },
            )
        })
        .await
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let token = token.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO api_tokens (token_hash, name, role, created_at, revoked) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .db()?
            .execute(params![
                token.token_hash,
                token.name,
                token.role.as_str(),
                ts_sql(token.created_at),
                token.revoked
            ])
            // The secret's hash is not repeated in the error: it names the token by its name.
            .map_err(|e| insert_error(e, |_| format!("a token like {:?}", token.name)))?;
            Ok(())
        })
        .await
    }

    async fn token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read_here(|conn| {
            let row = conn
                .prepare_cached(
                    "SELECT token_hash, name, role, created_at, revoked FROM api_tokens WHERE token_hash = ?1",
                )
                .db()?
                .query_row([token_hash], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, bool>(4)?,
                    ))
                })
                .optional()
                .db()?;
            row.map(|(token_hash, name, role, created_at, revoked)| {
                const T: &str = "api_tokens";
                Ok(TokenRecord {
                    token_hash,
                    name,
                    role: Role::parse(&role).ok_or_else(|| corrupt(T, format!("unknown role {role:?}")))?,
                    created_at: ts_from(created_at, T, "created_at")?,
                    revoked,
                })
            })
            .transpose()
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction().db()?;
            let unfinished_by_state = collect(
                &tx,
                &format!(
                    "SELECT state, COUNT(*) FROM commands WHERE state IN {UNFINISHED} GROUP BY state ORDER BY state"
                ),
                [],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
                |(state, count)| Ok((state, u64_from(count, "commands", "count")?)),
            )?;
            let dead_letters: i64 =
                tx.prepare_cached("SELECT COUNT(*) FROM dead_letters").db()?.query_row([], |row| row.get(0)).db()?;
            let latest: Option<i64> = tx
                .prepare_cached("SELECT latest_ts FROM telemetry_watermark WHERE id = 1")
                .db()?
                .query_row([], |row| row.get(0))
                .optional()
                .db()?;
            Ok(StoreStats {
                unfinished_by_state,
                dead_letters: u64_from(dead_letters, "dead_letters", "count")?,
                latest_telemetry: latest.map(|t| ts_from(t, "telemetry_watermark", "latest_ts")).transpose()?,
            })
        })
        .await
    }

    fn writer_stats(&self) -> Option<WriterStats> {
        Some(SqliteStore::writer_stats(self))
    }

    fn pool_status(&self) -> PoolStatus {
        let readers = &self.inner.readers;
        PoolStatus { max: readers.size, in_use: readers.size - readers.permits.available_permits(), waiting: 0 }
    }

    async fn register_instance(&self, instance: &InstanceRecord) -> Result<(), StoreError> {
        self.take_over(instance).await
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

    async fn request_cancel(&self, _id: &CommandId) -> Result<(), StoreError> {
        // One process serves a SQLite database: there is no other instance to ask.
        Ok(())
    }

    fn wakeups(&self) -> Option<mpsc::Receiver<Wakeup>> {
        None
    }
}

fn read_telemetry(row: &Row<'_>) -> rusqlite::Result<(String, i64, String, f64)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
}

fn decode_telemetry((agent_id, ts, metric_key, value): (String, i64, String, f64)) -> Result<TelemetryRow, StoreError> {
    const T: &str = "telemetry";
    Ok(TelemetryRow {
        agent_id: id_from(&agent_id, T, "agent_id")?,
        ts: ts_from(ts, T, "ts")?,
        metric_key: id_from::<MetricKey>(&metric_key, T, "metric_key")?,
        value,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::QueueBounds;
    use crate::store::contract;
    use serde_json::json;

    /// A store on a fresh database file in its own temporary directory (kept alive by the
    /// returned guard).
    pub(crate) async fn fresh() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = SqliteStore::open(dir.path().join("nested").join("viworks.db")).expect("open the store");
        (store, dir)
    }

    mod contract_sqlite {
        async fn fresh() -> Option<(super::SqliteStore, tempfile::TempDir)> {
            Some(super::fresh().await)
        }

        crate::store::contract::store_contract_tests!(fresh);
    }

    fn audit(n: u64) -> NewAudit {
        NewAudit {
            ts: Timestamp::from_millis(1_000 + n),
            req_id: format!("req-{n}"),
            actor: "admin".into(),
            action: "agent.enrolled".into(),
            args_hash: chain::args_hash(&json!({ "n": n })),
            targets: vec![format!("gw-{n}")],
            rc: "201".into(),
            duration_ms: 3,
            detail: json!({ "n": n }),
        }
    }

    #[tokio::test]
    async fn an_audit_row_edited_in_the_file_breaks_the_chain_at_that_row() {
        let (store, dir) = fresh().await;
        for n in 1..=4 {
            store.append_audit(&audit(n)).await.expect("append");
        }
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 4 });
        let tamper = Connection::open(dir.path().join("nested").join("viworks.db")).expect("open the file");
        tamper.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
        assert_eq!(tamper.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2", []).expect("tamper"), 1);
        let verdict = store.verify_audit().await.expect("verify");
        assert!(matches!(verdict, ChainVerdict::Broken { seq: 2, .. }), "{verdict:?}");

        tamper.execute("UPDATE audit_log SET actor = 'admin' WHERE seq = 2", []).expect("restore");
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 4 });
        tamper.execute("UPDATE audit_log SET detail = 'not json' WHERE seq = 3", []).expect("tamper");
        let verdict = store.verify_audit().await.expect("an unreadable row is a verdict, not an error");
        assert!(matches!(verdict, ChainVerdict::Broken { seq: 3, .. }), "{verdict:?}");

        tamper.execute("UPDATE audit_log SET detail = '{\"n\":3}' WHERE seq = 3", []).expect("restore");
        tamper.execute("DELETE FROM audit_log WHERE seq = 2", []).expect("delete");
        let verdict = store.verify_audit().await.expect("verify");
        assert!(matches!(verdict, ChainVerdict::Broken { seq: 3, .. }), "{verdict:?}");
    }

    #[tokio::test]
    async fn data_survives_closing_and_reopening_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("viworks.db");
        let store = SqliteStore::open(&path).expect("open");
        let agent = contract::agent_record("gw-1", "fra");
        store.enroll_agent(&agent).await.expect("enroll");
        store.append_audit(&audit(1)).await.expect("append");
        let (job, commands) = contract::job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
        store.create_job(&job, &commands, QueueBounds::UNBOUNDED, None).await.expect("create");
        store.close().await;

        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.agent(&agent.agent_id).await.expect("read"), Some(agent));
        assert_eq!(store.unfinished_commands().await.expect("read"), commands);
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 1 });
        let entry = store.append_audit(&audit(2)).await.expect("append after reopening");
        assert_eq!(entry.seq, 2);
        drop(store);

        // Dropping without close also flushes: the writer commits what was queued, then stops.
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 2 });
    }

    #[tokio::test]
    async fn writes_after_close_fail_closed_and_reads_still_work() {
        let (store, _dir) = fresh().await;
        let other = store.clone();
        store.append_audit(&audit(1)).await.expect("append");
        store.close().await;
        assert!(matches!(other.append_audit(&audit(2)).await, Err(StoreError::Closed)));
        assert!(matches!(other.ping().await, Err(StoreError::Closed)));
        assert_eq!(other.audit(&AuditFilter::default()).await.expect("read").len(), 1);
    }

    #[tokio::test]
    async fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("viworks.db");
        drop(SqliteStore::open(&path).expect("open"));
        let conn = Connection::open(&path).expect("open the file");
        conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)", []).expect("insert");
        drop(conn);
        match SqliteStore::open(&path) {
            Err(StoreError::SchemaTooNew { found: 99, supported }) => {
                assert_eq!(usize::try_from(supported).expect("small"), MIGRATIONS.len());
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn migrations_are_recorded_and_not_reapplied() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("viworks.db");
        drop(SqliteStore::open(&path).expect("open"));
        drop(SqliteStore::open(&path).expect("reopen applies nothing twice"));
        let conn = Connection::open(&path).expect("open the file");
        let versions: Vec<i64> = conn
            .prepare("SELECT version FROM schema_migrations ORDER BY version")
            .expect("prepare")
            .query_map([], |row| row.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(versions, (1..=i64::try_from(MIGRATIONS.len()).expect("small")).collect::<Vec<_>>());
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0)).expect("pragma");
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_panicked_on() {
        let (store, dir) = fresh().await;
        store.enroll_agent(&contract::agent_record("gw-1", "fra")).await.expect("enroll");
        let (job, commands) = contract::job_of("job-1", None, &[("cmd-1", "gw-1")], 0);
        store.create_job(&job, &commands, QueueBounds::UNBOUNDED, None).await.expect("create");
        let conn = Connection::open(dir.path().join("nested").join("viworks.db")).expect("open the file");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
        conn.execute("UPDATE agents SET agent_id = 'not an id!'", []).expect("tamper");
        conn.execute("UPDATE commands SET state = 'exploded'", []).expect("tamper");
        assert!(matches!(
            store.agents(&AgentFilter::default()).await,
            Err(StoreError::Corrupt { table: "agents", .. })
        ));
        assert!(matches!(store.unfinished_commands().await, Ok(v) if v.is_empty()), "not an unfinished state");
        let id = CommandId::new("cmd-1").expect("id");
        assert!(matches!(store.command(&id).await, Err(StoreError::Corrupt { table: "commands", .. })));
    }

    #[tokio::test]
    async fn checkpoints_copy_the_log_into_the_database_while_the_store_is_open() {
        let (store, dir) = fresh().await;
        let file = dir.path().join("nested").join("viworks.db");
        let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let before = size();
        let agent = AgentId::new("gw-1").expect("id");
        let key = MetricKey::new("cpu.load").expect("key");
        // About 7 MiB of rows and index entries through the log: several checkpoint intervals.
        for batch in 0..60 {
            let rows: Vec<TelemetryRow> = (0..2_000)
                .map(|n| TelemetryRow {
                    agent_id: agent.clone(),
                    ts: Timestamp::from_millis(batch * 2_000 + n),
                    metric_key: key.clone(),
                    value: n as f64,
                })
                .collect();
            store.save_telemetry(&rows).await.expect("stored");
        }
        let grown = || size() >= before + 2 * 1024 * 1024;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !grown() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(grown(), "the database file stayed at {} bytes (was {before})", size());
        store.close().await;
    }

    /// The kept number of unfinished commands, beside the same counted from the commands.
    fn unfinished(conn: &Connection) -> (i64, i64) {
        let one = |sql: &str| -> i64 { conn.query_row(sql, [], |row| row.get(0)).expect("count") };
        (
            one("SELECT unfinished FROM queue_total WHERE id = 1"),
            one(&format!("SELECT COUNT(*) FROM commands WHERE state IN {UNFINISHED}")),
        )
    }

    #[test]
    fn the_unfinished_states_are_the_ones_named_in_sql() {
        for state in ["queued", "sent", "acked", "succeeded", "failed", "timed_out", "cancelled", "dead_lettered"] {
            assert_eq!(is_unfinished(state), UNFINISHED.contains(&format!("'{state}'")), "{state}");
        }
    }

    #[tokio::test]
    async fn the_kept_count_of_unfinished_commands_follows_every_change() {
        let (store, dir) = fresh().await;
        let conn = Connection::open(dir.path().join("nested").join("viworks.db")).expect("open the file");
        conn.busy_timeout(Duration::from_secs(5)).expect("busy timeout");
        let check = |step: &str, expected: i64| assert_eq!(unfinished(&conn), (expected, expected), "after {step}");
        check("opening", 0);
        let pairs = [("cmd-1", "gw-1"), ("cmd-2", "gw-1"), ("cmd-3", "gw-2"), ("cmd-4", "gw-3"), ("cmd-5", "gw-3")];
        let (job, commands) = contract::job_of("job-1", None, &pairs, 0);
        store.create_job(&job, &commands, QueueBounds::UNBOUNDED, None).await.expect("create");
        check("a job", 5);
        let sent = CommandRecord { state: CommandState::Sent { session: 1 }, ..commands[2].clone() };
        let finished = CommandRecord { state: CommandState::Done(Terminal::Succeeded), ..commands[0].clone() };
        store.save_commands(&[sent, finished.clone()]).await.expect("saved");
        check("a command sent and one finished", 4);
        store.save_commands(&[finished]).await.expect("saved");
        check("the same command finished again", 4);
        let refused = contract::job_of("job-2", None, &[("cmd-6", "gw-1"), ("cmd-7", "gw-4")], 0);
        let bounds = QueueBounds { max_commands: 100, per_agent: 1 };
        assert!(store.create_job(&refused.0, &refused.1, bounds, None).await.is_err(), "gw-1 is full");
        check("a refused job", 4);
        let cancelled = store.cancel_unowned(&commands[1].command.command_id, Timestamp::from_millis(1)).await;
        assert_eq!(cancelled.expect("cancels"), CancelOutcome::Cancelled);
        check("a cancelled command", 3);
        let expired = store.expire_unowned(Timestamp::from_millis(u64::MAX / 4), Duration::ZERO).await;
        assert_eq!(expired.expect("expired").len(), 3, "every unowned command outlived its timers");
        check("the queue's timers", 0);
        // A count gone wrong is right again from the next start.
        conn.execute("UPDATE queue_total SET unfinished = 42", []).expect("tamper");
        store.close().await;
        let _reopened = SqliteStore::open(dir.path().join("nested").join("viworks.db")).expect("reopen");
        check("reopening", 0);
    }

    #[tokio::test]
    async fn the_unfinished_count_of_an_older_database_is_filled_in_by_its_upgrade() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("viworks.db");
        let store = SqliteStore::open(&path).expect("open");
        let (job, commands) = contract::job_of("job-1", None, &[("cmd-1", "gw-1"), ("cmd-2", "gw-2")], 0);
        store.create_job(&job, &commands, QueueBounds::UNBOUNDED, None).await.expect("create");
        store.close().await;
        // Back to version 2: the commands stay, the count goes.
        let conn = Connection::open(&path).expect("open the file");
        conn.execute_batch("DROP TABLE queue_total; DELETE FROM schema_migrations WHERE version = 3;")
            .expect("downgrade");
        let store = SqliteStore::open(&path).expect("the upgrade applies");
        assert_eq!(unfinished(&conn), (2, 2));
        let bounds = QueueBounds { max_commands: 2, per_agent: 10 };
        let (job, commands) = contract::job_of("job-2", None, &[("cmd-3", "gw-3")], 0);
        assert!(
            matches!(
                store.create_job(&job, &commands, bounds, None).await,
                Err(StoreError::QueueFull { global: true, .. })
            ),
            "the upgraded count holds the bound"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn concurrent_writes_share_transactions() {
        let (store, _dir) = fresh().await;
        let before = store.writer_stats();
        let agent = AgentId::new("gw-1").expect("id");
        let results: Vec<_> = (0..500).map(contract::result_for).collect();
        let writes = results.iter().map(|r| store.save_result(&agent, r, Timestamp::from_millis(1)));
        for outcome in futures_util::future::join_all(writes).await {
            assert_eq!(outcome.expect("stored"), Recorded::New);
        }
        let after = store.writer_stats();
        assert_eq!(after.requests - before.requests, 500);
        assert!(
            after.transactions - before.transactions < 500,
            "500 queued writes took {} transactions",
            after.transactions - before.transactions
        );
    }
}
