//! The envelope's JSON, written by hand: byte for byte what serde_json's compact serializer
//! writes for the same values (the serde derives on the message types remain the reference,
//! and the tests below hold the two together).
//!
//! It is faster because member names are written as constants instead of being escaped byte
//! by byte, strings are scanned for characters to escape eight bytes at a time, and nonces
//! are written as hexadecimal in place. Numbers in free-form values and telemetry samples
//! are still formatted by serde_json, so floating-point output cannot drift.

use serde_json::Value;

use super::Envelope;
use super::ids::Nonce;
use super::message::{
    Ack, Close, CloseCode, Command, CommandResult, Heartbeat, Hello, Message, Reject, RejectCode, ResultAck, Telemetry,
    TelemetryAck, Welcome,
};

/// Free-form values nested deeper than this are handed to serde_json whole, so that this
/// writer's recursion stays shallow whatever a caller built in memory.
const MAX_DEPTH: usize = 32;

/// Appends the JSON of `envelope` to `out`. Fails only on a telemetry value that JSON cannot
/// carry (NaN or an infinity), with the error serde_json would give.
pub(super) fn write_envelope(out: &mut Vec<u8>, envelope: &Envelope) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"kind\":\"");
    out.extend_from_slice(envelope.message.kind().as_str().as_bytes());
    out.extend_from_slice(b"\",\"seq\":");
    write_u64(out, envelope.seq);
    out.extend_from_slice(b",\"ts\":");
    write_u64(out, envelope.ts.as_millis());
    out.extend_from_slice(b",\"body\":");
    match &envelope.message {
        Message::Hello(body) => hello(out, body),
        Message::Welcome(body) => welcome(out, body),
        Message::Reject(body) => reject(out, body),
        Message::Command(body) => command(out, body)?,
        Message::Ack(Ack { command_id }) => {
            out.extend_from_slice(b"{\"command_id\":");
            write_str(out, command_id.as_str());
            out.push(b'}');
        }
        Message::Result(body) => result(out, body)?,
        Message::ResultAck(ResultAck { command_ids }) => {
            out.extend_from_slice(b"{\"command_ids\":[");
            for (i, id) in command_ids.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, id.as_str());
            }
            out.extend_from_slice(b"]}");
        }
        Message::Telemetry(body) => telemetry(out, body)?,
        Message::TelemetryAck(TelemetryAck { batch_id }) => {
            out.extend_from_slice(b"{\"batch_id\":");
            write_u64(out, *batch_id);
            out.push(b'}');
        }
        Message::Heartbeat(Heartbeat {}) => out.extend_from_slice(b"{}"),
        Message::Close(Close { code, message }) => {
            out.extend_from_slice(b"{\"code\":");
            write_str(out, close_code(*code));
            out.extend_from_slice(b",\"message\":");
            write_str(out, message.as_str());
            out.push(b'}');
        }
    }
    out.push(b'}');
    Ok(())
}

/// A guess at the encoded length of `envelope`, so that one allocation usually holds the
/// whole sealed message: an upper bound for everything but escaped strings and free-form
/// values, which are guessed.
pub(super) fn size_hint(envelope: &Envelope) -> usize {
    let digits = |n: u64| n.checked_ilog10().map_or(1, |log| log as usize + 1);
    let body = match &envelope.message {
        Message::Hello(h) => {
            180 + h.agent_id.as_str().len()
                + h.site.as_str().len()
                + h.hostname.as_str().len()
                + h.version.as_str().len()
                + h.capabilities.iter().map(|c| c.as_str().len() + 3).sum::<usize>()
        }
        Message::Welcome(_) => 250,
        Message::Reject(r) => 180 + r.message.as_str().len(),
        Message::Command(c) => 100 + c.command_id.as_str().len() + c.verb.as_str().len() + value_hint(&c.args),
        Message::Ack(a) => 20 + a.command_id.as_str().len(),
        Message::Result(r) => {
            120 + r.command_id.as_str().len()
                + value_hint(&r.output)
                + r.error.as_ref().map_or(0, |e| 30 + e.code.as_str().len() + e.message.as_str().len())
        }
        Message::ResultAck(r) => 20 + r.command_ids.iter().map(|id| id.as_str().len() + 3).sum::<usize>(),
        Message::Telemetry(t) => 80 + t.samples.iter().map(|s| 70 + s.key.as_str().len()).sum::<usize>(),
        Message::TelemetryAck(_) => 40,
        Message::Heartbeat(_) => 2,
        Message::Close(c) => 50 + c.message.as_str().len(),
    };
    // `{"kind":"…","seq":…,"ts":…,"body":…}`
    32 + envelope.message.kind().as_str().len() + digits(envelope.seq) + digits(envelope.ts.as_millis()) + body
}

fn value_hint(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len() + 2,
        Value::Array(_) | Value::Object(_) => 128,
        _ => 24,
    }
}

fn hello(out: &mut Vec<u8>, h: &Hello) {
    out.extend_from_slice(b"{\"agent_id\":");
    write_str(out, h.agent_id.as_str());
    out.extend_from_slice(b",\"site\":");
    write_str(out, h.site.as_str());
    out.extend_from_slice(b",\"hostname\":");
    write_str(out, h.hostname.as_str());
    out.extend_from_slice(b",\"version\":");
    write_str(out, h.version.as_str());
    out.extend_from_slice(b",\"capabilities\":[");
    for (i, capability) in h.capabilities.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, capability.as_str());
    }
    out.extend_from_slice(b"],\"max_concurrency\":");
    write_u64(out, u64::from(h.max_concurrency));
    out.extend_from_slice(b",\"nonce\":");
    write_nonce(out, &h.nonce);
    out.push(b'}');
}

fn welcome(out: &mut Vec<u8>, w: &Welcome) {
    out.extend_from_slice(b"{\"agent_nonce\":");
    write_nonce(out, &w.agent_nonce);
    out.extend_from_slice(b",\"host_nonce\":");
    write_nonce(out, &w.host_nonce);
    out.extend_from_slice(b",\"heartbeat_interval_ms\":");
    write_u64(out, w.heartbeat_interval_ms);
    out.extend_from_slice(b",\"liveness_timeout_ms\":");
    write_u64(out, w.liveness_timeout_ms);
    out.push(b'}');
}

fn reject(out: &mut Vec<u8>, r: &Reject) {
    out.extend_from_slice(b"{\"code\":");
    write_str(out, reject_code(r.code));
    out.extend_from_slice(b",\"message\":");
    write_str(out, r.message.as_str());
    if let Some(retry_after_ms) = r.retry_after_ms {
        out.extend_from_slice(b",\"retry_after_ms\":");
        write_u64(out, retry_after_ms);
    }
    if let Some(agent_nonce) = &r.agent_nonce {
        out.extend_from_slice(b",\"agent_nonce\":");
        write_nonce(out, agent_nonce);
    }
    out.push(b'}');
}

fn command(out: &mut Vec<u8>, c: &Command) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"command_id\":");
    write_str(out, c.command_id.as_str());
    out.extend_from_slice(b",\"verb\":");
    write_str(out, c.verb.as_str());
    out.extend_from_slice(b",\"args\":");
    write_value(out, &c.args, 0)?;
    out.extend_from_slice(b",\"timeout_ms\":");
    write_u64(out, c.timeout_ms);
    out.extend_from_slice(b",\"attempt\":");
    write_u64(out, u64::from(c.attempt));
    out.push(b'}');
    Ok(())
}

fn result(out: &mut Vec<u8>, r: &CommandResult) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"command_id\":");
    write_str(out, r.command_id.as_str());
    out.extend_from_slice(b",\"status\":");
    write_str(out, r.status.as_str());
    if let Some(exit_code) = r.exit_code {
        out.extend_from_slice(b",\"exit_code\":");
        if exit_code < 0 {
            out.push(b'-');
        }
        write_u64(out, u64::from(exit_code.unsigned_abs()));
    }
    out.extend_from_slice(b",\"output\":");
    write_value(out, &r.output, 0)?;
    if let Some(error) = &r.error {
        out.extend_from_slice(b",\"error\":{\"code\":");
        write_str(out, error.code.as_str());
        out.extend_from_slice(b",\"message\":");
        write_str(out, error.message.as_str());
        out.push(b'}');
    }
    out.extend_from_slice(b",\"duration_ms\":");
    write_u64(out, r.duration_ms);
    out.push(b'}');
    Ok(())
}

fn telemetry(out: &mut Vec<u8>, t: &Telemetry) -> Result<(), serde_json::Error> {
    out.extend_from_slice(b"{\"batch_id\":");
    write_u64(out, t.batch_id);
    out.extend_from_slice(b",\"samples\":[");
    for (i, sample) in t.samples.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"ts\":");
        write_u64(out, sample.ts.as_millis());
        out.extend_from_slice(b",\"key\":");
        write_str(out, sample.key.as_str());
        out.extend_from_slice(b",\"value\":");
        if !sample.value.is_finite() {
            // The message the `finite` serializer of `Sample::value` gives.
            return Err(serde::ser::Error::custom("telemetry value is not finite"));
        }
        serde_json::to_writer(&mut *out, &sample.value)?;
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"dropped\":");
    write_u64(out, t.dropped);
    out.push(b'}');
    Ok(())
}

/// A free-form value; numbers are formatted by serde_json.
fn write_value(out: &mut Vec<u8>, value: &Value, depth: usize) -> Result<(), serde_json::Error> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => serde_json::to_writer(&mut *out, number)?,
        Value::String(s) => write_str(out, s),
        _ if depth >= MAX_DEPTH => serde_json::to_writer(&mut *out, value)?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, item, depth + 1)?;
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, key);
                out.push(b':');
                write_value(out, item, depth + 1)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// Decimal digits of `n`, as itoa (which serde_json uses) writes them.
fn write_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        // Truncation is intended: a remainder below 10.
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// A nonce as its quoted 64 lowercase hexadecimal digits.
fn write_nonce(out: &mut Vec<u8>, nonce: &Nonce) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for byte in nonce.0 {
        out.extend_from_slice(&[DIGITS[usize::from(byte >> 4)], DIGITS[usize::from(byte & 0x0f)]]);
    }
    out.push(b'"');
}

/// A quoted JSON string with serde_json's escapes: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`, `\t`,
/// and `\u00xx` (lowercase) for the other control characters; everything else as is.
fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    while let Some(at) = next_escape(bytes, run) {
        out.extend_from_slice(&bytes[run..at]);
        let byte = bytes[at];
        let short = match byte {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => 0,
        };
        if short == 0 {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
        run = at + 1;
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// The position of the first byte at or after `from` that needs an escape: a control
/// character, a quote or a backslash.
pub(super) fn next_escape(bytes: &[u8], from: usize) -> Option<usize> {
    /// Bytes tested at once; the test below compiles to a few vector instructions per chunk.
    const CHUNK: usize = 32;
    // Below 0x20, or a quote (0x22): exactly the bytes whose `b ^ 2` is at most 0x20. Written
    // without branches so that the chunk test vectorizes.
    let needs_escape = |b: u8| ((b ^ 2) <= 0x20) | (b == b'\\');
    let mut at = from;
    while let Some(chunk) = bytes.get(at..at + CHUNK) {
        let flagged = chunk.iter().fold(0u8, |any, &b| any | u8::from(needs_escape(b)));
        if flagged != 0 {
            break;
        }
        at += CHUNK;
    }
    let rest = bytes.get(at..)?;
    rest.iter().position(|&b| needs_escape(b)).map(|i| at + i)
}

fn reject_code(code: RejectCode) -> &'static str {
    match code {
        RejectCode::UnsupportedVersion => "unsupported_version",
        RejectCode::Malformed => "malformed",
        RejectCode::UnknownAgent => "unknown_agent",
        RejectCode::IdentityMismatch => "identity_mismatch",
        RejectCode::BadMac => "bad_mac",
        RejectCode::Replay => "replay",
        RejectCode::Stale => "stale",
        RejectCode::DuplicateAgent => "duplicate_agent",
        RejectCode::Overloaded => "overloaded",
    }
}

fn close_code(code: CloseCode) -> &'static str {
    match code {
        CloseCode::Normal => "normal",
        CloseCode::GoingAway => "going_away",
        CloseCode::LivenessTimeout => "liveness_timeout",
        CloseCode::ProtocolViolation => "protocol_violation",
        CloseCode::TooManyViolations => "too_many_violations",
        CloseCode::Revoked => "revoked",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::Timestamp;
    use crate::wire::envelope::{encode, encode_with_serde};
    use crate::wire::{AgentId, Capability, CommandId, MetricKey, ResultError, ResultStatus, Sample, Text, Verb};
    use proptest::prelude::*;

    fn same_as_serde(envelope: &Envelope) -> Result<(), TestCaseError> {
        let ours = encode(envelope).map_err(|e| e.code());
        let reference = encode_with_serde(envelope).map_err(|e| e.code());
        prop_assert_eq!(
            ours.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
            reference.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
        );
        prop_assert_eq!(ours, reference);
        Ok(())
    }

    /// Strings with everything a JSON writer must get right: quotes, backslashes, every
    /// control character, DEL, and characters of two to four bytes.
    fn tricky_string() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => "[a-z0-9 ]{0,12}",
            1 => (0u8..0x20).prop_map(|b| char::from(b).to_string()),
            1 => prop::sample::select(vec!["\"", "\\", "\u{7f}", "é", "€", "𝄞", "/", "\u{2028}"]).prop_map(String::from),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
    }

    /// Free text: like [`tricky_string`] without control characters.
    fn text<const N: usize>() -> impl Strategy<Value = Text<N>> {
        tricky_string().prop_map(|s| Text::lossy(&s))
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9._-]{0,20}"
    }

    fn nonce() -> impl Strategy<Value = Nonce> {
        any::<[u8; 32]>().prop_map(Nonce)
    }

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop::sample::select(vec![0.0, -0.0, 0.1, 1.0, 1e21, 1e-7, 5e-324, f64::MAX, f64::MIN_POSITIVE])
                .prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            number(),
            tricky_string().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                proptest::collection::btree_map(tricky_string(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Any envelope, of any kind, with awkward strings, numbers and free-form values.
    pub(in crate::wire) fn envelope() -> impl Strategy<Value = Envelope> {
        (any::<u64>(), any::<u64>(), message()).prop_map(|(seq, ts, message)| Envelope {
            seq,
            ts: Timestamp::from_millis(ts),
            message,
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        let command_id = || name().prop_map(|s| CommandId::new(s).expect("valid"));
        prop_oneof![
            (name(), text(), text(), text(), proptest::collection::vec(name(), 0..4), any::<u32>(), nonce()).prop_map(
                |(agent_id, site, hostname, version, capabilities, max_concurrency, nonce)| {
                    Message::Hello(Hello {
                        agent_id: AgentId::new(agent_id).expect("valid"),
                        site,
                        hostname,
                        version,
                        capabilities: capabilities.into_iter().map(|c| Capability::new(c).expect("valid")).collect(),
                        max_concurrency,
                        nonce,
                    })
                }
            ),
            (nonce(), nonce(), any::<u64>(), any::<u64>()).prop_map(|(agent_nonce, host_nonce, h, l)| {
                Message::Welcome(Welcome { agent_nonce, host_nonce, heartbeat_interval_ms: h, liveness_timeout_ms: l })
            }),
            (0..9usize, text(), any::<Option<u64>>(), proptest::option::of(nonce())).prop_map(
                |(code, message, retry_after_ms, agent_nonce)| {
                    let code = ALL_REJECT_CODES[code];
                    Message::Reject(Reject { code, message, retry_after_ms, agent_nonce })
                }
            ),
            (command_id(), "[a-z0-9][a-z0-9_.]{0,20}", value(), any::<u64>(), any::<u32>()).prop_map(
                |(command_id, verb, args, timeout_ms, attempt)| {
                    let verb = Verb::new(verb).expect("valid");
                    Message::Command(Command { command_id, verb, args, timeout_ms, attempt })
                }
            ),
            command_id().prop_map(|command_id| Message::Ack(Ack { command_id })),
            (
                command_id(),
                0..5usize,
                any::<Option<i32>>(),
                value(),
                proptest::option::of((text(), text())),
                any::<u64>()
            )
                .prop_map(|(command_id, status, exit_code, output, error, duration_ms)| {
                    Message::Result(CommandResult {
                        command_id,
                        status: ALL_STATUSES[status],
                        exit_code,
                        output,
                        error: error.map(|(code, message)| ResultError { code, message }),
                        duration_ms,
                    })
                }),
            proptest::collection::vec(command_id(), 0..5)
                .prop_map(|command_ids| Message::ResultAck(ResultAck { command_ids })),
            (any::<u64>(), proptest::collection::vec((any::<u64>(), name(), any::<f64>()), 0..5), any::<u64>())
                .prop_map(|(batch_id, samples, dropped)| {
                    let samples = samples
                        .into_iter()
                        .map(|(ts, key, value)| Sample {
                            ts: Timestamp::from_millis(ts),
                            key: MetricKey::new(key).expect("valid"),
                            value,
                        })
                        .collect();
                    Message::Telemetry(Telemetry { batch_id, samples, dropped })
                }),
            any::<u64>().prop_map(|batch_id| Message::TelemetryAck(TelemetryAck { batch_id })),
            Just(Message::Heartbeat(Heartbeat {})),
            (0..6usize, text())
                .prop_map(|(code, message)| Message::Close(Close { code: ALL_CLOSE_CODES[code], message })),
        ]
    }

    const ALL_REJECT_CODES: [RejectCode; 9] = [
        RejectCode::UnsupportedVersion,
        RejectCode::Malformed,
        RejectCode::UnknownAgent,
        RejectCode::IdentityMismatch,
        RejectCode::BadMac,
        RejectCode::Replay,
        RejectCode::Stale,
        RejectCode::DuplicateAgent,
        RejectCode::Overloaded,
    ];
    const ALL_STATUSES: [ResultStatus; 5] = [
        ResultStatus::Succeeded,
        ResultStatus::Failed,
        ResultStatus::TimedOut,
        ResultStatus::Interrupted,
        ResultStatus::Rejected,
    ];
    const ALL_CLOSE_CODES: [CloseCode; 6] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::LivenessTimeout,
        CloseCode::ProtocolViolation,
        CloseCode::TooManyViolations,
        CloseCode::Revoked,
    ];

    #[test]
    fn enumeration_names_are_the_serde_names() {
        let quoted = |s: &str| format!("\"{s}\"");
        for code in ALL_REJECT_CODES {
            assert_eq!(quoted(reject_code(code)), serde_json::to_string(&code).expect("serializes"));
        }
        for code in ALL_CLOSE_CODES {
            assert_eq!(quoted(close_code(code)), serde_json::to_string(&code).expect("serializes"));
        }
        for status in ALL_STATUSES {
            assert_eq!(quoted(status.as_str()), serde_json::to_string(&status).expect("serializes"));
        }
    }

    #[test]
    fn the_size_hint_covers_messages_without_escapes_or_nested_values() {
        let plain = |message: Message| Envelope { seq: u64::MAX, ts: Timestamp::from_millis(u64::MAX), message };
        fn text<const N: usize>(s: &str) -> Text<N> {
            Text::new(s).expect("valid")
        }
        let nonce = Nonce([0xab; 32]);
        for envelope in [
            plain(Message::Heartbeat(Heartbeat {})),
            plain(Message::Ack(Ack { command_id: CommandId::new("c".repeat(64)).expect("valid") })),
            plain(Message::TelemetryAck(TelemetryAck { batch_id: u64::MAX })),
            plain(Message::Welcome(Welcome {
                agent_nonce: nonce,
                host_nonce: nonce,
                heartbeat_interval_ms: u64::MAX,
                liveness_timeout_ms: u64::MAX,
            })),
            plain(Message::Reject(Reject {
                code: RejectCode::UnsupportedVersion,
                message: text("no"),
                retry_after_ms: Some(u64::MAX),
                agent_nonce: Some(nonce),
            })),
            plain(Message::Result(CommandResult {
                command_id: CommandId::new("c1").expect("valid"),
                status: ResultStatus::Interrupted,
                exit_code: Some(i32::MIN),
                output: Value::from("x".repeat(300)),
                error: Some(ResultError { code: text("code"), message: text("why") }),
                duration_ms: u64::MAX,
            })),
            plain(Message::Hello(Hello {
                agent_id: AgentId::new("gw").expect("valid"),
                site: text("s"),
                hostname: text("h"),
                version: text("v"),
                capabilities: vec![Capability::new("docker").expect("valid")],
                max_concurrency: u32::MAX,
                nonce,
            })),
        ] {
            let encoded = encode(&envelope).expect("encodes");
            assert!(size_hint(&envelope) + 1 >= encoded.len(), "{}", String::from_utf8_lossy(&encoded));
        }
    }

    #[test]
    fn every_single_character_is_escaped_as_serde_json_does() {
        for c in (0u32..0x800).filter_map(char::from_u32) {
            for s in [c.to_string(), format!("abcdefgh{c}ijklmnop{c}{c}")] {
                let mut ours = Vec::new();
                write_str(&mut ours, &s);
                assert_eq!(ours, serde_json::to_vec(&s).expect("serializes"), "{s:?}");
            }
        }
    }

    #[test]
    fn values_nested_past_the_writers_depth_are_written_the_same() {
        let mut deep = Value::from("\u{1}leaf\"");
        for depth in 0..3 * MAX_DEPTH {
            deep =
                if depth % 2 == 0 { Value::Array(vec![deep, Value::Null]) } else { serde_json::json!({ "k": deep }) };
        }
        let mut ours = Vec::new();
        write_value(&mut ours, &deep, 0).expect("writes");
        assert_eq!(ours, serde_json::to_vec(&deep).expect("serializes"));
    }

    #[test]
    fn non_finite_telemetry_fails_with_the_serde_message() {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let sample = Sample { ts: Timestamp::ZERO, key: MetricKey::new("cpu").expect("valid"), value };
            let envelope = Envelope {
                seq: 1,
                ts: Timestamp::ZERO,
                message: Message::Telemetry(Telemetry { batch_id: 1, samples: vec![sample], dropped: 0 }),
            };
            let ours = encode(&envelope).expect_err("refused").to_string();
            assert_eq!(ours, encode_with_serde(&envelope).expect_err("refused").to_string());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn any_string_is_escaped_as_serde_json_does(s in any::<String>(), t in tricky_string()) {
            for s in [s, t] {
                let mut ours = Vec::new();
                write_str(&mut ours, &s);
                prop_assert_eq!(ours, serde_json::to_vec(&s).expect("serializes"));
            }
        }

        #[test]
        fn every_envelope_is_encoded_byte_for_byte_as_serde_json_does(envelope in envelope()) {
            same_as_serde(&envelope)?;
        }
    }
}
