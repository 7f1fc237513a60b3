//! The envelope: the version byte and the JSON object `{"kind","seq","ts","body"}` that
//! carries every message.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::message::{Kind, Message};
use super::{PROTOCOL_VERSION, TAG_LEN, WireError};
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
/// Fails only when a value cannot be represented in JSON, such as a telemetry sample that is
/// NaN or infinite.
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(128 + TAG_LEN);
    out.push(PROTOCOL_VERSION);
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
