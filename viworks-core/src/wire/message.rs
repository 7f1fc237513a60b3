//! The message kinds of protocol version 1 and their bodies.

use serde::{Deserialize, Serialize};

use super::ids::{AgentId, Capability, CommandId, MetricKey, Nonce, Text, Verb};
use crate::Timestamp;

/// Free text for names and versions.
type Name = Text<255>;
/// Free text for human-readable reasons.
type Reason = Text<1024>;

/// The kind of a message, as written in the envelope's `kind` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// Agent → host: who I am, sent first.
    Hello,
    /// Host → agent: session accepted.
    Welcome,
    /// Host → agent: session refused, with a reason code.
    Reject,
    /// Host → agent: run this.
    Command,
    /// Agent → host: command received and durably recorded.
    Ack,
    /// Agent → host: a command's outcome.
    Result,
    /// Host → agent: these results are stored; forget them.
    ResultAck,
    /// Agent → host: a batch of telemetry samples.
    Telemetry,
    /// Host → agent: that batch is stored.
    TelemetryAck,
    /// Either way: I am alive.
    Heartbeat,
    /// Either way: I am ending the session, and why.
    Close,
}

impl Kind {
    /// Every kind, in protocol order.
    pub const ALL: [Kind; 11] = [
        Kind::Hello,
        Kind::Welcome,
        Kind::Reject,
        Kind::Command,
        Kind::Ack,
        Kind::Result,
        Kind::ResultAck,
        Kind::Telemetry,
        Kind::TelemetryAck,
        Kind::Heartbeat,
        Kind::Close,
    ];

    /// The name used on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Reject => "reject",
            Kind::Command => "command",
            Kind::Ack => "ack",
            Kind::Result => "result",
            Kind::ResultAck => "result_ack",
            Kind::Telemetry => "telemetry",
            Kind::TelemetryAck => "telemetry_ack",
            Kind::Heartbeat => "heartbeat",
            Kind::Close => "close",
        }
    }

    /// The kind named `name` on the wire, if any.
    pub fn from_wire(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// One protocol message: its kind and body.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Reject`].
    Reject(Reject),
    /// See [`Command`].
    Command(Command),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`CommandResult`].
    Result(CommandResult),
    /// See [`ResultAck`].
    ResultAck(ResultAck),
    /// See [`Telemetry`].
    Telemetry(Telemetry),
    /// See [`TelemetryAck`].
    TelemetryAck(TelemetryAck),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Close`].
    Close(Close),
}

impl Message {
    /// This message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Reject(_) => Kind::Reject,
            Message::Command(_) => Kind::Command,
            Message::Ack(_) => Kind::Ack,
            Message::Result(_) => Kind::Result,
            Message::ResultAck(_) => Kind::ResultAck,
            Message::Telemetry(_) => Kind::Telemetry,
            Message::TelemetryAck(_) => Kind::TelemetryAck,
            Message::Heartbeat(_) => Kind::Heartbeat,
            Message::Close(_) => Kind::Close,
        }
    }
}

/// The agent's first message: its identity, what it can do, and its half of the session keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's identity; must match its client certificate.
    pub agent_id: AgentId,
    /// The site (location or environment) the agent belongs to.
    pub site: Name,
    /// The machine's host name.
    pub hostname: Name,
    /// The agent software's version.
    pub version: Name,
    /// What this agent can run, such as `docker` and `scripts`. At most 64 entries.
    #[serde(deserialize_with = "bounded_vec::<_, 64, _>")]
    pub capabilities: Vec<Capability>,
    /// How many commands the agent runs at once; the host never has more in flight.
    pub max_concurrency: u32,
    /// The agent's contribution to the session keys. Fresh for every connection.
    pub nonce: Nonce,
}

/// The host's acceptance of a HELLO.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The nonce from the HELLO being answered, so that an old WELCOME cannot be replayed.
    pub agent_nonce: Nonce,
    /// The host's contribution to the session keys.
    pub host_nonce: Nonce,
    /// How often each side sends a heartbeat when it has nothing else to send.
    pub heartbeat_interval_ms: u64,
    /// How long either side waits without hearing anything before it ends the session.
    pub liveness_timeout_ms: u64,
}

/// The host's refusal of a HELLO.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    /// Why the session was refused.
    pub code: RejectCode,
    /// A human-readable explanation.
    pub message: Reason,
    /// How long the agent should wait before trying again, when the host has an opinion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// The nonce of the HELLO being refused, present when the REJECT is sealed with the
    /// agent's handshake key, so that an old REJECT cannot be replayed into a new handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_nonce: Option<Nonce>,
}

/// Why a HELLO was refused. Written in `snake_case` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RejectCode {
    /// The message's version byte is not one the host speaks.
    UnsupportedVersion,
    /// The HELLO could not be parsed.
    Malformed,
    /// No key is known for this agent id (never enrolled, or revoked).
    UnknownAgent,
    /// The agent id in the HELLO differs from the identity its transport proved.
    IdentityMismatch,
    /// The HELLO's tag does not verify under the agent's key.
    BadMac,
    /// This HELLO was already seen inside the skew window.
    Replay,
    /// The HELLO's timestamp lies outside the skew window.
    Stale,
    /// Another live session holds this agent id.
    DuplicateAgent,
    /// The host is at an admission limit; try again later.
    Overloaded,
}

/// A command for the agent to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// The command's identity and result correlation id.
    pub command_id: CommandId,
    /// The operation to run.
    pub verb: Verb,
    /// The operation's arguments, checked by the agent against the verb's schema.
    #[serde(default)]
    pub args: serde_json::Value,
    /// How long the agent lets the command run before it reports `timed_out`.
    pub timeout_ms: u64,
    /// Which delivery attempt this is, starting at 1.
    pub attempt: u32,
}

/// The agent's receipt for a command: it is durably recorded and will be answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The command received.
    pub command_id: CommandId,
}

/// How a command ended, as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResultStatus {
    /// It ran and succeeded.
    Succeeded,
    /// It ran and failed.
    Failed,
    /// It ran past its timeout and was stopped.
    TimedOut,
    /// It was started, then the agent stopped before it finished; it is not run again.
    Interrupted,
    /// It was never run: unknown verb, bad arguments, or not allowed on this agent.
    Rejected,
}

impl ResultStatus {
    /// The name used on the wire and in stores.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Succeeded => "succeeded",
            ResultStatus::Failed => "failed",
            ResultStatus::TimedOut => "timed_out",
            ResultStatus::Interrupted => "interrupted",
            ResultStatus::Rejected => "rejected",
        }
    }
}

/// Why a command failed, when it did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    /// A stable machine-readable code, such as `unavailable` or `bad_args`.
    pub code: Text<64>,
    /// A human-readable explanation.
    pub message: Reason,
}

/// A command's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command this answers.
    pub command_id: CommandId,
    /// How it ended.
    pub status: ResultStatus,
    /// The process exit code, for verbs that run a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The verb's output.
    #[serde(default)]
    pub output: serde_json::Value,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "strict_option")]
    pub error: Option<ResultError>,
    /// How long it ran.
    pub duration_ms: u64,
}

/// The host's receipt for stored results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultAck {
    /// The commands whose results are stored. At most 4096 entries.
    #[serde(deserialize_with = "bounded_vec::<_, 4096, _>")]
    pub command_ids: Vec<CommandId>,
}

/// One telemetry sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When it was measured.
    pub ts: Timestamp,
    /// What was measured.
    pub key: MetricKey,
    /// The value; always finite (JSON cannot carry NaN or infinities, and encoding fails
    /// on them).
    #[serde(serialize_with = "finite")]
    pub value: f64,
}

/// A batch of telemetry samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// The batch's number, increasing per agent; acknowledged by [`TelemetryAck`].
    pub batch_id: u64,
    /// The samples. At most 10,000 entries, each a JSON object.
    #[serde(deserialize_with = "bounded_objects::<_, 10_000, _>")]
    pub samples: Vec<Sample>,
    /// Samples the agent dropped since its previous batch because its buffer was full.
    #[serde(default)]
    pub dropped: u64,
}

/// The host's receipt for a telemetry batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAck {
    /// The batch stored.
    pub batch_id: u64,
}

/// A keep-alive with no content.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {}

/// The end of a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Close {
    /// Why the session ends.
    pub code: CloseCode,
    /// A human-readable explanation.
    pub message: Reason,
}

/// Why a session ended. Written in `snake_case` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CloseCode {
    /// An orderly end with nothing wrong.
    Normal,
    /// The sender is shutting down or restarting; reconnect later.
    GoingAway,
    /// Nothing was heard from the peer within the liveness timeout.
    LivenessTimeout,
    /// The peer sent something the protocol does not allow.
    ProtocolViolation,
    /// The peer sent too many messages that failed authentication or parsing.
    TooManyViolations,
    /// The agent's enrollment was revoked.
    Revoked,
}

/// Serializes a finite `f64`, failing on NaN and infinities instead of writing `null`.
fn finite<S: serde::Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    if value.is_finite() {
        serializer.serialize_f64(*value)
    } else {
        Err(serde::ser::Error::custom("telemetry value is not finite"))
    }
}

/// A value that must be written as a JSON object. serde's derived structs also accept an array
/// of their fields by position; the protocol has one encoding, so nested structs refuse it.
struct Strict<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Strict<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(ObjectsOnly(deserializer)).map(Strict)
    }
}

/// Forwards everything to the inner deserializer, except that a struct is read only as a map.
pub(super) struct ObjectsOnly<D>(pub(super) D);

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for ObjectsOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// Deserializes an optional struct that must be a JSON object.
fn strict_option<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Ok(Option::<Strict<T>>::deserialize(deserializer)?.map(|strict| strict.0))
}

/// Like [`bounded_vec`], for elements that must each be a JSON object.
fn bounded_objects<'de, T, const MAX: usize, D>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Ok(bounded_vec::<Strict<T>, MAX, D>(deserializer)?.into_iter().map(|strict| strict.0).collect())
}

/// Deserializes a sequence, refusing more than `MAX` elements before allocating for them.
fn bounded_vec<'de, T, const MAX: usize, D>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    struct Bounded<T, const MAX: usize>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for Bounded<T, MAX> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a sequence of at most {MAX} elements")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(256));
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(serde::de::Error::invalid_length(MAX + 1, &self));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    deserializer.deserialize_seq(Bounded::<T, MAX>(std::marker::PhantomData))
}
