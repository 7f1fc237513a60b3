//! Durable state behind one trait, so that the embedded SQLite store and the Postgres store
//! are interchangeable and pass the same contract tests (`store::contract`).
//!
//! Every write is durable when its future resolves: the host replies 202 to a submission and
//! acknowledges a result to an agent only after the corresponding call returned `Ok`.

mod any;
mod columns;
pub mod postgres;
pub mod sqlite;

pub use any::AnyStore;

#[cfg(test)]
pub(crate) mod contract;
#[cfg(test)]
pub(crate) mod pg_cluster;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use viworks_core::Timestamp;
use viworks_core::idempotency::{IdempotencyKey, JobId, Recorded, RequestDigest};
use viworks_core::session::CommandRecord;
use viworks_core::wire::{AgentId, CommandId, CommandResult, Hello, MetricKey, Verb};

use crate::audit::chain::{Link, Prepared};

/// Why a store operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(String),
    /// The schema is newer than this build knows; refusing to run against it.
    #[error("database schema version {found} is newer than this build's {supported}")]
    SchemaTooNew {
        /// The version found.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// A unique value exists already (agent id, token).
    #[error("{0} exists already")]
    Exists(String),
    /// The idempotency key was used with a different request.
    #[error("idempotency key {0} was used with a different request")]
    IdempotencyConflict(IdempotencyKey),
    /// The writer is shutting down or gone.
    #[error("the store is closed")]
    Closed,
    /// Accepting the job would exceed a queue bound: the store-wide limit of unfinished
    /// commands, or the per-agent limit of the listed agents.
    #[error("queues are full (store-wide: {global}, agents at their limit: {agents:?})")]
    QueueFull {
        /// Whether the store-wide bound was reached.
        global: bool,
        /// Targets whose own queue is full.
        agents: Vec<AgentId>,
    },
    /// The instance is not registered (any more): its lease ran out and others took over
    /// what it held. It must stop serving agents.
    #[error("instance {0} is not registered; its lease ended")]
    NotRegistered(String),
    /// A stored row could not be read back (corruption or a schema mismatch).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// An enrolled agent as the store knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its identity (the client certificate's common name).
    pub agent_id: AgentId,
    /// Its site.
    pub site: String,
    /// Host name from its last HELLO.
    pub hostname: String,
    /// Software version from its last HELLO.
    pub version: String,
    /// Capabilities from its last HELLO.
    pub capabilities: Vec<String>,
    /// Concurrency from its last HELLO (0 before it ever connected).
    pub max_concurrency: u32,
    /// Revoked agents are refused at the HELLO.
    pub revoked: bool,
    /// Agents in maintenance receive no new commands.
    pub maintenance: bool,
    /// When it was enrolled.
    pub enrolled_at: Timestamp,
    /// When a session of it last started or ended.
    pub last_seen: Option<Timestamp>,
    /// Whether its last recorded event was a connect (the live registry is authoritative).
    pub connected: bool,
}

impl AgentRecord {
    /// A newly enrolled agent of `site`: never connected, neither revoked nor in maintenance.
    pub fn enrolled(agent_id: AgentId, site: impl Into<String>, at: Timestamp) -> AgentRecord {
        AgentRecord {
            agent_id,
            site: site.into(),
            hostname: String::new(),
            version: String::new(),
            capabilities: Vec::new(),
            max_concurrency: 0,
            revoked: false,
            maintenance: false,
            enrolled_at: at,
            last_seen: None,
            connected: false,
        }
    }
}

/// Which agents to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentFilter {
    /// Only this site.
    pub site: Option<String>,
    /// Only agents advertising this capability.
    pub capability: Option<String>,
    /// Only connected (true) or disconnected (false) agents, as recorded.
    pub connected: Option<bool>,
    /// Include revoked agents.
    pub include_revoked: bool,
    /// Agents with ids after this one (keyset pagination).
    pub after: Option<AgentId>,
    /// At most this many (the store caps it at 1000).
    pub limit: usize,
}

/// One operator request, fanned out to one command per target agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its identity.
    pub job_id: JobId,
    /// The API request that created it.
    pub req_id: String,
    /// Who asked (token name).
    pub actor: String,
    /// The verb of all its commands.
    pub verb: Verb,
    /// Their arguments.
    pub args: serde_json::Value,
    /// When it was accepted.
    pub created_at: Timestamp,
    /// The `Idempotency-Key` it was submitted with, and the digest of the request.
    pub idempotency: Option<(IdempotencyKey, RequestDigest)>,
}

/// What [`Store::create_job`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum JobInsert {
    /// The job and its commands were stored. `claimed` are the commands the claimant named in
    /// [`Store::create_job`] now holds, in order, as [`Store::claim_commands`] would return
    /// them (empty without a claimant).
    Created {
        /// The commands stored held by the claimant.
        claimed: Vec<CommandRecord>,
    },
    /// The idempotency key was seen with the same request: this is that job, nothing stored.
    Existing(JobId),
}

/// A command with its job and, once it arrived, its result.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCommand {
    /// The lifecycle record as the dispatcher last reported it.
    pub record: CommandRecord,
    /// The job it belongs to.
    pub job_id: JobId,
    /// When its record last changed.
    pub updated_at: Timestamp,
    /// Its result, stored once per command id.
    pub result: Option<StoredResult>,
}

/// A result as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResult {
    /// The result.
    pub result: CommandResult,
    /// When the host received it first.
    pub received_at: Timestamp,
}

/// Which commands to list, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandFilter {
    /// Only commands in this state: `queued`, `sent`, `acked`, or a terminal name
    /// (`succeeded`, `failed`, `timed_out`, `interrupted`, `rejected`, `cancelled`,
    /// `dead_lettered`).
    pub status: Option<String>,
    /// Only commands for this agent.
    pub agent: Option<AgentId>,
    /// Only commands of this verb.
    pub verb: Option<Verb>,
    /// Commands older than this position in submission order (keyset pagination).
    pub before: Option<u64>,
    /// At most this many (the store caps it at 1000).
    pub limit: usize,
}

/// One stored telemetry sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRow {
    /// The agent that measured it.
    pub agent_id: AgentId,
    /// When it was measured.
    pub ts: Timestamp,
    /// What was measured.
    pub metric_key: MetricKey,
    /// The value.
    pub value: f64,
}

/// Which telemetry to read, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryQuery {
    /// The agent.
    pub agent_id: AgentId,
    /// Only this metric.
    pub metric: Option<MetricKey>,
    /// Samples at or after this instant.
    pub from: Option<Timestamp>,
    /// Samples before this instant.
    pub to: Option<Timestamp>,
    /// At most this many (the store caps it at 10,000).
    pub limit: usize,
}

/// An audit record to append; the store assigns its sequence number and chain hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewAudit {
    /// When it happened.
    pub ts: Timestamp,
    /// The API request, or the session, it belongs to.
    pub req_id: String,
    /// Who did it: a token name, an agent id, or `host`.
    pub actor: String,
    /// What happened, such as `command.created` or `security.replay`.
    pub action: String,
    /// BLAKE3 of the canonical JSON of the arguments, hex.
    pub args_hash: String,
    /// What it concerned: agent ids, command ids.
    pub targets: Vec<String>,
    /// The outcome: an HTTP status, a terminal state, a reject code.
    pub rc: String,
    /// How long it took.
    pub duration_ms: u64,
    /// Anything else worth keeping, as JSON.
    pub detail: serde_json::Value,
}

/// An audit record as stored: content, position, and chain hashes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// The content.
    #[serde(flatten)]
    pub content: NewAudit,
    /// The previous entry's hash (64 zero digits for the first), hex.
    pub prev_hash: String,
    /// `blake3(prev_hash bytes || canonical JSON of content)`, hex.
    pub hash: String,
}

/// Which audit records to read, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this action.
    pub action: Option<String>,
    /// Only this actor.
    pub actor: Option<String>,
    /// Records with `seq` below this (keyset pagination).
    pub before: Option<u64>,
    /// At most this many (the store caps it at 1000).
    pub limit: usize,
}

/// The verdict of walking the audit chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainVerdict {
    /// Every link holds.
    Intact {
        /// Records checked.
        entries: u64,
    },
    /// The first record whose hash does not follow from its content and predecessor.
    Broken {
        /// Its sequence number.
        seq: u64,
        /// What does not hold.
        reason: String,
    },
}

/// A command the host gave up on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRow {
    /// The command.
    pub command_id: CommandId,
    /// Its agent.
    pub agent_id: AgentId,
    /// Why (`attempts_exhausted`, `queue_expired`, `no_result`).
    pub reason: String,
    /// Times it was sent.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub at: Timestamp,
}

/// What an API token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything.
    Viewer,
    /// Read, and run and cancel commands.
    Operator,
    /// Everything, including enrolling and revoking agents and managing tokens.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// An API token as stored: only a hash of the secret is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// BLAKE3 of the token's secret, hex.
    pub token_hash: String,
    /// A name for audit records.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was created.
    pub created_at: Timestamp,
    /// Revoked tokens authenticate nothing.
    pub revoked: bool,
}

/// The names of the states a command leaves: every other state name is terminal.
pub const UNFINISHED_STATES: [&str; 3] = ["queued", "sent", "acked"];

/// Counts for health and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Unfinished commands per state name (`queued`, `sent`, `acked`), across every instance;
    /// a state with none is left out. Finished commands are not counted here: the queue
    /// bounds keep the unfinished few, so reading this costs the same after years of history,
    /// where counting every command would read the whole table at each scrape.
    pub unfinished_by_state: Vec<(String, u64)>,
    /// Rows in the dead-letter table.
    pub dead_letters: u64,
    /// The newest telemetry sample's time, for ingest lag.
    pub latest_telemetry: Option<Timestamp>,
}

impl StoreStats {
    /// Unfinished commands in `state` (one of [`UNFINISHED_STATES`]); 0 when the store counted
    /// none.
    pub fn unfinished(&self, state: &str) -> u64 {
        self.unfinished_by_state.iter().find(|(name, _)| name == state).map_or(0, |(_, count)| *count)
    }
}

/// How many unfinished commands the store accepts: checked by [`Store::create_job`] against
/// every instance's commands, so the bound holds for the whole cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueBounds {
    /// Unfinished commands across all agents.
    pub max_commands: usize,
    /// Unfinished commands per agent.
    pub per_agent: usize,
}

impl QueueBounds {
    /// No bound at all (tests and tools that load data).
    pub const UNBOUNDED: QueueBounds = QueueBounds { max_commands: usize::MAX, per_agent: usize::MAX };
}

/// A host instance serving from the store. Its lease is renewed by its heartbeat; an instance
/// whose lease ran out is dead, and whatever it held (agent presence, commands) may be taken
/// over by the others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Unique per process start.
    pub instance_id: String,
    /// A name for operators (the machine's host name and the agent endpoint, say).
    pub name: String,
    /// When it registered.
    pub started_at: Timestamp,
    /// When its lease ends unless renewed.
    pub lease_until: Timestamp,
}

/// What [`Store::claim_presence`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceClaim {
    /// The calling instance now holds the agent's presence.
    Claimed,
    /// A live instance holds it: the agent is connected there.
    HeldBy {
        /// That instance.
        instance_id: String,
        /// Until when its lease runs, unless renewed.
        lease_until: Timestamp,
    },
}

/// Which unfinished commands [`Store::claim_commands`] takes over. Only commands of agents
/// whose presence the claiming instance holds are ever claimed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimScope {
    /// This agent's.
    Agent(AgentId),
    /// This job's.
    Job(JobId),
    /// Every agent's the instance holds (the periodic sweep).
    All,
}

/// What [`Store::cancel_unowned`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The command was queued and no instance held it: it is cancelled now.
    Cancelled,
    /// An instance holds it in its dispatcher; only that instance can cancel it.
    Owned(String),
    /// It is past its queue (this state name): sent, acknowledged or finished.
    NotCancellable(String),
    /// No such command.
    NotFound,
}

/// A cross-instance wake-up delivered by [`Store::wakeups`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// A job was stored: claim its commands for the agents held here.
    Job(JobId),
    /// An operator asked to cancel a command: cancel it if it is held here and still queued.
    Cancel(CommandId),
}

/// How busy the store's connection pool is, for health reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// Connections the pool may open.
    pub max: usize,
    /// Connections in use by a call now.
    pub in_use: usize,
    /// Calls waiting for a connection.
    pub waiting: usize,
}

/// Appends the one `record` to the audit chain: where it was linked, or why it was not (a store
/// that answers with another number of links than one counts as failing).
pub(crate) async fn append_one<S: Store + ?Sized>(store: &S, record: &Prepared) -> Result<Link, StoreError> {
    let links = store.append_audits(Arc::from([record.clone()])).await?;
    match links.as_slice() {
        [link] => Ok(*link),
        _ => Err(StoreError::Database(format!("the store linked {} audit records for one", links.len()))),
    }
}

/// Durable state of the control plane. Implementations: [`sqlite::SqliteStore`], and Postgres.
///
/// Futures are `Send` so the host can await them from any task. Reads never wait behind
/// writes.
pub trait Store: Send + Sync + 'static {
    /// Checks the database answers and returns the round-trip time.
    fn ping(&self) -> impl Future<Output = Result<Duration, StoreError>> + Send;

    /// Enrolls an agent. Fails with [`StoreError::Exists`] if the id is enrolled already
    /// (revoked or not).
    fn enroll_agent(&self, agent: &AgentRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The agent with this id.
    fn agent(&self, id: &AgentId) -> impl Future<Output = Result<Option<AgentRecord>, StoreError>> + Send;

    /// The enrolled agents among `ids` (revoked ones included, as [`Store::agent`] returns
    /// them), in one read; ids of agents never enrolled are left out.
    fn agents_named(&self, ids: &[AgentId]) -> impl Future<Output = Result<Vec<AgentRecord>, StoreError>> + Send;

    /// Agents matching `filter`, in id order.
    fn agents(&self, filter: &AgentFilter) -> impl Future<Output = Result<Vec<AgentRecord>, StoreError>> + Send;

    /// Records a session start: the HELLO's host name, version, capabilities and concurrency,
    /// `connected`, and `last_seen`. Returns false when the agent is not enrolled.
    fn agent_connected(&self, hello: &Hello, at: Timestamp) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Records a session end.
    fn agent_disconnected(&self, id: &AgentId, at: Timestamp) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Revokes (or reinstates) an agent. Returns false when it is not enrolled.
    fn set_revoked(&self, id: &AgentId, revoked: bool) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Puts an agent in (or out of) maintenance. Returns false when it is not enrolled.
    fn set_maintenance(&self, id: &AgentId, on: bool) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Stores a job and its commands atomically, resolving its idempotency key first with
    /// [`viworks_core::idempotency::resolve`]: the same key and digest gives
    /// [`JobInsert::Existing`] and stores nothing; the same key with another digest fails
    /// with [`StoreError::IdempotencyConflict`]; more unfinished commands than `bounds` allow
    /// fails with [`StoreError::QueueFull`] and stores nothing. Submissions are serialised
    /// across instances, so the bounds hold for the whole cluster. The store assigns the
    /// commands' orders, consecutive and above every stored one, in the given sequence (the
    /// records' own `order` is ignored).
    ///
    /// With a `claimant` (an instance id), the commands of agents whose presence that
    /// instance holds are stored held by it, in the same transaction, and returned in
    /// [`JobInsert::Created`]: the submitting instance dispatches them without a second
    /// write. The other commands are held by no instance, and the store announces them
    /// through [`Store::wakeups`] to every instance.
    fn create_job(
        &self,
        job: &JobRecord,
        commands: &[CommandRecord],
        bounds: QueueBounds,
        claimant: Option<&str>,
    ) -> impl Future<Output = Result<JobInsert, StoreError>> + Send;

    /// Persists command lifecycle records (upsert by command id). A command already in a
    /// terminal state keeps it: a later record never replaces it, so each command has exactly
    /// one terminal state even if a late transition is reported. A record whose state is
    /// `Done(DeadLettered(..))` also writes its dead-letter row. Batched: many records commit
    /// together.
    fn save_commands(&self, records: &[CommandRecord]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The highest submission order of any command ever stored, finished or not, so that a
    /// restarted dispatcher hands out orders above it.
    fn max_order(&self) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Every command not in a terminal state, for the dispatcher's recovery at start.
    fn unfinished_commands(&self) -> impl Future<Output = Result<Vec<CommandRecord>, StoreError>> + Send;

    /// One command.
    fn command(&self, id: &CommandId) -> impl Future<Output = Result<Option<StoredCommand>, StoreError>> + Send;

    /// Commands matching `filter`, newest first.
    fn commands(&self, filter: &CommandFilter) -> impl Future<Output = Result<Vec<StoredCommand>, StoreError>> + Send;

    /// A job and all its commands.
    fn job(
        &self,
        id: &JobId,
    ) -> impl Future<Output = Result<Option<(JobRecord, Vec<StoredCommand>)>, StoreError>> + Send;

    /// Stores a result once per command id: a second delivery with the same content is
    /// [`Recorded::Duplicate`] and changes nothing; different content is
    /// [`Recorded::Conflicting`] and keeps the first.
    fn save_result(
        &self,
        agent: &AgentId,
        result: &CommandResult,
        at: Timestamp,
    ) -> impl Future<Output = Result<Recorded, StoreError>> + Send;

    /// Upserts samples by (agent, ts, metric key); returns how many rows were written.
    fn save_telemetry(&self, rows: &[TelemetryRow]) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Samples matching `query`, newest first.
    fn telemetry(&self, query: &TelemetryQuery) -> impl Future<Output = Result<Vec<TelemetryRow>, StoreError>> + Send;

    /// The newest sample of each metric of an agent.
    fn latest_telemetry(&self, agent: &AgentId) -> impl Future<Output = Result<Vec<TelemetryRow>, StoreError>> + Send;

    /// Links `records` to the end of the audit chain in this order and stores them, in one
    /// transaction: all of them or none. Returns where each was linked, in the same order.
    /// The records are shared so that a caller can retry or log them without copying.
    fn append_audits(&self, records: Arc<[Prepared]>) -> impl Future<Output = Result<Vec<Link>, StoreError>> + Send;

    /// Appends one record to the audit chain and returns it as stored.
    fn append_audit(&self, entry: &NewAudit) -> impl Future<Output = Result<AuditEntry, StoreError>> + Send {
        async move {
            let record = Prepared::new(entry.clone());
            let link = append_one(self, &record).await?;
            Ok(record.into_entry(link))
        }
    }

    /// Audit records matching `filter`, newest first.
    fn audit(&self, filter: &AuditFilter) -> impl Future<Output = Result<Vec<AuditEntry>, StoreError>> + Send;

    /// Walks the whole chain from the first record and reports the first broken link.
    fn verify_audit(&self) -> impl Future<Output = Result<ChainVerdict, StoreError>> + Send;

    /// Dead letters, newest first, at most `limit` (capped at 1000).
    fn dead_letters(&self, limit: usize) -> impl Future<Output = Result<Vec<DeadLetterRow>, StoreError>> + Send;

    /// Stores a token. Fails with [`StoreError::Exists`] on a hash collision.
    fn create_token(&self, token: &TokenRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The token with this hash.
    fn token(&self, token_hash: &str) -> impl Future<Output = Result<Option<TokenRecord>, StoreError>> + Send;

    /// Counts for health and metrics.
    fn stats(&self) -> impl Future<Output = Result<StoreStats, StoreError>> + Send;

    /// The connection pool's occupancy.
    fn pool_status(&self) -> PoolStatus;

    /// What the store's single writer has done, for a store that has one (SQLite); `None`
    /// for a store whose writes go to a server (Postgres reports its own).
    fn writer_stats(&self) -> Option<sqlite::WriterStats> {
        None
    }

    // ---- instances sharing the store ---------------------------------------------------------

    /// Registers a starting instance. A store only one process can serve (SQLite) treats
    /// every other registered instance as dead and releases what it held.
    fn register_instance(&self, instance: &InstanceRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Renews an instance's lease, and with it every agent presence it holds. False when the
    /// instance is no longer registered: it was declared dead and must stop serving.
    fn renew_instance(
        &self,
        instance_id: &str,
        lease_until: Timestamp,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Removes an instance, its presences, and its hold on commands (shutdown).
    fn deregister_instance(&self, instance_id: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes every instance whose lease ended before `now` the same way, and returns them.
    fn reap_instances(&self, now: Timestamp) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Registered instances, by id.
    fn instances(&self) -> impl Future<Output = Result<Vec<InstanceRecord>, StoreError>> + Send;

    /// Records that `instance_id` serves `agent` in `session`, unless another instance whose
    /// lease runs past `now` does. The same instance may take over from its own earlier
    /// session.
    fn claim_presence(
        &self,
        agent: &AgentId,
        instance_id: &str,
        session: u64,
        now: Timestamp,
    ) -> impl Future<Output = Result<PresenceClaim, StoreError>> + Send;

    /// Ends the presence of `agent` in `session` of `instance_id` (a newer one is kept).
    fn release_presence(
        &self,
        agent: &AgentId,
        instance_id: &str,
        session: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes over the unfinished commands in `scope` of the agents whose presence
    /// `instance_id` holds, from no one or from an instance that lost the agent, skipping rows
    /// another transaction holds (they are found by the next sweep). Returns them in order.
    fn claim_commands(
        &self,
        instance_id: &str,
        scope: &ClaimScope,
    ) -> impl Future<Output = Result<Vec<CommandRecord>, StoreError>> + Send;

    /// Saves the records of commands `instance_id` gives up and lets go of them, in one
    /// transaction; commands it no longer holds are left alone.
    fn release_commands(
        &self,
        instance_id: &str,
        records: &[CommandRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Runs the timers of commands no instance holds, from their rows: queued ones older than
    /// `queue_ttl` and acknowledged ones past their result deadline are dead-lettered. Each
    /// is finished by exactly one caller, whichever instance sweeps first. Returns them.
    fn expire_unowned(
        &self,
        now: Timestamp,
        queue_ttl: Duration,
    ) -> impl Future<Output = Result<Vec<CommandRecord>, StoreError>> + Send;

    /// Cancels a queued command that no instance holds.
    fn cancel_unowned(
        &self,
        id: &CommandId,
        now: Timestamp,
    ) -> impl Future<Output = Result<CancelOutcome, StoreError>> + Send;

    /// Asks every instance to cancel `id` if it holds it (see [`Wakeup::Cancel`]).
    fn request_cancel(&self, id: &CommandId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Wake-ups from other instances, or `None` for a store one process serves alone (there
    /// is no one to hear from). A dropped notification is made up for by the periodic sweep.
    fn wakeups(&self) -> Option<tokio::sync::mpsc::Receiver<Wakeup>>;
}
