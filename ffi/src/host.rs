//! The host side: a [`viw_host`] admits connections by their HELLO and hands out one
//! [`viw_host_session`] per admitted agent.

use std::ffi::c_char;
use std::ptr;
use std::time::Duration;

use viworks_core::auth::{ChannelBinding, MasterKey, SkewWindow};
use viworks_core::session::{Host, HostConfig, HostSession, Timers};
use viworks_core::wire::{AgentId, Command, CommandId, Limits};
use viworks_core::{Entropy, Timestamp};

use crate::boundary::{call, catch_value};
use crate::driver::Driven;
use crate::event::{close_code_from, viw_event, viw_reject_code};
use crate::memory::{
    check_out, copy_out, free_handle, handle, input, input_ref, input_str, input32, optional_str, optional32,
    owned_string, release_string, viw_bytes, write,
};
use crate::status::{Failure, VIW_ERR_MALFORMED, VIW_ERR_REFUSED, viw_status};

/// The host's admission point, shared by all its connections: it holds the HELLO nonce cache
/// and the registry of live agents. Create with [`viw_host_new`], release with
/// [`viw_host_free`].
#[derive(Debug)]
pub struct viw_host(Host);

/// The host's side of one agent's session. Created by [`viw_host_accept`], released with
/// [`viw_host_session_free`]. It does not refer to its host: either may be freed first.
#[derive(Debug)]
pub struct viw_host_session(Driven<HostSession>);

/// The host's admission and session settings. Fill it with [`viw_host_config_default`], then
/// change what differs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct viw_host_config {
    /// Send a heartbeat after this long without sending anything (at least 10).
    pub heartbeat_interval_ms: u64,
    /// End a session after this long without hearing from the agent (at least two
    /// heartbeats).
    pub liveness_timeout_ms: u64,
    /// How far a HELLO's timestamp may be from the host's clock, either way.
    pub skew_window_ms: u64,
    /// HELLO nonces remembered at once; size it for the HELLOs arriving in two windows.
    pub nonce_capacity: usize,
    /// HELLO nonces one agent may hold at once.
    pub nonce_quota_per_agent: usize,
    /// Live sessions admitted at once.
    pub max_sessions: usize,
    /// The largest concurrency an agent may advertise.
    pub max_concurrency: u32,
    /// Refused messages a session tolerates before it closes.
    pub max_violations: u32,
    /// The largest message accepted, version byte and tag included.
    pub max_message_len: usize,
    /// Messages a session queues for sending before it refuses more.
    pub max_transmit: usize,
}

impl From<HostConfig> for viw_host_config {
    fn from(config: HostConfig) -> Self {
        viw_host_config {
            heartbeat_interval_ms: millis(config.timers.heartbeat_interval),
            liveness_timeout_ms: millis(config.timers.liveness_timeout),
            skew_window_ms: millis(config.skew_window.width()),
            nonce_capacity: config.nonce_capacity,
            nonce_quota_per_agent: config.nonce_quota_per_agent,
            max_sessions: config.max_sessions,
            max_concurrency: config.max_concurrency,
            max_violations: config.max_violations,
            max_message_len: config.limits.max_message_len,
            max_transmit: config.max_transmit,
        }
    }
}

impl From<&viw_host_config> for HostConfig {
    fn from(config: &viw_host_config) -> Self {
        HostConfig {
            timers: Timers {
                heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
                liveness_timeout: Duration::from_millis(config.liveness_timeout_ms),
            },
            skew_window: SkewWindow::new(Duration::from_millis(config.skew_window_ms)),
            nonce_capacity: config.nonce_capacity,
            nonce_quota_per_agent: config.nonce_quota_per_agent,
            max_sessions: config.max_sessions,
            max_concurrency: config.max_concurrency,
            max_violations: config.max_violations,
            limits: Limits { max_message_len: config.max_message_len },
            max_transmit: config.max_transmit,
        }
    }
}

fn millis(span: Duration) -> u64 {
    u64::try_from(span.as_millis()).unwrap_or(u64::MAX)
}

/// A refused HELLO: what to audit, and the REJECT to send before closing the connection.
/// Release with [`viw_refusal_free`].
#[repr(C)]
#[derive(Debug)]
pub struct viw_refusal {
    /// Why it was refused.
    pub code: viw_reject_code,
    /// Whether the HELLO's tag verified, so that `claimed_agent` is proven.
    pub authenticated: bool,
    /// The agent id the HELLO claimed (NUL-terminated), or null when it could not be read.
    pub claimed_agent: *mut c_char,
    /// The sealed REJECT to send to the agent.
    pub reply: viw_bytes,
}

impl viw_refusal {
    const EMPTY: viw_refusal = viw_refusal {
        code: viw_reject_code::None,
        authenticated: false,
        claimed_agent: ptr::null_mut(),
        reply: viw_bytes::EMPTY,
    };
}

/// Writes the protocol's default host settings to `*out`: 15 s heartbeats, 45 s liveness,
/// a 60 s skew window, 131,072 nonces, 65,536 sessions, 1 MiB messages.
///
/// # Safety
///
/// `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_config_default(out: *mut viw_host_config) -> viw_status {
    // SAFETY: the caller's contract covers `out`.
    call("viw_host_config_default", || unsafe { write(out, HostConfig::default().into(), "out") })
}

/// Creates a host started at `now_ms` with `config`, deriving agent keys from `master_key`
/// (32 bytes) and drawing session nonces from a stream seeded by `seed` (32 bytes, from the
/// operating system's generator). HELLOs stamped before `now_ms` are refused as stale.
///
/// Fails with `VIW_ERR_INVALID_ARGUMENT` for a configuration whose bounds are zero or
/// inconsistent. `*out` is set to null on failure.
///
/// # Safety
///
/// `config` is null or readable, `master_key` and `seed` are readable for 32 bytes each, and
/// `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_new(
    config: *const viw_host_config,
    master_key: *const u8,
    seed: *const u8,
    now_ms: u64,
    out: *mut *mut viw_host,
) -> viw_status {
    call("viw_host_new", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { write(out, ptr::null_mut(), "out") }?;
        // SAFETY: as above.
        let config = HostConfig::from(unsafe { input_ref(config, "config") }?);
        // SAFETY: as above.
        let master = MasterKey::from_bytes(unsafe { input32(master_key, "master_key") }?);
        // SAFETY: as above.
        let entropy = Entropy::from_seed(unsafe { input32(seed, "seed") }?);
        let host = Host::new(config, Box::new(master), entropy, Timestamp::from_millis(now_ms))?;
        // SAFETY: as above.
        unsafe { write(out, Box::into_raw(Box::new(viw_host(host))), "out") }
    })
}

/// Handles the first message of a connection, `hello`, at `now_ms`.
///
/// `transport_identity` is the agent id the transport proved (the client certificate's), or
/// null when there is none; a HELLO claiming another id is refused. `channel_binding` is the
/// connection's 32-byte channel binding, or null for a transport without one.
///
/// On success writes a new session to `*out_session` (its first transmit is the WELCOME) and
/// an empty refusal to `*out_refusal`. When the HELLO is refused, returns `VIW_ERR_REFUSED`,
/// writes null to `*out_session` and fills `*out_refusal`: send its `reply`, close the
/// connection, and release it with [`viw_refusal_free`].
///
/// # Safety
///
/// `host` is null or a live host used by no other thread during the call; `hello` is readable
/// for `hello_len` bytes, `transport_identity` is null or readable for
/// `transport_identity_len` bytes, `channel_binding` is null or readable for 32 bytes, and the
/// two outputs are null or writable.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn viw_host_accept(
    host: *mut viw_host,
    now_ms: u64,
    hello: *const u8,
    hello_len: usize,
    transport_identity: *const c_char,
    transport_identity_len: usize,
    channel_binding: *const u8,
    out_session: *mut *mut viw_host_session,
    out_refusal: *mut viw_refusal,
) -> viw_status {
    call("viw_host_accept", || {
        check_out(out_session, "out_session")?;
        check_out(out_refusal, "out_refusal")?;
        // SAFETY: the caller's contract covers each output pointer.
        unsafe {
            write(out_session, ptr::null_mut(), "out_session")?;
            write(out_refusal, viw_refusal::EMPTY, "out_refusal")?;
        }
        // SAFETY: the caller's contract covers each pointer with its length.
        let host = unsafe { handle(host, "host") }?;
        // SAFETY: as above.
        let hello = unsafe { input(hello, hello_len, "hello") }?;
        // SAFETY: as above.
        let identity = unsafe { optional_str(transport_identity, transport_identity_len, "transport_identity") }?
            .map(AgentId::new)
            .transpose()?;
        // SAFETY: as above.
        let binding =
            unsafe { optional32(channel_binding, "channel_binding") }?.map_or(ChannelBinding::NONE, ChannelBinding);
        match host.0.accept(Timestamp::from_millis(now_ms), hello, identity.as_ref(), &binding) {
            Ok(session) => {
                let session = Box::into_raw(Box::new(viw_host_session(Driven::new(session))));
                // SAFETY: as above.
                unsafe { write(out_session, session, "out_session") }
            }
            Err(refusal) => {
                let claimed_agent = match &refusal.claimed_agent {
                    Some(agent) => owned_string(agent.as_str())?,
                    None => ptr::null_mut(),
                };
                let out = viw_refusal {
                    code: refusal.code.into(),
                    authenticated: refusal.authenticated,
                    claimed_agent,
                    reply: viw_bytes::from_vec(refusal.reply),
                };
                // SAFETY: as above.
                unsafe { write(out_refusal, out, "out_refusal") }?;
                Err(Failure::new(VIW_ERR_REFUSED, format!("HELLO refused: {:?}", refusal.code)))
            }
        }
    })
}

/// Writes to `*out_count` how many sessions this host admitted that have not ended.
///
/// # Safety
///
/// `host` is null or a live host used by no other thread during the call; `out_count` is null
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_live_sessions(host: *mut viw_host, out_count: *mut usize) -> viw_status {
    call("viw_host_live_sessions", || {
        // SAFETY: the caller's contract covers both pointers.
        let host = unsafe { handle(host, "host") }?;
        // SAFETY: as above.
        unsafe { write(out_count, host.0.live_sessions(), "out_count") }
    })
}

/// Releases a host. Sessions it admitted stay usable. Null does nothing.
///
/// # Safety
///
/// `host` is null or was returned by [`viw_host_new`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_free(host: *mut viw_host) {
    catch_value((), || free_handle(host));
}

/// Releases the claimed agent id and the reply a refusal owns and resets it, so that a second
/// call is harmless. Null does nothing.
///
/// # Safety
///
/// `refusal` is null or was filled in by [`viw_host_accept`] and its pointers not changed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_refusal_free(refusal: *mut viw_refusal) {
    catch_value((), || {
        if refusal.is_null() || !refusal.is_aligned() {
            return;
        }
        // SAFETY: non-null and aligned, and per the contract filled in by `viw_host_accept`;
        // only the pointer fields are read, by raw pointer, never the enum.
        unsafe {
            release_string(ptr::addr_of!((*refusal).claimed_agent).read());
            let reply = ptr::addr_of!((*refusal).reply).read();
            viw_bytes::release(reply.data, reply.len);
            refusal.write(viw_refusal::EMPTY);
        }
    })
}

/// # Safety
///
/// `session` is null or a live session used by no other thread during `'a`.
unsafe fn session<'a>(session: *mut viw_host_session) -> Result<&'a mut Driven<HostSession>, Failure> {
    // SAFETY: forwarded contract.
    unsafe { handle(session, "session") }.map(|s| &mut s.0)
}

/// Handles one message from the agent at `now_ms`. Returns `VIW_OK` when it was accepted;
/// when it was refused returns why (`VIW_ERR_BAD_MAC` for a forged or corrupted message,
/// `VIW_ERR_REPLAY` for a replayed one, `VIW_ERR_MALFORMED`, ...) and also queues a Violation
/// event. Refusals are counted and too many close the session. `VIW_ERR_CLOSED` once closed.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `bytes`
/// is readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_handle_message(
    session: *mut viw_host_session,
    now_ms: u64,
    bytes: *const u8,
    len: usize,
) -> viw_status {
    call("viw_host_session_handle_message", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, bytes) = unsafe { (self::session(session)?, input(bytes, len, "bytes")?) };
        session.handle_message(Timestamp::from_millis(now_ms), bytes)
    })
}

/// Sends heartbeats when due and ends the session when the agent has been silent past the
/// liveness timeout. Call it at the time [`viw_host_session_poll_timeout`] gave.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_handle_timeout(session: *mut viw_host_session, now_ms: u64) -> viw_status {
    call("viw_host_session_handle_timeout", || {
        // SAFETY: the caller's contract covers `session`.
        unsafe { self::session(session) }?.handle_timeout(Timestamp::from_millis(now_ms));
        Ok(())
    })
}

/// Copies the next message to send into `buf` and its length into `*out_len`; `*out_len` is 0
/// when there is nothing to send. When the message does not fit, returns
/// `VIW_ERR_SHORT_BUFFER` with the required length in `*out_len` and keeps the message for
/// the next call. Messages are at most the configured `max_message_len`.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, `buf` is null
/// or writable for `cap` bytes, and `out_len` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_poll_transmit(
    session: *mut viw_host_session,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> viw_status {
    call("viw_host_session_poll_transmit", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_transmit_into(buf, cap, out_len) }
    })
}

/// Hands the next message to send over as library-owned bytes in `*out` (empty when there is
/// nothing to send). Release them with [`viw_bytes_free`](crate::viw_bytes_free).
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `out` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_poll_transmit_owned(
    session: *mut viw_host_session,
    out: *mut viw_bytes,
) -> viw_status {
    call("viw_host_session_poll_transmit_owned", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_transmit_owned(out) }
    })
}

/// Fills `*out` with the next event (kind `VIW_EVENT_KIND_NONE` when there is none), without
/// reading what `*out` held. Release each event with [`viw_event_free`](crate::viw_event_free)
/// before polling into it again.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `out` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_poll_event(
    session: *mut viw_host_session,
    out: *mut viw_event,
) -> viw_status {
    call("viw_host_session_poll_event", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_event(out) }
    })
}

/// Writes when to call [`viw_host_session_handle_timeout`] next to `*out_at_ms`, and whether
/// there is such a time (false once closed) to `*out_has`.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and the
/// outputs are null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_poll_timeout(
    session: *mut viw_host_session,
    out_has: *mut bool,
    out_at_ms: *mut u64,
) -> viw_status {
    call("viw_host_session_poll_timeout", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_timeout(out_has, out_at_ms) }
    })
}

/// Sends a command: `command_json` is the command body as UTF-8 JSON,
/// `{"command_id":..,"verb":..,"args":{..},"timeout_ms":..,"attempt":..}`. Takes one credit.
///
/// Fails with `VIW_ERR_INVALID_UTF8` or `VIW_ERR_MALFORMED` for bad input,
/// `VIW_ERR_NO_CREDIT` when the agent already runs as many commands as it advertised,
/// `VIW_ERR_TRANSMIT_FULL` when the transmit queue is full, `VIW_ERR_CLOSED` once closed.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `command_json` is readable for `command_json_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_send_command(
    session: *mut viw_host_session,
    now_ms: u64,
    command_json: *const c_char,
    command_json_len: usize,
) -> viw_status {
    call("viw_host_session_send_command", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, json) =
            unsafe { (self::session(session)?, input_str(command_json, command_json_len, "command_json")?) };
        let command: Command = parse_body(json, "command")?;
        session.session.send_command(Timestamp::from_millis(now_ms), command)?;
        Ok(())
    })
}

/// Parses a message body given as JSON; it must be an object.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T, Failure> {
    if !json.trim_start().starts_with('{') {
        return Err(Failure::new(VIW_ERR_MALFORMED, format!("the {what} must be a JSON object")));
    }
    serde_json::from_str(json).map_err(|e| Failure::new(VIW_ERR_MALFORMED, format!("the {what} is malformed: {e}")))
}

/// Acknowledges the result of `command_id`, which the caller has stored durably, so the agent
/// can forget it. Fails with `VIW_ERR_CLOSED` once closed.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `command_id` is readable for `command_id_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_ack_result(
    session: *mut viw_host_session,
    now_ms: u64,
    command_id: *const c_char,
    command_id_len: usize,
) -> viw_status {
    call("viw_host_session_ack_result", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, id) = unsafe { (self::session(session)?, input_str(command_id, command_id_len, "command_id")?) };
        let id = CommandId::new(id)?;
        session.session.ack_results(Timestamp::from_millis(now_ms), &[id])?;
        Ok(())
    })
}

/// Acknowledges telemetry batch `batch_id`, which the caller has stored durably.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_ack_telemetry(
    session: *mut viw_host_session,
    now_ms: u64,
    batch_id: u64,
) -> viw_status {
    call("viw_host_session_ack_telemetry", || {
        // SAFETY: the caller's contract covers `session`.
        let session = unsafe { self::session(session) }?;
        session.session.ack_telemetry(Timestamp::from_millis(now_ms), batch_id)?;
        Ok(())
    })
}

/// Ends the session with `close_code` (a [`viw_close_code`](crate::viw_close_code) number, 1 to 6) and the
/// human-readable `reason` (UTF-8, cut to 1024 bytes), queueing a CLOSE to send. Does nothing
/// once closed.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `reason`
/// is readable for `reason_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_close(
    session: *mut viw_host_session,
    now_ms: u64,
    close_code: u32,
    reason: *const c_char,
    reason_len: usize,
) -> viw_status {
    call("viw_host_session_close", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, reason) = unsafe { (self::session(session)?, input_str(reason, reason_len, "reason")?) };
        let code = close_code_from(close_code)?;
        session.session.close(Timestamp::from_millis(now_ms), code, reason);
        session.take_events();
        Ok(())
    })
}

/// The transport ended without a CLOSE: ends the session as if the agent had gone away.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_connection_lost(session: *mut viw_host_session) -> viw_status {
    call("viw_host_session_connection_lost", || {
        // SAFETY: the caller's contract covers `session`.
        let session = unsafe { self::session(session) }?;
        session.session.connection_lost();
        session.take_events();
        Ok(())
    })
}

/// Copies the agent's id, proven by its HELLO, into `buf` (not NUL-terminated) and its length
/// into `*out_len`; `VIW_ERR_SHORT_BUFFER` with the required length when it does not fit.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, `buf` is null
/// or writable for `cap` bytes, and `out_len` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_agent_id(
    session: *mut viw_host_session,
    buf: *mut c_char,
    cap: usize,
    out_len: *mut usize,
) -> viw_status {
    call("viw_host_session_agent_id", || {
        // SAFETY: the caller's contract covers each pointer.
        let session = unsafe { self::session(session) }?;
        // SAFETY: as above.
        unsafe { copy_out(session.session.agent_id().as_str().as_bytes(), buf.cast(), cap, out_len) }
    })
}

/// Writes to `*out_closed` whether the session has ended. Drain transmit and events, then free
/// it.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `out_closed` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_is_closed(
    session: *mut viw_host_session,
    out_closed: *mut bool,
) -> viw_status {
    call("viw_host_session_is_closed", || {
        // SAFETY: the caller's contract covers each pointer.
        let session = unsafe { self::session(session) }?;
        // SAFETY: as above.
        unsafe { write(out_closed, session.session.is_closed(), "out_closed") }
    })
}

/// Releases a session; if it had not ended, its agent no longer counts as live. Null does
/// nothing.
///
/// # Safety
///
/// `session` is null or was returned by [`viw_host_accept`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_host_session_free(session: *mut viw_host_session) {
    catch_value((), || free_handle(session));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_round_trips_through_its_c_form() {
        let config = HostConfig::default();
        assert_eq!(HostConfig::from(&viw_host_config::from(config)), config);
    }

    #[test]
    fn handles_may_move_between_threads() {
        fn send<T: Send>() {}
        send::<viw_host>();
        send::<viw_host_session>();
        send::<crate::viw_agent_session>();
        send::<crate::viw_nonce_cache>();
    }
}
