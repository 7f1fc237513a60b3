//! Session state machines, sans-IO, after quinn-proto.
//!
//! A connection is driven by feeding it what arrives (`handle_message(now, bytes)`) and the
//! passing of time (`handle_timeout(now)`), and draining what it produced: bytes to send
//! (`poll_transmit`), things that happened (`poll_event`) and when to call again
//! (`poll_timeout`). Drivers drain transmit and events after every call.
//!
//! - [`Host`] admits connections: it authenticates the HELLO, refuses replays, unknown and
//!   duplicate agents, and hands out a [`HostSession`] per admitted agent.
//! - [`AgentSession`] is the agent's side of one connection.
//! - [`ExecutionGuard`] sits between an agent's sessions and its executor and makes execution
//!   at-most-once per command, with an [`ExecutionLedger`] that survives restarts.
//! - [`Dispatcher`] is the host's command lifecycle across sessions: queues, credits, retries,
//!   dead letters and exactly one terminal state per command.

mod agent;
mod channel;
mod dispatcher;
mod host;
mod ledger;

use std::time::Duration;

use thiserror::Error;

use crate::auth::AuthError;
use crate::wire::Kind;

pub use agent::{AgentConfig, AgentEvent, AgentSession};
pub use dispatcher::{
    CommandRecord, CommandState, DeadLetter, DispatchConfig, DispatchError, DispatchEvent, Dispatcher, NewCommand,
    Terminal,
};
pub use host::{AgentKeys, Host, HostConfig, HostEvent, HostSession, Refusal, SessionEnd};
pub use ledger::{ExecutionGuard, ExecutionLedger, LedgerEntry, MemoryLedger, MemoryLedgerError};

/// How often a quiet side sends a heartbeat, and how long a side waits without hearing
/// anything before it ends the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_interval: Duration,
    /// End the session after this long without receiving anything valid.
    pub liveness_timeout: Duration,
}

impl Timers {
    /// 15 s heartbeats, 45 s liveness: three missed heartbeats end a session.
    pub const DEFAULT: Timers =
        Timers { heartbeat_interval: Duration::from_secs(15), liveness_timeout: Duration::from_secs(45) };

    /// These timers made usable: a heartbeat of at least 10 ms and a liveness timeout of at
    /// least two heartbeats, so that a peer on time is never declared dead.
    pub fn sanitized(self) -> Timers {
        let heartbeat_interval = self.heartbeat_interval.max(Duration::from_millis(10));
        let liveness_timeout = self.liveness_timeout.max(heartbeat_interval * 2);
        Timers { heartbeat_interval, liveness_timeout }
    }
}

impl Default for Timers {
    fn default() -> Self {
        Timers::DEFAULT
    }
}

/// A message a session refused. Each is counted; too many end the session with
/// `too_many_violations`, and each is worth an audit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// The tag did not verify: forged, corrupted, or from another session.
    BadMac,
    /// The message was too large, too short, of another version, or not parseable; the
    /// [`crate::wire::WireError::code`] says which.
    Undecodable(&'static str),
    /// The sequence number was not the next one: a replay, or a message lost in between.
    OutOfSequence {
        /// The sequence number expected.
        expected: u64,
        /// The sequence number received.
        got: u64,
    },
    /// A verified message of a kind this side never receives in this state.
    UnexpectedKind(Kind),
    /// A verified message whose content breaks a rule, such as a WELCOME answering another
    /// HELLO.
    Invalid(&'static str),
}

impl Violation {
    fn from_auth(error: &AuthError) -> Violation {
        match error {
            AuthError::BadMac => Violation::BadMac,
            other => Violation::Undecodable(other.code()),
        }
    }

    /// A stable `snake_case` name, for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Violation::BadMac => "bad_mac",
            Violation::Undecodable(code) => code,
            Violation::OutOfSequence { .. } => "replay_or_gap",
            Violation::UnexpectedKind(_) => "unexpected_kind",
            Violation::Invalid(_) => "invalid",
        }
    }
}

/// Why a session operation was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The session has ended; nothing more can be sent.
    #[error("the session is closed")]
    Closed,
    /// The handshake has not finished; only the HELLO may be sent.
    #[error("the session is not established yet")]
    NotEstablished,
    /// The agent has as many commands in flight as it advertised; wait for a result.
    #[error("no credit: {in_flight} commands already in flight")]
    NoCredit {
        /// Commands in flight now.
        in_flight: usize,
    },
    /// The transmit queue is full because the driver is not draining it.
    #[error("the transmit queue is full")]
    TransmitFull,
    /// The sealed message would exceed the message size limit the peer enforces.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The sealed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The message could not be encoded (a non-finite telemetry value).
    #[error("message cannot be encoded: {0}")]
    Unencodable(#[source] AuthError),
    /// A configuration bound is zero or inconsistent.
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
}
