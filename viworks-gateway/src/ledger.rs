//! The execution ledger and outbox in SQLite under `STATE_DIR`: what the agent started and
//! finished, durable before each method returns, so that a command runs at most once across
//! crashes and its result survives until the host has stored it.
//!
//! One table, one row per command:
//!
//! ```text
//!   record_started ──▶ started ──record_finished──▶ finished, acked = 0 (in the outbox)
//!                                                      │ record_acked
//!                                                      ▼
//!                                  finished, acked = 1 (answers re-deliveries until pruned)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use thiserror::Error;
use viworks_core::Timestamp;
use viworks_core::session::{ExecutionLedger, LedgerEntry};
use viworks_core::wire::{Command, CommandId, CommandResult, IdError};

/// The schema, one entry per version: entry `i` takes the database from version `i` to
/// `i + 1` (kept in `PRAGMA user_version`). Append only; never edit an entry that has shipped.
const MIGRATIONS: &[&str] = &[
    // Version 1. Times are INTEGER milliseconds since the Unix epoch; `result` is the JSON of a
    // `CommandResult`. `seq` orders insertions, `finish_seq` orders the outbox (clocks can step
    // back, counters cannot).
    r#"
    CREATE TABLE ledger (
        command_id  TEXT PRIMARY KEY NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('started', 'finished')),
        result      TEXT,
        acked       INTEGER NOT NULL DEFAULT 0 CHECK (acked IN (0, 1)),
        started_at  INTEGER,
        finished_at INTEGER,
        seq         INTEGER NOT NULL UNIQUE,
        finish_seq  INTEGER UNIQUE,
        CHECK ((state = 'finished') = (result IS NOT NULL AND finished_at IS NOT NULL AND finish_seq IS NOT NULL)),
        CHECK (acked = 0 OR state = 'finished')
    ) STRICT;
    CREATE INDEX ledger_unfinished ON ledger (seq) WHERE state = 'started';
    CREATE INDEX ledger_outbox ON ledger (finish_seq) WHERE state = 'finished' AND acked = 0;
    CREATE INDEX ledger_prunable ON ledger (finish_seq) WHERE state = 'finished' AND acked = 1;
    "#,
];

/// The schema version this build writes.
const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// How long a statement waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most memory SQLite's page cache may hold for the ledger, in KiB.
const CACHE_KIB: i64 = 512;

/// How long finished, acknowledged entries are kept, and how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Acknowledged entries older than this are pruned.
    pub max_age: Duration,
    /// At most this many entries are kept; the oldest acknowledged go first.
    pub max_entries: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { max_age: Duration::from_secs(7 * 24 * 3600), max_entries: 100_000 }
    }
}

/// Why the ledger failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// SQLite failed.
    #[error("ledger database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The ledger's directory or file could not be created.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The ledger file could not be opened, configured or migrated.
    #[error("cannot open the ledger {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file system refused write-ahead logging (some network file systems do).
    #[error("cannot switch the ledger {} to WAL mode (it is in {mode} mode)", path.display())]
    NotWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// The database was written by a newer build; this one refuses to touch it rather than
    /// misread it. Upgrade the agent, or move the file aside (losing the ledger).
    #[error("the ledger {} has schema version {found}; this build supports up to {supported}", path.display())]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// Every entry is unfinished or unacknowledged, so none can be pruned to make room. The
    /// command is not recorded (and must not run); room frees up as the host acknowledges
    /// results.
    #[error("the ledger holds {max_entries} entries, none of them prunable")]
    Full {
        /// The configured limit ([`Retention::max_entries`]).
        max_entries: usize,
    },
    /// A stored result is not a valid `CommandResult` (the file was damaged or edited).
    #[error("the stored result of {command_id} is corrupt: {source}")]
    CorruptResult {
        /// The entry's key as stored.
        command_id: String,
        /// Why it does not decode.
        source: serde_json::Error,
    },
    /// A stored key is not a valid command id (the file was damaged or edited).
    #[error("the ledger holds an invalid command id {command_id:?}: {source}")]
    CorruptId {
        /// The key as stored.
        command_id: String,
        /// Why it is invalid.
        source: IdError,
    },
    /// A result could not be encoded as JSON.
    #[error("cannot encode the result of {command_id}: {source}")]
    Encode {
        /// The command.
        command_id: CommandId,
        /// Why.
        source: serde_json::Error,
    },
}

/// The [`ExecutionLedger`] of the agent: one SQLite file in WAL mode with `synchronous=FULL`,
/// so that every write has reached stable storage when its method returns (one fsync each).
///
/// Holds at most [`Retention::max_entries`] entries: recording a new command prunes the
/// oldest acknowledged entries to make room, and fails with [`LedgerError::Full`] when there
/// are none.
#[derive(Debug)]
pub struct SqliteLedger {
    conn: Connection,
    retention: Retention,
}

impl SqliteLedger {
    /// Opens (creating and migrating) the ledger at `path`.
    ///
    /// Creates the parent directory (mode 0700) and the file (mode 0600) when missing. Blocks
    /// on file I/O. Fails with [`LedgerError::SchemaTooNew`] when a newer build wrote the file,
    /// and with an error naming `path` when it cannot be created, opened or migrated.
    pub fn open(path: &Path, retention: Retention) -> Result<SqliteLedger, LedgerError> {
        prepare_file(path)?;
        let open_err = |source| LedgerError::Open { path: path.to_path_buf(), source };
        let mut conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE)
                .map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(LedgerError::NotWal { path: path.to_path_buf(), mode });
        }
        // In WAL mode `synchronous=NORMAL` syncs only at checkpoints: a commit would survive
        // this process crashing but not the machine losing power, and a command recorded
        // started could then run twice. `FULL` syncs the WAL at every commit.
        conn.pragma_update(None, "synchronous", "FULL").map_err(open_err)?;
        // The page cache is the one part of the agent's memory that grows with the ledger:
        // once filled by a busy spell it stays resident. Reads are by key or along an index,
        // so a bound well below SQLite's default 2 MiB costs no extra I/O worth noticing.
        conn.pragma_update(None, "cache_size", -CACHE_KIB).map_err(open_err)?;
        migrate(&mut conn, path)?;
        let retention = Retention { max_entries: retention.max_entries.max(1), ..retention };
        Ok(SqliteLedger { conn, retention })
    }

    /// Prunes by age and size; returns how many entries went.
    ///
    /// Only finished, acknowledged entries go: first those finished before
    /// `now - max_age`, then the oldest (by finish order) while more than `max_entries`
    /// remain. Started and unacknowledged entries are never pruned, so the ledger can stay
    /// above `max_entries` until the host acknowledges results.
    pub fn prune(&mut self, now: Timestamp) -> Result<usize, LedgerError> {
        let cutoff = sql_ts(now.saturating_sub(self.retention.max_age));
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let by_age = tx.execute(
            "DELETE FROM ledger WHERE state = 'finished' AND acked = 1 AND finished_at < ?1",
            params![cutoff],
        )?;
        let count = count(&tx)?;
        let by_size = delete_oldest_acked(&tx, count.saturating_sub(self.retention.max_entries))?;
        tx.commit()?;
        Ok(by_age + by_size)
    }

    /// Entries held, of every state.
    pub fn len(&self) -> Result<usize, LedgerError> {
        count(&self.conn)
    }

    /// Whether the ledger holds no entry.
    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        Ok(self.len()? == 0)
    }

    /// The retention in force (`max_entries` raised to at least 1).
    pub fn retention(&self) -> Retention {
        self.retention
    }
}

impl ExecutionLedger for SqliteLedger {
    type Error = LedgerError;

    fn entry(&mut self, id: &CommandId) -> Result<Option<LedgerEntry>, LedgerError> {
        let row: Option<(String, Option<String>, bool)> = self
            .conn
            .prepare_cached("SELECT state, result, acked FROM ledger WHERE command_id = ?1")?
            .query_row(params![id.as_str()], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .optional()?;
        match row {
            None => Ok(None),
            // The CHECK constraints hold `result` non-null exactly when the state is finished.
            Some((state, Some(json), acked)) if state == "finished" => {
                Ok(Some(LedgerEntry::Finished { result: decode(id.as_str(), &json)?, acked }))
            }
            Some(_) => Ok(Some(LedgerEntry::Started)),
        }
    }

    /// Records `command` as started. A command already in the ledger is left as it is (the
    /// guard never records a known command; overwriting a finished entry would lose its result).
    /// Fails with [`LedgerError::Full`] when the ledger is full of entries it cannot prune.
    fn record_started(&mut self, command: &Command, now: Timestamp) -> Result<(), LedgerError> {
        let max_entries = self.retention.max_entries;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !exists(&tx, &command.command_id)? {
            make_room(&tx, max_entries)?;
            tx.prepare_cached(
                "INSERT INTO ledger (command_id, state, acked, started_at, seq)
                 VALUES (?1, 'started', 0, ?2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger))",
            )?
            .execute(params![command.command_id.as_str(), sql_ts(now)])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records `result` and puts it at the back of the outbox; an entry not started before
    /// (a refusal) is created, which can fail with [`LedgerError::Full`]. Finishing an entry
    /// again replaces its result and puts it back in the outbox.
    fn record_finished(&mut self, result: &CommandResult, now: Timestamp) -> Result<(), LedgerError> {
        let json = serde_json::to_string(result)
            .map_err(|source| LedgerError::Encode { command_id: result.command_id.clone(), source })?;
        let max_entries = self.retention.max_entries;
        let id = result.command_id.as_str();
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if exists(&tx, &result.command_id)? {
            tx.prepare_cached(
                "UPDATE ledger SET state = 'finished', result = ?2, acked = 0, finished_at = ?3,
                     finish_seq = (SELECT COALESCE(MAX(finish_seq), 0) + 1 FROM ledger)
                 WHERE command_id = ?1",
            )?
            .execute(params![id, json, sql_ts(now)])?;
        } else {
            make_room(&tx, max_entries)?;
            tx.prepare_cached(
                "INSERT INTO ledger (command_id, state, result, acked, finished_at, seq, finish_seq)
                 VALUES (?1, 'finished', ?2, 0, ?3,
                     (SELECT COALESCE(MAX(seq), 0) + 1 FROM ledger),
                     (SELECT COALESCE(MAX(finish_seq), 0) + 1 FROM ledger))",
            )?
            .execute(params![id, json, sql_ts(now)])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks the finished entries among `ids` acknowledged, in one transaction; unknown and
    /// unfinished ids are ignored.
    fn record_acked(&mut self, ids: &[CommandId]) -> Result<(), LedgerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut update =
                tx.prepare_cached("UPDATE ledger SET acked = 1 WHERE command_id = ?1 AND state = 'finished'")?;
            for id in ids {
                update.execute(params![id.as_str()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` finished, unacknowledged results, in the order they finished.
    fn outbox(&mut self, limit: usize) -> Result<Vec<CommandResult>, LedgerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut select = self.conn.prepare_cached(
            "SELECT command_id, result FROM ledger WHERE state = 'finished' AND acked = 0
             ORDER BY finish_seq LIMIT ?1",
        )?;
        let rows = select.query_map(params![limit], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?;
        let mut results = Vec::new();
        for row in rows {
            let (id, json) = row?;
            results.push(decode(&id, &json)?);
        }
        Ok(results)
    }

    /// Commands started and never finished, in the order they started.
    fn unfinished(&mut self) -> Result<Vec<CommandId>, LedgerError> {
        let mut select =
            self.conn.prepare_cached("SELECT command_id FROM ledger WHERE state = 'started' ORDER BY seq")?;
        let rows = select.query_map([], |row| row.get::<_, String>(0))?;
        let mut ids = Vec::new();
        for row in rows {
            let raw = row?;
            match CommandId::new(raw.as_str()) {
                Ok(id) => ids.push(id),
                Err(source) => return Err(LedgerError::CorruptId { command_id: raw, source }),
            }
        }
        Ok(ids)
    }
}

/// Creates the parent directory (0700: the ledger holds command output) and the file (0600;
/// SQLite gives its `-wal` and `-shm` files the main file's mode).
fn prepare_file(path: &Path) -> Result<(), LedgerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut dirs, 0o700);
        dirs.create(parent).map_err(|source| LedgerError::Create { path: parent.to_path_buf(), source })?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop).map_err(|source| LedgerError::Create { path: path.to_path_buf(), source })
}

/// Brings the schema up to [`SCHEMA_VERSION`], one transaction per version.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), LedgerError> {
    let open_err = |source| LedgerError::Open { path: path.to_path_buf(), source };
    let too_new = |found| LedgerError::SchemaTooNew { path: path.to_path_buf(), found, supported: SCHEMA_VERSION };
    for (index, sql) in MIGRATIONS.iter().enumerate() {
        let version = u32::try_from(index + 1).unwrap_or(u32::MAX);
        // IMMEDIATE takes the write lock first, so two processes opening the file at once
        // cannot both apply a version; the version is read again inside the lock.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(open_err)?;
        let found = user_version(&tx).map_err(open_err)?;
        if found > SCHEMA_VERSION {
            return Err(too_new(found));
        }
        if found >= version {
            continue;
        }
        tx.execute_batch(sql).map_err(open_err)?;
        // `user_version` lives in the database header and commits with the transaction.
        tx.pragma_update(None, "user_version", version).map_err(open_err)?;
        tx.commit().map_err(open_err)?;
        tracing::info!(version, path = %path.display(), "migrated the ledger");
    }
    // A database newer than every migration is refused even when there is nothing to apply.
    let found = user_version(conn).map_err(open_err)?;
    if found > SCHEMA_VERSION {
        return Err(too_new(found));
    }
    Ok(())
}

fn user_version(conn: &Connection) -> Result<u32, rusqlite::Error> {
    // SQLite stores it as a signed 32-bit integer; a negative one is as foreign as a newer one.
    let raw: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    Ok(u32::try_from(raw).unwrap_or(u32::MAX))
}

fn sql_ts(at: Timestamp) -> i64 {
    i64::try_from(at.as_millis()).unwrap_or(i64::MAX)
}

fn count(conn: &Connection) -> Result<usize, LedgerError> {
    let n: i64 = conn.prepare_cached("SELECT COUNT(*) FROM ledger")?.query_row([], |row| row.get(0))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

fn exists(conn: &Connection, id: &CommandId) -> Result<bool, LedgerError> {
    Ok(conn.prepare_cached("SELECT 1 FROM ledger WHERE command_id = ?1")?.exists(params![id.as_str()])?)
}

/// Deletes the `n` oldest (by finish order) finished, acknowledged entries, or as many as
/// there are; returns how many went.
fn delete_oldest_acked(conn: &Connection, n: usize) -> Result<usize, LedgerError> {
    if n == 0 {
        return Ok(0);
    }
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    Ok(conn
        .prepare_cached(
            "DELETE FROM ledger WHERE command_id IN (
                 SELECT command_id FROM ledger WHERE state = 'finished' AND acked = 1
                 ORDER BY finish_seq LIMIT ?1)",
        )?
        .execute(params![n])?)
}

/// Makes room for one more entry, within the caller's transaction.
fn make_room(conn: &Connection, max_entries: usize) -> Result<(), LedgerError> {
    let held = count(conn)?;
    if held < max_entries {
        return Ok(());
    }
    let excess = held - max_entries + 1;
    if delete_oldest_acked(conn, excess)? < excess {
        // Nothing deleted is kept: the caller's transaction rolls back when it drops.
        return Err(LedgerError::Full { max_entries });
    }
    Ok(())
}

fn decode(command_id: &str, json: &str) -> Result<CommandResult, LedgerError> {
    serde_json::from_str(json)
        .map_err(|source| LedgerError::CorruptResult { command_id: command_id.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use viworks_core::Entropy;
    use viworks_core::auth::{AgentKey, ChannelBinding, MasterKey};
    use viworks_core::session::{AgentConfig, AgentSession, ExecutionGuard, Host, HostConfig, HostEvent};
    use viworks_core::wire::{AgentId, ResultStatus, Verb};

    use super::*;

    const MASTER: [u8; 32] = [7; 32];
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + ms)
    }

    fn cid(s: &str) -> CommandId {
        CommandId::new(s).expect("valid id")
    }

    fn command(id: &str) -> Command {
        Command {
            command_id: cid(id),
            verb: Verb::new("get_system_health").expect("verb"),
            args: serde_json::json!({}),
            timeout_ms: 5_000,
            attempt: 1,
        }
    }

    fn result(id: &str, status: ResultStatus) -> CommandResult {
        CommandResult {
            command_id: cid(id),
            status,
            exit_code: Some(0),
            output: serde_json::json!({ "answer": 42 }),
            error: None,
            duration_ms: 12,
        }
    }

    fn retention(max_entries: usize) -> Retention {
        Retention { max_age: DAY, max_entries }
    }

    /// A ledger in a fresh directory; keep the directory alive as long as the ledger.
    fn ledger(max_entries: usize) -> (tempfile::TempDir, PathBuf, SqliteLedger) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join("ledger.db");
        let ledger = SqliteLedger::open(&path, retention(max_entries)).expect("opens");
        (dir, path, ledger)
    }

    /// Starts, finishes and acknowledges `id` at `now`.
    fn settle(ledger: &mut SqliteLedger, id: &str, now: Timestamp) {
        ledger.record_started(&command(id), now).expect("started");
        ledger.record_finished(&result(id, ResultStatus::Succeeded), now).expect("finished");
        ledger.record_acked(&[cid(id)]).expect("acked");
    }

    fn outbox_ids(ledger: &mut SqliteLedger) -> Vec<String> {
        ledger.outbox(100).expect("outbox").into_iter().map(|r| r.command_id.to_string()).collect()
    }

    #[test]
    fn entries_move_from_started_to_finished_to_acked() {
        let (_dir, _path, mut ledger) = ledger(16);
        assert_eq!(ledger.entry(&cid("a")).expect("entry"), None);
        ledger.record_started(&command("a"), at(1)).expect("started");
        assert_eq!(ledger.entry(&cid("a")).expect("entry"), Some(LedgerEntry::Started));
        let done = result("a", ResultStatus::Succeeded);
        ledger.record_finished(&done, at(2)).expect("finished");
        assert_eq!(
            ledger.entry(&cid("a")).expect("entry"),
            Some(LedgerEntry::Finished { result: done.clone(), acked: false })
        );
        ledger.record_acked(&[cid("a")]).expect("acked");
        assert_eq!(ledger.entry(&cid("a")).expect("entry"), Some(LedgerEntry::Finished { result: done, acked: true }));
    }

    #[test]
    fn the_outbox_holds_unacknowledged_results_in_finish_order() {
        let (_dir, _path, mut ledger) = ledger(16);
        for id in ["a", "b", "c"] {
            ledger.record_started(&command(id), at(1)).expect("started");
        }
        assert!(ledger.outbox(10).expect("outbox").is_empty(), "nothing finished yet");
        ledger.record_finished(&result("c", ResultStatus::Succeeded), at(2)).expect("finished");
        ledger.record_finished(&result("a", ResultStatus::Failed), at(2)).expect("finished");
        assert_eq!(outbox_ids(&mut ledger), ["c", "a"]);
        let first = ledger.outbox(1).expect("outbox");
        assert_eq!(first, vec![result("c", ResultStatus::Succeeded)], "the limit applies, oldest first");
        assert!(ledger.outbox(0).expect("outbox").is_empty());
        ledger.record_acked(&[cid("c")]).expect("acked");
        assert_eq!(outbox_ids(&mut ledger), ["a"]);
    }

    #[test]
    fn unfinished_lists_started_commands_in_start_order() {
        let (_dir, _path, mut ledger) = ledger(16);
        for id in ["z", "a", "m"] {
            ledger.record_started(&command(id), at(1)).expect("started");
        }
        ledger.record_finished(&result("a", ResultStatus::Succeeded), at(2)).expect("finished");
        assert_eq!(ledger.unfinished().expect("unfinished"), vec![cid("z"), cid("m")]);
    }

    #[test]
    fn acking_ignores_unknown_and_unfinished_ids() {
        let (_dir, _path, mut ledger) = ledger(16);
        ledger.record_started(&command("running"), at(1)).expect("started");
        ledger.record_started(&command("done"), at(1)).expect("started");
        ledger.record_finished(&result("done", ResultStatus::Succeeded), at(2)).expect("finished");
        ledger.record_acked(&[cid("nobody"), cid("running"), cid("done")]).expect("acked");
        assert_eq!(ledger.entry(&cid("running")).expect("entry"), Some(LedgerEntry::Started));
        assert_eq!(ledger.entry(&cid("nobody")).expect("entry"), None);
        assert!(matches!(ledger.entry(&cid("done")).expect("entry"), Some(LedgerEntry::Finished { acked: true, .. })));
        ledger.record_acked(&[]).expect("an empty ack is fine");
    }

    #[test]
    fn a_result_for_a_command_never_started_is_recorded() {
        let (_dir, _path, mut ledger) = ledger(16);
        let refused = result("refused", ResultStatus::Rejected);
        ledger.record_finished(&refused, at(1)).expect("finished");
        assert_eq!(
            ledger.entry(&cid("refused")).expect("entry"),
            Some(LedgerEntry::Finished { result: refused, acked: false })
        );
        assert_eq!(outbox_ids(&mut ledger), ["refused"]);
        assert!(ledger.unfinished().expect("unfinished").is_empty());
    }

    #[test]
    fn starting_a_known_command_again_keeps_its_result() {
        let (_dir, _path, mut ledger) = ledger(16);
        settle(&mut ledger, "a", at(1));
        ledger.record_started(&command("a"), at(2)).expect("no-op");
        assert!(matches!(ledger.entry(&cid("a")).expect("entry"), Some(LedgerEntry::Finished { acked: true, .. })));
        assert_eq!(ledger.len().expect("len"), 1);
    }

    #[test]
    fn a_started_command_survives_close_and_is_recovered_as_interrupted() {
        let (_dir, path, mut ledger) = ledger(16);
        ledger.record_started(&command("a"), at(1)).expect("started");
        drop(ledger);

        let mut ledger = SqliteLedger::open(&path, retention(16)).expect("reopens");
        assert_eq!(ledger.unfinished().expect("unfinished"), vec![cid("a")]);
        let guard = ExecutionGuard::recover(ledger, at(10), 2).expect("recovers");
        drop(guard);

        let mut ledger = SqliteLedger::open(&path, retention(16)).expect("reopens");
        assert!(ledger.unfinished().expect("unfinished").is_empty());
        let outbox = ledger.outbox(10).expect("outbox");
        assert!(matches!(outbox.as_slice(), [r] if r.command_id == cid("a") && r.status == ResultStatus::Interrupted));
    }

    #[test]
    fn the_database_is_in_wal_mode_with_full_sync_a_bounded_cache_and_a_private_directory() {
        let (_dir, path, ledger) = ledger(16);
        let mode: String = ledger.conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("pragma");
        assert_eq!(mode, "wal");
        let sync: i64 = ledger.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).expect("pragma");
        assert_eq!(sync, 2, "FULL");
        let cache: i64 = ledger.conn.query_row("PRAGMA cache_size", [], |r| r.get(0)).expect("pragma");
        assert_eq!(cache, -CACHE_KIB, "the page cache is bounded in KiB");
        let dir_mode = std::fs::metadata(path.parent().expect("parent")).expect("stat").permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let file_mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(file_mode & 0o777, 0o600);
    }

    #[test]
    fn prune_removes_only_old_acknowledged_entries() {
        let (_dir, _path, mut ledger) = ledger(16);
        settle(&mut ledger, "old-acked", at(0));
        ledger.record_started(&command("old-running"), at(0)).expect("started");
        ledger.record_finished(&result("old-unacked", ResultStatus::Succeeded), at(0)).expect("finished");
        settle(&mut ledger, "new-acked", at(0).saturating_add(DAY));

        assert_eq!(ledger.prune(at(0).saturating_add(DAY)).expect("prune"), 0, "nothing is older than a day yet");
        assert_eq!(ledger.prune(at(1).saturating_add(DAY)).expect("prune"), 1);
        assert_eq!(ledger.entry(&cid("old-acked")).expect("entry"), None);
        assert_eq!(ledger.entry(&cid("old-running")).expect("entry"), Some(LedgerEntry::Started));
        assert!(ledger.entry(&cid("old-unacked")).expect("entry").is_some());
        assert!(ledger.entry(&cid("new-acked")).expect("entry").is_some());
        // Far in the future, the unacknowledged and the started still stay.
        assert_eq!(ledger.prune(at(0).saturating_add(DAY * 365)).expect("prune"), 1);
        assert_eq!(ledger.len().expect("len"), 2);
    }

    #[test]
    fn prune_by_size_removes_the_oldest_acknowledged_first() {
        let (_dir, path, mut ledger) = ledger(16);
        for (n, id) in ["a1", "a2", "a3", "a4", "a5"].into_iter().enumerate() {
            settle(&mut ledger, id, at(n as u64));
        }
        ledger.record_finished(&result("unacked", ResultStatus::Succeeded), at(0)).expect("finished");
        ledger.record_started(&command("running"), at(0)).expect("started");
        drop(ledger);

        // Reopened with a smaller limit: 7 entries, 3 allowed, 2 of them not prunable.
        let mut ledger = SqliteLedger::open(&path, retention(3)).expect("reopens");
        assert_eq!(ledger.prune(at(10)).expect("prune"), 4);
        assert_eq!(ledger.len().expect("len"), 3);
        assert!(ledger.entry(&cid("a5")).expect("entry").is_some(), "the newest acknowledged stays");
        assert!(ledger.entry(&cid("unacked")).expect("entry").is_some());
        assert!(ledger.entry(&cid("running")).expect("entry").is_some());

        // With only unprunable entries beyond the limit, prune does what it can and stops.
        let mut ledger = SqliteLedger::open(&path, retention(1)).expect("reopens");
        assert_eq!(ledger.prune(at(10)).expect("prune"), 1);
        assert_eq!(ledger.len().expect("len"), 2);
    }

    #[test]
    fn a_full_ledger_makes_room_from_acknowledged_entries_or_refuses() {
        let (_dir, _path, mut ledger) = ledger(2);
        ledger.record_started(&command("a"), at(1)).expect("started");
        ledger.record_started(&command("b"), at(1)).expect("started");
        assert!(matches!(ledger.record_started(&command("c"), at(2)), Err(LedgerError::Full { max_entries: 2 })));
        assert!(matches!(
            ledger.record_finished(&result("c", ResultStatus::Rejected), at(2)),
            Err(LedgerError::Full { .. })
        ));
        assert_eq!(ledger.entry(&cid("c")).expect("entry"), None, "a refused command is not recorded");

        // Finished but unacknowledged is still not prunable.
        ledger.record_finished(&result("a", ResultStatus::Succeeded), at(3)).expect("finished");
        assert!(matches!(ledger.record_started(&command("c"), at(3)), Err(LedgerError::Full { .. })));

        ledger.record_acked(&[cid("a")]).expect("acked");
        ledger.record_started(&command("c"), at(4)).expect("room was made");
        assert_eq!(ledger.entry(&cid("a")).expect("entry"), None, "the acknowledged entry made room");
        assert_eq!(ledger.len().expect("len"), 2);
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused() {
        let (_dir, path, ledger) = ledger(16);
        ledger.conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).expect("pragma");
        drop(ledger);
        let err = SqliteLedger::open(&path, retention(16)).expect_err("refused");
        let newer = SCHEMA_VERSION + 1;
        assert!(matches!(err, LedgerError::SchemaTooNew { found, supported: SCHEMA_VERSION, .. } if found == newer));
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn reopening_a_current_database_migrates_nothing() {
        let (_dir, path, mut ledger) = ledger(16);
        settle(&mut ledger, "a", at(1));
        drop(ledger);
        let mut ledger = SqliteLedger::open(&path, retention(16)).expect("reopens");
        assert_eq!(user_version(&ledger.conn).expect("version"), SCHEMA_VERSION);
        assert!(ledger.entry(&cid("a")).expect("entry").is_some());
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"not a directory").expect("write");
        let path = blocker.join("ledger.db");
        let err = SqliteLedger::open(&path, Retention::default()).expect_err("cannot create under a file");
        assert!(err.to_string().contains(&blocker.display().to_string()), "{err}");

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x42; 8192]).expect("write");
        let err = SqliteLedger::open(&garbage, Retention::default()).expect_err("not a database");
        assert!(matches!(err, LedgerError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains(&garbage.display().to_string()), "{err}");
    }

    #[test]
    fn a_corrupt_stored_result_is_a_typed_error() {
        let (_dir, _path, mut ledger) = ledger(16);
        ledger.record_finished(&result("a", ResultStatus::Succeeded), at(1)).expect("finished");
        ledger
            .conn
            .execute("UPDATE ledger SET result = '{\"command_id\":' WHERE command_id = 'a'", [])
            .expect("damage");
        assert!(
            matches!(ledger.entry(&cid("a")), Err(LedgerError::CorruptResult { command_id, .. }) if command_id == "a")
        );
        assert!(matches!(ledger.outbox(10), Err(LedgerError::CorruptResult { .. })));

        ledger
            .conn
            .execute("INSERT INTO ledger (command_id, state, seq) VALUES ('bad id', 'started', 99)", [])
            .expect("damage");
        assert!(matches!(ledger.unfinished(), Err(LedgerError::CorruptId { .. })));
    }

    fn agent_config() -> AgentConfig {
        let agent_id = AgentId::new("gw-1").expect("id");
        let key = AgentKey::derive(&MasterKey::from_bytes(MASTER), &agent_id);
        AgentConfig::new(agent_id, key)
    }

    /// An agent session established with an in-memory host.
    fn connect(host: &mut Host, now: Timestamp) -> (AgentSession, viworks_core::session::HostSession) {
        let config = agent_config();
        let mut agent = AgentSession::new(&config, now, &mut Entropy::from_u64(now.as_millis()), &ChannelBinding::NONE)
            .expect("hello");
        let hello = agent.poll_transmit().expect("hello queued");
        let mut host_session =
            host.accept(now, &hello, Some(&config.agent_id), &ChannelBinding::NONE).expect("admitted");
        pump(now, &mut agent, &mut host_session);
        assert!(agent.is_established());
        (agent, host_session)
    }

    /// Moves messages both ways until both sides are quiet.
    fn pump(now: Timestamp, agent: &mut AgentSession, host: &mut viworks_core::session::HostSession) {
        loop {
            let mut moved = false;
            while let Some(bytes) = host.poll_transmit() {
                agent.handle_message(now, &bytes);
                moved = true;
            }
            while let Some(bytes) = agent.poll_transmit() {
                host.handle_message(now, &bytes);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn host_results(host: &mut viworks_core::session::HostSession) -> Vec<CommandResult> {
        std::iter::from_fn(|| host.poll_event())
            .filter_map(|e| if let HostEvent::Result(r) = e { Some(r) } else { None })
            .collect()
    }

    #[test]
    fn the_guard_answers_a_redelivered_finished_command_from_the_ledger_across_restarts() {
        let (_dir, path, ledger) = ledger(16);
        let mut host =
            Host::new(HostConfig::default(), Box::new(MasterKey::from_bytes(MASTER)), Entropy::from_u64(3), at(0))
                .expect("host");
        let (mut agent, mut host_session) = connect(&mut host, at(1));
        let mut guard = ExecutionGuard::recover(ledger, at(1), 2).expect("recovers");
        assert_eq!(guard.on_command(at(2), &mut agent, command("a")).expect("ledger"), Some(command("a")), "runs");
        assert_eq!(guard.on_command(at(3), &mut agent, command("a")).expect("ledger"), None, "running: ack only");
        guard.on_finished(at(4), Some(&mut agent), result("a", ResultStatus::Succeeded)).expect("ledger");
        pump(at(4), &mut agent, &mut host_session);
        assert_eq!(host_results(&mut host_session), vec![result("a", ResultStatus::Succeeded)]);

        // The agent restarts before the host acknowledges; the host re-delivers the command.
        drop(guard);
        drop(agent);
        drop(host_session);
        let ledger = SqliteLedger::open(&path, retention(16)).expect("reopens");
        let mut guard = ExecutionGuard::recover(ledger, at(10), 2).expect("recovers");
        let (mut agent, mut host_session) = connect(&mut host, at(5_000));
        assert_eq!(guard.on_established(at(5_000), &mut agent).expect("outbox"), 1, "the unacknowledged result");
        assert_eq!(guard.on_command(at(5_001), &mut agent, command("a")).expect("ledger"), None, "never run twice");
        pump(at(5_001), &mut agent, &mut host_session);
        let answered = host_results(&mut host_session);
        assert_eq!(answered, vec![result("a", ResultStatus::Succeeded); 2], "both the outbox and the redelivery");

        guard.on_results_acked(&[cid("a")]).expect("ledger");
        let mut ledger = SqliteLedger::open(&path, retention(16)).expect("a second handle sees the ack");
        assert!(ledger.outbox(10).expect("outbox").is_empty());
    }

    #[test]
    fn the_guard_refuses_beyond_its_concurrency_durably() {
        let (_dir, path, ledger) = ledger(16);
        let mut agent =
            AgentSession::new(&agent_config(), at(0), &mut Entropy::from_u64(1), &ChannelBinding::NONE).expect("hello");
        let mut guard = ExecutionGuard::recover(ledger, at(0), 1).expect("recovers");
        assert!(guard.on_command(at(1), &mut agent, command("a")).expect("ledger").is_some());
        assert!(guard.on_command(at(1), &mut agent, command("b")).expect("ledger").is_none());
        drop(guard);
        let mut ledger = SqliteLedger::open(&path, retention(16)).expect("reopens");
        assert!(matches!(ledger.outbox(8).expect("outbox").as_slice(), [r] if r.status == ResultStatus::Rejected));
        assert_eq!(ledger.unfinished().expect("unfinished"), vec![cid("a")]);
    }
}
