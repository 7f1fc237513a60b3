//! Shared generators and fixtures for the core's integration tests.

#![allow(dead_code)]

use proptest::prelude::*;
use viworks_core::Timestamp;
use viworks_core::wire::{
    Ack, AgentId, Capability, Close, CloseCode, Command, CommandId, CommandResult, Envelope, Heartbeat, Hello, Message,
    MetricKey, Nonce, Reject, RejectCode, ResultAck, ResultError, ResultStatus, Sample, Telemetry, TelemetryAck, Text,
    Verb, Welcome,
};

fn text<const N: usize>() -> impl Strategy<Value = Text<N>> {
    "[a-zA-Z0-9 é.,:/_-]{0,40}".prop_map(|s| Text::new(s).expect("valid text"))
}

pub fn agent_id() -> impl Strategy<Value = AgentId> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,30}".prop_map(|s| AgentId::new(s).expect("valid id"))
}

pub fn command_id() -> impl Strategy<Value = CommandId> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,39}".prop_map(|s| CommandId::new(s).expect("valid id"))
}

fn verb() -> impl Strategy<Value = Verb> {
    "[a-z0-9][a-z0-9_.]{0,29}".prop_map(|s| Verb::new(s).expect("valid verb"))
}

fn nonce() -> impl Strategy<Value = Nonce> {
    any::<[u8; 32]>().prop_map(Nonce)
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z \"\\\\]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::UnsupportedVersion),
        Just(RejectCode::Malformed),
        Just(RejectCode::UnknownAgent),
        Just(RejectCode::IdentityMismatch),
        Just(RejectCode::BadMac),
        Just(RejectCode::Replay),
        Just(RejectCode::Stale),
        Just(RejectCode::DuplicateAgent),
        Just(RejectCode::Overloaded),
    ]
}

fn result_status() -> impl Strategy<Value = ResultStatus> {
    prop_oneof![
        Just(ResultStatus::Succeeded),
        Just(ResultStatus::Failed),
        Just(ResultStatus::TimedOut),
        Just(ResultStatus::Interrupted),
        Just(ResultStatus::Rejected),
    ]
}

fn close_code() -> impl Strategy<Value = CloseCode> {
    prop_oneof![
        Just(CloseCode::Normal),
        Just(CloseCode::GoingAway),
        Just(CloseCode::LivenessTimeout),
        Just(CloseCode::ProtocolViolation),
        Just(CloseCode::TooManyViolations),
        Just(CloseCode::Revoked),
    ]
}

fn sample() -> impl Strategy<Value = Sample> {
    (any::<u64>(), "[a-z][a-z._:/]{0,19}", -1e12f64..1e12).prop_map(|(ts, key, value)| Sample {
        ts: Timestamp::from_millis(ts),
        key: MetricKey::new(key).expect("valid key"),
        value,
    })
}

/// Any message of any kind.
pub fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (agent_id(), text(), text(), text(), proptest::collection::vec("[a-z]{1,8}", 0..4), any::<u32>(), nonce())
            .prop_map(|(agent_id, site, hostname, version, caps, max_concurrency, nonce)| {
                Message::Hello(Hello {
                    agent_id,
                    site,
                    hostname,
                    version,
                    capabilities: caps.into_iter().map(|c| Capability::new(c).expect("valid")).collect(),
                    max_concurrency,
                    nonce,
                })
            }),
        (nonce(), nonce(), any::<u64>(), any::<u64>()).prop_map(|(agent_nonce, host_nonce, hb, live)| {
            Message::Welcome(Welcome { agent_nonce, host_nonce, heartbeat_interval_ms: hb, liveness_timeout_ms: live })
        }),
        (reject_code(), text(), proptest::option::of(any::<u64>()), proptest::option::of(nonce())).prop_map(
            |(code, message, retry_after_ms, agent_nonce)| Message::Reject(Reject {
                code,
                message,
                retry_after_ms,
                agent_nonce,
            })
        ),
        (command_id(), verb(), json(), any::<u64>(), any::<u32>()).prop_map(
            |(command_id, verb, args, timeout_ms, attempt)| {
                Message::Command(Command { command_id, verb, args, timeout_ms, attempt })
            }
        ),
        command_id().prop_map(|command_id| Message::Ack(Ack { command_id })),
        (
            command_id(),
            result_status(),
            proptest::option::of(any::<i32>()),
            json(),
            proptest::option::of((text(), text())),
            any::<u64>()
        )
            .prop_map(|(command_id, status, exit_code, output, error, duration_ms)| {
                Message::Result(CommandResult {
                    command_id,
                    status,
                    exit_code,
                    output,
                    error: error.map(|(code, message)| ResultError { code, message }),
                    duration_ms,
                })
            }),
        proptest::collection::vec(command_id(), 0..5)
            .prop_map(|command_ids| Message::ResultAck(ResultAck { command_ids })),
        (any::<u64>(), proptest::collection::vec(sample(), 0..6), any::<u64>())
            .prop_map(|(batch_id, samples, dropped)| Message::Telemetry(Telemetry { batch_id, samples, dropped })),
        any::<u64>().prop_map(|batch_id| Message::TelemetryAck(TelemetryAck { batch_id })),
        Just(Message::Heartbeat(Heartbeat {})),
        (close_code(), text()).prop_map(|(code, message)| Message::Close(Close { code, message })),
    ]
}

/// Any message in an envelope.
pub fn arb_envelope() -> impl Strategy<Value = Envelope> {
    (any::<u64>(), any::<u64>(), arb_message()).prop_map(|(seq, ts, message)| Envelope {
        seq,
        ts: Timestamp::from_millis(ts),
        message,
    })
}
