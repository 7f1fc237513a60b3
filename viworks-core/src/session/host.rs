//! The host side: [`Host`] admits connections by their HELLO; each admitted agent gets a
//! [`HostSession`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::channel::{Channel, Received};
use super::{SessionError, Timers, Violation};
use crate::auth::{
    self, AgentKey, AuthError, ChannelBinding, DirectionKeys, MacKey, MasterKey, NonceCache, NonceCacheConfig,
    NonceOutcome, SkewWindow,
};
use crate::flow::{CreditWindow, Delivery};
use crate::time::millis_of;
use crate::wire::{
    AgentId, CloseCode, Command, CommandId, CommandResult, Envelope, Hello, Limits, MAX_HELLO_LEN, Message, Nonce,
    Reject, RejectCode, ResultAck, Telemetry, TelemetryAck, Text, Welcome, WireError,
};
use crate::{Entropy, Timestamp};

/// Where the host finds agent keys.
pub trait AgentKeys: Send + Sync {
    /// The key of `agent_id`, or `None` when the agent is not enrolled or was revoked.
    fn agent_key(&self, agent_id: &AgentId) -> Option<AgentKey>;
}

/// Every agent id has a key derived from the master key: right for a host that tracks
/// enrollment elsewhere, and for tests.
impl AgentKeys for MasterKey {
    fn agent_key(&self, agent_id: &AgentId) -> Option<AgentKey> {
        Some(AgentKey::derive(self, agent_id))
    }
}

/// The host's admission and session settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Heartbeat and liveness timers, announced to agents in the WELCOME.
    pub timers: Timers,
    /// How far a HELLO's timestamp may be from the host's clock.
    pub skew_window: SkewWindow,
    /// HELLO nonces remembered at once; size it for the HELLOs arriving in two windows.
    pub nonce_capacity: usize,
    /// HELLO nonces one agent may hold at once.
    pub nonce_quota_per_agent: usize,
    /// Live sessions admitted at once; beyond it HELLOs are refused as `overloaded`.
    pub max_sessions: usize,
    /// The largest concurrency an agent may advertise.
    pub max_concurrency: u32,
    /// Refused messages a session tolerates before it closes with `too_many_violations`.
    pub max_violations: u32,
    /// Message size limits.
    pub limits: Limits,
    /// Messages a session queues for sending before it refuses more.
    pub max_transmit: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            timers: Timers::DEFAULT,
            skew_window: SkewWindow::DEFAULT,
            nonce_capacity: 1 << 17,
            nonce_quota_per_agent: 16,
            max_sessions: 65_536,
            max_concurrency: 256,
            max_violations: 3,
            limits: Limits::default(),
            max_transmit: 1024,
        }
    }
}

/// A refused HELLO: what to audit and what to send back before closing the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Why it was refused.
    pub code: RejectCode,
    /// The agent id the HELLO claimed, when it could be read.
    pub claimed_agent: Option<AgentId>,
    /// Whether the HELLO's tag verified, so that `claimed_agent` is proven.
    pub authenticated: bool,
    /// The REJECT to send: sealed with the agent's handshake key when the HELLO was
    /// authenticated, otherwise with [`MacKey::anonymous_reject`].
    pub reply: Vec<u8>,
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionEnd {
    /// The close code.
    pub code: CloseCode,
    /// Whether the peer ended it (it sent CLOSE) rather than this side.
    pub by_peer: bool,
}

/// What happened in a [`HostSession`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum HostEvent {
    /// The agent durably recorded this command and will answer it; never send it again.
    Acked(CommandId),
    /// A command's result. Store it, then call [`HostSession::ack_results`].
    Result(CommandResult),
    /// A telemetry batch. Store it, then call [`HostSession::ack_telemetry`].
    Telemetry(Telemetry),
    /// A message was refused; worth an audit record.
    Violation(Violation),
    /// The session ended. `in_flight` lists the commands sent and not yet answered: those
    /// never acknowledged may be sent again, the acknowledged ones will be answered later.
    Closed {
        /// How it ended.
        end: SessionEnd,
        /// Commands in flight when it ended.
        in_flight: Vec<(CommandId, Delivery)>,
    },
}

/// A registered agent's liveness deadline, shared between the registry and its session.
#[derive(Debug)]
struct PresenceGuard {
    deadline: Arc<AtomicU64>,
    live: Arc<AtomicUsize>,
}

impl PresenceGuard {
    fn renew(&self, deadline: Timestamp) {
        // Zero means ended; a renewal never resurrects an ended session.
        let _ = self.deadline.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            (current != 0).then_some(deadline.as_millis().max(1))
        });
    }

    fn end(&self) {
        if self.deadline.swap(0, Ordering::AcqRel) != 0 {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.end();
    }
}

/// The host's admission point, shared by all connections: it holds the HELLO nonce cache and
/// the registry of live agents, so it sees replays and duplicate identities across sessions.
///
/// Sessions it hands out run independently; each keeps its registry entry alive by hearing
/// from its agent and releases it when it ends or is dropped.
pub struct Host {
    config: HostConfig,
    keys: Box<dyn AgentKeys>,
    nonces: NonceCache,
    registry: BTreeMap<AgentId, Arc<AtomicU64>>,
    live: Arc<AtomicUsize>,
    entropy: Entropy,
    next_session: u64,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("live_sessions", &self.live_sessions()).finish_non_exhaustive()
    }
}

impl Host {
    /// A host started at `now` with `config`, finding keys in `keys` and drawing nonces from
    /// `entropy`. HELLOs stamped before `now` are refused as stale: the host cannot know
    /// whether it saw them before it (re)started.
    pub fn new(
        config: HostConfig,
        keys: Box<dyn AgentKeys>,
        mut entropy: Entropy,
        now: Timestamp,
    ) -> Result<Self, SessionError> {
        if config.max_sessions == 0 || config.max_concurrency == 0 {
            return Err(SessionError::InvalidConfig("max_sessions and max_concurrency must be at least 1"));
        }
        let nonce_config = NonceCacheConfig {
            capacity: config.nonce_capacity,
            per_agent_quota: config.nonce_quota_per_agent,
            max_agents: config.nonce_capacity,
            window: config.skew_window,
        };
        let mut nonces = NonceCache::new(nonce_config, &mut entropy).map_err(|e| match e {
            AuthError::InvalidCacheConfig(problem) => SessionError::InvalidConfig(problem),
            _ => SessionError::InvalidConfig("invalid nonce cache bounds"),
        })?;
        nonces.set_horizon(now);
        Ok(Host {
            config: Host::sanitize(config),
            keys,
            nonces,
            registry: BTreeMap::new(),
            live: Arc::new(AtomicUsize::new(0)),
            entropy,
            next_session: 1,
        })
    }

    fn sanitize(mut config: HostConfig) -> HostConfig {
        config.timers = config.timers.sanitized();
        config.max_transmit = config.max_transmit.max(4);
        config
    }

    /// Sessions admitted and not yet ended.
    pub fn live_sessions(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// The HELLO nonce cache, for metrics.
    pub fn nonce_cache(&self) -> &NonceCache {
        &self.nonces
    }

    /// Whether `agent_id` has a session that has heard from its agent within the liveness
    /// timeout.
    pub fn is_live(&self, agent_id: &AgentId, now: Timestamp) -> bool {
        self.registry.get(agent_id).is_some_and(|deadline| alive(deadline, now))
    }

    /// Handles the first message of a connection. `transport_identity` is the agent id the
    /// transport proved (the client certificate's), when there is one; a HELLO for another
    /// id is refused. `binding` is the connection's [`ChannelBinding`].
    ///
    /// Checks, in order: size and version, the claimed id against the transport identity, the
    /// agent's key, the tag, the content, the skew window and nonce cache, duplicate identity,
    /// and the session limit. On success the session's first transmit is the WELCOME.
    pub fn accept(
        &mut self,
        now: Timestamp,
        hello: &[u8],
        transport_identity: Option<&AgentId>,
        binding: &ChannelBinding,
    ) -> Result<HostSession, Refusal> {
        let envelope = match auth::read_hello_unverified(hello) {
            Ok(envelope) => envelope,
            Err(AuthError::Wire(WireError::UnsupportedVersion(_))) => {
                return Err(self.refuse_anonymously(now, RejectCode::UnsupportedVersion, None));
            }
            Err(_) => return Err(self.refuse_anonymously(now, RejectCode::Malformed, None)),
        };
        let Message::Hello(body) = envelope.message else {
            return Err(self.refuse_anonymously(now, RejectCode::Malformed, None));
        };
        let claimed = body.agent_id.clone();
        if transport_identity.is_some_and(|proven| *proven != claimed) {
            return Err(self.refuse_anonymously(now, RejectCode::IdentityMismatch, Some(claimed)));
        }
        let Some(agent_key) = self.keys.agent_key(&claimed) else {
            return Err(self.refuse_anonymously(now, RejectCode::UnknownAgent, Some(claimed)));
        };
        let handshake = DirectionKeys::handshake(&agent_key, binding);
        let hello_limits = Limits { max_message_len: MAX_HELLO_LEN };
        if auth::verify(&handshake.agent_to_host, hello, hello_limits).is_err() {
            return Err(self.refuse_anonymously(now, RejectCode::BadMac, Some(claimed)));
        }
        // The tag was verified above; from here on the HELLO is the agent's.
        let refuse = |host: &mut Host, code, retry_after| {
            Err(host.refuse_authenticated(now, &handshake.host_to_agent, code, &body, retry_after))
        };
        if envelope.seq != 0 || body.max_concurrency == 0 || body.max_concurrency > self.config.max_concurrency {
            return refuse(self, RejectCode::Malformed, None);
        }
        match self.nonces.check(&claimed, &body.nonce, envelope.ts, now) {
            NonceOutcome::Fresh => {}
            NonceOutcome::Stale => return refuse(self, RejectCode::Stale, None),
            NonceOutcome::Replayed => return refuse(self, RejectCode::Replay, None),
            _ => return refuse(self, RejectCode::Overloaded, Some(self.config.skew_window.width())),
        }
        if self.is_live(&claimed, now) {
            return refuse(self, RejectCode::DuplicateAgent, Some(self.config.timers.liveness_timeout));
        }
        if self.live_sessions() >= self.config.max_sessions {
            return refuse(self, RejectCode::Overloaded, Some(self.config.timers.liveness_timeout));
        }
        self.admit(now, agent_key, &handshake.host_to_agent, body)
            .map_err(|_| self.refuse_anonymously(now, RejectCode::Malformed, Some(claimed)))
    }

    fn admit(
        &mut self,
        now: Timestamp,
        agent_key: AgentKey,
        welcome_key: &MacKey,
        hello: Hello,
    ) -> Result<HostSession, AuthError> {
        let timers = self.config.timers;
        let host_nonce = Nonce(self.entropy.bytes32());
        let welcome = Envelope {
            seq: 0,
            ts: now,
            message: Message::Welcome(Welcome {
                agent_nonce: hello.nonce,
                host_nonce,
                heartbeat_interval_ms: millis_of(timers.heartbeat_interval),
                liveness_timeout_ms: millis_of(timers.liveness_timeout),
            }),
        };
        let welcome = auth::seal(welcome_key, &welcome)?;
        let keys = DirectionKeys::session(&agent_key, &hello.nonce, &host_nonce);
        let mut channel = Channel::established(
            keys.host_to_agent,
            keys.agent_to_host,
            self.config.limits,
            self.config.max_transmit,
            timers,
            self.config.max_violations,
            now,
        );
        channel.queue_sealed(welcome);
        let deadline = Arc::new(AtomicU64::new(channel.liveness_deadline().as_millis().max(1)));
        self.prune_registry(now);
        self.registry.insert(hello.agent_id.clone(), Arc::clone(&deadline));
        self.live.fetch_add(1, Ordering::AcqRel);
        let id = self.next_session;
        self.next_session += 1;
        Ok(HostSession {
            id,
            credits: CreditWindow::new(hello.max_concurrency as usize),
            hello,
            channel,
            events: VecDeque::new(),
            presence: PresenceGuard { deadline, live: Arc::clone(&self.live) },
            end: None,
            reject_key: welcome_key.clone(),
        })
    }

    /// Forgets registry entries of ended sessions once the registry outgrows the session
    /// limit, so that it stays bounded by twice that limit.
    fn prune_registry(&mut self, now: Timestamp) {
        if self.registry.len() >= self.config.max_sessions.saturating_mul(2) {
            self.registry.retain(|_, deadline| alive(deadline, now));
        }
    }

    fn refuse_anonymously(&mut self, now: Timestamp, code: RejectCode, claimed: Option<AgentId>) -> Refusal {
        let reply = reject(&MacKey::anonymous_reject(), now, code, None, None);
        Refusal { code, claimed_agent: claimed, authenticated: false, reply }
    }

    fn refuse_authenticated(
        &mut self,
        now: Timestamp,
        key: &MacKey,
        code: RejectCode,
        hello: &Hello,
        retry_after: Option<Duration>,
    ) -> Refusal {
        let reply = reject(key, now, code, Some(hello.nonce), retry_after);
        Refusal { code, claimed_agent: Some(hello.agent_id.clone()), authenticated: true, reply }
    }
}

fn alive(deadline: &AtomicU64, now: Timestamp) -> bool {
    let deadline = deadline.load(Ordering::Acquire);
    deadline != 0 && deadline >= now.as_millis()
}

fn reject(
    key: &MacKey,
    now: Timestamp,
    code: RejectCode,
    agent_nonce: Option<Nonce>,
    retry_after: Option<Duration>,
) -> Vec<u8> {
    let envelope = Envelope {
        seq: 0,
        ts: now,
        message: Message::Reject(Reject {
            code,
            message: Text::lossy(reject_text(code)),
            retry_after_ms: retry_after.map(millis_of),
            agent_nonce,
        }),
    };
    // A REJECT holds no floating-point value, so sealing cannot fail.
    auth::seal(key, &envelope).unwrap_or_default()
}

fn reject_text(code: RejectCode) -> &'static str {
    match code {
        RejectCode::UnsupportedVersion => "protocol version not supported",
        RejectCode::Malformed => "HELLO is malformed or out of bounds",
        RejectCode::UnknownAgent => "agent is not enrolled",
        RejectCode::IdentityMismatch => "agent id differs from the certificate identity",
        RejectCode::BadMac => "HELLO failed authentication",
        RejectCode::Replay => "HELLO was replayed",
        RejectCode::Stale => "HELLO timestamp outside the clock-skew window",
        RejectCode::DuplicateAgent => "agent already has a live session",
        _ => "host is at its admission limit",
    }
}

/// The host's side of one agent's session.
///
/// Commands go out through [`HostSession::send_command`], never more at once than the agent
/// advertised; results and telemetry come back as events and are acknowledged by the driver
/// once stored, so an acknowledgement always means durable.
#[derive(Debug)]
pub struct HostSession {
    id: u64,
    hello: Hello,
    channel: Channel,
    credits: CreditWindow,
    events: VecDeque<HostEvent>,
    presence: PresenceGuard,
    end: Option<SessionEnd>,
    /// The HELLO's handshake key, for [`HostSession::refuse`].
    reject_key: MacKey,
}

impl HostSession {
    /// Turns an admission back into a refusal, for a check the driver makes after
    /// [`Host::accept`] (another host instance holds the agent's session, say). Call it before
    /// the first [`HostSession::poll_transmit`]: the WELCOME is discarded unsent and the REJECT,
    /// sealed with the HELLO's handshake key like any authenticated refusal, is returned to be
    /// sent instead. The session's registry entry ends with it.
    pub fn refuse(self, now: Timestamp, code: RejectCode, retry_after: Option<Duration>) -> Refusal {
        let reply = reject(&self.reject_key, now, code, Some(self.hello.nonce), retry_after);
        Refusal { code, claimed_agent: Some(self.hello.agent_id.clone()), authenticated: true, reply }
    }

    /// This session's number, unique within its [`Host`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The agent's identity, proven by its HELLO's tag.
    pub fn agent_id(&self) -> &AgentId {
        &self.hello.agent_id
    }

    /// The HELLO the agent opened with: site, host name, version, capabilities, concurrency.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<SessionEnd> {
        self.end
    }

    /// Whether the session has ended. Drain transmit and events, then drop it.
    pub fn is_closed(&self) -> bool {
        self.end.is_some()
    }

    /// Commands that may be sent now.
    pub fn credits(&self) -> usize {
        if self.is_closed() { 0 } else { self.credits.credits().min(self.channel.room()) }
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.credits.len()
    }

    /// Handles one message from the agent.
    pub fn handle_message(&mut self, now: Timestamp, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        let message = match self.channel.receive(now, bytes) {
            Received::Message(message) => message,
            Received::Refused { violation, close } => {
                self.events.push_back(HostEvent::Violation(violation));
                if let Some(code) = close {
                    self.close(now, code, close_text(code));
                }
                return;
            }
        };
        self.presence.renew(self.channel.liveness_deadline());
        match message {
            Message::Ack(ack) => {
                if self.credits.ack(&ack.command_id) {
                    self.events.push_back(HostEvent::Acked(ack.command_id));
                }
            }
            Message::Result(result) => {
                // A result from an earlier session's outbox is just as valid; it holds no credit here.
                self.credits.release(&result.command_id);
                self.events.push_back(HostEvent::Result(result));
            }
            Message::Telemetry(telemetry) => self.events.push_back(HostEvent::Telemetry(telemetry)),
            Message::Heartbeat(_) => {}
            Message::Close(close) => self.finish(close.code, true),
            other => {
                self.events.push_back(HostEvent::Violation(Violation::UnexpectedKind(other.kind())));
                self.close(now, CloseCode::ProtocolViolation, close_text(CloseCode::ProtocolViolation));
            }
        }
    }

    /// Sends heartbeats when due and ends the session when the agent has been silent past the
    /// liveness timeout.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if !self.is_closed() && self.channel.on_timeout(now) {
            self.close(now, CloseCode::LivenessTimeout, close_text(CloseCode::LivenessTimeout));
        }
    }

    /// The next sealed message to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.channel.poll_transmit()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }

    /// When to call [`HostSession::handle_timeout`] next; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        (!self.is_closed()).then(|| self.channel.next_timeout())
    }

    /// Sends `command`, taking one credit. Fails with [`SessionError::NoCredit`] when the agent
    /// already runs as many commands as it advertised.
    pub fn send_command(&mut self, now: Timestamp, command: Command) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        if self.channel.room() == 0 {
            return Err(SessionError::TransmitFull);
        }
        let id = command.command_id.clone();
        let fresh = !self.credits.contains(&id);
        self.credits.take(&id, now).map_err(|e| SessionError::NoCredit { in_flight: e.in_flight })?;
        let sent = self.channel.send(now, Message::Command(command));
        if sent.is_err() && fresh {
            self.credits.release(&id);
        }
        sent
    }

    /// Counts commands the agent acknowledged in an earlier session as in flight here: they
    /// hold credits until their results arrive.
    pub fn resume(&mut self, now: Timestamp, acknowledged: impl IntoIterator<Item = CommandId>) {
        for id in acknowledged {
            self.credits.resume(&id, now);
        }
    }

    /// Acknowledges results that are now stored durably, so the agent can forget them.
    pub fn ack_results(&mut self, now: Timestamp, stored: &[CommandId]) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        for chunk in stored.chunks(4096) {
            self.channel.send(now, Message::ResultAck(ResultAck { command_ids: chunk.to_vec() }))?;
        }
        Ok(())
    }

    /// Acknowledges a telemetry batch that is now stored durably.
    pub fn ack_telemetry(&mut self, now: Timestamp, batch_id: u64) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        self.channel.send(now, Message::TelemetryAck(TelemetryAck { batch_id }))
    }

    /// The transport ended without a CLOSE (reset, crash, network loss). Ends the session
    /// as if the agent had gone away; nothing is sent.
    pub fn connection_lost(&mut self) {
        if !self.is_closed() {
            self.finish(CloseCode::GoingAway, true);
        }
    }

    /// Ends the session with `code`, sending CLOSE.
    pub fn close(&mut self, now: Timestamp, code: CloseCode, reason: &str) {
        if !self.is_closed() {
            self.channel.send_close(now, code, reason);
            self.finish(code, false);
        }
    }

    fn finish(&mut self, code: CloseCode, by_peer: bool) {
        let end = SessionEnd { code, by_peer };
        self.end = Some(end);
        self.presence.end();
        self.events.push_back(HostEvent::Closed { end, in_flight: self.credits.drain() });
    }
}

fn close_text(code: CloseCode) -> &'static str {
    match code {
        CloseCode::LivenessTimeout => "nothing heard within the liveness timeout",
        CloseCode::ProtocolViolation => "protocol violation",
        CloseCode::TooManyViolations => "too many refused messages",
        CloseCode::GoingAway => "host shutting down",
        CloseCode::Revoked => "agent revoked",
        _ => "session closed",
    }
}
