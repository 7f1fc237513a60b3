//! The store the configuration names: SQLite or Postgres behind one type, so that the host,
//! its API and its agent endpoint are built once for either.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use viworks_core::Timestamp;
use viworks_core::idempotency::{JobId, Recorded};
use viworks_core::session::CommandRecord;
use viworks_core::wire::{AgentId, CommandId, CommandResult, Hello};

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{
    AgentFilter, AgentRecord, AuditEntry, AuditFilter, CancelOutcome, ChainVerdict, ClaimScope, CommandFilter,
    DeadLetterRow, InstanceRecord, JobInsert, JobRecord, PoolStatus, PresenceClaim, QueueBounds, Store, StoreError,
    StoreStats, StoredCommand, TelemetryQuery, TelemetryRow, TokenRecord, Wakeup,
};
use crate::audit::chain::{Link, Prepared};

/// One of the stores. Cheap to clone: clones share the writer or the pool.
#[derive(Clone)]
pub enum AnyStore {
    /// SQLite in one file (the default).
    Sqlite(SqliteStore),
    /// Postgres, shared by any number of host instances.
    Postgres(PostgresStore),
}

impl AnyStore {
    /// Which database this is, for logs and health reports.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }

    /// Lets pending writes finish and closes the store.
    pub async fn close(self) {
        match self {
            AnyStore::Sqlite(store) => store.close().await,
            AnyStore::Postgres(store) => store.close().await,
        }
    }
}

/// Each method forwards to the store inside.
macro_rules! forward {
    ($( fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $out:ty; )*) => {
        $(
            fn $name(&self $(, $arg: $ty)*) -> impl Future<Output = Result<$out, StoreError>> + Send {
                async move {
                    match self {
                        AnyStore::Sqlite(store) => store.$name($($arg),*).await,
                        AnyStore::Postgres(store) => store.$name($($arg),*).await,
                    }
                }
            }
        )*
    };
}

impl Store for AnyStore {
    forward! {
        fn ping(&self) -> Duration;
        fn enroll_agent(&self, agent: &AgentRecord) -> ();
        fn agent(&self, id: &AgentId) -> Option<AgentRecord>;
        fn agents_named(&self, ids: &[AgentId]) -> Vec<AgentRecord>;
        fn agents(&self, filter: &AgentFilter) -> Vec<AgentRecord>;
        fn agent_connected(&self, hello: &Hello, at: Timestamp) -> bool;
        fn agent_disconnected(&self, id: &AgentId, at: Timestamp) -> ();
        fn set_revoked(&self, id: &AgentId, revoked: bool) -> bool;
        fn set_maintenance(&self, id: &AgentId, on: bool) -> bool;
        fn create_job(
            &self,
            job: &JobRecord,
            commands: &[CommandRecord],
            bounds: QueueBounds,
            claimant: Option<&str>,
        ) -> JobInsert;
        fn save_commands(&self, records: &[CommandRecord]) -> ();
        fn max_order(&self) -> Option<u64>;
        fn unfinished_commands(&self) -> Vec<CommandRecord>;
        fn command(&self, id: &CommandId) -> Option<StoredCommand>;
        fn commands(&self, filter: &CommandFilter) -> Vec<StoredCommand>;
        fn job(&self, id: &JobId) -> Option<(JobRecord, Vec<StoredCommand>)>;
        fn save_result(&self, agent: &AgentId, result: &CommandResult, at: Timestamp) -> Recorded;
        fn save_telemetry(&self, rows: &[TelemetryRow]) -> usize;
        fn telemetry(&self, query: &TelemetryQuery) -> Vec<TelemetryRow>;
        fn latest_telemetry(&self, agent: &AgentId) -> Vec<TelemetryRow>;
        fn append_audits(&self, records: Arc<[Prepared]>) -> Vec<Link>;
        fn audit(&self, filter: &AuditFilter) -> Vec<AuditEntry>;
        fn verify_audit(&self) -> ChainVerdict;
        fn dead_letters(&self, limit: usize) -> Vec<DeadLetterRow>;
        fn create_token(&self, token: &TokenRecord) -> ();
        fn token(&self, token_hash: &str) -> Option<TokenRecord>;
        fn stats(&self) -> StoreStats;
        fn register_instance(&self, instance: &InstanceRecord) -> ();
        fn renew_instance(&self, instance_id: &str, lease_until: Timestamp) -> bool;
        fn deregister_instance(&self, instance_id: &str) -> ();
        fn reap_instances(&self, now: Timestamp) -> Vec<String>;
        fn instances(&self) -> Vec<InstanceRecord>;
        fn claim_presence(&self, agent: &AgentId, instance_id: &str, session: u64, now: Timestamp) -> PresenceClaim;
        fn release_presence(&self, agent: &AgentId, instance_id: &str, session: u64) -> ();
        fn claim_commands(&self, instance_id: &str, scope: &ClaimScope) -> Vec<CommandRecord>;
        fn release_commands(&self, instance_id: &str, records: &[CommandRecord]) -> ();
        fn expire_unowned(&self, now: Timestamp, queue_ttl: Duration) -> Vec<CommandRecord>;
        fn cancel_unowned(&self, id: &CommandId, now: Timestamp) -> CancelOutcome;
        fn request_cancel(&self, id: &CommandId) -> ();
    }

    fn pool_status(&self) -> PoolStatus {
        match self {
            AnyStore::Sqlite(store) => store.pool_status(),
            AnyStore::Postgres(store) => store.pool_status(),
        }
    }

    fn writer_stats(&self) -> Option<super::sqlite::WriterStats> {
        match self {
            AnyStore::Sqlite(store) => Store::writer_stats(store),
            AnyStore::Postgres(store) => store.writer_stats(),
        }
    }

    fn wakeups(&self) -> Option<tokio::sync::mpsc::Receiver<Wakeup>> {
        match self {
            AnyStore::Sqlite(store) => store.wakeups(),
            AnyStore::Postgres(store) => store.wakeups(),
        }
    }
}
