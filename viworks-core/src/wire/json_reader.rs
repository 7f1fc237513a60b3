//! A fast reading of the canonical encoding of the most frequent session messages
//! (HEARTBEAT, ACK, RESULT, RESULT_ACK, TELEMETRY_ACK, COMMAND): exactly the bytes
//! `json_writer` writes, member order and all, with strings free of escapes.
//!
//! It accepts only a subset of what the serde reading accepts, and builds the same envelope
//! from it; anything else (another kind, another member order, whitespace, an escape, a
//! value out of range) gives `None`, and the caller falls back to the serde reading, which
//! decides what is accepted and how a refusal reads. Free-form values that are not plain
//! strings (`args`, `output`) are read by serde_json itself.

use serde_json::Value;

use super::Envelope;
use super::ids::{CommandId, Text, Verb};
use super::json_writer::next_escape;
use super::message::{
    Ack, Command, CommandResult, Heartbeat, Kind, Message, ResultAck, ResultError, ResultStatus, TelemetryAck,
};
use crate::Timestamp;

/// The most command ids a RESULT_ACK may carry (as the serde reading bounds it).
const MAX_RESULT_ACK_IDS: usize = 4096;

/// The deepest a free-form value may nest (the value itself counting as one level): the
/// whole text nests at most 128 levels, of which the envelope and the body take two.
const MAX_VALUE_DEPTH: usize = 126;

/// The envelope `json` (without the version byte) encodes, if it is the canonical encoding of
/// one of the kinds read here.
pub(super) fn read_canonical(json: &[u8]) -> Option<Envelope> {
    let mut cursor = Cursor { bytes: json, at: 0 };
    cursor.literal(b"{\"kind\":\"")?;
    let kind = [Kind::Heartbeat, Kind::Result, Kind::Ack, Kind::ResultAck, Kind::TelemetryAck, Kind::Command]
        .into_iter()
        .find(|kind| {
            cursor.rest().starts_with(kind.as_str().as_bytes()) && cursor.rest().get(kind.as_str().len()) == Some(&b'"')
        })?;
    cursor.at += kind.as_str().len();
    cursor.literal(b"\",\"seq\":")?;
    let seq = cursor.u64()?;
    cursor.literal(b",\"ts\":")?;
    let ts = Timestamp::from_millis(cursor.u64()?);
    cursor.literal(b",\"body\":")?;
    let message = match kind {
        Kind::Heartbeat => {
            cursor.literal(b"{}")?;
            Message::Heartbeat(Heartbeat {})
        }
        Kind::Ack => {
            cursor.literal(b"{\"command_id\":")?;
            let command_id = cursor.command_id()?;
            cursor.literal(b"}")?;
            Message::Ack(Ack { command_id })
        }
        Kind::TelemetryAck => {
            cursor.literal(b"{\"batch_id\":")?;
            let batch_id = cursor.u64()?;
            cursor.literal(b"}")?;
            Message::TelemetryAck(TelemetryAck { batch_id })
        }
        Kind::ResultAck => {
            cursor.literal(b"{\"command_ids\":[")?;
            let mut command_ids = Vec::new();
            if !cursor.eat(b']') {
                loop {
                    if command_ids.len() == MAX_RESULT_ACK_IDS {
                        return None;
                    }
                    command_ids.push(cursor.command_id()?);
                    if cursor.eat(b']') {
                        break;
                    }
                    cursor.literal(b",")?;
                }
            }
            cursor.literal(b"}")?;
            Message::ResultAck(ResultAck { command_ids })
        }
        Kind::Result => Message::Result(cursor.result()?),
        Kind::Command => Message::Command(cursor.command()?),
        _ => return None,
    };
    cursor.literal(b"}")?;
    // Nothing may follow, not even whitespace (which the serde reading allows).
    (cursor.at == json.len()).then_some(Envelope { seq, ts, message })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at.min(self.bytes.len())..]
    }

    fn literal(&mut self, expected: &[u8]) -> Option<()> {
        if !self.rest().starts_with(expected) {
            return None;
        }
        self.at += expected.len();
        Some(())
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.rest().first() == Some(&byte);
        self.at += usize::from(found);
        found
    }

    /// An unsigned integer written canonically: `0`, or digits without a leading zero.
    fn u64(&mut self) -> Option<u64> {
        let digits = self.rest().iter().take_while(|b| b.is_ascii_digit()).count();
        let text = &self.rest()[..digits];
        if digits == 0 || (digits > 1 && text[0] == b'0') {
            return None;
        }
        let mut value: u64 = 0;
        for &digit in text {
            value = value.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        }
        self.at += digits;
        Some(value)
    }

    fn i32(&mut self) -> Option<i32> {
        let negative = self.eat(b'-');
        let magnitude = self.u64()?;
        if negative {
            if magnitude == 0 {
                return None;
            }
            i32::try_from(-i64::try_from(magnitude).ok()?).ok()
        } else {
            i32::try_from(magnitude).ok()
        }
    }

    /// A quoted string without escapes or control characters.
    fn str(&mut self) -> Option<&'a str> {
        if !self.eat(b'"') {
            return None;
        }
        let rest = self.rest();
        let end = next_escape(rest, 0)?;
        if rest[end] != b'"' {
            return None;
        }
        let text = std::str::from_utf8(&rest[..end]).ok()?;
        self.at += end + 1;
        Some(text)
    }

    fn command_id(&mut self) -> Option<CommandId> {
        CommandId::new(self.str()?).ok()
    }

    fn text<const MAX: usize>(&mut self) -> Option<Text<MAX>> {
        Text::new(self.str()?).ok()
    }

    /// A free-form value: a plain string read here, anything else by serde_json, refused
    /// when it nests deeper than the whole text allows.
    fn value(&mut self) -> Option<Value> {
        if self.rest().first() == Some(&b'"') {
            let start = self.at;
            if let Some(text) = self.str() {
                return Some(Value::String(text.to_owned()));
            }
            self.at = start;
        }
        let mut stream = serde_json::Deserializer::from_slice(self.rest()).into_iter::<Value>();
        let value = stream.next()?.ok()?;
        self.at += stream.byte_offset();
        (depth(&value, 0) <= MAX_VALUE_DEPTH).then_some(value)
    }

    fn result(&mut self) -> Option<CommandResult> {
        self.literal(b"{\"command_id\":")?;
        let command_id = self.command_id()?;
        self.literal(b",\"status\":\"")?;
        let status = [
            ResultStatus::Succeeded,
            ResultStatus::Failed,
            ResultStatus::TimedOut,
            ResultStatus::Interrupted,
            ResultStatus::Rejected,
        ]
        .into_iter()
        .find(|status| {
            let name = status.as_str().as_bytes();
            self.rest().starts_with(name) && self.rest().get(name.len()) == Some(&b'"')
        })?;
        self.at += status.as_str().len() + 1;
        let exit_code = match self.literal(b",\"exit_code\":") {
            Some(()) => Some(self.i32()?),
            None => None,
        };
        self.literal(b",\"output\":")?;
        let output = self.value()?;
        let error = match self.literal(b",\"error\":{\"code\":") {
            Some(()) => {
                let code = self.text()?;
                self.literal(b",\"message\":")?;
                let message = self.text()?;
                self.literal(b"}")?;
                Some(ResultError { code, message })
            }
            None => None,
        };
        self.literal(b",\"duration_ms\":")?;
        let duration_ms = self.u64()?;
        self.literal(b"}")?;
        Some(CommandResult { command_id, status, exit_code, output, error, duration_ms })
    }

    fn command(&mut self) -> Option<Command> {
        self.literal(b"{\"command_id\":")?;
        let command_id = self.command_id()?;
        self.literal(b",\"verb\":")?;
        let verb = Verb::new(self.str()?).ok()?;
        self.literal(b",\"args\":")?;
        let args = self.value()?;
        self.literal(b",\"timeout_ms\":")?;
        let timeout_ms = self.u64()?;
        self.literal(b",\"attempt\":")?;
        let attempt = u32::try_from(self.u64()?).ok()?;
        self.literal(b"}")?;
        Some(Command { command_id, verb, args, timeout_ms, attempt })
    }
}

/// How deep `value` nests, a scalar counting 0 and a container one more than its deepest
/// member; stops counting past [`MAX_VALUE_DEPTH`].
fn depth(value: &Value, above: usize) -> usize {
    if above > MAX_VALUE_DEPTH {
        return above;
    }
    match value {
        Value::Array(items) => items.iter().map(|item| depth(item, above + 1)).max().unwrap_or(above + 1),
        Value::Object(members) => members.values().map(|item| depth(item, above + 1)).max().unwrap_or(above + 1),
        _ => above,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::envelope::{decode_in_two_passes, encode};
    use crate::wire::json_writer::tests::envelope;
    use proptest::prelude::*;

    fn command_id(s: &str) -> CommandId {
        CommandId::new(s).expect("valid")
    }

    fn result_with_output(output: Value) -> Envelope {
        let result = CommandResult {
            command_id: command_id("c1"),
            status: ResultStatus::Failed,
            exit_code: Some(-3),
            output,
            error: Some(ResultError {
                code: Text::new("bad").expect("valid"),
                message: Text::new("ü").expect("valid"),
            }),
            duration_ms: 7,
        };
        Envelope { seq: 4, ts: Timestamp::from_millis(9), message: Message::Result(result) }
    }

    #[test]
    fn the_frequent_kinds_are_read_back_from_their_encoding() {
        let envelopes = [
            Envelope { seq: 0, ts: Timestamp::ZERO, message: Message::Heartbeat(Heartbeat {}) },
            Envelope {
                seq: u64::MAX,
                ts: Timestamp::from_millis(1),
                message: Message::Ack(Ack { command_id: command_id("a") }),
            },
            Envelope { seq: 2, ts: Timestamp::ZERO, message: Message::TelemetryAck(TelemetryAck { batch_id: 10 }) },
            Envelope {
                seq: 2,
                ts: Timestamp::ZERO,
                message: Message::ResultAck(ResultAck { command_ids: vec![command_id("a"), command_id("b")] }),
            },
            Envelope { seq: 2, ts: Timestamp::ZERO, message: Message::ResultAck(ResultAck { command_ids: vec![] }) },
            result_with_output(serde_json::json!({"load": [0.5, 1e300, -2], "text": "a\"b", "n": null})),
            result_with_output(Value::from("plain output")),
            result_with_output(Value::from("escaped\noutput")),
            Envelope {
                seq: 1,
                ts: Timestamp::ZERO,
                message: Message::Command(Command {
                    command_id: command_id("c"),
                    verb: Verb::new("docker.ps").expect("valid"),
                    args: serde_json::json!({}),
                    timeout_ms: 5,
                    attempt: u32::MAX,
                }),
            },
        ];
        for envelope in envelopes {
            let bytes = encode(&envelope).expect("encodes");
            assert_eq!(read_canonical(&bytes[1..]), Some(envelope));
        }
    }

    #[test]
    fn a_free_form_value_may_nest_126_levels_and_no_more() {
        let nested = |levels: usize| {
            let mut value = Value::Null;
            for _ in 0..levels {
                value = Value::Array(vec![value]);
            }
            encode(&result_with_output(value)).expect("encodes")
        };
        assert!(read_canonical(&nested(126)[1..]).is_some());
        assert!(read_canonical(&nested(127)[1..]).is_none());
        assert!(decode_in_two_passes(&nested(127)[1..]).is_err(), "the reference refuses it too");
    }

    #[test]
    fn anything_but_the_canonical_form_is_left_to_serde() {
        for json in [
            &b"{\"kind\":\"heartbeat\",\"seq\":1,\"ts\":0,\"body\":{}} "[..],
            b"{\"kind\":\"heartbeat\",\"seq\":01,\"ts\":0,\"body\":{}}",
            b"{\"kind\":\"heartbeat\",\"ts\":0,\"seq\":1,\"body\":{}}",
            b"{\"kind\":\"heartbeats\",\"seq\":1,\"ts\":0,\"body\":{}}",
            b"{\"kind\":\"ack\",\"seq\":1,\"ts\":0,\"body\":{\"command_id\":\"c\\u0031\"}}",
            b"{\"kind\":\"ack\",\"seq\":18446744073709551616,\"ts\":0,\"body\":{\"command_id\":\"c\"}}",
            b"{\"kind\":\"ack\",\"seq\":1,\"ts\":0,\"body\":{\"command_id\":\"c\x01\"}}",
            b"{\"kind\":\"ack\",\"seq\":1,\"ts\":0,\"body\":{\"command_id\":\"-c\"}}",
        ] {
            assert_eq!(read_canonical(json), None, "{}", String::from_utf8_lossy(json));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn whatever_the_fast_reading_accepts_the_reference_reads_the_same(
            envelope in envelope(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        ) {
            let Ok(mut bytes) = encode(&envelope) else {
                return Ok(()); // a non-finite telemetry value
            };
            if edits.is_empty() {
                if let Some(read) = read_canonical(&bytes[1..]) {
                    prop_assert_eq!(read, envelope);
                }
            }
            for (at, byte) in edits {
                let i = at.index(bytes.len() - 1) + 1;
                bytes[i] = byte;
            }
            if let Some(fast) = read_canonical(&bytes[1..]) {
                prop_assert_eq!(decode_in_two_passes(&bytes[1..]).ok(), Some(fast));
            }
        }
    }
}
