//! Shared fixtures for the ViWorkS benchmarks: identities and messages of a chosen shape and
//! size, and an established host and agent session pair driven in memory.
//!
//! The benchmarks themselves live in `benches/` (criterion); `docs/performance.md` explains
//! how to run them and records the figures they produced. The end-to-end load generator
//! (`viworks-loadgen`) is in [`loadgen`].

pub mod loadgen;

use std::time::Duration;

use serde_json::json;
use viworks_core::auth::{AgentKey, ChannelBinding, MasterKey, SkewWindow};
use viworks_core::session::{AgentConfig, AgentSession, Host, HostConfig, HostEvent, HostSession, Timers};
use viworks_core::wire::{
    self, Ack, AgentId, Capability, Close, CloseCode, Command, CommandId, CommandResult, Envelope, Heartbeat, Hello,
    Message, MetricKey, Nonce, Reject, RejectCode, ResultAck, ResultStatus, Sample, Telemetry, TelemetryAck, Text,
    Verb, Welcome,
};
use viworks_core::{Entropy, Timestamp};

/// The instant every fixture starts from: 2026-01-01T00:00:00Z, in milliseconds.
pub const EPOCH_MS: u64 = 1_767_225_600_000;

/// `ms` milliseconds after [`EPOCH_MS`].
pub fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(EPOCH_MS + ms)
}

/// The agent id `name`. Panics when `name` is not a valid agent id.
pub fn agent_id(name: &str) -> AgentId {
    AgentId::new(name).expect("a valid agent id")
}

/// The command id `name`. Panics when `name` is not a valid command id.
pub fn command_id(name: &str) -> CommandId {
    CommandId::new(name).expect("a valid command id")
}

/// The metric key `name`. Panics when `name` is not a valid metric key.
pub fn metric_key(name: &str) -> MetricKey {
    MetricKey::new(name).expect("a valid metric key")
}

/// A nonce that is distinct for every `n`.
pub fn nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    Nonce(bytes)
}

/// A successful `get_system_health` result for `cmd-{n}`, about the size a real one has.
pub fn result(n: u64) -> CommandResult {
    CommandResult {
        command_id: command_id(&format!("cmd-{n}")),
        status: ResultStatus::Succeeded,
        exit_code: Some(0),
        output: json!({
            "cpu_pct": 12.5,
            "load": [0.42, 0.38, 0.31],
            "mem_used_bytes": 3_221_225_472_u64,
            "mem_total_bytes": 8_589_934_592_u64,
            "disk_used_pct": 61.0,
            "uptime_secs": 86_400,
        }),
        error: None,
        duration_ms: 12,
    }
}

/// A telemetry batch of `samples` samples taken at `ts`, under distinct metric keys.
pub fn telemetry(batch_id: u64, samples: usize, ts: Timestamp) -> Telemetry {
    let samples = (0..samples)
        .map(|m| Sample { ts, key: metric_key(&format!("host.metric_{m}")), value: m as f64 * 1.5 })
        .collect();
    Telemetry { batch_id, samples, dropped: 0 }
}

/// One envelope of every message kind, named by kind, each with realistic content: a HELLO
/// with four capabilities, a COMMAND with arguments, a RESULT as [`result`] builds it, a
/// RESULT_ACK of 16 ids and a TELEMETRY batch of 20 samples.
pub fn one_of_each_kind() -> Vec<(&'static str, Envelope)> {
    let text = |s: &str| Text::new(s).expect("valid text");
    let capabilities = ["docker", "scripts", "get_system_health", "docker.ps"]
        .into_iter()
        .map(|c| Capability::new(c).expect("a valid capability"))
        .collect();
    let messages = vec![
        Message::Hello(Hello {
            agent_id: agent_id("gw-eu-west-0042"),
            site: text("eu-west"),
            hostname: text("edge-42.example.net"),
            version: text("0.1.0"),
            capabilities,
            max_concurrency: 4,
            nonce: nonce(1),
        }),
        Message::Welcome(Welcome {
            agent_nonce: nonce(1),
            host_nonce: nonce(2),
            heartbeat_interval_ms: 15_000,
            liveness_timeout_ms: 45_000,
        }),
        Message::Reject(Reject {
            code: RejectCode::Overloaded,
            message: Text::lossy("the host is at its session limit"),
            retry_after_ms: Some(45_000),
            agent_nonce: Some(nonce(1)),
        }),
        Message::Command(Command {
            command_id: command_id("01JH3Z8K6Q7W2N4M5P9R0S1T2U"),
            verb: Verb::new("docker.restart").expect("a valid verb"),
            args: json!({ "container": "web-frontend", "timeout_secs": 10 }),
            timeout_ms: 30_000,
            attempt: 1,
        }),
        Message::Ack(Ack { command_id: command_id("01JH3Z8K6Q7W2N4M5P9R0S1T2U") }),
        Message::Result(result(7)),
        Message::ResultAck(ResultAck { command_ids: (0..16).map(|n| command_id(&format!("cmd-{n}"))).collect() }),
        Message::Telemetry(telemetry(9, 20, at(0))),
        Message::TelemetryAck(TelemetryAck { batch_id: 9 }),
        Message::Heartbeat(Heartbeat {}),
        Message::Close(Close { code: CloseCode::GoingAway, message: Text::lossy("host shutting down") }),
    ];
    messages
        .into_iter()
        .enumerate()
        .map(|(seq, message)| {
            let kind = message.kind().as_str();
            (kind, Envelope { seq: seq as u64 + 1, ts: at(0), message })
        })
        .collect()
}

/// An envelope whose encoding (the version byte and the JSON, the bytes the tag covers) is
/// exactly `len` bytes, stamped with a current time: a HEARTBEAT whose sequence number has
/// the right count of digits for the smallest sizes, an ACK with a padded command id for
/// small ones, otherwise a RESULT padded in its output. Panics when `len` is below the
/// smallest HEARTBEAT (about 58 bytes).
pub fn envelope_of_len(len: usize) -> Envelope {
    let encoded_len = |envelope: &Envelope| wire::encode(envelope).expect("encodes").len();
    let heartbeat = |seq: u64| Envelope { seq, ts: at(0), message: Message::Heartbeat(Heartbeat {}) };
    let ack = |id: &str| Envelope { seq: 1, ts: at(0), message: Message::Ack(Ack { command_id: command_id(id) }) };
    let smallest = encoded_len(&heartbeat(1));
    assert!(len >= smallest, "no message encodes to fewer than {smallest} bytes");
    let smallest_ack = encoded_len(&ack("c"));
    let envelope = if len < smallest + 20 && len < smallest_ack {
        heartbeat(10u64.pow((len - smallest) as u32))
    } else if len - smallest_ack < CommandId::MAX_LEN {
        ack(&"c".repeat(1 + len - smallest_ack))
    } else {
        let padded = |pad: usize| {
            let mut result = result(1);
            result.output = json!("x".repeat(pad));
            Envelope { seq: 1, ts: at(0), message: Message::Result(result) }
        };
        padded(len - encoded_len(&padded(0)))
    };
    assert_eq!(encoded_len(&envelope), len, "the padding is not escaped, so the length is exact");
    envelope
}

/// What the agent side of a [`SessionPair`] sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// RESULT messages as [`result`] builds them.
    Results,
    /// HEARTBEAT messages.
    Heartbeats,
    /// TELEMETRY batches of this many samples.
    Telemetry(usize),
}

const MASTER: [u8; 32] = [7; 32];
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A host, one established [`HostSession`] and its agent, connected through memory.
///
/// The liveness timeout is set far out, so that the agent can produce heartbeats by moving
/// its own clock forward without either side ending the session.
#[derive(Debug)]
pub struct SessionPair {
    /// The host that admitted the session; kept so that the session stays registered.
    pub host: Host,
    /// The host side of the session.
    pub session: HostSession,
    /// The agent side.
    pub agent: AgentSession,
    agent_now: Timestamp,
    sent: u64,
}

impl SessionPair {
    /// A host with default settings (but the timers) and one agent, handshake done. Panics
    /// if the handshake fails, which would be a bug in the fixture.
    pub fn established() -> Self {
        let config = HostConfig {
            timers: Timers { heartbeat_interval: HEARTBEAT, liveness_timeout: Duration::from_secs(1 << 30) },
            skew_window: SkewWindow::DEFAULT,
            ..HostConfig::default()
        };
        let now = at(0);
        let mut host = Host::new(config, Box::new(MasterKey::from_bytes(MASTER)), Entropy::from_u64(1), now)
            .expect("a valid host configuration");
        let id = agent_id("gw-bench");
        let key = AgentKey::derive(&MasterKey::from_bytes(MASTER), &id);
        let agent_config = AgentConfig { max_concurrency: 64, ..AgentConfig::new(id, key) };
        let mut agent = AgentSession::new(&agent_config, now, &mut Entropy::from_u64(2), &ChannelBinding::NONE)
            .expect("the HELLO seals");
        let hello = agent.poll_transmit().expect("the HELLO is queued");
        let mut session =
            host.accept(now, &hello, Some(&agent_config.agent_id), &ChannelBinding::NONE).expect("the host admits");
        while let Some(welcome) = session.poll_transmit() {
            agent.handle_message(now, &welcome);
        }
        assert!(agent.is_established(), "the WELCOME established the agent");
        while agent.poll_event().is_some() {}
        SessionPair { host, session, agent, agent_now: now, sent: 0 }
    }

    /// The next `count` sealed messages of `feed` from the agent, in sequence, for the host
    /// session to handle. Panics if the agent refuses to send, a bug in the fixture.
    pub fn agent_messages(&mut self, feed: Feed, count: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            self.sent += 1;
            match feed {
                Feed::Results => self.agent.send_result(self.agent_now, result(self.sent)).expect("sends"),
                Feed::Telemetry(samples) => self
                    .agent
                    .send_telemetry(self.agent_now, telemetry(self.sent, samples, self.agent_now))
                    .expect("sends"),
                Feed::Heartbeats => {
                    self.agent_now = self.agent_now.saturating_add(HEARTBEAT);
                    self.agent.handle_timeout(self.agent_now);
                }
            }
            out.push(self.agent.poll_transmit().expect("the message is queued"));
        }
        out
    }

    /// Hands `messages` to the host session at `now` and drains its events, as a driver does;
    /// returns how many events came out. Panics if the session refuses a message: the
    /// benchmark is of the path honest traffic takes.
    pub fn host_handles(&mut self, now: Timestamp, messages: &[Vec<u8>]) -> usize {
        let mut events = 0;
        for bytes in messages {
            self.session.handle_message(now, bytes);
            while let Some(event) = self.session.poll_event() {
                if matches!(event, HostEvent::Violation(_) | HostEvent::Closed { .. }) {
                    panic!("the host session refused an honest message: {event:?}");
                }
                std::hint::black_box(&event);
                events += 1;
            }
        }
        events
    }
}
