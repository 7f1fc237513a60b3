//! The envelope: the version byte and the JSON object `{"kind","seq","ts","body"}` that
//! carries every message.

use std::borrow::Cow;

use serde::Deserialize;
#[cfg(test)]
use serde::Serialize;
use serde::de::{DeserializeOwned, DeserializeSeed, Error as _, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::message::{Kind, Message, ObjectsOnly};
use super::{PROTOCOL_VERSION, TAG_LEN, WireError};
use super::{json_reader, json_writer};
use crate::Timestamp;

/// A message with its sequence number and send time.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// Position of this message in its direction of the session: 0 for HELLO and for
    /// WELCOME or REJECT, then 1, 2, 3, … with no gaps.
    pub seq: u64,
    /// When the sender sent it.
    pub ts: Timestamp,
    /// The message itself.
    pub message: Message,
}

#[cfg(test)]
#[derive(Serialize)]
struct Outgoing<'a, B> {
    kind: &'static str,
    seq: u64,
    ts: Timestamp,
    body: &'a B,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    seq: u64,
    ts: Timestamp,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// Encodes `envelope` as the version byte followed by its JSON, with room left for the tag.
///
/// The JSON is what serde_json writes for the message types' serde derives, byte for byte,
/// but written by a dedicated writer (see `json_writer`), usually into one allocation.
///
/// Fails only when a value cannot be represented in JSON, such as a telemetry sample that is
/// NaN or infinite.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(1 + json_writer::size_hint(envelope) + TAG_LEN);
    out.push(PROTOCOL_VERSION);
    json_writer::write_envelope(&mut out, envelope)
        .map_err(|source| WireError::Malformed { kind: envelope.message.kind().as_str(), source })?;
    Ok(out)
}

/// The reference encoding through serde, which [`encode`] must match byte for byte.
#[cfg(test)]
pub(crate) fn encode_with_serde(envelope: &Envelope) -> Result<Vec<u8>, WireError> {
    let mut out = vec![PROTOCOL_VERSION];
    let Envelope { seq, ts, message } = envelope;
    let (seq, ts) = (*seq, *ts);
    let kind = message.kind().as_str();
    let written = match message {
        Message::Hello(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Welcome(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Reject(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Command(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Ack(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Result(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::ResultAck(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Telemetry(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::TelemetryAck(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Heartbeat(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
        Message::Close(body) => write(&mut out, Outgoing { kind, seq, ts, body }),
    };
    written.map_err(|source| WireError::Malformed { kind, source })?;
    Ok(out)
}

#[cfg(test)]
fn write<B: Serialize>(out: &mut Vec<u8>, envelope: Outgoing<'_, B>) -> serde_json::Result<()> {
    serde_json::to_writer(out, &envelope)
}

/// Decodes the version byte and JSON envelope produced by [`encode`] (without the tag).
///
/// Callers must have bounded `bytes` already; [`crate::auth::open`] does so before calling.
pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
    let (&version, json) = bytes.split_first().ok_or(WireError::TooShort { len: 0 })?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    // Two shortcuts, then the reference reading. The canonical encoding of the frequent
    // session messages is read directly; any envelope whose kind comes before its body is read
    // by serde in one pass. Anything else, and every refusal, takes the two-pass reading,
    // which decides what is accepted and how a refusal is reported: each shortcut accepts
    // only a subset of what it accepts (the one-pass reading also nests one level less deep)
    // and builds the same envelope from it.
    if let Some(envelope) = json_reader::read_canonical(json) {
        return Ok(envelope);
    }
    match decode_in_one_pass(json) {
        Some(envelope) => Ok(envelope),
        None => decode_in_two_passes(json),
    }
}

/// The reference reading: the envelope first, with its body kept as raw JSON, then the body
/// as the message type its kind names.
pub(super) fn decode_in_two_passes(json: &[u8]) -> Result<Envelope, WireError> {
    let incoming: Incoming<'_> =
        serde_json::from_slice(json).map_err(|source| WireError::Malformed { kind: "envelope", source })?;
    let kind = Kind::from_wire(&incoming.kind)
        .ok_or_else(|| WireError::UnknownKind(incoming.kind.chars().take(32).collect()))?;
    let body = incoming.body.get();
    let message = match kind {
        Kind::Hello => Message::Hello(body_of(kind, body)?),
        Kind::Welcome => Message::Welcome(body_of(kind, body)?),
        Kind::Reject => Message::Reject(body_of(kind, body)?),
        Kind::Command => Message::Command(body_of(kind, body)?),
        Kind::Ack => Message::Ack(body_of(kind, body)?),
        Kind::Result => Message::Result(body_of(kind, body)?),
        Kind::ResultAck => Message::ResultAck(body_of(kind, body)?),
        Kind::Telemetry => Message::Telemetry(body_of(kind, body)?),
        Kind::TelemetryAck => Message::TelemetryAck(body_of(kind, body)?),
        Kind::Heartbeat => Message::Heartbeat(body_of(kind, body)?),
        Kind::Close => Message::Close(body_of(kind, body)?),
    };
    Ok(Envelope { seq: incoming.seq, ts: incoming.ts, message })
}

/// Reads an envelope whose `kind` comes before its `body` in one pass, the body straight into
/// its message type; `None` for anything else, valid or not.
fn decode_in_one_pass(json: &[u8]) -> Option<Envelope> {
    // All of it must be UTF-8, including members the body ignores (serde skips those
    // without checking them; the two-pass reading checks the whole body).
    let text = std::str::from_utf8(json).ok()?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let mut message = None;
    // The message is written into `message` where it is built, rather than returned through
    // the layers of serde's results: an envelope is 176 bytes, and every layer copied it.
    let (seq, ts) = serde::Deserializer::deserialize_map(&mut deserializer, OnePass(&mut message)).ok()?;
    deserializer.end().ok()?;
    Some(Envelope { seq, ts, message: message? })
}

/// Reads the envelope's members, writing the message into the slot it holds and returning
/// `seq` and `ts`.
struct OnePass<'a>(&'a mut Option<Message>);

impl<'de> Visitor<'de> for OnePass<'_> {
    type Value = (u64, Timestamp);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an envelope with its kind before its body")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(u64, Timestamp), A::Error> {
        let (mut kind, mut seq, mut ts, mut body) = (None, None, None, false);
        while let Some(member) = map.next_key::<&str>()? {
            match member {
                "kind" if kind.is_none() => {
                    let name = map.next_value::<&str>()?;
                    kind = Some(Kind::from_wire(name).ok_or_else(|| A::Error::custom("unknown kind"))?);
                }
                "seq" if seq.is_none() => seq = Some(map.next_value::<u64>()?),
                "ts" if ts.is_none() => ts = Some(map.next_value::<Timestamp>()?),
                "body" if !body => {
                    let kind = kind.ok_or_else(|| A::Error::custom("body before kind"))?;
                    map.next_value_seed(Body(kind, &mut *self.0))?;
                    body = true;
                }
                _ => return Err(A::Error::custom("unknown or repeated member")),
            }
        }
        match (seq, ts, body) {
            (Some(seq), Some(ts), true) => Ok((seq, ts)),
            _ => Err(A::Error::custom("missing member")),
        }
    }
}

/// The body of a message of the given kind, which must be a JSON object, written into the
/// slot.
struct Body<'a>(Kind, &'a mut Option<Message>);

impl<'de> DeserializeSeed<'de> for Body<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let body = ObjectsOnly(deserializer);
        *self.1 = Some(match self.0 {
            Kind::Hello => Message::Hello(Deserialize::deserialize(body)?),
            Kind::Welcome => Message::Welcome(Deserialize::deserialize(body)?),
            Kind::Reject => Message::Reject(Deserialize::deserialize(body)?),
            Kind::Command => Message::Command(Deserialize::deserialize(body)?),
            Kind::Ack => Message::Ack(Deserialize::deserialize(body)?),
            Kind::Result => Message::Result(Deserialize::deserialize(body)?),
            Kind::ResultAck => Message::ResultAck(Deserialize::deserialize(body)?),
            Kind::Telemetry => Message::Telemetry(Deserialize::deserialize(body)?),
            Kind::TelemetryAck => Message::TelemetryAck(Deserialize::deserialize(body)?),
            Kind::Heartbeat => Message::Heartbeat(Deserialize::deserialize(body)?),
            Kind::Close => Message::Close(Deserialize::deserialize(body)?),
        });
        Ok(())
    }
}

fn body_of<T: DeserializeOwned>(kind: Kind, body: &str) -> Result<T, WireError> {
    // serde would also fill a struct from a JSON array by position; the protocol says object.
    if !body.starts_with('{') {
        let source = <serde_json::Error as serde::de::Error>::custom("a message body must be a JSON object");
        return Err(WireError::Malformed { kind: kind.as_str(), source });
    }
    serde_json::from_str(body).map_err(|source| WireError::Malformed { kind: kind.as_str(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Heartbeat, Sample, Telemetry};

    fn heartbeat(seq: u64) -> Envelope {
        Envelope { seq, ts: Timestamp::from_millis(5), message: Message::Heartbeat(Heartbeat {}) }
    }

    #[test]
    fn encoding_is_the_version_byte_then_readable_json() {
        let bytes = encode(&heartbeat(3)).expect("encodes");
        assert_eq!(bytes[0], PROTOCOL_VERSION);
        assert_eq!(&bytes[1..], br#"{"kind":"heartbeat","seq":3,"ts":5,"body":{}}"#);
        assert_eq!(decode(&bytes).expect("decodes"), heartbeat(3));
    }

    #[test]
    fn field_order_does_not_matter_but_unknown_envelope_fields_do() {
        let reordered = b"\x01{\"body\":{},\"ts\":5,\"seq\":3,\"kind\":\"heartbeat\"}";
        assert_eq!(decode(reordered).expect("decodes"), heartbeat(3));
        let extra = b"\x01{\"kind\":\"heartbeat\",\"seq\":3,\"ts\":5,\"body\":{},\"v\":2}";
        assert!(matches!(decode(extra), Err(WireError::Malformed { kind: "envelope", .. })));
    }

    #[test]
    fn wrong_version_and_unknown_kind_are_typed() {
        assert!(matches!(decode(b"\x02{}"), Err(WireError::UnsupportedVersion(2))));
        let unknown = b"\x01{\"kind\":\"upgrade\",\"seq\":0,\"ts\":0,\"body\":{}}";
        assert!(matches!(decode(unknown), Err(WireError::UnknownKind(k)) if k == "upgrade"));
        assert!(matches!(decode(b""), Err(WireError::TooShort { len: 0 })));
    }

    #[test]
    fn a_body_of_the_wrong_shape_names_its_kind() {
        let bad = b"\x01{\"kind\":\"ack\",\"seq\":1,\"ts\":0,\"body\":{\"command_id\":\"\"}}";
        assert!(matches!(decode(bad), Err(WireError::Malformed { kind: "ack", .. })));
    }

    #[test]
    fn a_body_must_be_an_object_not_an_array() {
        let positional = b"\x01{\"kind\":\"ack\",\"seq\":1,\"ts\":0,\"body\":[\"c1\"]}";
        assert!(matches!(decode(positional), Err(WireError::Malformed { kind: "ack", .. })));
        let spaced = b"\x01{\"kind\":\"ack\",\"seq\":1,\"ts\":0,\"body\": {\"command_id\":\"c1\"}}";
        assert!(decode(spaced).is_ok(), "whitespace before the body is fine");
    }

    #[test]
    fn nested_structs_must_be_objects_too() {
        let positional_sample =
            b"\x01{\"kind\":\"telemetry\",\"seq\":1,\"ts\":0,\"body\":{\"batch_id\":1,\"samples\":[[5,\"cpu\",1.0]]}}";
        assert!(matches!(decode(positional_sample), Err(WireError::Malformed { kind: "telemetry", .. })));
        let keyed_sample = b"\x01{\"kind\":\"telemetry\",\"seq\":1,\"ts\":0,\"body\":{\"batch_id\":1,\"samples\":[{\"ts\":5,\"key\":\"cpu\",\"value\":1.0}]}}";
        assert!(decode(keyed_sample).is_ok());
        let positional_error = b"\x01{\"kind\":\"result\",\"seq\":1,\"ts\":0,\"body\":{\"command_id\":\"c1\",\"status\":\"failed\",\"duration_ms\":1,\"error\":[\"x\",\"y\"]}}";
        assert!(matches!(decode(positional_error), Err(WireError::Malformed { kind: "result", .. })));
        let no_error = b"\x01{\"kind\":\"result\",\"seq\":1,\"ts\":0,\"body\":{\"command_id\":\"c1\",\"status\":\"failed\",\"duration_ms\":1,\"error\":null}}";
        assert!(decode(no_error).is_ok());
    }

    #[test]
    fn non_finite_telemetry_cannot_be_encoded() {
        let envelope = Envelope {
            seq: 1,
            ts: Timestamp::ZERO,
            message: Message::Telemetry(Telemetry {
                batch_id: 1,
                samples: vec![Sample { ts: Timestamp::ZERO, key: "cpu".parse().expect("valid key"), value: f64::NAN }],
                dropped: 0,
            }),
        };
        assert!(matches!(encode(&envelope), Err(WireError::Malformed { kind: "telemetry", .. })));
    }

    /// `{"kind":"command",…,"args":…}` whose whole JSON text nests `depth` levels deep.
    fn command_nested(depth: usize) -> Vec<u8> {
        // The envelope, the body and the args object are three levels; arrays make the rest.
        let arrays = depth - 3;
        format!(
            "\x01{{\"kind\":\"command\",\"seq\":1,\"ts\":0,\"body\":{{\"command_id\":\"c\",\"verb\":\"v\",\"args\":{{\"a\":{}1{}}},\"timeout_ms\":1,\"attempt\":1}}}}",
            "[".repeat(arrays),
            "]".repeat(arrays)
        )
        .into_bytes()
    }

    #[test]
    fn the_json_text_may_nest_128_levels_and_no_more() {
        assert!(decode(&command_nested(128)).is_ok());
        assert!(matches!(decode(&command_nested(129)), Err(WireError::Malformed { kind: "command", .. })));
    }

    #[test]
    fn invalid_utf8_is_refused_even_in_a_member_the_body_ignores() {
        let ignored = b"\x01{\"kind\":\"ack\",\"seq\":1,\"ts\":0,\"body\":{\"command_id\":\"c1\",\"x\":\"\x80\"}}";
        assert!(matches!(decode(ignored), Err(WireError::Malformed { kind: "envelope", .. })));
    }

    #[test]
    fn escaped_names_and_a_body_before_the_kind_are_read_too() {
        let escaped = b"\x01{\"k\\u0069nd\":\"heart\\u0062eat\",\"seq\":3,\"ts\":5,\"body\":{}}";
        assert_eq!(decode(escaped).expect("decodes"), heartbeat(3));
        let body_first = b"\x01{\"body\":{\"command_id\":\"c1\"},\"kind\":\"ack\",\"seq\":1,\"ts\":0}";
        assert!(matches!(decode(body_first).expect("decodes").message, Message::Ack(_)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 1024, ..Default::default() })]

        #[test]
        fn the_one_pass_reading_builds_what_the_two_pass_reading_builds(
            envelope in super::super::json_writer::tests::envelope(),
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..3),
        ) {
            let Ok(mut bytes) = encode(&envelope) else {
                return Ok(()); // a non-finite telemetry value
            };
            if edits.is_empty() {
                proptest::prop_assert_eq!(decode_in_one_pass(&bytes[1..]), Some(envelope.clone()));
            }
            for (at, byte) in edits {
                let i = at.index(bytes.len() - 1) + 1;
                bytes[i] = byte;
            }
            // Whatever the shortcut accepts, the reference reading accepts as the same envelope.
            if let Some(fast) = decode_in_one_pass(&bytes[1..]) {
                proptest::prop_assert_eq!(decode_in_two_passes(&bytes[1..]).ok(), Some(fast));
            }
        }
    }

    #[test]
    fn oversized_collections_are_refused_while_parsing() {
        let ids: Vec<String> = (0..4097).map(|i| format!("\"c{i}\"")).collect();
        let json = format!(
            "\x01{{\"kind\":\"result_ack\",\"seq\":1,\"ts\":0,\"body\":{{\"command_ids\":[{}]}}}}",
            ids.join(",")
        );
        assert!(matches!(decode(json.as_bytes()), Err(WireError::Malformed { kind: "result_ack", .. })));
    }
}
