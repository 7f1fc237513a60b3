//! SPKI pins: the SHA-256 of a certificate's SubjectPublicKeyInfo, and matching a server
//! certificate against a primary and a backup pin.

use std::ffi::c_char;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use viworks_core::auth::{PinMatch, PinSet, SpkiPin};

use crate::boundary::call;
use crate::memory::{copy_out, input, input_str, input32, optional32, write, write32};
use crate::status::{Failure, viw_status};

/// Which configured pin a certificate matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum viw_pin_match {
    /// The primary pin: the normal case.
    Primary = 0,
    /// The backup pin: a key rotation is under way, and operators should be told.
    Backup = 1,
}

/// Writes to `out_pin` (32 bytes) the SPKI pin of the DER-encoded X.509 certificate `der`.
/// Fails with `VIW_ERR_BAD_CERTIFICATE` when `der` is not one.
///
/// # Safety
///
/// `der` is readable for `der_len` bytes and `out_pin` is null or writable for 32 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_spki_pin_of_certificate(der: *const u8, der_len: usize, out_pin: *mut u8) -> viw_status {
    call("viw_spki_pin_of_certificate", || {
        // SAFETY: the caller's contract covers both pointers.
        let pin = SpkiPin::of_certificate_der(unsafe { input(der, der_len, "der") }?)?;
        // SAFETY: as above.
        unsafe { write32(out_pin, pin.as_bytes(), "out_pin") }
    })
}

/// Parses a pin written as base64 of 32 bytes, optionally prefixed with `sha256/` (the form
/// in configuration files), into `out_pin` (32 bytes). Fails with `VIW_ERR_INVALID_ARGUMENT`.
///
/// # Safety
///
/// `text` is readable for `text_len` bytes and `out_pin` is null or writable for 32 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_spki_pin_parse(text: *const c_char, text_len: usize, out_pin: *mut u8) -> viw_status {
    call("viw_spki_pin_parse", || {
        // SAFETY: the caller's contract covers both pointers.
        let pin: SpkiPin = unsafe { input_str(text, text_len, "text") }?.parse()?;
        // SAFETY: as above.
        unsafe { write32(out_pin, pin.as_bytes(), "out_pin") }
    })
}

/// Writes the pin (32 bytes) as standard base64 (44 characters, not NUL-terminated) to `buf`
/// and its length to `*out_len`.
///
/// # Safety
///
/// `pin` is readable for 32 bytes, `buf` is null or writable for `cap` bytes, and `out_len` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_spki_pin_to_base64(
    pin: *const u8,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> viw_status {
    call("viw_spki_pin_to_base64", || {
        // SAFETY: the caller's contract covers each pointer.
        let pin = unsafe { input32(pin, "pin") }?;
        let encoded = STANDARD.encode(pin);
        // SAFETY: as above.
        unsafe { copy_out(encoded.as_bytes(), buf.cast(), cap, out_len) }
    })
}

/// Checks the DER certificate `der` against `primary_pin` and, during a key rotation,
/// `backup_pin` (null when there is none), each 32 bytes, and writes which matched to
/// `*out_match`. Fails with `VIW_ERR_PIN_MISMATCH` when neither does and
/// `VIW_ERR_BAD_CERTIFICATE` when `der` is not a certificate.
///
/// # Safety
///
/// `primary_pin` is readable for 32 bytes, `backup_pin` is null or readable for 32 bytes,
/// `der` is readable for `der_len` bytes, and `out_match` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_pin_set_check_certificate(
    primary_pin: *const u8,
    backup_pin: *const u8,
    der: *const u8,
    der_len: usize,
    out_match: *mut viw_pin_match,
) -> viw_status {
    call("viw_pin_set_check_certificate", || {
        // SAFETY: the caller's contract covers each pointer with its length.
        let (primary, backup, der) = unsafe {
            (input32(primary_pin, "primary_pin")?, optional32(backup_pin, "backup_pin")?, input(der, der_len, "der")?)
        };
        crate::memory::check_out(out_match, "out_match")?;
        let set = PinSet { primary: pin_of(primary)?, backup: backup.map(pin_of).transpose()? };
        let matched = match set.check_certificate_der(der)? {
            PinMatch::Primary => viw_pin_match::Primary,
            PinMatch::Backup => viw_pin_match::Backup,
        };
        // SAFETY: as above.
        unsafe { write(out_match, matched, "out_match") }
    })
}

/// The pin whose digest is `bytes`. The core builds pins from certificates or from their text
/// form only, so the bytes go through the text form.
fn pin_of(bytes: [u8; 32]) -> Result<SpkiPin, Failure> {
    Ok(STANDARD.encode(bytes).parse::<SpkiPin>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_through_their_bytes() {
        for spki in [&b"a"[..], b"key", b""] {
            let pin = SpkiPin::of_spki_der(spki);
            assert_eq!(pin_of(*pin.as_bytes()).expect("valid"), pin);
        }
    }
}
