//! What the fuzz targets share: a reader that turns the fuzzer's bytes into a script of
//! operations, and the keys and sealing that let a script's messages get past the MAC.
//!
//! A script is a flat byte string: one byte chooses an operation, and an operation that
//! carries bytes takes them as a two-byte little-endian length and that many bytes (fewer at
//! the end of the input). The seeds under `fuzz/seeds/` are written in this form by
//! `cargo run --example write_seeds`.

use std::time::Duration;

use serde_json::Value;
use viworks_core::auth::{self, AgentKey, ChannelBinding, DirectionKeys, MacKey, MasterKey, SkewWindow};
use viworks_core::session::{AgentConfig, HostConfig, Timers};
use viworks_core::wire::{self, AgentId, Envelope, Limits, Nonce, PROTOCOL_VERSION};
use viworks_core::{Entropy, Timestamp};

/// The host's master key in every session target.
pub const MASTER: [u8; 32] = [9; 32];

/// The agent every established session in the targets belongs to.
pub const AGENT: &str = "gw-fuzz-01";

/// The instant every session target starts at.
pub const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);

/// Messages a session queues before it refuses more: small, so that a script can fill it.
pub const MAX_TRANSMIT: usize = 8;

/// The largest message either side accepts in the targets: small, so that a script can reach
/// the limit.
pub const LIMITS: Limits = Limits { max_message_len: 4096 };

/// Reads a script from the fuzzer's bytes.
#[derive(Clone, Debug)]
pub struct Script<'a> {
    rest: &'a [u8],
}

impl<'a> Script<'a> {
    /// A script over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Script { rest: data }
    }

    /// The next byte, or `None` at the end of the input.
    pub fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(first)
    }

    /// The next two bytes, little-endian; missing bytes read as zero.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte().unwrap_or(0), self.byte().unwrap_or(0)])
    }

    /// The next eight bytes, little-endian; missing bytes read as zero.
    pub fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        for b in &mut bytes {
            *b = self.byte().unwrap_or(0);
        }
        u64::from_le_bytes(bytes)
    }

    /// Everything not read yet, consumed.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// A length-prefixed chunk: two bytes of length, then up to that many bytes.
    pub fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16()).min(self.rest.len());
        let (chunk, rest) = self.rest.split_at(len);
        self.rest = rest;
        chunk
    }
}

/// Appends one length-prefixed chunk to a script being written (the seeds).
pub fn push_chunk(script: &mut Vec<u8>, chunk: &[u8]) {
    let len = u16::try_from(chunk.len()).expect("a seed chunk fits in 64 KiB");
    script.extend_from_slice(&len.to_le_bytes());
    script.extend_from_slice(chunk);
}

/// The agent id every established session belongs to.
pub fn agent_id() -> AgentId {
    AgentId::new(AGENT).expect("a valid agent id")
}

/// The host's key source.
pub fn master() -> MasterKey {
    MasterKey::from_bytes(MASTER)
}

/// The agent key of `agent_id` under [`MASTER`].
pub fn agent_key(agent_id: &AgentId) -> AgentKey {
    AgentKey::derive(&master(), agent_id)
}

/// Short timers, so that a few timeouts in a script reach heartbeats and liveness.
pub const TIMERS: Timers =
    Timers { heartbeat_interval: Duration::from_secs(1), liveness_timeout: Duration::from_secs(3) };

/// The host configuration of the session targets.
pub fn host_config() -> HostConfig {
    HostConfig {
        timers: TIMERS,
        skew_window: SkewWindow::new(Duration::from_secs(10)),
        max_sessions: 4,
        max_concurrency: 4,
        limits: LIMITS,
        max_transmit: MAX_TRANSMIT,
        nonce_capacity: 64,
        ..HostConfig::default()
    }
}

/// The configuration of [`AGENT`].
pub fn agent_config() -> AgentConfig {
    let agent_id = agent_id();
    let key = agent_key(&agent_id);
    AgentConfig { max_concurrency: 2, limits: LIMITS, max_transmit: MAX_TRANSMIT, ..AgentConfig::new(agent_id, key) }
}

/// A fresh entropy source for `seed`.
pub fn entropy(seed: u8) -> Entropy {
    Entropy::from_u64(u64::from(seed))
}

/// Appends the tag of `covered` under `key`: the fuzzer's bytes become a message the receiver
/// verifies, so what follows the MAC check is fuzzed too.
pub fn seal_bytes(key: &MacKey, covered: &[u8]) -> Vec<u8> {
    let mut sealed = covered.to_vec();
    sealed.extend_from_slice(blake3::keyed_hash(key.as_bytes(), covered).as_bytes());
    sealed
}

/// The version byte followed by `json`: the bytes a tag covers.
pub fn covered(json: &[u8]) -> Vec<u8> {
    let mut covered = Vec::with_capacity(json.len() + 1);
    covered.push(PROTOCOL_VERSION);
    covered.extend_from_slice(json);
    covered
}

/// Rewrites an envelope's JSON so that it can pass the receiver's checks that no fuzzer could
/// guess: `seq` and `ts` set, and each named body field set to a nonce. Bytes that are not a
/// JSON object are returned unchanged.
pub fn fix_up(json: &[u8], seq: u64, ts: Timestamp, nonces: &[(&str, &Nonce)]) -> Vec<u8> {
    let Ok(Value::Object(mut envelope)) = serde_json::from_slice::<Value>(json) else {
        return json.to_vec();
    };
    envelope.insert("seq".into(), seq.into());
    envelope.insert("ts".into(), ts.as_millis().into());
    if let Some(Value::Object(body)) = envelope.get_mut("body") {
        for (field, nonce) in nonces {
            body.insert((*field).into(), hex(&nonce.0).into());
        }
    }
    serde_json::to_vec(&Value::Object(envelope)).unwrap_or_else(|_| json.to_vec())
}

/// Lowercase hexadecimal, the wire form of nonces and keys.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session keys of [`AGENT`]'s connection, learnt from the HELLO and the WELCOME the two
/// sides exchanged. `None` when either is not what a completed handshake sends.
pub fn session_keys(agent_id: &AgentId, hello: &[u8], welcome: &[u8]) -> Option<DirectionKeys> {
    let key = agent_key(agent_id);
    let handshake = DirectionKeys::handshake(&key, &ChannelBinding::NONE);
    let hello = auth::open(&handshake.agent_to_host, hello, Limits::default()).ok()?;
    let welcome = auth::open(&handshake.host_to_agent, welcome, Limits::default()).ok()?;
    match (hello.message, welcome.message) {
        (wire::Message::Hello(hello), wire::Message::Welcome(welcome)) => {
            Some(DirectionKeys::session(&key, &hello.nonce, &welcome.host_nonce))
        }
        _ => None,
    }
}

/// Checks what one side sent on an established session: each message opens under `key`,
/// carries the next sequence number, fits the size limit, and nothing follows a CLOSE.
#[derive(Debug)]
pub struct TransmitCheck {
    key: MacKey,
    next_seq: u64,
    closed: bool,
}

impl TransmitCheck {
    /// A check for messages sealed with `key`, the first numbered 1.
    pub fn new(key: MacKey) -> Self {
        TransmitCheck { key, next_seq: 1, closed: false }
    }

    /// Checks one transmitted message and returns it opened.
    pub fn check(&mut self, sealed: &[u8]) -> Envelope {
        assert!(!self.closed, "a message was sent after the CLOSE");
        assert!(sealed.len() <= LIMITS.max_message_len, "a sent message exceeds the limit the peer enforces");
        let envelope = auth::open(&self.key, sealed, LIMITS).expect("every sent message opens under the session key");
        assert_eq!(envelope.seq, self.next_seq, "sent sequence numbers are consecutive");
        self.next_seq += 1;
        self.closed = matches!(envelope.message, wire::Message::Close(_));
        envelope
    }

    /// Whether a CLOSE was sent.
    pub fn sent_close(&self) -> bool {
        self.closed
    }
}

/// The sequence number the receiving side expects next, tracked from what the script sent it:
/// a message advances it only when its tag verifies, it decodes, and it carries that number.
#[derive(Debug)]
pub struct ReceiveSeq {
    key: MacKey,
    next: u64,
}

impl ReceiveSeq {
    /// The receiver expects 1 first, under `key`.
    pub fn new(key: MacKey) -> Self {
        ReceiveSeq { key, next: 1 }
    }

    /// The number the receiver expects next.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The key the receiver verifies with.
    pub fn key(&self) -> &MacKey {
        &self.key
    }

    /// Records that `sealed` was handed to an open receiver.
    pub fn delivered(&mut self, sealed: &[u8]) {
        if let Ok(envelope) = auth::open(&self.key, sealed, LIMITS)
            && envelope.seq == self.next
        {
            self.next += 1;
        }
    }
}
