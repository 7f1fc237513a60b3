//! Memory crossing the boundary: checked views of the caller's pointers, copies into the
//! caller's buffers, and buffers the library owns until their `_free`.

use std::ffi::{CString, c_char};
use std::ptr;

use crate::boundary;
use crate::status::{Failure, VIW_ERR_INTERNAL, VIW_ERR_INVALID_UTF8, VIW_ERR_SHORT_BUFFER};

/// Length of every key, nonce, seed, channel binding and pin: 32 bytes.
pub const VIW_KEY_LEN: usize = 32;

/// Bytes owned by the library, handed to the caller. Release them with [`viw_bytes_free`],
/// never with `free()`.
#[repr(C)]
#[derive(Debug)]
pub struct viw_bytes {
    /// The first byte, or null when empty.
    pub data: *mut u8,
    /// How many bytes.
    pub len: usize,
}

impl viw_bytes {
    pub(crate) const EMPTY: viw_bytes = viw_bytes { data: ptr::null_mut(), len: 0 };

    pub(crate) fn from_vec(bytes: Vec<u8>) -> viw_bytes {
        if bytes.is_empty() {
            return viw_bytes::EMPTY;
        }
        let len = bytes.len();
        let data = Box::into_raw(bytes.into_boxed_slice()).cast::<u8>();
        viw_bytes { data, len }
    }

    /// Releases bytes made by [`viw_bytes::from_vec`].
    ///
    /// # Safety
    ///
    /// `data` and `len` are null and 0, or exactly as `from_vec` returned them and not yet
    /// released.
    pub(crate) unsafe fn release(data: *mut u8, len: usize) {
        if !data.is_null() {
            // SAFETY: per the contract, `data` and `len` describe a boxed slice made by
            // `from_vec` that nobody has released.
            drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(data, len)) });
        }
    }
}

/// A string passed in by the caller: `len` bytes of UTF-8 at `data`, not NUL-terminated.
/// `data` may be null only when `len` is 0, meaning the empty string or "not given".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct viw_str {
    /// The first byte.
    pub data: *const c_char,
    /// How many bytes.
    pub len: usize,
}

/// Releases bytes the library handed out and resets `bytes` to empty, so that a second call is
/// harmless. Does nothing when `bytes` is null.
///
/// # Safety
///
/// `bytes` is null or points to a `viw_bytes` that the library filled in (or that is empty).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_bytes_free(bytes: *mut viw_bytes) {
    boundary::catch_value((), || {
        if bytes.is_null() || !bytes.is_aligned() {
            return;
        }
        // SAFETY: `bytes` is non-null and aligned, and the caller guarantees it points to a
        // `viw_bytes` the library filled in; the fields are plain data, read by value.
        unsafe {
            let owned = bytes.read();
            viw_bytes::release(owned.data, owned.len);
            bytes.write(viw_bytes::EMPTY);
        }
    })
}

/// `len` bytes at `data`. `data` must be non-null, even for an empty input.
///
/// # Safety
///
/// `data` is null or valid for reads of `len` bytes for `'a`.
pub(crate) unsafe fn input<'a>(data: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if data.is_null() {
        return Err(Failure::null(what));
    }
    if len > isize::MAX as usize {
        return Err(Failure::invalid(format!("{what}: length {len} is out of range")));
    }
    // SAFETY: non-null, in range, and valid for `len` bytes per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// `len` bytes of UTF-8 at `data`.
///
/// # Safety
///
/// As [`input`].
pub(crate) unsafe fn input_str<'a>(data: *const c_char, len: usize, what: &str) -> Result<&'a str, Failure> {
    // SAFETY: forwarded contract.
    let bytes = unsafe { input(data.cast(), len, what) }?;
    std::str::from_utf8(bytes)
        .map_err(|e| Failure::new(VIW_ERR_INVALID_UTF8, format!("{what} is not UTF-8 (at byte {})", e.valid_up_to())))
}

/// An optional string: `None` when `data` is null.
///
/// # Safety
///
/// As [`input`].
pub(crate) unsafe fn optional_str<'a>(data: *const c_char, len: usize, what: &str) -> Result<Option<&'a str>, Failure> {
    if data.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { input_str(data, len, what) }.map(Some)
}

/// A [`viw_str`] field of a configuration: empty when its pointer is null and its length 0.
///
/// # Safety
///
/// `s.data` is null or valid for reads of `s.len` bytes for `'a`.
pub(crate) unsafe fn config_str<'a>(s: viw_str, what: &str) -> Result<&'a str, Failure> {
    if s.data.is_null() && s.len == 0 {
        return Ok("");
    }
    // SAFETY: forwarded contract.
    unsafe { input_str(s.data, s.len, what) }
}

/// The 32 bytes at `data`.
///
/// # Safety
///
/// `data` is null or valid for reads of 32 bytes.
pub(crate) unsafe fn input32(data: *const u8, what: &str) -> Result<[u8; VIW_KEY_LEN], Failure> {
    // SAFETY: forwarded contract.
    let bytes = unsafe { input(data, VIW_KEY_LEN, what) }?;
    let mut out = [0u8; VIW_KEY_LEN];
    out.copy_from_slice(bytes);
    Ok(out)
}

/// The 32 bytes at `data`, or `None` when it is null.
///
/// # Safety
///
/// As [`input32`].
pub(crate) unsafe fn optional32(data: *const u8, what: &str) -> Result<Option<[u8; VIW_KEY_LEN]>, Failure> {
    if data.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    unsafe { input32(data, what) }.map(Some)
}

/// A reference to the caller's `T`, after null and alignment checks.
///
/// # Safety
///
/// `ptr` is null or points to a valid `T` that nothing else accesses during `'a`.
pub(crate) unsafe fn handle<'a, T>(ptr: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    check_out(ptr, what)?;
    // SAFETY: checked non-null and aligned; validity and exclusivity per the caller's contract.
    Ok(unsafe { &mut *ptr })
}

/// A reference to the caller's read-only `T`.
///
/// # Safety
///
/// `ptr` is null or points to a valid `T` for `'a`.
pub(crate) unsafe fn input_ref<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, Failure> {
    check_out(ptr.cast_mut(), what)?;
    // SAFETY: checked non-null and aligned; validity per the caller's contract.
    Ok(unsafe { &*ptr })
}

/// Fails unless `ptr` is non-null and aligned for `T`.
pub(crate) fn check_out<T>(ptr: *mut T, what: &str) -> Result<(), Failure> {
    if ptr.is_null() {
        return Err(Failure::null(what));
    }
    if !ptr.is_aligned() {
        return Err(Failure::invalid(format!("{what} is not aligned")));
    }
    Ok(())
}

/// Writes `value` to the caller's `*out` without reading what was there.
///
/// # Safety
///
/// `out` is null or valid for writes of a `T`.
pub(crate) unsafe fn write<T>(out: *mut T, value: T, what: &str) -> Result<(), Failure> {
    check_out(out, what)?;
    // SAFETY: checked non-null and aligned; writable per the caller's contract. `write` does
    // not read or drop the old contents, which may be uninitialised.
    unsafe { out.write(value) };
    Ok(())
}

/// Writes 32 bytes to the caller's `out`.
///
/// # Safety
///
/// `out` is null or valid for writes of 32 bytes.
pub(crate) unsafe fn write32(out: *mut u8, value: &[u8; VIW_KEY_LEN], what: &str) -> Result<(), Failure> {
    if out.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: non-null and writable for 32 bytes per the caller's contract; `value` is ours.
    unsafe { ptr::copy_nonoverlapping(value.as_ptr(), out, VIW_KEY_LEN) };
    Ok(())
}

/// Copies `bytes` into the caller's buffer `buf` of `cap` bytes and writes the length to
/// `*out_len`. When they do not fit, writes the required length and fails with
/// [`VIW_ERR_SHORT_BUFFER`]; `buf` may be null when `cap` is 0, to ask for the length.
///
/// # Safety
///
/// `buf` is null or valid for writes of `cap` bytes; `out_len` is null or valid for a write.
pub(crate) unsafe fn copy_out(bytes: &[u8], buf: *mut u8, cap: usize, out_len: *mut usize) -> Result<(), Failure> {
    // SAFETY: forwarded contract.
    unsafe { write(out_len, bytes.len(), "out_len") }?;
    if bytes.is_empty() {
        return Ok(());
    }
    if bytes.len() > cap {
        return Err(Failure::new(
            VIW_ERR_SHORT_BUFFER,
            format!("the buffer holds {cap} bytes, {} are needed", bytes.len()),
        ));
    }
    if buf.is_null() {
        return Err(Failure::null("buf"));
    }
    // SAFETY: `buf` is non-null and writable for `cap >= bytes.len()` bytes per the caller's
    // contract; `bytes` is the library's own memory, so they cannot overlap.
    unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
    Ok(())
}

/// A NUL-terminated copy of `s` owned by the library, released with [`release_string`].
pub(crate) fn owned_string(s: &str) -> Result<*mut c_char, Failure> {
    CString::new(s)
        .map(CString::into_raw)
        .map_err(|_| Failure::new(VIW_ERR_INTERNAL, "a string handed out holds a NUL byte"))
}

/// Releases a string made by [`owned_string`]; null is allowed.
///
/// # Safety
///
/// `s` is null or was returned by `owned_string` and not released since.
pub(crate) unsafe fn release_string(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: per the contract, `s` came from `CString::into_raw` and is released once.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Releases a handle made with `Box::into_raw`; null does nothing, a misaligned pointer is
/// ignored rather than freed (it cannot be one of ours).
pub(crate) fn free_handle<T>(ptr: *mut T) {
    if !ptr.is_null() && ptr.is_aligned() {
        // SAFETY: every `_free` documents that its argument came from the matching `_new` (a
        // `Box::into_raw`) and is not used afterwards.
        drop(unsafe { Box::from_raw(ptr) });
    }
}
