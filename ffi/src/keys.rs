//! Key derivation, and sealing and opening single messages, for callers that handle messages
//! outside a session (test vectors, relays, audit tools).
//!
//! Keys are 32-byte arrays owned by the caller; nothing here allocates for the caller.

use std::ffi::c_char;

use viworks_core::auth::{self, AgentKey, ChannelBinding, DirectionKeys, MacKey, MasterKey};
use viworks_core::wire::{self, AgentId, Limits, Nonce, PROTOCOL_VERSION, TAG_LEN};

use crate::boundary::call;
use crate::memory::{VIW_KEY_LEN, copy_out, input, input_str, input32, optional32, write, write32};
use crate::status::viw_status;

/// The two keys of one phase of a session, one per direction.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct viw_direction_keys {
    /// Authenticates what the agent sends.
    pub agent_to_host: [u8; VIW_KEY_LEN],
    /// Authenticates what the host sends.
    pub host_to_agent: [u8; VIW_KEY_LEN],
}

impl From<DirectionKeys> for viw_direction_keys {
    fn from(keys: DirectionKeys) -> Self {
        viw_direction_keys {
            agent_to_host: *keys.agent_to_host.as_bytes(),
            host_to_agent: *keys.host_to_agent.as_bytes(),
        }
    }
}

/// Writes to `out_agent_key` (32 bytes) the key of agent `agent_id` under `master_key`
/// (32 bytes). Fails with `VIW_ERR_INVALID_ARGUMENT` when `agent_id` is not a valid agent id.
///
/// # Safety
///
/// `master_key` is readable for 32 bytes, `agent_id` for `agent_id_len` bytes, and
/// `out_agent_key` writable for 32 bytes (or any of them is null, which is refused).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_key_derive(
    master_key: *const u8,
    agent_id: *const c_char,
    agent_id_len: usize,
    out_agent_key: *mut u8,
) -> viw_status {
    call("viw_agent_key_derive", || {
        // SAFETY: the caller's contract covers each pointer with its length.
        let master = MasterKey::from_bytes(unsafe { input32(master_key, "master_key") }?);
        // SAFETY: as above.
        let agent_id = AgentId::new(unsafe { input_str(agent_id, agent_id_len, "agent_id") }?)?;
        let key = AgentKey::derive(&master, &agent_id);
        // SAFETY: as above.
        unsafe { write32(out_agent_key, key.as_bytes(), "out_agent_key") }
    })
}

/// Writes to `out` the keys for HELLO (agent to host) and WELCOME or REJECT (host to agent) of
/// the connection identified by `channel_binding` (32 bytes; null for a transport without one).
///
/// # Safety
///
/// `agent_key` is readable for 32 bytes, `channel_binding` is null or readable for 32 bytes,
/// and `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_direction_keys_handshake(
    agent_key: *const u8,
    channel_binding: *const u8,
    out: *mut viw_direction_keys,
) -> viw_status {
    call("viw_direction_keys_handshake", || {
        // SAFETY: the caller's contract covers each pointer.
        let agent_key = AgentKey::from_bytes(unsafe { input32(agent_key, "agent_key") }?);
        // SAFETY: as above.
        let binding =
            unsafe { optional32(channel_binding, "channel_binding") }?.map_or(ChannelBinding::NONE, ChannelBinding);
        let keys = DirectionKeys::handshake(&agent_key, &binding);
        // SAFETY: as above.
        unsafe { write(out, keys.into(), "out") }
    })
}

/// Writes to `out` the keys for everything after the handshake, from the agent key and both
/// sides' HELLO and WELCOME nonces (32 bytes each).
///
/// # Safety
///
/// `agent_key`, `agent_nonce` and `host_nonce` are readable for 32 bytes each, and `out` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_direction_keys_session(
    agent_key: *const u8,
    agent_nonce: *const u8,
    host_nonce: *const u8,
    out: *mut viw_direction_keys,
) -> viw_status {
    call("viw_direction_keys_session", || {
        // SAFETY: the caller's contract covers each pointer.
        let (agent_key, agent_nonce, host_nonce) = unsafe {
            (input32(agent_key, "agent_key")?, input32(agent_nonce, "agent_nonce")?, input32(host_nonce, "host_nonce")?)
        };
        let keys = DirectionKeys::session(&AgentKey::from_bytes(agent_key), &Nonce(agent_nonce), &Nonce(host_nonce));
        // SAFETY: as above.
        unsafe { write(out, keys.into(), "out") }
    })
}

/// Writes to `out_key` (32 bytes) the public key that seals a REJECT when the host cannot know
/// the agent's key. Such a REJECT proves nothing about its sender.
///
/// # Safety
///
/// `out_key` is null or writable for 32 bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_anonymous_reject_key(out_key: *mut u8) -> viw_status {
    // SAFETY: the caller's contract covers `out_key`.
    call("viw_anonymous_reject_key", || unsafe { write32(out_key, MacKey::anonymous_reject().as_bytes(), "out_key") })
}

/// Seals one message: `envelope_json` is the envelope `{"kind","seq","ts","body"}` as UTF-8
/// JSON. The message is checked against the protocol (kind, body fields, identifiers), encoded
/// canonically, prefixed with the version byte and followed by its 32-byte tag under `key`,
/// and copied to `buf`; `*out_len` receives its length.
///
/// Fails with `VIW_ERR_SHORT_BUFFER` (and the required length in `*out_len`) when `cap` is
/// too small, `VIW_ERR_INVALID_UTF8`, `VIW_ERR_MALFORMED` or `VIW_ERR_UNKNOWN_KIND` for bad
/// input.
///
/// # Safety
///
/// `key` is readable for 32 bytes, `envelope_json` for `envelope_json_len` bytes, `buf` is
/// null or writable for `cap` bytes, and `out_len` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_seal(
    key: *const u8,
    envelope_json: *const c_char,
    envelope_json_len: usize,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> viw_status {
    call("viw_seal", || {
        // SAFETY: the caller's contract covers each pointer with its length.
        let key = MacKey::from_bytes(unsafe { input32(key, "key") }?);
        // SAFETY: as above.
        let json = unsafe { input_str(envelope_json, envelope_json_len, "envelope_json") }?;
        let mut unsealed = Vec::with_capacity(1 + json.len());
        unsealed.push(PROTOCOL_VERSION);
        unsealed.extend_from_slice(json.as_bytes());
        let envelope = wire::decode(&unsealed)?;
        let sealed = auth::seal(&key, &envelope)?;
        // SAFETY: as above.
        unsafe { copy_out(&sealed, buf, cap, out_len) }
    })
}

/// Opens one message: checks its size against `max_message_len` (0 for the default of 1 MiB),
/// its version byte and its tag under `key`, and only then parses it. On success copies the
/// envelope JSON exactly as it was sealed (without version byte and tag, not NUL-terminated)
/// to `buf` and its length to `*out_len`.
///
/// Fails with `VIW_ERR_BAD_MAC` when the tag does not verify (nothing was parsed),
/// `VIW_ERR_TOO_SHORT`, `VIW_ERR_TOO_LARGE`, `VIW_ERR_UNSUPPORTED_VERSION`,
/// `VIW_ERR_UNKNOWN_KIND` or `VIW_ERR_MALFORMED` as the shared test vectors name them, and
/// `VIW_ERR_SHORT_BUFFER` with the required length in `*out_len`.
///
/// # Safety
///
/// `key` is readable for 32 bytes, `sealed` for `sealed_len` bytes, `buf` is null or writable
/// for `cap` bytes, and `out_len` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_open(
    key: *const u8,
    sealed: *const u8,
    sealed_len: usize,
    max_message_len: usize,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> viw_status {
    call("viw_open", || {
        // SAFETY: the caller's contract covers each pointer with its length.
        let key = MacKey::from_bytes(unsafe { input32(key, "key") }?);
        // SAFETY: as above.
        let sealed = unsafe { input(sealed, sealed_len, "sealed") }?;
        let limits = if max_message_len == 0 { Limits::default() } else { Limits { max_message_len } };
        let covered = auth::verify(&key, sealed, limits)?;
        // The tag was verified above; from here on the bytes are the peer's.
        wire::decode(covered)?;
        debug_assert_eq!(covered.len() + TAG_LEN, sealed.len());
        // SAFETY: as above.
        unsafe { copy_out(&covered[1..], buf.cast(), cap, out_len) }
    })
}
