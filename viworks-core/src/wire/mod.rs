//! The wire format: what one protocol message looks like as bytes.
//!
//! A message is one WebSocket binary message (or one frame from [`Framer`] on a stream
//! transport) laid out as
//!
//! ```text
//! +---------+---------------------------+------------------+
//! | version | envelope, JSON, UTF-8     | tag, 32 bytes    |
//! | 1 byte  | {"kind","seq","ts","body"}| BLAKE3 keyed MAC |
//! +---------+---------------------------+------------------+
//! ```
//!
//! This module encodes and decodes the first two parts; [`crate::auth`] computes and checks
//! the tag. Sizes are checked before any byte is parsed.

mod envelope;
mod framer;
pub(crate) mod ids;
mod json_reader;
mod json_writer;
mod message;

use thiserror::Error;

pub use envelope::{Envelope, decode, encode};
pub use framer::{FRAME_HEADER_LEN, Framer, encode_frame};
pub use ids::{AgentId, Capability, CommandId, IdError, MetricKey, Nonce, Text, Verb};
pub use message::{
    Ack, Close, CloseCode, Command, CommandResult, Heartbeat, Hello, Kind, Message, Reject, RejectCode, ResultAck,
    ResultError, ResultStatus, Sample, Telemetry, TelemetryAck, Welcome,
};

/// The protocol version this crate speaks, carried in the first byte of every message.
pub const PROTOCOL_VERSION: u8 = 1;

/// Length of the authentication tag that ends every message.
pub const TAG_LEN: usize = 32;

/// The largest HELLO accepted. A HELLO is the one message whose content is read before its
/// tag can be checked (the key depends on the agent id inside it), so it gets a small bound,
/// though one that fits every field at its own maximum (about 5.5 KiB).
pub const MAX_HELLO_LEN: usize = 8 * 1024;

/// The default bound on one message, tag included.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 1024 * 1024;

/// Size limits applied before parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest message accepted, version byte and tag included.
    pub max_message_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_message_len: DEFAULT_MAX_MESSAGE_LEN }
    }
}

/// Why bytes could not be read as a protocol message.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum WireError {
    /// The message is longer than the limit; nothing of it was parsed.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Length of the message received.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The message is too short to hold a version byte, an envelope and a tag.
    #[error("message of {len} bytes is too short to be a protocol message")]
    TooShort {
        /// Length of the message received.
        len: usize,
    },
    /// The first byte names a protocol version this implementation does not speak.
    #[error("protocol version {0} is not supported (this side speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    /// The envelope names a message kind this version does not define.
    #[error("unknown message kind {0:?}")]
    UnknownKind(String),
    /// The envelope or its body is not valid JSON of the expected shape.
    #[error("malformed {kind} message: {source}")]
    Malformed {
        /// The part that failed: `"envelope"` or the message kind.
        kind: &'static str,
        /// What serde_json reported, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A length prefix on a stream transport announces a frame larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
}

impl WireError {
    /// A stable `snake_case` name for this error, used in logs, test vectors and the C API.
    pub fn code(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "too_large",
            WireError::TooShort { .. } => "too_short",
            WireError::UnsupportedVersion(_) => "unsupported_version",
            WireError::UnknownKind(_) => "unknown_kind",
            WireError::Malformed { .. } => "malformed",
            WireError::FrameTooLarge { .. } => "frame_too_large",
        }
    }
}
