//! The running control plane's shared state: admission of agent connections, the command
//! dispatcher, the registry of live sessions, and the persistence of every command
//! transition. The agent endpoint and the REST API both work through [`Control`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Notify, broadcast};
use viworks_core::auth::{AgentKey, ChannelBinding, MasterKey};
use viworks_core::flow::{Delivery, TokenBucket};
use viworks_core::idempotency::{
    IdempotencyKey, JobId, Recorded, RequestDigest, push_canonical_json, push_json_string,
};
use viworks_core::session::{
    AgentKeys, CommandRecord, CommandState, DispatchConfig, DispatchError, DispatchEvent, Dispatcher, Host, HostConfig,
    HostSession, NewCommand, Refusal, Terminal,
};
use viworks_core::wire::{AgentId, Command, CommandId, CommandResult, Verb};
use viworks_core::{Entropy, Timestamp};

use crate::audit::chain::{Fields, Prepared};
use crate::audit::{self, Auditor};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{
    AgentFilter, AgentRecord, CancelOutcome, ClaimScope, InstanceRecord, JobInsert, JobRecord, NewAudit, PresenceClaim,
    QueueBounds, Store, StoreError, StoreStats, Wakeup,
};

/// Agent keys for enrolled, unrevoked agents only, derived from the master key.
pub struct EnrolledKeys {
    master: MasterKey,
    enrolled: RwLock<BTreeMap<AgentId, bool>>,
}

impl EnrolledKeys {
    /// Keys under `master` for the agents in `enrolled` (id, revoked).
    pub fn new(master: MasterKey, enrolled: impl IntoIterator<Item = (AgentId, bool)>) -> Self {
        EnrolledKeys { master, enrolled: RwLock::new(enrolled.into_iter().collect()) }
    }

    /// Records an enrollment or a revocation.
    pub fn set(&self, agent: AgentId, revoked: bool) {
        if let Ok(mut enrolled) = self.enrolled.write() {
            enrolled.insert(agent, revoked);
        }
    }

    /// Whether `agent` is known here, enrolled or revoked. An agent enrolled by another
    /// process (the CLI, another host instance) is unknown until [`EnrolledKeys::set`].
    pub fn knows(&self, agent: &AgentId) -> bool {
        self.enrolled.read().map(|enrolled| enrolled.contains_key(agent)).unwrap_or(false)
    }

    /// The agent key of `agent`, enrolled or not (for enrollment bundles).
    pub fn derive(&self, agent: &AgentId) -> AgentKey {
        AgentKey::derive(&self.master, agent)
    }
}

impl AgentKeys for EnrolledKeys {
    fn agent_key(&self, agent_id: &AgentId) -> Option<AgentKey> {
        let enrolled = self.enrolled.read().ok()?;
        match enrolled.get(agent_id) {
            Some(false) => Some(AgentKey::derive(&self.master, agent_id)),
            _ => None,
        }
    }
}

/// Which agents a submission targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// These agents, each of which must be enrolled, unrevoked and not in maintenance.
    Agents(Vec<AgentId>),
    /// Every enrolled agent matching all given criteria; agents in maintenance are skipped.
    Selector {
        /// Only this site.
        site: Option<String>,
        /// Only agents advertising this capability.
        capability: Option<String>,
        /// Only agents online now (true) or offline now (false).
        online: Option<bool>,
    },
}

/// A validated operator request to run one verb on some agents.
#[derive(Clone, Debug, PartialEq)]
pub struct SubmitRequest {
    /// The verb; its arguments were validated against its schema.
    pub verb: Verb,
    /// Its arguments.
    pub args: serde_json::Value,
    /// Where to run it.
    pub targets: Targets,
    /// How long each agent lets it run.
    pub timeout: Duration,
    /// Who asked (token name), for the audit trail.
    pub actor: String,
    /// The API request id.
    pub req_id: String,
    /// The `Idempotency-Key` header and the request's digest.
    pub idempotency: Option<(IdempotencyKey, RequestDigest)>,
}

/// An accepted submission: durable before this is returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The job.
    pub job_id: JobId,
    /// One command per target.
    pub commands: Vec<(CommandId, AgentId)>,
    /// True when the idempotency key named an earlier, identical request: nothing new was
    /// queued.
    pub replayed: bool,
}

/// Why the control plane refused a request.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A queue bound was reached; retry after the given time (HTTP 429).
    #[error("queues are full; retry in {} s", retry_after.as_secs())]
    QueueFull {
        /// A suggested wait.
        retry_after: Duration,
    },
    /// The idempotency key was used with a different request (HTTP 409).
    #[error("idempotency key {0} was used with a different request")]
    IdempotencyConflict(IdempotencyKey),
    /// Targets that are not enrolled or are revoked (HTTP 404).
    #[error("unknown or revoked agents: {0:?}")]
    UnknownAgents(Vec<AgentId>),
    /// Targets in maintenance mode (HTTP 409).
    #[error("agents in maintenance: {0:?}")]
    InMaintenance(Vec<AgentId>),
    /// The request names no target, or the selector matched none (HTTP 422).
    #[error("no agent matches the targets")]
    NoTargets,
    /// No such command (HTTP 404).
    #[error("no unfinished command {0}")]
    NotFound(CommandId),
    /// The command was already sent and cannot be cancelled (HTTP 409).
    #[error("command {0} was already sent to its agent")]
    NotCancellable(CommandId),
    /// The store failed (HTTP 503).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Queue figures for health and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Commands waiting to be sent.
    pub queued: usize,
    /// Commands sent or acknowledged and not yet answered.
    pub in_flight: usize,
    /// Room left before submissions are refused.
    pub free_slots: usize,
    /// Live agent sessions.
    pub online: usize,
}

/// The bounds and timers of the running host.
#[derive(Clone, Copy, Debug)]
pub struct ControlConfig {
    /// Admission and session settings.
    pub host: HostConfig,
    /// Dispatcher bounds and retry policy.
    pub dispatch: DispatchConfig,
    /// How instances sharing the store keep track of each other.
    pub cluster: ClusterConfig,
}

/// The timers of an instance among others on one store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// How long an instance's presence outlives its last heartbeat: after a crash, its agents
    /// are admitted elsewhere this long after its last renewal. It renews every third of it.
    pub lease: Duration,
    /// How often the instance sweeps the store: reaps dead instances, claims commands it
    /// missed a wake-up for, and runs the timers of commands no instance holds.
    pub sweep: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { lease: Duration::from_secs(15), sweep: Duration::from_secs(5) }
    }
}

/// Why an admitted session could not be attached.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AttachError {
    /// Another live instance holds the agent's session.
    #[error("agent {agent} is connected to instance {instance}")]
    ElsewhereLive {
        /// The agent.
        agent: AgentId,
        /// The instance holding it.
        instance: String,
        /// How long until that instance's lease ends unless renewed.
        retry_after: Duration,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Live {
    session: u64,
    wake: Arc<Notify>,
    stop: Arc<AtomicU8>,
}

/// Why a connection task must end its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Nothing: keep going.
    No,
    /// The agent was revoked while connected.
    Revoked,
    /// A newer session of the same agent was admitted (this one had missed its liveness
    /// deadline, or admission would have refused the newer one).
    Superseded,
}

/// What a connection task holds for its admitted session.
pub struct Attachment {
    /// Notified when commands may be waiting for this agent or the session must end.
    pub wake: Arc<Notify>,
    stop: Arc<AtomicU8>,
}

impl Attachment {
    /// Whether, and why, the session must end.
    pub fn stop(&self) -> Stop {
        match self.stop.load(Ordering::Acquire) {
            1 => Stop::Revoked,
            2 => Stop::Superseded,
            _ => Stop::No,
        }
    }
}

struct Dispatch {
    dispatcher: Dispatcher,
}

struct Inner<S> {
    store: S,
    /// Appends audit records in batches; flushed at shutdown.
    auditor: Auditor,
    /// This process's registration among the instances sharing the store.
    instance: InstanceRecord,
    /// Serialises the persister's batches with the release of an agent's commands, so that
    /// no batch lands after the release that superseded it.
    writes: tokio::sync::Mutex<()>,
    /// When the lease was last renewed (milliseconds since the epoch).
    renewed_at: AtomicU64,
    config: ControlConfig,
    clock: Clock,
    keys: Arc<EnrolledKeys>,
    host: Mutex<Host>,
    dispatch: Mutex<Dispatch>,
    live: Mutex<BTreeMap<AgentId, Live>>,
    sent_at: Mutex<BTreeMap<CommandId, Timestamp>>,
    dirty: Mutex<Dirty>,
    persist: Notify,
    updates: broadcast::Sender<CommandRecord>,
    entropy: Mutex<Entropy>,
    metrics: Metrics,
    closing: AtomicBool,
    security_audits: Mutex<TokenBucket>,
}

/// The control plane's shared state. Cheap to clone; every clone is the same control plane.
pub struct Control<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Control<S> {
    fn clone(&self) -> Self {
        Control { inner: Arc::clone(&self.inner) }
    }
}

/// How long the persister gathers changed command records after the first one before
/// writing them all.
const PERSIST_LINGER: Duration = Duration::from_millis(5);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave these structures half-updated in a way that
    // matters more than stopping would; keep serving.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S: Store + Clone> Control<S> {
    /// Starts the control plane on `store`: loads enrolled agents, registers this process as
    /// an instance named `instance_name` among those sharing the store, and spawns its
    /// persister, timer, sweeper and wake-up tasks on the current tokio runtime. Commands are
    /// claimed from the store as their agents attach here.
    pub async fn start(
        store: S,
        master: MasterKey,
        config: ControlConfig,
        metrics: Metrics,
        instance_name: String,
    ) -> Result<Self, StoreError> {
        let clock = Clock::start();
        let now = clock.now();
        let mut enrolled = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .agents(&AgentFilter {
                    include_revoked: true,
                    after: after.clone(),
                    limit: 1000,
                    ..AgentFilter::default()
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.agent_id.clone());
            enrolled.extend(page.into_iter().map(|a| (a.agent_id, a.revoked)));
        }
        let keys = Arc::new(EnrolledKeys::new(master, enrolled));
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| StoreError::Database(format!("no OS randomness: {e}")))?;
        let mut entropy = Entropy::from_seed(seed);
        let host = Host::new(config.host, Box::new(SharedKeys(Arc::clone(&keys))), entropy.fork(), now)
            .map_err(|e| StoreError::Database(format!("invalid host configuration: {e}")))?;
        // Commands are held by the instance serving their agent: they are claimed from the
        // store when the agent attaches here, not loaded all at start.
        let dispatcher = Dispatcher::new(config.dispatch, entropy.fork());
        let instance = InstanceRecord {
            instance_id: format!("inst-{}", hex16(entropy.bytes32())),
            name: instance_name,
            started_at: now,
            lease_until: now.saturating_add(config.cluster.lease),
        };
        store.register_instance(&instance).await?;
        tracing::info!(instance = %instance.instance_id, name = %instance.name, "instance registered");
        let (updates, _) = broadcast::channel(4096);
        let wakeups = store.wakeups();
        let auditor = Auditor::start(store.clone());
        let control = Control {
            inner: Arc::new(Inner {
                store,
                auditor,
                instance,
                writes: tokio::sync::Mutex::new(()),
                renewed_at: AtomicU64::new(now.as_millis()),
                config,
                clock,
                keys,
                host: Mutex::new(host),
                dispatch: Mutex::new(Dispatch { dispatcher }),
                live: Mutex::new(BTreeMap::new()),
                sent_at: Mutex::new(BTreeMap::new()),
                dirty: Mutex::new(Dirty::default()),
                persist: Notify::new(),
                updates,
                entropy: Mutex::new(entropy),
                metrics,
                closing: AtomicBool::new(false),
                // 100 at once, then 20 a second: a flood of refused connections is counted in
                // metrics, not written to the audit chain one row per attempt.
                security_audits: Mutex::new(TokenBucket::new(100, Duration::from_millis(50), now)),
            }),
        };
        tokio::spawn(control.clone().persister());
        tokio::spawn(control.clone().ticker());
        tokio::spawn(control.clone().sweeper());
        if let Some(wakeups) = wakeups {
            tokio::spawn(control.clone().listener(wakeups));
        }
        Ok(control)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The clock every component reads.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// The clock.
    pub fn clock(&self) -> Clock {
        self.inner.clock
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The enrolled agents' keys.
    pub fn keys(&self) -> &EnrolledKeys {
        &self.inner.keys
    }

    /// The running configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.inner.config
    }

    /// Change notifications for commands, sent after each record is durable. Subscribers
    /// that fall behind see `Lagged` and should re-read from the store.
    pub fn subscribe(&self) -> broadcast::Receiver<CommandRecord> {
        self.inner.updates.subscribe()
    }

    /// A fresh random identifier: 32 lowercase hex digits.
    pub fn random_id(&self) -> String {
        hex16(lock(&self.inner.entropy).bytes32())
    }

    /// This instance's identity among those sharing the store.
    pub fn instance(&self) -> &InstanceRecord {
        &self.inner.instance
    }

    // ---- admission and sessions -------------------------------------------------------------

    /// Admits a connection by its first message (see [`Host::accept`]).
    pub fn accept(&self, hello: &[u8], proven: &AgentId, binding: &ChannelBinding) -> Result<HostSession, Refusal> {
        let now = self.now();
        lock(&self.inner.host).accept(now, hello, Some(proven), binding)
    }

    /// Registers an admitted session so that it is woken for new commands: records in the
    /// store that this instance serves the agent (refused while another live instance does),
    /// takes over the agent's unfinished commands, and resumes those it acknowledged earlier.
    pub async fn attach(&self, session: &mut HostSession) -> Result<Attachment, AttachError> {
        let agent = session.agent_id().clone();
        let now = self.now();
        let store = &self.inner.store;
        let instance = &self.inner.instance.instance_id;
        if let PresenceClaim::HeldBy { instance_id, lease_until } =
            store.claim_presence(&agent, instance, session.id(), now).await?
        {
            let retry_after = lease_until.saturating_since(now).max(Duration::from_secs(1));
            return Err(AttachError::ElsewhereLive { agent, instance: instance_id, retry_after });
        }
        let claimed = match store.claim_commands(instance, &ClaimScope::Agent(agent.clone())).await {
            Ok(claimed) => claimed,
            Err(error) => {
                let _ = store.release_presence(&agent, instance, session.id()).await;
                return Err(error.into());
            }
        };
        self.adopt(claimed).await;
        let wake = Arc::new(Notify::new());
        let stop = Arc::new(AtomicU8::new(0));
        let previous = {
            let mut live = lock(&self.inner.live);
            let awaiting = lock(&self.inner.dispatch).dispatcher.awaiting_results(&agent);
            session.resume(self.now(), awaiting);
            live.insert(agent, Live { session: session.id(), wake: Arc::clone(&wake), stop: Arc::clone(&stop) })
        };
        if let Some(previous) = previous {
            previous.stop.store(2, Ordering::Release);
            previous.wake.notify_one();
        }
        self.inner.metrics.sessions.inc();
        wake.notify_one();
        Ok(Attachment { wake, stop })
    }

    /// Hands claimed commands to the dispatcher. A command whose result was stored while no
    /// dispatcher held it (an instance died between storing and finishing it) is finished.
    async fn adopt(&self, claimed: Vec<CommandRecord>) {
        if claimed.is_empty() {
            return;
        }
        let mut answered = Vec::new();
        for record in &claimed {
            if matches!(record.state, CommandState::Sent { .. } | CommandState::Acked { .. })
                && let Ok(Some(stored)) = self.inner.store.command(&record.command.command_id).await
                && let Some(result) = stored.result
            {
                answered.push(result.result);
            }
        }
        let now = self.now();
        self.with_dispatcher(|d| {
            d.adopt(now, claimed);
            for result in &answered {
                d.on_result(now, result);
            }
        });
    }

    /// Unregisters a session that ended, re-queues what it left unacknowledged and, unless a
    /// newer session of the agent took over here, hands the agent's commands and presence
    /// back to the store so that any instance can serve the agent next.
    pub async fn detach(&self, agent: &AgentId, session: u64, in_flight: &[(CommandId, Delivery)]) {
        let now = self.now();
        let current = {
            let mut live = lock(&self.inner.live);
            let current = live.get(agent).is_some_and(|l| l.session == session);
            if current {
                live.remove(agent);
            }
            current
        };
        self.inner.metrics.sessions.dec();
        self.with_dispatcher(|d| d.on_session_closed(now, session, in_flight));
        if !current {
            return;
        }
        let instance = &self.inner.instance.instance_id;
        let store = &self.inner.store;
        {
            // No persister batch is in flight while the release is written, and the agent's
            // pending records are superseded by the released ones.
            let _writes = self.inner.writes.lock().await;
            let released = {
                let mut dispatch = lock(&self.inner.dispatch);
                dispatch.dispatcher.release_agent(agent)
            };
            let superseded: Vec<CommandRecord> = {
                let mut dirty = lock(&self.inner.dirty);
                let ids: Vec<CommandId> = dirty
                    .records
                    .values()
                    .filter(|r| r.command.agent_id == *agent)
                    .map(|r| r.command.command_id.clone())
                    .collect();
                // Their audit records stay queued: the persister appends them after its next
                // write, which comes after this one.
                ids.iter().filter_map(|id| dirty.records.remove(id)).collect()
            };
            let mut delay = Duration::from_millis(100);
            loop {
                // Finished commands are no longer in the dispatcher: save them first.
                let saved = store.save_commands(&superseded).await;
                let released_ok = match saved {
                    Ok(()) => store.release_commands(instance, &released).await,
                    Err(error) => Err(error),
                };
                match released_ok {
                    Ok(()) => break,
                    Err(error) if !self.is_closing() && delay < Duration::from_secs(30) => {
                        tracing::warn!(%agent, %error, "handing the agent's commands back failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    Err(error) => {
                        // The lease still names this instance: once it lapses (the store being
                        // unreachable stops its renewal too), another instance takes them over.
                        tracing::error!(%agent, %error, "could not hand the agent's commands back");
                        break;
                    }
                }
            }
            self.publish(superseded, Vec::new()).await;
        }
        if let Err(error) = store.release_presence(agent, instance, session).await {
            tracing::warn!(%agent, %error, "releasing the agent's presence failed; its lease will lapse");
        }
    }

    /// Whether `agent` has a live session on this host.
    pub fn is_online(&self, agent: &AgentId) -> bool {
        lock(&self.inner.live).contains_key(agent)
    }

    /// Agents with a live session.
    pub fn online_agents(&self) -> BTreeSet<AgentId> {
        lock(&self.inner.live).keys().cloned().collect()
    }

    /// Commands `agent` may be sent now on `session`, at most `credits`.
    pub fn next_commands(&self, agent: &AgentId, session: u64, credits: usize) -> Vec<Command> {
        if credits == 0 {
            return Vec::new();
        }
        let now = self.now();
        let commands = self.with_dispatcher(|d| d.next_for(now, agent, session, credits));
        if !commands.is_empty() {
            let mut sent_at = lock(&self.inner.sent_at);
            for command in &commands {
                sent_at.entry(command.command_id.clone()).or_insert(now);
            }
        }
        commands
    }

    /// A command taken with [`Control::next_commands`] could not be sent on `session`: it goes
    /// back to its queue under the retry policy, as if its session had ended.
    pub fn unsent(&self, session: u64, id: &CommandId) {
        let now = self.now();
        let delivery = Delivery { sent_at: now, acked: false };
        self.with_dispatcher(|d| d.on_session_closed(now, session, &[(id.clone(), delivery)]));
    }

    /// The agent acknowledged a command.
    pub fn acked(&self, id: &CommandId) {
        let now = self.now();
        self.with_dispatcher(|d| d.on_acked(now, id));
    }

    /// Stores results durably, then finishes their commands. Returns the ids that may be
    /// acknowledged to the agent (all stored ones, duplicates included).
    pub async fn results(&self, agent: &AgentId, results: Vec<CommandResult>) -> Result<Vec<CommandId>, StoreError> {
        let now = self.now();
        let started = std::time::Instant::now();
        let store = &self.inner.store;
        let outcomes = match results.as_slice() {
            // Most messages carry one result: no joined set of futures to allocate for it.
            [result] => vec![store.save_result(agent, result, now).await],
            // Concurrent, so that the writes can share the store's transactions.
            many => {
                futures_util::future::join_all(many.iter().map(|result| store.save_result(agent, result, now))).await
            }
        };
        self.inner.metrics.result_store_seconds.observe(started.elapsed().as_secs_f64());
        let mut stored = Vec::with_capacity(results.len());
        let mut first_error = None;
        for (result, outcome) in results.iter().zip(outcomes) {
            match outcome {
                Ok(Recorded::Conflicting { .. }) => {
                    stored.push(result.command_id.clone());
                    self.audit_event(
                        agent.as_str(),
                        "security.conflicting_result",
                        vec![result.command_id.to_string()],
                        "kept_first",
                        serde_json::json!({}),
                    )
                    .await;
                }
                Ok(_) => stored.push(result.command_id.clone()),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        let finished = self.with_dispatcher(|d| {
            results.iter().filter(|r| stored.contains(&r.command_id)).filter(|r| d.on_result(now, r)).count()
        });
        self.inner.metrics.results.inc_by(finished as u64);
        {
            let mut sent_at = lock(&self.inner.sent_at);
            for id in &stored {
                if let Some(at) = sent_at.remove(id) {
                    let seconds = now.saturating_since(at).as_secs_f64();
                    self.inner.metrics.round_trip_seconds.observe(seconds);
                }
            }
        }
        match first_error {
            Some(error) if stored.is_empty() => Err(error),
            _ => Ok(stored),
        }
    }

    /// Revokes or reinstates an agent: refused at its next HELLO, and its live session (if
    /// any) is closed.
    pub async fn set_revoked(&self, agent: &AgentId, revoked: bool) -> Result<bool, StoreError> {
        let found = self.inner.store.set_revoked(agent, revoked).await?;
        if found {
            self.inner.keys.set(agent.clone(), revoked);
            if revoked && let Some(live) = lock(&self.inner.live).get(agent) {
                live.stop.store(1, Ordering::Release);
                live.wake.notify_one();
            }
        }
        Ok(found)
    }

    // ---- submissions ------------------------------------------------------------------------

    /// Accepts a submission: resolves targets, reserves queue room, stores the job and its
    /// commands durably, then queues them. Nothing is queued when any step refuses.
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, ControlError> {
        let agents = self.resolve_targets(&request.targets).await?;
        // From here on the job may become durable, its commands held by this instance: the
        // rest runs in a task of its own, so that a caller who stops waiting (a client that
        // hangs up) cannot leave the job stored but its commands neither queued nor audited.
        let control = self.clone();
        tokio::spawn(async move { control.accept_job(request, agents).await }).await.unwrap_or_else(|error| {
            Err(ControlError::Store(StoreError::Database(format!("accepting the submission failed: {error}"))))
        })
    }

    /// Stores the job for `agents`, audits its commands' creation and queues them.
    async fn accept_job(&self, request: SubmitRequest, agents: Vec<AgentId>) -> Result<Submitted, ControlError> {
        let now = self.now();
        let (job_id, records, claimed) = match self.store_job(&request, &agents, now).await? {
            Stored::Existing(existing) => return self.existing_job(existing).await,
            Stored::Created { job_id, records, claimed } => (job_id, records, claimed),
        };
        let commands: Vec<(CommandId, AgentId)> =
            records.iter().map(|r| (r.command.command_id.clone(), r.command.agent_id.clone())).collect();
        // Queued before any command can be dispatched, so that each command's record of its
        // creation precedes every later one in the chain; and in one wait for the queue, not
        // one per command, so that a broadcast's answer does not queue behind its own sessions.
        let detail = serde_json::json!({ "job_id": job_id, "req_id": request.req_id, "verb": request.verb.as_str() });
        let args_hash = audit::chain::args_hash(&detail);
        let mut detail_json = String::new();
        push_canonical_json(&detail, &mut detail_json);
        let now = self.now();
        let created = commands
            .iter()
            .map(|(command, agent)| {
                let fields = Fields {
                    ts: now,
                    req_id: "",
                    actor: &request.actor,
                    action: "command.created",
                    args_hash: &args_hash,
                    targets: &[agent.as_str(), command.as_str()],
                    rc: "queued",
                    duration_ms: 0,
                };
                Prepared::build(fields, |out| out.push_str(&detail_json))
            })
            .collect();
        self.inner.auditor.record_all(created).await;
        // Agents served here took their commands as the job was stored; other instances were
        // notified by the store and claim theirs, and the sweep catches any wake-up that went
        // missing.
        self.adopt(claimed).await;
        self.inner.metrics.submitted.inc_by(commands.len() as u64);
        Ok(Submitted { job_id, commands, replayed: false })
    }

    /// Claims the commands in `scope` of agents served here and wakes their sessions.
    async fn claim(&self, scope: &ClaimScope) {
        match self.inner.store.claim_commands(&self.inner.instance.instance_id, scope).await {
            Ok(claimed) => self.adopt(claimed).await,
            Err(error) => tracing::warn!(%error, ?scope, "claiming commands failed; the sweep retries"),
        }
    }

    async fn resolve_targets(&self, targets: &Targets) -> Result<Vec<AgentId>, ControlError> {
        let store = &self.inner.store;
        let agents = match targets {
            Targets::Agents(ids) => {
                let mut unique = BTreeSet::new();
                let named: Vec<AgentId> = ids.iter().filter(|id| unique.insert(*id)).cloned().collect();
                let found: BTreeMap<AgentId, AgentRecord> =
                    store.agents_named(&named).await?.into_iter().map(|a| (a.agent_id.clone(), a)).collect();
                let mut unknown = Vec::new();
                let mut maintenance = Vec::new();
                for id in &named {
                    match found.get(id) {
                        Some(agent) if !agent.revoked && agent.maintenance => maintenance.push(id.clone()),
                        Some(agent) if !agent.revoked => {}
                        _ => unknown.push(id.clone()),
                    }
                }
                if !unknown.is_empty() {
                    return Err(ControlError::UnknownAgents(unknown));
                }
                if !maintenance.is_empty() {
                    return Err(ControlError::InMaintenance(maintenance));
                }
                unique.into_iter().cloned().collect()
            }
            Targets::Selector { site, capability, online } => {
                let mut out = Vec::new();
                let mut after = None;
                loop {
                    let filter = AgentFilter {
                        site: site.clone(),
                        capability: capability.clone(),
                        after: after.clone(),
                        limit: 1000,
                        ..AgentFilter::default()
                    };
                    let page = store.agents(&filter).await?;
                    let Some(last) = page.last() else { break };
                    after = Some(last.agent_id.clone());
                    out.extend(
                        page.into_iter()
                            .filter(|a| !a.maintenance && !a.revoked)
                            .filter(|a| online.is_none_or(|want| self.is_online(&a.agent_id) == want))
                            .map(|a| a.agent_id),
                    );
                }
                out
            }
        };
        if agents.is_empty() {
            return Err(ControlError::NoTargets);
        }
        Ok(agents)
    }

    async fn store_job(
        &self,
        request: &SubmitRequest,
        agents: &[AgentId],
        now: Timestamp,
    ) -> Result<Stored, ControlError> {
        // One identifier for the job and, numbered, its commands: cheap for a broadcast, and
        // rows stored together sit together in the store's indexes.
        let id = sortable_id(now, lock(&self.inner.entropy).bytes32());
        let job_id = JobId::new(format!("job-{id}"))
            .map_err(|e| StoreError::Database(format!("generated job id invalid: {e}")))?;
        let records: Vec<CommandRecord> = agents
            .iter()
            .enumerate()
            .map(|(n, agent)| {
                let command_id = CommandId::new(format!("cmd-{id}-{n}"))
                    .map_err(|e| StoreError::Database(format!("generated command id invalid: {e}")))?;
                Ok(CommandRecord {
                    command: NewCommand {
                        command_id,
                        agent_id: agent.clone(),
                        verb: request.verb.clone(),
                        args: request.args.clone(),
                        timeout: request.timeout,
                    },
                    state: CommandState::Queued { not_before: now },
                    attempts: 0,
                    submitted_at: now,
                    // The store numbers the commands of all instances.
                    order: n as u64,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        let job = JobRecord {
            job_id: job_id.clone(),
            req_id: request.req_id.clone(),
            actor: request.actor.clone(),
            verb: request.verb.clone(),
            args: request.args.clone(),
            created_at: now,
            idempotency: request.idempotency.clone(),
        };
        let dispatch = self.inner.config.dispatch;
        let bounds = QueueBounds { max_commands: dispatch.max_commands, per_agent: dispatch.per_agent_queue };
        // Claimed in the job's own transaction when an agent is served here: no second write
        // before the first COMMAND goes out.
        let claimant =
            agents.iter().any(|agent| self.is_online(agent)).then_some(self.inner.instance.instance_id.as_str());
        let started = std::time::Instant::now();
        let created = self.inner.store.create_job(&job, &records, bounds, claimant).await;
        self.inner.metrics.job_store_seconds.observe(started.elapsed().as_secs_f64());
        match created {
            Ok(JobInsert::Created { claimed }) => Ok(Stored::Created { job_id, records, claimed }),
            Ok(JobInsert::Existing(existing)) => Ok(Stored::Existing(existing)),
            Err(StoreError::IdempotencyConflict(key)) => Err(ControlError::IdempotencyConflict(key)),
            Err(StoreError::QueueFull { .. }) => {
                self.inner.metrics.refused_full.inc();
                Err(ControlError::QueueFull { retry_after: Duration::from_secs(1) })
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn existing_job(&self, job_id: JobId) -> Result<Submitted, ControlError> {
        let commands = match self.inner.store.job(&job_id).await? {
            Some((_, commands)) => {
                commands.into_iter().map(|c| (c.record.command.command_id, c.record.command.agent_id)).collect()
            }
            None => Vec::new(),
        };
        Ok(Submitted { job_id, commands, replayed: true })
    }

    /// Cancels a command that was not sent yet, durably before it returns: here if this
    /// instance holds it, in the store if no instance does, and through the instance that
    /// holds it otherwise (waiting up to two seconds for its answer).
    pub async fn cancel(&self, id: &CommandId) -> Result<(), ControlError> {
        let now = self.now();
        let held = lock(&self.inner.dispatch).dispatcher.record(id).is_some();
        if held {
            self.with_dispatcher(|d| d.cancel(now, id)).map_err(|error| match error {
                DispatchError::NotCancellable(id) => ControlError::NotCancellable(id),
                _ => ControlError::NotFound(id.clone()),
            })?;
            return self.flush().await;
        }
        let store = &self.inner.store;
        match store.cancel_unowned(id, now).await? {
            CancelOutcome::Cancelled => {
                if let Some(stored) = store.command(id).await? {
                    self.publish_changed(vec![stored.record]).await;
                }
                Ok(())
            }
            CancelOutcome::NotFound => Err(ControlError::NotFound(id.clone())),
            CancelOutcome::NotCancellable(_) => Err(ControlError::NotCancellable(id.clone())),
            CancelOutcome::Owned(_) => {
                store.request_cancel(id).await?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    match store.command(id).await?.map(|c| c.record.state) {
                        Some(CommandState::Done(Terminal::Cancelled)) => return Ok(()),
                        Some(CommandState::Queued { .. }) => continue,
                        Some(_) => return Err(ControlError::NotCancellable(id.clone())),
                        None => return Err(ControlError::NotFound(id.clone())),
                    }
                }
                Err(ControlError::Store(StoreError::Database(format!(
                    "the instance holding {id} did not answer the cancellation in time"
                ))))
            }
        }
    }

    /// Writes every pending command record now.
    async fn flush(&self) -> Result<(), ControlError> {
        let _writes = self.inner.writes.lock().await;
        let (batch, transitions) = std::mem::take(&mut *lock(&self.inner.dirty)).split();
        match self.inner.store.save_commands(&batch).await {
            Ok(()) => {
                self.publish(batch, transitions).await;
                Ok(())
            }
            Err(error) => {
                self.requeue_dirty(batch, transitions);
                Err(error.into())
            }
        }
    }

    /// Queue figures: cluster-wide command counts from `stats`, sessions of this instance.
    pub fn queue_stats(&self, stats: &StoreStats) -> QueueStats {
        let count = |name: &str| usize::try_from(stats.unfinished(name)).unwrap_or(usize::MAX);
        let queued = count("queued");
        let in_flight = count("sent").saturating_add(count("acked"));
        let free_slots = self.inner.config.dispatch.max_commands.saturating_sub(queued.saturating_add(in_flight));
        QueueStats { queued, in_flight, free_slots, online: lock(&self.inner.live).len() }
    }

    // ---- audit ------------------------------------------------------------------------------

    /// Queues an audit record for the chain (waiting for room when the queue is full); it is
    /// emitted on the `audit` tracing target once stored.
    pub async fn audit_event(
        &self,
        actor: &str,
        action: &str,
        targets: Vec<String>,
        rc: &str,
        detail: serde_json::Value,
    ) {
        self.audit(event(self.now(), actor, action, targets, rc, detail)).await;
    }

    /// Queues `entry` for the audit chain, waiting for room when the queue is full.
    pub async fn audit(&self, entry: NewAudit) {
        self.inner.auditor.record(entry).await;
    }

    /// Like [`Control::audit_event`], for events an unauthenticated peer can cause at will:
    /// rate-limited, with the excess counted in the `audit_suppressed` metric instead.
    pub async fn audit_security(
        &self,
        actor: &str,
        action: &str,
        targets: Vec<String>,
        rc: &str,
        detail: serde_json::Value,
    ) {
        let allowed = lock(&self.inner.security_audits).try_take(self.now(), 1).is_ok();
        if allowed {
            self.audit_event(actor, action, targets, rc, detail).await;
        } else {
            self.inner.metrics.audit_suppressed.inc();
        }
    }

    // ---- internals --------------------------------------------------------------------------

    fn with_dispatcher<R>(&self, f: impl FnOnce(&mut Dispatcher) -> R) -> R {
        let out = f(&mut lock(&self.inner.dispatch).dispatcher);
        self.drain_dispatcher_events();
        out
    }

    /// Moves the dispatcher's reports into the persister's dirty set and wakes agents whose
    /// commands became sendable.
    fn drain_dispatcher_events(&self) {
        let mut ready = BTreeSet::new();
        let mut changed = Vec::new();
        {
            let mut dispatch = lock(&self.inner.dispatch);
            while let Some(event) = dispatch.dispatcher.poll_event() {
                match event {
                    DispatchEvent::Changed(record) => changed.push(record),
                    DispatchEvent::Ready(agent) => {
                        ready.insert(agent);
                    }
                    _ => {}
                }
            }
        }
        if !changed.is_empty() {
            let now = self.now();
            // Prepared before taking the lock that every session's changes share.
            let transitions: Vec<Prepared> = changed.iter().map(|record| transition_audit(record, now)).collect();
            let mut dirty = lock(&self.inner.dirty);
            dirty.transitions.extend(transitions);
            for record in changed {
                // The latest state of a command supersedes any unwritten earlier one.
                dirty.records.insert(record.command.command_id.clone(), record);
            }
            self.inner.persist.notify_one();
        }
        self.wake(ready.iter());
    }

    fn wake<'a>(&self, agents: impl Iterator<Item = &'a AgentId>) {
        let live = lock(&self.inner.live);
        for agent in agents {
            if let Some(session) = live.get(agent) {
                session.wake.notify_one();
            }
        }
    }

    /// Writes changed command records in batches, then publishes and audits them.
    async fn persister(self) {
        loop {
            let writes = self.inner.writes.lock().await;
            let (batch, transitions) = std::mem::take(&mut *lock(&self.inner.dirty)).split();
            if batch.is_empty() && transitions.is_empty() {
                drop(writes);
                if self.inner.closing.load(Ordering::Acquire) {
                    return;
                }
                tokio::select! {
                    _ = self.inner.persist.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                // Nothing waits on these writes (results are durable before they are
                // acknowledged, commands before they are accepted), so gathering for a moment
                // turns a command's sent, acked and finished records into one write, and a
                // fleet's into a few a second, instead of one fsync'd commit per change.
                if !self.inner.closing.load(Ordering::Acquire) {
                    tokio::time::sleep(PERSIST_LINGER).await;
                }
                continue;
            }
            match self.inner.store.save_commands(&batch).await {
                Ok(()) => {
                    drop(writes);
                    self.publish(batch, transitions).await;
                }
                Err(error) => {
                    drop(writes);
                    tracing::error!(%error, records = batch.len(), "persisting command records failed; retrying");
                    self.requeue_dirty(batch, transitions);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Announces durable command records to subscribers and appends the audit records of
    /// the changes they hold.
    async fn publish(&self, batch: Vec<CommandRecord>, transitions: Vec<Prepared>) {
        for record in batch {
            // A terminal state is final, so each command is counted once, by the instance
            // that stored its end.
            if let CommandState::Done(terminal) = &record.state {
                Metrics::count(&self.inner.metrics.finished, terminal.as_str());
            }
            let _ = self.inner.updates.send(record);
        }
        self.inner.auditor.record_all(transitions).await;
    }

    /// Publishes records the store changed itself, one change each.
    async fn publish_changed(&self, records: Vec<CommandRecord>) {
        let now = self.now();
        let transitions = records.iter().map(|record| transition_audit(record, now)).collect();
        self.publish(records, transitions).await;
    }

    /// Puts records whose write failed back, unless a newer record of the command is waiting,
    /// and their changes' audit records before any that came since.
    fn requeue_dirty(&self, batch: Vec<CommandRecord>, transitions: Vec<Prepared>) {
        let mut dirty = lock(&self.inner.dirty);
        for record in batch {
            dirty.records.entry(record.command.command_id.clone()).or_insert(record);
        }
        let since = std::mem::replace(&mut dirty.transitions, transitions);
        dirty.transitions.extend(since);
    }

    /// Keeps this instance's lease, reaps dead instances, claims commands whose wake-up was
    /// missed, and runs the timers of commands no instance holds. Stops every session when
    /// the lease could not be renewed in time: other instances may be serving its agents.
    async fn sweeper(self) {
        let cluster = self.inner.config.cluster;
        let renew_every = (cluster.lease / 3).max(Duration::from_millis(100));
        let mut last_sweep = tokio::time::Instant::now();
        while !self.inner.closing.load(Ordering::Acquire) {
            tokio::time::sleep(renew_every.min(cluster.sweep)).await;
            if self.inner.closing.load(Ordering::Acquire) {
                break;
            }
            let now = self.now();
            let store = &self.inner.store;
            let instance = &self.inner.instance;
            match store.renew_instance(&instance.instance_id, now.saturating_add(cluster.lease)).await {
                Ok(true) => self.inner.renewed_at.store(now.as_millis(), Ordering::Release),
                Ok(false) => {
                    tracing::error!(instance = %instance.instance_id, "this instance was declared dead; rejoining");
                    self.fence();
                    let mut rejoin = instance.clone();
                    rejoin.lease_until = now.saturating_add(cluster.lease);
                    if store.register_instance(&rejoin).await.is_ok() {
                        self.inner.renewed_at.store(now.as_millis(), Ordering::Release);
                    }
                }
                Err(error) => {
                    let renewed = Timestamp::from_millis(self.inner.renewed_at.load(Ordering::Acquire));
                    tracing::warn!(%error, "renewing this instance's lease failed");
                    if now.saturating_since(renewed) >= cluster.lease {
                        tracing::error!("this instance's lease lapsed; ending its sessions");
                        self.fence();
                    }
                }
            }
            if last_sweep.elapsed() < cluster.sweep {
                continue;
            }
            last_sweep = tokio::time::Instant::now();
            match store.reap_instances(now).await {
                Ok(dead) if !dead.is_empty() => tracing::warn!(?dead, "reaped instances whose lease ended"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "reaping dead instances failed"),
            }
            if !lock(&self.inner.live).is_empty() {
                self.claim(&ClaimScope::All).await;
            }
            match store.expire_unowned(now, self.inner.config.dispatch.queue_ttl).await {
                Ok(expired) => self.publish_changed(expired).await,
                Err(error) => tracing::warn!(%error, "expiring unowned commands failed"),
            }
        }
    }

    /// Ends every session and forgets every command held: what this instance held belongs
    /// to whoever serves its agents next.
    fn fence(&self) {
        let live: Vec<AgentId> = lock(&self.inner.live).keys().cloned().collect();
        {
            let mut dispatch = lock(&self.inner.dispatch);
            for agent in &live {
                dispatch.dispatcher.release_agent(agent);
            }
        }
        for session in lock(&self.inner.live).values() {
            session.stop.store(2, Ordering::Release);
            session.wake.notify_one();
        }
    }

    /// Acts on other instances' wake-ups.
    async fn listener(self, mut wakeups: tokio::sync::mpsc::Receiver<Wakeup>) {
        while let Some(wakeup) = wakeups.recv().await {
            if self.inner.closing.load(Ordering::Acquire) {
                break;
            }
            match wakeup {
                Wakeup::Job(job) => {
                    if !lock(&self.inner.live).is_empty() {
                        self.claim(&ClaimScope::Job(job)).await;
                    }
                }
                Wakeup::Cancel(id) => {
                    let held = lock(&self.inner.dispatch).dispatcher.record(&id).is_some();
                    if held {
                        let now = self.now();
                        if self.with_dispatcher(|d| d.cancel(now, &id)).is_ok() {
                            let _ = self.flush().await;
                        }
                    }
                }
            }
        }
    }

    /// Drives the dispatcher's timers: retry delays, queue expiry, result deadlines.
    async fn ticker(self) {
        while !self.inner.closing.load(Ordering::Acquire) {
            let next = lock(&self.inner.dispatch).dispatcher.poll_timeout();
            let now = self.now();
            let wait = next.map_or(Duration::from_secs(1), |at| at.saturating_since(now).min(Duration::from_secs(1)));
            tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
            let now = self.now();
            self.with_dispatcher(|d| d.handle_timeout(now));
        }
    }

    /// Stops the background tasks after writing every pending record.
    pub async fn shutdown(&self) {
        self.inner.closing.store(true, Ordering::Release);
        for _ in 0..200 {
            if lock(&self.inner.dirty).is_empty() {
                break;
            }
            self.inner.persist.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let live: Vec<Arc<Notify>> = lock(&self.inner.live).values().map(|l| Arc::clone(&l.wake)).collect();
        for wake in live {
            wake.notify_one();
        }
        // Sessions detach as they close, handing their agents' commands back; give them a
        // moment, then let go of whatever is left so other instances need not wait out the
        // lease.
        for _ in 0..200 {
            if lock(&self.inner.live).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.flush().await;
        if let Err(error) = self.inner.store.deregister_instance(&self.inner.instance.instance_id).await {
            tracing::warn!(%error, "deregistering this instance failed; its lease will lapse");
        }
        // Last: every record of what happened above is durable before the store closes.
        self.inner.auditor.flush().await;
    }

    /// Whether [`Control::shutdown`] was called.
    pub fn is_closing(&self) -> bool {
        self.inner.closing.load(Ordering::Acquire)
    }
}

/// Command changes the persister has yet to write.
#[derive(Default)]
struct Dirty {
    /// The latest record of each changed command.
    records: BTreeMap<CommandId, CommandRecord>,
    /// The audit record of every change, in order, including those whose record a later
    /// change superseded: the chain keeps each step of a command's life, the store its last.
    transitions: Vec<Prepared>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.transitions.is_empty()
    }

    fn split(self) -> (Vec<CommandRecord>, Vec<Prepared>) {
        (self.records.into_values().collect(), self.transitions)
    }
}

/// What [`Control::store_job`] did with a submission.
enum Stored {
    /// Stored as a new job; `claimed` are its commands this instance holds.
    Created { job_id: JobId, records: Vec<CommandRecord>, claimed: Vec<CommandRecord> },
    /// The idempotency key named this earlier job; nothing was stored.
    Existing(JobId),
}

/// An identifier that sorts by the time `now` it was made: the milliseconds since the epoch
/// as 12 hex digits, then the first 80 bits of `random` as 20. Rows keyed by such identifiers
/// are added at the end of their indexes rather than each on a random page, so that a commit
/// of many rows writes a few pages instead of one per row.
fn sortable_id(now: Timestamp, random: [u8; 32]) -> String {
    let random = hex16(random);
    format!("{:012x}{}", now.as_millis() & 0xffff_ffff_ffff, &random[..20])
}

/// The first 16 bytes of `bytes` as 32 lowercase hex digits.
fn hex16(bytes: [u8; 32]) -> String {
    bytes[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// An audit record of an event at `now` that took no time of its own.
fn event(
    now: Timestamp,
    actor: &str,
    action: &str,
    targets: Vec<String>,
    rc: &str,
    detail: serde_json::Value,
) -> NewAudit {
    NewAudit {
        ts: now,
        req_id: String::new(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        args_hash: audit::chain::args_hash(&detail),
        targets,
        rc: rc.to_owned(),
        duration_ms: 0,
        detail,
    }
}

/// The audit record for a command's new state.
fn transition_audit(record: &CommandRecord, now: Timestamp) -> Prepared {
    /// The one member, if any, of a state's `detail.state`.
    enum StateMember<'a> {
        None,
        Number(&'static str, u64),
        Text(&'static str, &'a str),
    }
    let (action, rc, member) = match &record.state {
        CommandState::Queued { .. } if record.attempts == 0 => ("command.created", "queued", StateMember::None),
        CommandState::Queued { not_before } => {
            ("command.retry_scheduled", "queued", StateMember::Number("not_before", not_before.as_millis()))
        }
        CommandState::Sent { session } => ("command.dispatched", "sent", StateMember::Number("session", *session)),
        CommandState::Acked { .. } => ("command.acked", "acked", StateMember::None),
        CommandState::Done(Terminal::DeadLettered(reason)) => {
            ("command.dead_lettered", "dead_lettered", StateMember::Text("reason", reason.as_str()))
        }
        CommandState::Done(terminal) => ("command.finished", terminal.as_str(), StateMember::None),
    };
    let command = &record.command;
    let fields = Fields {
        ts: now,
        req_id: "",
        actor: "host",
        action,
        args_hash: &audit::chain::args_hash(&command.args),
        targets: &[command.agent_id.as_str(), command.command_id.as_str()],
        rc,
        duration_ms: now.saturating_since(record.submitted_at).as_millis() as u64,
    };
    // `{"attempts":…,"state":{…},"verb":…}`: canonical JSON, members in sorted order, written
    // as is rather than through a JSON value (four of these are made per command).
    Prepared::build(fields, |out| {
        let _ = write!(out, "{{\"attempts\":{},\"state\":{{", record.attempts);
        match member {
            StateMember::None => {}
            StateMember::Number(key, value) => {
                let _ = write!(out, "\"{key}\":{value}");
            }
            StateMember::Text(key, value) => {
                let _ = write!(out, "\"{key}\":");
                push_json_string(value, out);
            }
        }
        out.push_str("},\"verb\":");
        push_json_string(command.verb.as_str(), out);
        out.push('}');
    })
}

/// Lets the admission [`Host`] own a handle to the shared key table.
struct SharedKeys(Arc<EnrolledKeys>);

impl AgentKeys for SharedKeys {
    fn agent_key(&self, agent_id: &AgentId) -> Option<AgentKey> {
        self.0.agent_key(agent_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lifecycle records as a JSON value would make them: what `transition_audit` writes
    /// directly must be the same record, byte for byte.
    #[test]
    fn lifecycle_records_are_those_of_their_json_values() {
        let command = viworks_core::session::NewCommand {
            command_id: CommandId::new("cmd-1").expect("valid"),
            agent_id: AgentId::new("gw-1").expect("valid"),
            verb: Verb::new("docker_ps").expect("valid"),
            args: serde_json::json!({ "all": true, "filter": "name=\"web\"" }),
            timeout: Duration::from_secs(30),
        };
        let at = |millis| Timestamp::from_millis(millis);
        let states = [
            (CommandState::Queued { not_before: at(5) }, 0, "command.created", "queued", serde_json::json!({})),
            (
                CommandState::Queued { not_before: at(9) },
                2,
                "command.retry_scheduled",
                "queued",
                serde_json::json!({ "not_before": 9 }),
            ),
            (CommandState::Sent { session: 7 }, 1, "command.dispatched", "sent", serde_json::json!({ "session": 7 })),
            (CommandState::Acked { deadline: at(99) }, 1, "command.acked", "acked", serde_json::json!({})),
            (CommandState::Done(Terminal::Succeeded), 1, "command.finished", "succeeded", serde_json::json!({})),
            (
                CommandState::Done(Terminal::DeadLettered(viworks_core::session::DeadLetter::NoResult)),
                3,
                "command.dead_lettered",
                "dead_lettered",
                serde_json::json!({ "reason": "no_result" }),
            ),
        ];
        for (state, attempts, action, rc, detail) in states {
            let record = CommandRecord { command: command.clone(), state, attempts, submitted_at: at(1_000), order: 4 };
            let expected = NewAudit {
                ts: at(1_250),
                req_id: String::new(),
                actor: "host".to_owned(),
                action: action.to_owned(),
                args_hash: audit::chain::args_hash(&command.args),
                targets: vec!["gw-1".to_owned(), "cmd-1".to_owned()],
                rc: rc.to_owned(),
                duration_ms: 250,
                detail: serde_json::json!({ "verb": "docker_ps", "attempts": attempts, "state": detail }),
            };
            let written = transition_audit(&record, at(1_250));
            assert_eq!(written, Prepared::new(expected.clone()), "{action}");
            assert_eq!(written.content(), expected, "{action}");
        }
    }

    #[test]
    fn sortable_ids_order_by_time_then_differ_by_their_random_part() {
        let early = sortable_id(Timestamp::from_millis(1_700_000_000_000), [0xff; 32]);
        let later = sortable_id(Timestamp::from_millis(1_700_000_000_001), [0x00; 32]);
        assert!(early < later, "{early} sorts before {later}");
        assert_eq!(early.len(), 32);
        assert!(early.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{early}");
        assert_eq!(&early[..12], "018bcfe56800");
        let mut other = [0xff; 32];
        other[9] = 0;
        assert_ne!(sortable_id(Timestamp::from_millis(1), [0xff; 32]), sortable_id(Timestamp::from_millis(1), other));
    }
}
