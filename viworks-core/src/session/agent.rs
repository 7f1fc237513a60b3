//! The agent side of one connection: HELLO, then commands in and results and telemetry out.

use std::collections::VecDeque;
use std::time::Duration;

use super::channel::{Channel, Received};
use super::host::SessionEnd;
use super::{SessionError, Timers, Violation};
use crate::auth::{self, AgentKey, AuthError, ChannelBinding, DirectionKeys, MacKey};
use crate::wire::{
    Ack, AgentId, Capability, CloseCode, Command, CommandId, CommandResult, Envelope, Hello, Limits, Message, Nonce,
    RejectCode, Telemetry, Text,
};
use crate::{Entropy, Timestamp};

/// Who the agent is and what it announces in its HELLO.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The agent's identity, as in its client certificate.
    pub agent_id: AgentId,
    /// The key it received at enrollment.
    pub agent_key: AgentKey,
    /// Its site.
    pub site: Text<255>,
    /// The machine's host name.
    pub hostname: Text<255>,
    /// The agent software's version.
    pub version: Text<255>,
    /// What it can run.
    pub capabilities: Vec<Capability>,
    /// How many commands it runs at once (at least 1).
    pub max_concurrency: u32,
    /// Message size limits.
    pub limits: Limits,
    /// Messages queued for sending before more are refused.
    pub max_transmit: usize,
    /// Refused messages tolerated before the session closes.
    pub max_violations: u32,
    /// How long to wait for the WELCOME.
    pub handshake_timeout: Duration,
}

impl AgentConfig {
    /// A configuration with the protocol defaults for everything but identity and key.
    pub fn new(agent_id: AgentId, agent_key: AgentKey) -> Self {
        AgentConfig {
            agent_id,
            agent_key,
            site: Text::default(),
            hostname: Text::default(),
            version: Text::lossy(env!("CARGO_PKG_VERSION")),
            capabilities: Vec::new(),
            max_concurrency: 4,
            limits: Limits::default(),
            max_transmit: 1024,
            max_violations: 3,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What happened in an [`AgentSession`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// The host accepted the HELLO; the session is up with these timers.
    Established {
        /// Heartbeat and liveness timers the host announced.
        timers: Timers,
    },
    /// The host refused the HELLO. The session is closed; back off before reconnecting.
    Rejected {
        /// Why.
        code: RejectCode,
        /// The host's explanation.
        message: String,
        /// How long the host asks the agent to wait.
        retry_after: Option<Duration>,
        /// Whether the REJECT was sealed with this agent's key and answers this HELLO. An
        /// unauthenticated REJECT may come from anyone on the path.
        authenticated: bool,
    },
    /// A command to run (through the [`ExecutionGuard`](super::ExecutionGuard)).
    Command(Command),
    /// The host stored these results; they may leave the outbox.
    ResultsAcked(Vec<CommandId>),
    /// The host stored this telemetry batch.
    TelemetryAcked(u64),
    /// A message was refused.
    Violation(Violation),
    /// The session ended.
    Closed(SessionEnd),
}

#[derive(Debug)]
enum State {
    AwaitingWelcome { nonce: Nonce, handshake: DirectionKeys, deadline: Timestamp, hello: Option<Vec<u8>> },
    Established(Box<Channel>),
    Closed,
}

/// The agent's side of one connection. It queues its HELLO at creation; after the WELCOME
/// it carries commands in and acknowledgements, results and telemetry out.
#[derive(Debug)]
pub struct AgentSession {
    agent_key: AgentKey,
    limits: Limits,
    max_transmit: usize,
    max_violations: u32,
    state: State,
    events: VecDeque<AgentEvent>,
    /// What was still queued when this side closed, CLOSE last.
    after_close: VecDeque<Vec<u8>>,
}

impl AgentSession {
    /// A new session on the connection identified by `binding`, whose first transmit is the
    /// HELLO. Fails only if the HELLO cannot be sealed within the HELLO size limit.
    pub fn new(
        config: &AgentConfig,
        now: Timestamp,
        entropy: &mut Entropy,
        binding: &ChannelBinding,
    ) -> Result<Self, SessionError> {
        let nonce = Nonce(entropy.bytes32());
        let handshake = DirectionKeys::handshake(&config.agent_key, binding);
        let hello = Envelope {
            seq: 0,
            ts: now,
            message: Message::Hello(Hello {
                agent_id: config.agent_id.clone(),
                site: config.site.clone(),
                hostname: config.hostname.clone(),
                version: config.version.clone(),
                capabilities: config.capabilities.clone(),
                max_concurrency: config.max_concurrency.max(1),
                nonce,
            }),
        };
        let sealed = auth::seal(&handshake.agent_to_host, &hello).map_err(SessionError::Unencodable)?;
        if sealed.len() > crate::wire::MAX_HELLO_LEN {
            return Err(SessionError::TooLarge { len: sealed.len(), max: crate::wire::MAX_HELLO_LEN });
        }
        Ok(AgentSession {
            agent_key: config.agent_key.clone(),
            limits: config.limits,
            max_transmit: config.max_transmit.max(4),
            max_violations: config.max_violations,
            state: State::AwaitingWelcome {
                nonce,
                handshake,
                deadline: now.saturating_add(config.handshake_timeout),
                hello: Some(sealed),
            },
            events: VecDeque::new(),
            after_close: VecDeque::new(),
        })
    }

    /// Whether the WELCOME has arrived and the session is up.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Messages that can be queued for sending now.
    pub fn room(&self) -> usize {
        match &self.state {
            State::Established(channel) => channel.room(),
            _ => 0,
        }
    }

    /// Handles one message from the host.
    pub fn handle_message(&mut self, now: Timestamp, bytes: &[u8]) {
        match &mut self.state {
            State::Closed => {}
            State::AwaitingWelcome { .. } => self.handle_handshake(now, bytes),
            State::Established(channel) => match channel.receive(now, bytes) {
                Received::Message(message) => self.handle_established(now, message),
                Received::Refused { violation, close } => {
                    self.events.push_back(AgentEvent::Violation(violation));
                    if let Some(code) = close {
                        let reason = if code == CloseCode::TooManyViolations {
                            "too many refused messages"
                        } else {
                            "protocol violation"
                        };
                        self.close(now, code, reason);
                    }
                }
            },
        }
    }

    fn handle_handshake(&mut self, now: Timestamp, bytes: &[u8]) {
        let State::AwaitingWelcome { nonce, handshake, .. } = &self.state else {
            return;
        };
        let nonce = *nonce;
        let opened = auth::open(&handshake.host_to_agent, bytes, self.limits);
        let (envelope, authenticated) = match opened {
            Ok(envelope) => (envelope, true),
            Err(AuthError::BadMac) => match auth::open(&MacKey::anonymous_reject(), bytes, self.limits) {
                Ok(envelope) if matches!(envelope.message, Message::Reject(_)) => (envelope, false),
                _ => return self.fail_handshake(Violation::BadMac),
            },
            Err(error) => return self.fail_handshake(Violation::from_auth(&error)),
        };
        // The tag was verified above (or the REJECT is marked unauthenticated).
        if envelope.seq != 0 {
            return self.fail_handshake(Violation::OutOfSequence { expected: 0, got: envelope.seq });
        }
        match envelope.message {
            Message::Welcome(welcome) if authenticated => {
                if welcome.agent_nonce != nonce {
                    return self.fail_handshake(Violation::Invalid("welcome answers another hello"));
                }
                let timers = Timers {
                    heartbeat_interval: Duration::from_millis(welcome.heartbeat_interval_ms),
                    liveness_timeout: Duration::from_millis(welcome.liveness_timeout_ms),
                }
                .sanitized();
                let keys = DirectionKeys::session(&self.agent_key, &nonce, &welcome.host_nonce);
                let channel = Channel::established(
                    keys.agent_to_host,
                    keys.host_to_agent,
                    self.limits,
                    self.max_transmit,
                    timers,
                    self.max_violations,
                    now,
                );
                self.state = State::Established(Box::new(channel));
                self.events.push_back(AgentEvent::Established { timers });
            }
            Message::Reject(reject) => {
                let bound = reject.agent_nonce.is_some_and(|echo| echo == nonce);
                self.events.push_back(AgentEvent::Rejected {
                    code: reject.code,
                    message: reject.message.as_str().to_owned(),
                    retry_after: reject.retry_after_ms.map(Duration::from_millis),
                    authenticated: authenticated && bound,
                });
                self.state = State::Closed;
            }
            other => self.fail_handshake(Violation::UnexpectedKind(other.kind())),
        }
    }

    fn fail_handshake(&mut self, violation: Violation) {
        self.events.push_back(AgentEvent::Violation(violation));
        self.events.push_back(AgentEvent::Closed(SessionEnd { code: CloseCode::ProtocolViolation, by_peer: false }));
        self.state = State::Closed;
    }

    fn handle_established(&mut self, now: Timestamp, message: Message) {
        match message {
            Message::Command(command) => self.events.push_back(AgentEvent::Command(command)),
            Message::ResultAck(ack) => self.events.push_back(AgentEvent::ResultsAcked(ack.command_ids)),
            Message::TelemetryAck(ack) => self.events.push_back(AgentEvent::TelemetryAcked(ack.batch_id)),
            Message::Heartbeat(_) => {}
            Message::Close(close) => {
                self.state = State::Closed;
                self.events.push_back(AgentEvent::Closed(SessionEnd { code: close.code, by_peer: true }));
            }
            other => {
                self.events.push_back(AgentEvent::Violation(Violation::UnexpectedKind(other.kind())));
                self.close(now, CloseCode::ProtocolViolation, "protocol violation");
            }
        }
    }

    /// Sends heartbeats when due; ends the session when the host has been silent past the
    /// liveness timeout or the WELCOME did not come in time.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let silent = match &mut self.state {
            State::AwaitingWelcome { deadline, .. } => now > *deadline,
            State::Established(channel) => channel.on_timeout(now),
            State::Closed => false,
        };
        if silent {
            self.close(now, CloseCode::LivenessTimeout, "nothing heard within the liveness timeout");
        }
    }

    /// The next sealed message to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        match &mut self.state {
            State::AwaitingWelcome { hello, .. } => hello.take(),
            State::Established(channel) => channel.poll_transmit(),
            State::Closed => self.after_close.pop_front(),
        }
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// When to call [`AgentSession::handle_timeout`] next; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match &self.state {
            State::AwaitingWelcome { deadline, .. } => Some(deadline.saturating_add(Duration::from_millis(1))),
            State::Established(channel) => Some(channel.next_timeout()),
            State::Closed => None,
        }
    }

    fn channel(&mut self) -> Result<&mut Channel, SessionError> {
        match &mut self.state {
            State::Established(channel) => Ok(channel),
            State::AwaitingWelcome { .. } => Err(SessionError::NotEstablished),
            State::Closed => Err(SessionError::Closed),
        }
    }

    /// Acknowledges a command: it is recorded durably and will be answered.
    pub fn send_ack(&mut self, now: Timestamp, command_id: CommandId) -> Result<(), SessionError> {
        self.channel()?.send(now, Message::Ack(Ack { command_id }))
    }

    /// Sends a command's result; it stays in the outbox until the host acknowledges it.
    pub fn send_result(&mut self, now: Timestamp, result: CommandResult) -> Result<(), SessionError> {
        self.channel()?.send(now, Message::Result(result))
    }

    /// Sends a telemetry batch; keep it until [`AgentEvent::TelemetryAcked`].
    pub fn send_telemetry(&mut self, now: Timestamp, telemetry: Telemetry) -> Result<(), SessionError> {
        self.channel()?.send(now, Message::Telemetry(telemetry))
    }

    /// The transport ended without a CLOSE. Ends the session as if the host had gone away;
    /// nothing is sent.
    pub fn connection_lost(&mut self) {
        if !self.is_closed() {
            self.state = State::Closed;
            self.after_close.clear();
            self.events.push_back(AgentEvent::Closed(SessionEnd { code: CloseCode::GoingAway, by_peer: true }));
        }
    }

    /// Ends the session with `code`, sending CLOSE when established.
    pub fn close(&mut self, now: Timestamp, code: CloseCode, reason: &str) {
        let previous = std::mem::replace(&mut self.state, State::Closed);
        match previous {
            State::Closed => return,
            State::Established(mut channel) => {
                // Anything still queued goes first, then the CLOSE.
                channel.send_close(now, code, reason);
                while let Some(bytes) = channel.poll_transmit() {
                    self.after_close.push_back(bytes);
                }
            }
            State::AwaitingWelcome { .. } => {}
        }
        self.events.push_back(AgentEvent::Closed(SessionEnd { code, by_peer: false }));
    }
}
