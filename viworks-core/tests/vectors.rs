//! The shared test vectors in `tests/vectors/v1.json`: keys, inputs and the exact sealed bytes
//! of every message kind, plus messages that must be refused. Other implementations (the C
//! API, agents in other languages) check themselves against the same file.
//!
//! The file is generated from the fixed inputs below. After a deliberate protocol change,
//! regenerate it with `VIWORKS_WRITE_VECTORS=1 cargo test -p viworks-core --test vectors`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use viworks_core::Timestamp;
use viworks_core::auth::{self, AgentKey, ChannelBinding, DirectionKeys, MacKey, MasterKey};
use viworks_core::wire::{self, *};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct VectorFile {
    description: String,
    protocol_version: u8,
    master_key: String,
    agent_keys: Vec<AgentKeyVector>,
    session: SessionVector,
    messages: Vec<MessageVector>,
    rejections: Vec<RejectionVector>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct AgentKeyVector {
    agent_id: String,
    agent_key: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct SessionVector {
    agent_id: String,
    /// The connection's channel binding mixed into the handshake keys (RFC 9266 exporter;
    /// all zero for a transport without one, as here).
    channel_binding: String,
    agent_nonce: String,
    host_nonce: String,
    /// Named keys: `handshake.agent_to_host`, `handshake.host_to_agent`,
    /// `session.agent_to_host`, `session.host_to_agent`.
    keys: BTreeMap<String, String>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct MessageVector {
    name: String,
    key: String,
    envelope: serde_json::Value,
    covered_hex: String,
    tag_hex: String,
    sealed_hex: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct RejectionVector {
    name: String,
    key: String,
    sealed_hex: String,
    error: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/v1.json")
}

fn id<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("valid identifier")
}

fn text<const N: usize>(s: &str) -> Text<N> {
    Text::new(s).expect("valid text")
}

const TS: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn envelope(seq: u64, offset_ms: u64, message: Message) -> Envelope {
    Envelope { seq, ts: Timestamp::from_millis(TS + offset_ms), message }
}

/// One message of every kind, each with the name of the key that seals it.
fn conversation(agent_nonce: Nonce, host_nonce: Nonce) -> Vec<(&'static str, &'static str, Envelope)> {
    let command_id: CommandId = id("cmd-0001");
    vec![
        (
            "hello",
            "handshake.agent_to_host",
            envelope(
                0,
                0,
                Message::Hello(Hello {
                    agent_id: id("gw-fra-01"),
                    site: text("fra"),
                    hostname: text("gw-fra-01.example"),
                    version: text("0.1.0"),
                    capabilities: vec![id("docker"), id("scripts")],
                    max_concurrency: 4,
                    nonce: agent_nonce,
                }),
            ),
        ),
        (
            "welcome",
            "handshake.host_to_agent",
            envelope(
                0,
                3,
                Message::Welcome(Welcome {
                    agent_nonce,
                    host_nonce,
                    heartbeat_interval_ms: 15_000,
                    liveness_timeout_ms: 45_000,
                }),
            ),
        ),
        (
            "reject",
            "handshake.host_to_agent",
            envelope(
                0,
                3,
                Message::Reject(Reject {
                    code: RejectCode::DuplicateAgent,
                    message: text("agent gw-fra-01 already has a live session"),
                    retry_after_ms: Some(30_000),
                    agent_nonce: Some(agent_nonce),
                }),
            ),
        ),
        (
            "command",
            "session.host_to_agent",
            envelope(
                1,
                10,
                Message::Command(Command {
                    command_id: command_id.clone(),
                    verb: id("get_system_health"),
                    args: serde_json::json!({}),
                    timeout_ms: 30_000,
                    attempt: 1,
                }),
            ),
        ),
        ("ack", "session.agent_to_host", envelope(1, 12, Message::Ack(Ack { command_id: command_id.clone() }))),
        (
            "result",
            "session.agent_to_host",
            envelope(
                2,
                240,
                Message::Result(CommandResult {
                    command_id: command_id.clone(),
                    status: ResultStatus::Succeeded,
                    exit_code: None,
                    output: serde_json::json!({"cpu_usage_pct": 12.5, "load": [0.42, 0.31, 0.2], "uptime_s": 86400}),
                    error: None,
                    duration_ms: 228,
                }),
            ),
        ),
        (
            "result_ack",
            "session.host_to_agent",
            envelope(2, 245, Message::ResultAck(ResultAck { command_ids: vec![command_id] })),
        ),
        (
            "telemetry",
            "session.agent_to_host",
            envelope(
                3,
                30_000,
                Message::Telemetry(Telemetry {
                    batch_id: 1,
                    samples: vec![
                        Sample { ts: Timestamp::from_millis(TS + 30_000), key: id("cpu.usage_pct"), value: 12.5 },
                        Sample {
                            ts: Timestamp::from_millis(TS + 30_000),
                            key: id("mem.used_bytes"),
                            value: 1_073_741_824.0,
                        },
                    ],
                    dropped: 0,
                }),
            ),
        ),
        (
            "telemetry_ack",
            "session.host_to_agent",
            envelope(3, 30_004, Message::TelemetryAck(TelemetryAck { batch_id: 1 })),
        ),
        ("heartbeat", "session.agent_to_host", envelope(4, 45_000, Message::Heartbeat(Heartbeat {}))),
        (
            "close",
            "session.host_to_agent",
            envelope(4, 60_000, Message::Close(Close { code: CloseCode::GoingAway, message: text("host restarting") })),
        ),
    ]
}

fn keys_by_name(session: &SessionVector) -> BTreeMap<String, MacKey> {
    session.keys.iter().map(|(name, key)| (name.clone(), MacKey::from_hex(key).expect("key"))).collect()
}

fn generate() -> VectorFile {
    let master = MasterKey::from_bytes(std::array::from_fn(|i| i as u8));
    let agent_keys = ["gw-fra-01", "a", &"x".repeat(AgentId::MAX_LEN)]
        .into_iter()
        .map(|agent| AgentKeyVector {
            agent_id: agent.to_owned(),
            agent_key: AgentKey::derive(&master, &id(agent)).to_hex(),
        })
        .collect();
    let agent_key = AgentKey::derive(&master, &id("gw-fra-01"));
    let agent_nonce = Nonce(std::array::from_fn(|i| 0xa0 ^ i as u8));
    let host_nonce = Nonce(std::array::from_fn(|i| 0x50 ^ i as u8));
    let binding = ChannelBinding::NONE;
    let handshake = DirectionKeys::handshake(&agent_key, &binding);
    let session_keys = DirectionKeys::session(&agent_key, &agent_nonce, &host_nonce);
    let session = SessionVector {
        agent_id: "gw-fra-01".into(),
        channel_binding: hex(&binding.0),
        agent_nonce: agent_nonce.to_hex(),
        host_nonce: host_nonce.to_hex(),
        keys: BTreeMap::from([
            ("handshake.agent_to_host".into(), handshake.agent_to_host.to_hex()),
            ("handshake.host_to_agent".into(), handshake.host_to_agent.to_hex()),
            ("session.agent_to_host".into(), session_keys.agent_to_host.to_hex()),
            ("session.host_to_agent".into(), session_keys.host_to_agent.to_hex()),
        ]),
    };
    let keys = keys_by_name(&session);

    let messages: Vec<MessageVector> = conversation(agent_nonce, host_nonce)
        .into_iter()
        .map(|(name, key, envelope)| {
            let sealed = auth::seal(&keys[key], &envelope).expect("seals");
            let (covered, tag) = sealed.split_at(sealed.len() - wire::TAG_LEN);
            MessageVector {
                name: name.into(),
                key: key.into(),
                envelope: serde_json::from_slice(&covered[1..]).expect("json"),
                covered_hex: hex(covered),
                tag_hex: hex(tag),
                sealed_hex: hex(&sealed),
            }
        })
        .collect();

    let seal_raw = |key: &str, covered: &[u8]| {
        let mut out = covered.to_vec();
        out.extend_from_slice(blake3::keyed_hash(keys[key].as_bytes(), covered).as_bytes());
        out
    };
    let heartbeat = unhex(&messages.iter().find(|m| m.name == "heartbeat").expect("heartbeat").sealed_hex);
    let hb_key = "session.agent_to_host";
    let mut tag_flipped = heartbeat.clone();
    *tag_flipped.last_mut().expect("non-empty") ^= 0x01;
    let mut body_changed = heartbeat.clone();
    body_changed[10] ^= 0x20;
    let mut future_version = heartbeat.clone();
    future_version[0] = 2;
    let rejection = |name: &str, key: &str, sealed: Vec<u8>, error: &str| RejectionVector {
        name: name.into(),
        key: key.into(),
        sealed_hex: hex(&sealed),
        error: error.into(),
    };
    let rejections = vec![
        rejection("tag_bit_flipped", hb_key, tag_flipped, "bad_mac"),
        rejection("content_bit_flipped", hb_key, body_changed, "bad_mac"),
        rejection("opened_with_the_other_direction_key", "session.host_to_agent", heartbeat.clone(), "bad_mac"),
        rejection("opened_with_the_handshake_key", "handshake.agent_to_host", heartbeat.clone(), "bad_mac"),
        rejection("future_protocol_version", hb_key, future_version, "unsupported_version"),
        rejection("truncated", hb_key, heartbeat[..34].to_vec(), "too_short"),
        rejection(
            "unknown_kind",
            hb_key,
            seal_raw(hb_key, b"\x01{\"kind\":\"upgrade\",\"seq\":4,\"ts\":0,\"body\":{}}"),
            "unknown_kind",
        ),
        rejection("not_json", hb_key, seal_raw(hb_key, b"\x01{\"kind\":\"heartbeat\","), "malformed"),
        rejection(
            "unknown_envelope_field",
            hb_key,
            seal_raw(hb_key, b"\x01{\"kind\":\"heartbeat\",\"seq\":4,\"ts\":0,\"body\":{},\"v\":1}"),
            "malformed",
        ),
        rejection(
            "agent_id_with_a_space",
            "handshake.agent_to_host",
            seal_raw(
                "handshake.agent_to_host",
                format!(
                    "\x01{{\"kind\":\"hello\",\"seq\":0,\"ts\":{TS},\"body\":{{\"agent_id\":\"gw fra\",\"site\":\"\",\"hostname\":\"\",\"version\":\"\",\"capabilities\":[],\"max_concurrency\":1,\"nonce\":\"{}\"}}}}",
                    agent_nonce.to_hex()
                )
                .as_bytes(),
            ),
            "malformed",
        ),
    ];

    VectorFile {
        description: "ViWorkS protocol v1 test vectors. Keys and nonces are lowercase hex. \
            covered_hex is the version byte and envelope JSON the tag covers; tag_hex is \
            BLAKE3-keyed(key, covered); sealed_hex is covered followed by tag. Each message is \
            sealed under the named key of `session.keys`. Each rejection must be refused with \
            the named error when opened under its key. See docs/protocol.md."
            .into(),
        protocol_version: wire::PROTOCOL_VERSION,
        master_key: master.to_hex(),
        agent_keys,
        session,
        messages,
        rejections,
    }
}

#[test]
fn the_vector_file_matches_this_implementation() {
    let generated = generate();
    let rendered = serde_json::to_string_pretty(&generated).expect("renders") + "\n";
    if std::env::var_os("VIWORKS_WRITE_VECTORS").is_some() {
        std::fs::write(path(), &rendered).expect("writes the vector file");
    }
    let stored = std::fs::read_to_string(path()).expect("tests/vectors/v1.json exists");
    let parsed: VectorFile = serde_json::from_str(&stored).expect("parses");
    assert!(
        parsed == generated,
        "tests/vectors/v1.json differs from what this implementation produces; if the protocol \
         changed on purpose, regenerate it with VIWORKS_WRITE_VECTORS=1"
    );
}

#[test]
fn every_vector_message_opens_and_every_rejection_is_refused_as_named() {
    let stored = std::fs::read_to_string(path()).expect("tests/vectors/v1.json exists");
    let file: VectorFile = serde_json::from_str(&stored).expect("parses");
    let keys = keys_by_name(&file.session);
    let master = MasterKey::from_hex(&file.master_key).expect("master key");
    for agent in &file.agent_keys {
        assert_eq!(AgentKey::derive(&master, &id(&agent.agent_id)).to_hex(), agent.agent_key);
    }
    let mut kinds = std::collections::HashSet::new();
    for vector in &file.messages {
        let sealed = unhex(&vector.sealed_hex);
        assert_eq!(sealed, [unhex(&vector.covered_hex), unhex(&vector.tag_hex)].concat());
        let opened = auth::open(&keys[&vector.key], &sealed, Limits::default())
            .unwrap_or_else(|e| panic!("{} does not open: {e}", vector.name));
        assert_eq!(auth::seal(&keys[&vector.key], &opened).expect("seals"), sealed, "{}", vector.name);
        assert_eq!(opened.message.kind().as_str(), vector.name);
        kinds.insert(opened.message.kind());
    }
    assert_eq!(kinds.len(), Kind::ALL.len(), "every kind has a vector");
    for vector in &file.rejections {
        let refused = auth::open(&keys[&vector.key], &unhex(&vector.sealed_hex), Limits::default());
        match refused {
            Err(e) => assert_eq!(e.code(), vector.error, "{}", vector.name),
            Ok(_) => panic!("{} was accepted", vector.name),
        }
    }
}
