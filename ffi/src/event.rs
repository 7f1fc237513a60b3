//! Session events as one tagged C structure, shared by the host and the agent side.
//!
//! `kind` says which fields mean something; the others are zero or null. Strings are
//! NUL-terminated UTF-8 and JSON is UTF-8 (also NUL-terminated, with its length beside it),
//! all owned by the event until [`viw_event_free`].

use std::ffi::c_char;
use std::ptr;

use viworks_core::session::{AgentEvent, HostEvent, SessionEnd, Violation};
use viworks_core::wire::{CloseCode, RejectCode, ResultStatus};

use crate::boundary::catch_value;
use crate::memory::{owned_string, release_string};
use crate::status::{Failure, VIW_ERR_INTERNAL};

/// What a [`viw_event`] reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum viw_event_kind {
    /// Nothing happened: the event queue is empty.
    None = 0,
    /// Agent: the host accepted the HELLO. `heartbeat_interval_ms`, `liveness_timeout_ms`.
    Established = 1,
    /// Agent: the host refused the HELLO and the session is closed. `reject_code`, `text` (the
    /// host's explanation), `retry_after_ms` when `has_retry_after`, `authenticated`.
    Rejected = 2,
    /// Agent: a command to run. `command_id`, `verb`, `timeout_ms`, `attempt`, and `json`, the
    /// whole command body.
    Command = 3,
    /// Host: the agent durably recorded command `command_id`; never send it again.
    Acked = 4,
    /// Host: a command's result. `command_id`, `result_status`, and `json`, the whole result
    /// body. Store it, then acknowledge it.
    Result = 5,
    /// Agent: the host stored these results. `json`, a JSON array of command ids.
    ResultsAcked = 6,
    /// Host: a telemetry batch. `batch_id`, and `json`, the whole telemetry body.
    Telemetry = 7,
    /// Agent: the host stored telemetry batch `batch_id`.
    TelemetryAcked = 8,
    /// Either side: a message was refused. `violation`, and `text`, its stable code name.
    Violation = 9,
    /// Either side: the session ended. `close_code`, `by_peer`; on the host, `json` lists the
    /// commands in flight as `[{"command_id":..,"acked":..,"sent_at_ms":..}]`.
    Closed = 10,
}

/// Why a message was refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum viw_violation {
    /// Not a violation event.
    None = 0,
    /// The tag did not verify: forged, corrupted, or from another session.
    BadMac = 1,
    /// Too large, too short, of another version or not parseable; `text` says which.
    Undecodable = 2,
    /// Not the next sequence number: a replay, or a message lost in between.
    OutOfSequence = 3,
    /// An authentic message of a kind not allowed here.
    UnexpectedKind = 4,
    /// An authentic message whose content breaks a rule.
    Invalid = 5,
}

/// Why the host refused a HELLO.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum viw_reject_code {
    /// Not a refusal.
    None = 0,
    /// The HELLO's version byte is not one the host speaks.
    UnsupportedVersion = 1,
    /// The HELLO could not be parsed or is out of bounds.
    Malformed = 2,
    /// No key is known for the agent id.
    UnknownAgent = 3,
    /// The agent id differs from the identity the transport proved.
    IdentityMismatch = 4,
    /// The HELLO's tag does not verify.
    BadMac = 5,
    /// The HELLO was seen before inside the skew window.
    Replay = 6,
    /// The HELLO's timestamp is outside the skew window.
    Stale = 7,
    /// Another live session holds this agent id.
    DuplicateAgent = 8,
    /// The host is at an admission limit; try again later.
    Overloaded = 9,
    /// A code this version of the library does not know.
    Other = 10,
}

impl From<RejectCode> for viw_reject_code {
    fn from(code: RejectCode) -> Self {
        match code {
            RejectCode::UnsupportedVersion => viw_reject_code::UnsupportedVersion,
            RejectCode::Malformed => viw_reject_code::Malformed,
            RejectCode::UnknownAgent => viw_reject_code::UnknownAgent,
            RejectCode::IdentityMismatch => viw_reject_code::IdentityMismatch,
            RejectCode::BadMac => viw_reject_code::BadMac,
            RejectCode::Replay => viw_reject_code::Replay,
            RejectCode::Stale => viw_reject_code::Stale,
            RejectCode::DuplicateAgent => viw_reject_code::DuplicateAgent,
            RejectCode::Overloaded => viw_reject_code::Overloaded,
            _ => viw_reject_code::Other,
        }
    }
}

/// Why a session ended. The same numbers are accepted by the `_close` functions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum viw_close_code {
    /// Not a close event.
    None = 0,
    /// An orderly end with nothing wrong.
    Normal = 1,
    /// The sender is shutting down or restarting; reconnect later.
    GoingAway = 2,
    /// Nothing was heard from the peer within the liveness timeout.
    LivenessTimeout = 3,
    /// The peer sent something the protocol does not allow.
    ProtocolViolation = 4,
    /// The peer sent too many messages that failed authentication or parsing.
    TooManyViolations = 5,
    /// The agent's enrollment was revoked.
    Revoked = 6,
    /// A code this version of the library does not know.
    Other = 7,
}

impl From<CloseCode> for viw_close_code {
    fn from(code: CloseCode) -> Self {
        match code {
            CloseCode::Normal => viw_close_code::Normal,
            CloseCode::GoingAway => viw_close_code::GoingAway,
            CloseCode::LivenessTimeout => viw_close_code::LivenessTimeout,
            CloseCode::ProtocolViolation => viw_close_code::ProtocolViolation,
            CloseCode::TooManyViolations => viw_close_code::TooManyViolations,
            CloseCode::Revoked => viw_close_code::Revoked,
            _ => viw_close_code::Other,
        }
    }
}

/// The close code numbered `code`, as passed to a `_close` function.
pub(crate) fn close_code_from(code: u32) -> Result<CloseCode, Failure> {
    Ok(match code {
        1 => CloseCode::Normal,
        2 => CloseCode::GoingAway,
        3 => CloseCode::LivenessTimeout,
        4 => CloseCode::ProtocolViolation,
        5 => CloseCode::TooManyViolations,
        6 => CloseCode::Revoked,
        _ => return Err(Failure::invalid(format!("{code} is not a close code (1 to 6)"))),
    })
}

/// How a command ended, as the agent reported it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum viw_result_status {
    /// Not a result event.
    None = 0,
    /// It ran and succeeded.
    Succeeded = 1,
    /// It ran and failed.
    Failed = 2,
    /// It ran past its timeout and was stopped.
    TimedOut = 3,
    /// It was started, then the agent stopped before it finished; it is not run again.
    Interrupted = 4,
    /// It was never run.
    Rejected = 5,
    /// A status this version of the library does not know.
    Other = 6,
}

impl From<ResultStatus> for viw_result_status {
    fn from(status: ResultStatus) -> Self {
        match status {
            ResultStatus::Succeeded => viw_result_status::Succeeded,
            ResultStatus::Failed => viw_result_status::Failed,
            ResultStatus::TimedOut => viw_result_status::TimedOut,
            ResultStatus::Interrupted => viw_result_status::Interrupted,
            ResultStatus::Rejected => viw_result_status::Rejected,
            _ => viw_result_status::Other,
        }
    }
}

/// One thing that happened in a session, filled in by `viw_host_session_poll_event` or
/// `viw_agent_session_poll_event` and released with [`viw_event_free`].
#[repr(C)]
#[derive(Debug)]
pub struct viw_event {
    /// Which fields below mean something.
    pub kind: viw_event_kind,
    /// The command concerned (Command, Acked, Result), or null.
    pub command_id: *mut c_char,
    /// The command's verb (Command), or null.
    pub verb: *mut c_char,
    /// A human-readable text (Rejected) or a violation's code name (Violation), or null.
    pub text: *mut c_char,
    /// A JSON document (see [`viw_event_kind`]), NUL-terminated, or null.
    pub json: *mut c_char,
    /// The length of `json` in bytes, without the NUL.
    pub json_len: usize,
    /// Command: how long the agent lets it run.
    pub timeout_ms: u64,
    /// Command: which delivery attempt this is, from 1.
    pub attempt: u32,
    /// Result: how the command ended.
    pub result_status: viw_result_status,
    /// Telemetry, TelemetryAcked: the batch number.
    pub batch_id: u64,
    /// Established: how often each side sends a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// Established: how long each side waits without hearing anything.
    pub liveness_timeout_ms: u64,
    /// Rejected: why.
    pub reject_code: viw_reject_code,
    /// Rejected: whether the host asked for a delay before reconnecting.
    pub has_retry_after: bool,
    /// Rejected: the delay the host asked for.
    pub retry_after_ms: u64,
    /// Rejected: whether the REJECT was sealed with this agent's key and answers this HELLO;
    /// an unauthenticated REJECT may come from anyone on the path.
    pub authenticated: bool,
    /// Violation: what kind.
    pub violation: viw_violation,
    /// Closed: why.
    pub close_code: viw_close_code,
    /// Closed: whether the peer ended it.
    pub by_peer: bool,
}

impl viw_event {
    /// The empty event: kind None, every pointer null.
    pub(crate) const EMPTY: viw_event = viw_event {
        kind: viw_event_kind::None,
        command_id: ptr::null_mut(),
        verb: ptr::null_mut(),
        text: ptr::null_mut(),
        json: ptr::null_mut(),
        json_len: 0,
        timeout_ms: 0,
        attempt: 0,
        result_status: viw_result_status::None,
        batch_id: 0,
        heartbeat_interval_ms: 0,
        liveness_timeout_ms: 0,
        reject_code: viw_reject_code::None,
        has_retry_after: false,
        retry_after_ms: 0,
        authenticated: false,
        violation: viw_violation::None,
        close_code: viw_close_code::None,
        by_peer: false,
    };

    fn of_kind(kind: viw_event_kind) -> viw_event {
        viw_event { kind, ..viw_event::EMPTY }
    }

    /// Sets one string field to an owned copy of `s`; on failure releases what the event
    /// already owns.
    fn with_string(
        mut self,
        slot: impl FnOnce(&mut viw_event) -> &mut *mut c_char,
        s: &str,
    ) -> Result<viw_event, Failure> {
        match owned_string(s) {
            Ok(owned) => {
                *slot(&mut self) = owned;
                Ok(self)
            }
            Err(failure) => {
                self.release();
                Err(failure)
            }
        }
    }

    fn with_command_id(self, id: &str) -> Result<viw_event, Failure> {
        self.with_string(|e| &mut e.command_id, id)
    }

    fn with_verb(self, verb: &str) -> Result<viw_event, Failure> {
        self.with_string(|e| &mut e.verb, verb)
    }

    fn with_text(self, text: &str) -> Result<viw_event, Failure> {
        self.with_string(|e| &mut e.text, text)
    }

    /// Sets `json` to the JSON of `value`.
    fn with_json(self, value: &impl serde::Serialize) -> Result<viw_event, Failure> {
        match serde_json::to_string(value) {
            Ok(json) => {
                let len = json.len();
                let mut event = self.with_string(|e| &mut e.json, &json)?;
                event.json_len = len;
                Ok(event)
            }
            Err(error) => {
                self.release();
                Err(Failure::new(VIW_ERR_INTERNAL, error.to_string()))
            }
        }
    }

    /// Releases the strings this event owns.
    fn release(self) {
        // SAFETY: every pointer of an event built here is null or came from `owned_string`,
        // and `self` is consumed, so each is released once.
        unsafe {
            release_string(self.command_id);
            release_string(self.verb);
            release_string(self.text);
            release_string(self.json);
        }
    }

    pub(crate) fn from_host(event: &HostEvent) -> Result<viw_event, Failure> {
        match event {
            HostEvent::Acked(id) => viw_event::of_kind(viw_event_kind::Acked).with_command_id(id.as_str()),
            HostEvent::Result(result) => {
                viw_event { result_status: result.status.into(), ..viw_event::of_kind(viw_event_kind::Result) }
                    .with_command_id(result.command_id.as_str())?
                    .with_json(result)
            }
            HostEvent::Telemetry(telemetry) => {
                viw_event { batch_id: telemetry.batch_id, ..viw_event::of_kind(viw_event_kind::Telemetry) }
                    .with_json(telemetry)
            }
            HostEvent::Violation(violation) => violation_event(violation),
            HostEvent::Closed { end, in_flight } => {
                let in_flight: Vec<_> = in_flight
                    .iter()
                    .map(|(id, delivery)| {
                        serde_json::json!({
                            "command_id": id.as_str(),
                            "acked": delivery.acked,
                            "sent_at_ms": delivery.sent_at.as_millis(),
                        })
                    })
                    .collect();
                closed_event(end).with_json(&in_flight)
            }
            _ => Ok(viw_event::EMPTY),
        }
    }

    pub(crate) fn from_agent(event: &AgentEvent) -> Result<viw_event, Failure> {
        match event {
            AgentEvent::Established { timers } => Ok(viw_event {
                heartbeat_interval_ms: millis(timers.heartbeat_interval),
                liveness_timeout_ms: millis(timers.liveness_timeout),
                ..viw_event::of_kind(viw_event_kind::Established)
            }),
            AgentEvent::Rejected { code, message, retry_after, authenticated } => viw_event {
                reject_code: (*code).into(),
                has_retry_after: retry_after.is_some(),
                retry_after_ms: retry_after.map(millis).unwrap_or(0),
                authenticated: *authenticated,
                ..viw_event::of_kind(viw_event_kind::Rejected)
            }
            .with_text(message),
            AgentEvent::Command(command) => viw_event {
                timeout_ms: command.timeout_ms,
                attempt: command.attempt,
                ..viw_event::of_kind(viw_event_kind::Command)
            }
            .with_command_id(command.command_id.as_str())?
            .with_verb(command.verb.as_str())?
            .with_json(command),
            AgentEvent::ResultsAcked(ids) => viw_event::of_kind(viw_event_kind::ResultsAcked).with_json(ids),
            AgentEvent::TelemetryAcked(batch_id) => {
                Ok(viw_event { batch_id: *batch_id, ..viw_event::of_kind(viw_event_kind::TelemetryAcked) })
            }
            AgentEvent::Violation(violation) => violation_event(violation),
            AgentEvent::Closed(end) => Ok(closed_event(end)),
            _ => Ok(viw_event::EMPTY),
        }
    }
}

fn millis(span: std::time::Duration) -> u64 {
    u64::try_from(span.as_millis()).unwrap_or(u64::MAX)
}

fn violation_event(violation: &Violation) -> Result<viw_event, Failure> {
    let kind = match violation {
        Violation::BadMac => viw_violation::BadMac,
        Violation::Undecodable(_) => viw_violation::Undecodable,
        Violation::OutOfSequence { .. } => viw_violation::OutOfSequence,
        Violation::UnexpectedKind(_) => viw_violation::UnexpectedKind,
        _ => viw_violation::Invalid,
    };
    viw_event { violation: kind, ..viw_event::of_kind(viw_event_kind::Violation) }.with_text(violation.code())
}

fn closed_event(end: &SessionEnd) -> viw_event {
    viw_event { close_code: end.code.into(), by_peer: end.by_peer, ..viw_event::of_kind(viw_event_kind::Closed) }
}

/// Releases the strings and JSON an event owns and resets it to kind None, so that a second
/// call is harmless. Null does nothing.
///
/// # Safety
///
/// `event` is null, or points to an event filled in by a `poll_event` function (or reset by
/// this function) whose pointers the caller has not changed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_event_free(event: *mut viw_event) {
    catch_value((), || {
        if event.is_null() || !event.is_aligned() {
            return;
        }
        // SAFETY: `event` is non-null and aligned and, per the contract, was filled in by this
        // library. Only the pointer fields are read, each by raw pointer, so no reference to
        // the enum fields (which the caller may have altered) is made.
        unsafe {
            release_string(ptr::addr_of!((*event).command_id).read());
            release_string(ptr::addr_of!((*event).verb).read());
            release_string(ptr::addr_of!((*event).text).read());
            release_string(ptr::addr_of!((*event).json).read());
            event.write(viw_event::EMPTY);
        }
    })
}
