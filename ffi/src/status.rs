//! Status codes: what every function returns, their stable names, and the thread-local last
//! error message that explains the most recent failure.

use std::cell::RefCell;
use std::ffi::{CString, c_char};

use viworks_core::auth::AuthError;
use viworks_core::session::{SessionError, Violation};
use viworks_core::wire::{IdError, WireError};

use crate::boundary;

/// The result of every call: [`VIW_OK`], or a negative error.
pub type viw_status = i32;

/// Success.
pub const VIW_OK: viw_status = 0;
/// A pointer argument that must not be null was null.
pub const VIW_ERR_NULL_POINTER: viw_status = -1;
/// The caller's buffer is too small; the required length was written to the length output.
pub const VIW_ERR_SHORT_BUFFER: viw_status = -2;
/// A string argument is not valid UTF-8.
pub const VIW_ERR_INVALID_UTF8: viw_status = -3;
/// An argument is out of range: an invalid identifier, configuration, pin or code, or a
/// misaligned output pointer.
pub const VIW_ERR_INVALID_ARGUMENT: viw_status = -4;
/// A message's tag does not verify: forged, corrupted, or sealed under another key.
pub const VIW_ERR_BAD_MAC: viw_status = -5;
/// A message was authentic but out of sequence: a replay, or a message lost in between.
pub const VIW_ERR_REPLAY: viw_status = -6;
/// A message, or JSON passed in, is not of the expected shape.
pub const VIW_ERR_MALFORMED: viw_status = -7;
/// A message is too short to be a protocol message.
pub const VIW_ERR_TOO_SHORT: viw_status = -8;
/// A message exceeds the size limit.
pub const VIW_ERR_TOO_LARGE: viw_status = -9;
/// A message names a protocol version this library does not speak.
pub const VIW_ERR_UNSUPPORTED_VERSION: viw_status = -10;
/// A message names a kind this protocol version does not define.
pub const VIW_ERR_UNKNOWN_KIND: viw_status = -11;
/// An authentic message of a kind not allowed at this point of the session.
pub const VIW_ERR_UNEXPECTED_KIND: viw_status = -12;
/// The session has ended.
pub const VIW_ERR_CLOSED: viw_status = -13;
/// The session's handshake has not finished.
pub const VIW_ERR_NOT_ESTABLISHED: viw_status = -14;
/// The agent already runs as many commands as it advertised; wait for a result.
pub const VIW_ERR_NO_CREDIT: viw_status = -15;
/// The session's transmit queue is full; drain it with `poll_transmit`.
pub const VIW_ERR_TRANSMIT_FULL: viw_status = -16;
/// The host refused a HELLO; the refusal says why and holds the REJECT to send.
pub const VIW_ERR_REFUSED: viw_status = -17;
/// A certificate is not DER X.509.
pub const VIW_ERR_BAD_CERTIFICATE: viw_status = -18;
/// A certificate's key matches neither the primary nor the backup pin.
pub const VIW_ERR_PIN_MISMATCH: viw_status = -19;
/// A bug in this library (a caught panic). The handle involved must only be freed.
pub const VIW_ERR_INTERNAL: viw_status = -99;

/// Why a call failed: the status to return and the message for [`viw_last_error`].
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: viw_status,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(status: viw_status, message: impl Into<String>) -> Self {
        Failure { status, message: message.into() }
    }

    pub(crate) fn null(what: &str) -> Self {
        Failure::new(VIW_ERR_NULL_POINTER, format!("{what} is null"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Failure::new(VIW_ERR_INVALID_ARGUMENT, message)
    }
}

/// The status for a core error code (`AuthError::code`, `WireError::code`, `Violation::code`).
pub(crate) fn status_of_code(code: &str) -> viw_status {
    match code {
        "bad_mac" => VIW_ERR_BAD_MAC,
        "replay_or_gap" => VIW_ERR_REPLAY,
        "too_short" => VIW_ERR_TOO_SHORT,
        "too_large" | "frame_too_large" => VIW_ERR_TOO_LARGE,
        "unsupported_version" => VIW_ERR_UNSUPPORTED_VERSION,
        "unknown_kind" => VIW_ERR_UNKNOWN_KIND,
        "unexpected_kind" => VIW_ERR_UNEXPECTED_KIND,
        "bad_certificate" => VIW_ERR_BAD_CERTIFICATE,
        "pin_mismatch" => VIW_ERR_PIN_MISMATCH,
        "bad_pin" | "bad_key" | "invalid_cache_config" => VIW_ERR_INVALID_ARGUMENT,
        _ => VIW_ERR_MALFORMED,
    }
}

impl From<AuthError> for Failure {
    fn from(error: AuthError) -> Self {
        Failure::new(status_of_code(error.code()), error.to_string())
    }
}

impl From<WireError> for Failure {
    fn from(error: WireError) -> Self {
        Failure::new(status_of_code(error.code()), error.to_string())
    }
}

impl From<IdError> for Failure {
    fn from(error: IdError) -> Self {
        Failure::invalid(error.to_string())
    }
}

impl From<SessionError> for Failure {
    fn from(error: SessionError) -> Self {
        let status = match &error {
            SessionError::Closed => VIW_ERR_CLOSED,
            SessionError::NotEstablished => VIW_ERR_NOT_ESTABLISHED,
            SessionError::NoCredit { .. } => VIW_ERR_NO_CREDIT,
            SessionError::TransmitFull => VIW_ERR_TRANSMIT_FULL,
            SessionError::TooLarge { .. } => VIW_ERR_TOO_LARGE,
            SessionError::Unencodable(_) => VIW_ERR_MALFORMED,
            SessionError::InvalidConfig(_) => VIW_ERR_INVALID_ARGUMENT,
            _ => VIW_ERR_INTERNAL,
        };
        Failure::new(status, error.to_string())
    }
}

/// The failure a session reports for a message it refused.
pub(crate) fn violation_failure(violation: &Violation) -> Failure {
    let message = match violation {
        Violation::OutOfSequence { expected, got } => {
            format!("message refused: expected sequence number {expected}, got {got}")
        }
        Violation::UnexpectedKind(kind) => format!("message refused: unexpected {} message", kind.as_str()),
        Violation::Invalid(why) => format!("message refused: {why}"),
        other => format!("message refused: {}", other.code()),
    };
    Failure::new(status_of_code(violation.code()), message)
}

thread_local! {
    /// The message of the last failed call on this thread: the only mutable state the library
    /// keeps outside the handles it gives out.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

pub(crate) fn set_last_error(message: String) {
    // A message never holds NUL; should one slip in, it is cut there rather than lost.
    let message = match CString::new(message) {
        Ok(message) => message,
        Err(error) => {
            let at = error.nul_position();
            let mut bytes = error.into_vec();
            bytes.truncate(at);
            CString::new(bytes).unwrap_or_default()
        }
    };
    LAST_ERROR.with(|slot| *slot.borrow_mut() = Some(message));
}

pub(crate) fn clear_last_error() {
    LAST_ERROR.with(|slot| *slot.borrow_mut() = None);
}

/// Copies the message of the last failed call on this thread into `buf`, NUL-terminated and
/// cut to `len - 1` bytes if needed, and returns the message's full length (without the NUL),
/// like `snprintf`. Returns 0 when the last call on this thread succeeded. `buf` may be null
/// when `len` is 0, to ask for the length.
///
/// Every function that returns a status clears the message when it starts, so it describes the
/// most recent such call on this thread.
///
/// # Safety
///
/// `buf` is null or valid for writes of `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_last_error(buf: *mut c_char, len: usize) -> usize {
    boundary::catch_value(0, || {
        LAST_ERROR.with(|slot| {
            let slot = slot.borrow();
            let message = slot.as_ref().map(|m| m.as_bytes()).unwrap_or_default();
            if !buf.is_null() && len > 0 {
                let copied = message.len().min(len - 1);
                // SAFETY: the caller guarantees `buf` is valid for `len` bytes, and
                // `copied + 1 <= len`; the source is our own CString, which cannot overlap it.
                unsafe {
                    std::ptr::copy_nonoverlapping(message.as_ptr(), buf.cast::<u8>(), copied);
                    *buf.add(copied) = 0;
                }
            }
            message.len()
        })
    })
}

/// The stable `snake_case` name of `status` (`"ok"`, `"bad_mac"`, `"short_buffer"`, ...), or
/// `"unknown"`. The string is static: never free it. Names of message errors match the
/// `error` field of the shared test vectors.
#[unsafe(no_mangle)]
pub extern "C" fn viw_status_name(status: viw_status) -> *const c_char {
    boundary::catch_value(c"internal".as_ptr(), || status_name(status).as_ptr())
}

fn status_name(status: viw_status) -> &'static std::ffi::CStr {
    match status {
        VIW_OK => c"ok",
        VIW_ERR_NULL_POINTER => c"null_pointer",
        VIW_ERR_SHORT_BUFFER => c"short_buffer",
        VIW_ERR_INVALID_UTF8 => c"invalid_utf8",
        VIW_ERR_INVALID_ARGUMENT => c"invalid_argument",
        VIW_ERR_BAD_MAC => c"bad_mac",
        VIW_ERR_REPLAY => c"replay",
        VIW_ERR_MALFORMED => c"malformed",
        VIW_ERR_TOO_SHORT => c"too_short",
        VIW_ERR_TOO_LARGE => c"too_large",
        VIW_ERR_UNSUPPORTED_VERSION => c"unsupported_version",
        VIW_ERR_UNKNOWN_KIND => c"unknown_kind",
        VIW_ERR_UNEXPECTED_KIND => c"unexpected_kind",
        VIW_ERR_CLOSED => c"closed",
        VIW_ERR_NOT_ESTABLISHED => c"not_established",
        VIW_ERR_NO_CREDIT => c"no_credit",
        VIW_ERR_TRANSMIT_FULL => c"transmit_full",
        VIW_ERR_REFUSED => c"refused",
        VIW_ERR_BAD_CERTIFICATE => c"bad_certificate",
        VIW_ERR_PIN_MISMATCH => c"pin_mismatch",
        VIW_ERR_INTERNAL => c"internal",
        _ => c"unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_core_message_error_has_a_status_of_the_same_name() {
        for code in ["bad_mac", "too_short", "too_large", "unsupported_version", "unknown_kind", "malformed"] {
            assert_eq!(status_name(status_of_code(code)).to_str().expect("ascii"), code);
        }
    }

    #[test]
    fn the_last_error_is_per_thread_and_cleared() {
        set_last_error("boom".into());
        let other = std::thread::spawn(|| LAST_ERROR.with(|slot| slot.borrow().is_none())).join().expect("joins");
        assert!(other, "another thread sees no error");
        let mut buf = [0 as c_char; 3];
        // SAFETY: `buf` is valid for 3 bytes.
        assert_eq!(unsafe { viw_last_error(buf.as_mut_ptr(), buf.len()) }, 4);
        assert_eq!(buf.map(|c| c as u8), *b"bo\0");
        clear_last_error();
        // SAFETY: a null buffer with length 0 asks for the length only.
        assert_eq!(unsafe { viw_last_error(std::ptr::null_mut(), 0) }, 0);
    }
}
