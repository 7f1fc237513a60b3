//! The agent side of one connection: [`viw_agent_session`] sends the HELLO, then takes
//! commands in and sends acknowledgements, results and telemetry out.

use std::ffi::c_char;
use std::ptr;
use std::time::Duration;

use viworks_core::auth::{AgentKey, ChannelBinding};
use viworks_core::session::{AgentConfig, AgentSession};
use viworks_core::wire::{AgentId, Capability, CommandId, CommandResult, Limits, Telemetry, Text};
use viworks_core::{Entropy, Timestamp};

use crate::boundary::{call, catch_value};
use crate::driver::Driven;
use crate::event::{close_code_from, viw_event};
use crate::host::parse_body;
use crate::memory::{
    VIW_KEY_LEN, config_str, free_handle, handle, input, input_ref, input_str, input32, optional32, viw_bytes, viw_str,
    write,
};
use crate::status::{Failure, VIW_ERR_MALFORMED, viw_status};

/// The agent's side of one connection. Create with [`viw_agent_session_new`], release with
/// [`viw_agent_session_free`].
#[derive(Debug)]
pub struct viw_agent_session(Driven<AgentSession>);

/// Who the agent is and what it announces in its HELLO. Fill it with
/// [`viw_agent_config_default`], then set at least `agent_id` and `agent_key`. The strings are
/// read during [`viw_agent_session_new`] only.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct viw_agent_config {
    /// The agent's identity, as in its client certificate.
    pub agent_id: viw_str,
    /// The key it received at enrollment.
    pub agent_key: [u8; VIW_KEY_LEN],
    /// Its site; may be empty.
    pub site: viw_str,
    /// The machine's host name; may be empty.
    pub hostname: viw_str,
    /// The agent software's version; empty for this library's version.
    pub version: viw_str,
    /// What it can run, as a JSON array of names such as `["docker","scripts"]`; empty for
    /// none.
    pub capabilities_json: viw_str,
    /// How many commands it runs at once (at least 1).
    pub max_concurrency: u32,
    /// Refused messages tolerated before the session closes.
    pub max_violations: u32,
    /// The largest message accepted, version byte and tag included.
    pub max_message_len: usize,
    /// Messages queued for sending before more are refused.
    pub max_transmit: usize,
    /// How long to wait for the WELCOME.
    pub handshake_timeout_ms: u64,
}

/// Writes the protocol's default agent settings to `*out`, with empty strings and a zero key.
///
/// # Safety
///
/// `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_config_default(out: *mut viw_agent_config) -> viw_status {
    call("viw_agent_config_default", || {
        let defaults = AgentConfig::new(AgentId::new("a")?, AgentKey::from_bytes([0; 32]));
        let empty = viw_str { data: ptr::null(), len: 0 };
        let config = viw_agent_config {
            agent_id: empty,
            agent_key: [0; VIW_KEY_LEN],
            site: empty,
            hostname: empty,
            version: empty,
            capabilities_json: empty,
            max_concurrency: defaults.max_concurrency,
            max_violations: defaults.max_violations,
            max_message_len: defaults.limits.max_message_len,
            max_transmit: defaults.max_transmit,
            handshake_timeout_ms: u64::try_from(defaults.handshake_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        // SAFETY: the caller's contract covers `out`.
        unsafe { write(out, config, "out") }
    })
}

/// # Safety
///
/// Every `viw_str` in `c` is null with length 0 or readable for its length.
unsafe fn agent_config(c: &viw_agent_config) -> Result<AgentConfig, Failure> {
    // SAFETY: forwarded contract.
    let (agent_id, site, hostname, version, capabilities) = unsafe {
        (
            config_str(c.agent_id, "agent_id")?,
            config_str(c.site, "site")?,
            config_str(c.hostname, "hostname")?,
            config_str(c.version, "version")?,
            config_str(c.capabilities_json, "capabilities_json")?,
        )
    };
    let mut config = AgentConfig::new(AgentId::new(agent_id)?, AgentKey::from_bytes(c.agent_key));
    config.site = Text::new(site)?;
    config.hostname = Text::new(hostname)?;
    if !version.is_empty() {
        config.version = Text::new(version)?;
    }
    if !capabilities.is_empty() {
        let names: Vec<String> = serde_json::from_str(capabilities).map_err(|e| {
            Failure::new(VIW_ERR_MALFORMED, format!("capabilities_json is not a JSON array of strings: {e}"))
        })?;
        config.capabilities = names.into_iter().map(Capability::new).collect::<Result<_, _>>()?;
    }
    config.max_concurrency = c.max_concurrency;
    config.max_violations = c.max_violations;
    config.limits = Limits { max_message_len: c.max_message_len };
    config.max_transmit = c.max_transmit;
    config.handshake_timeout = Duration::from_millis(c.handshake_timeout_ms);
    Ok(config)
}

/// Creates the agent's side of a connection at `now_ms`, on the connection identified by
/// `channel_binding` (32 bytes, or null for a transport without one), drawing its HELLO nonce
/// from a stream seeded by `seed` (32 bytes, from the operating system's generator). Its first
/// transmit is the HELLO.
///
/// Fails with `VIW_ERR_INVALID_ARGUMENT` for an invalid id, text or capability,
/// `VIW_ERR_INVALID_UTF8`, `VIW_ERR_MALFORMED` for bad `capabilities_json`, and
/// `VIW_ERR_TOO_LARGE` when the HELLO exceeds its size limit. `*out` is null on failure.
///
/// # Safety
///
/// `config` is null or readable (with its strings as its documentation says), `seed` is
/// readable for 32 bytes, `channel_binding` is null or readable for 32 bytes, and `out` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_new(
    config: *const viw_agent_config,
    now_ms: u64,
    seed: *const u8,
    channel_binding: *const u8,
    out: *mut *mut viw_agent_session,
) -> viw_status {
    call("viw_agent_session_new", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { write(out, ptr::null_mut(), "out") }?;
        // SAFETY: as above.
        let config = unsafe { agent_config(input_ref(config, "config")?) }?;
        // SAFETY: as above.
        let mut entropy = Entropy::from_seed(unsafe { input32(seed, "seed") }?);
        // SAFETY: as above.
        let binding =
            unsafe { optional32(channel_binding, "channel_binding") }?.map_or(ChannelBinding::NONE, ChannelBinding);
        let session = AgentSession::new(&config, Timestamp::from_millis(now_ms), &mut entropy, &binding)?;
        let session = Box::into_raw(Box::new(viw_agent_session(Driven::new(session))));
        // SAFETY: as above.
        unsafe { write(out, session, "out") }
    })
}

/// # Safety
///
/// `session` is null or a live session used by no other thread during `'a`.
unsafe fn session<'a>(session: *mut viw_agent_session) -> Result<&'a mut Driven<AgentSession>, Failure> {
    // SAFETY: forwarded contract.
    unsafe { handle(session, "session") }.map(|s| &mut s.0)
}

/// Handles one message from the host at `now_ms`. Returns `VIW_OK` when it was accepted
/// (including a REJECT, reported as a Rejected event); when it was refused returns why
/// (`VIW_ERR_BAD_MAC`, `VIW_ERR_REPLAY`, `VIW_ERR_MALFORMED`, ...) and also queues a Violation
/// event. `VIW_ERR_CLOSED` once closed.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `bytes`
/// is readable for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_handle_message(
    session: *mut viw_agent_session,
    now_ms: u64,
    bytes: *const u8,
    len: usize,
) -> viw_status {
    call("viw_agent_session_handle_message", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, bytes) = unsafe { (self::session(session)?, input(bytes, len, "bytes")?) };
        session.handle_message(Timestamp::from_millis(now_ms), bytes)
    })
}

/// Sends heartbeats when due; ends the session when the host has been silent past the
/// liveness timeout or the WELCOME did not come in time.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_handle_timeout(session: *mut viw_agent_session, now_ms: u64) -> viw_status {
    call("viw_agent_session_handle_timeout", || {
        // SAFETY: the caller's contract covers `session`.
        unsafe { self::session(session) }?.handle_timeout(Timestamp::from_millis(now_ms));
        Ok(())
    })
}

/// As [`viw_host_session_poll_transmit`](crate::viw_host_session_poll_transmit), for the agent.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, `buf` is null
/// or writable for `cap` bytes, and `out_len` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_poll_transmit(
    session: *mut viw_agent_session,
    buf: *mut u8,
    cap: usize,
    out_len: *mut usize,
) -> viw_status {
    call("viw_agent_session_poll_transmit", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_transmit_into(buf, cap, out_len) }
    })
}

/// As [`viw_host_session_poll_transmit_owned`](crate::viw_host_session_poll_transmit_owned),
/// for the agent.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `out` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_poll_transmit_owned(
    session: *mut viw_agent_session,
    out: *mut viw_bytes,
) -> viw_status {
    call("viw_agent_session_poll_transmit_owned", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_transmit_owned(out) }
    })
}

/// As [`viw_host_session_poll_event`](crate::viw_host_session_poll_event), for the agent.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `out` is
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_poll_event(
    session: *mut viw_agent_session,
    out: *mut viw_event,
) -> viw_status {
    call("viw_agent_session_poll_event", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_event(out) }
    })
}

/// As [`viw_host_session_poll_timeout`](crate::viw_host_session_poll_timeout), for the agent.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and the
/// outputs are null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_poll_timeout(
    session: *mut viw_agent_session,
    out_has: *mut bool,
    out_at_ms: *mut u64,
) -> viw_status {
    call("viw_agent_session_poll_timeout", || {
        // SAFETY: the caller's contract covers each pointer.
        unsafe { self::session(session)?.poll_timeout(out_has, out_at_ms) }
    })
}

/// Acknowledges command `command_id`: it is recorded durably and will be answered. Fails with
/// `VIW_ERR_NOT_ESTABLISHED` before the WELCOME and `VIW_ERR_CLOSED` once closed.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `command_id` is readable for `command_id_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_send_ack(
    session: *mut viw_agent_session,
    now_ms: u64,
    command_id: *const c_char,
    command_id_len: usize,
) -> viw_status {
    call("viw_agent_session_send_ack", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, id) = unsafe { (self::session(session)?, input_str(command_id, command_id_len, "command_id")?) };
        session.session.send_ack(Timestamp::from_millis(now_ms), CommandId::new(id)?)?;
        Ok(())
    })
}

/// Sends a command's result: `result_json` is the result body as UTF-8 JSON,
/// `{"command_id":..,"status":"succeeded","output":{..},"duration_ms":..}` (with `exit_code`
/// and `error` when there are). Keep it until the host acknowledges it.
///
/// Fails with `VIW_ERR_INVALID_UTF8` or `VIW_ERR_MALFORMED` for bad input,
/// `VIW_ERR_NOT_ESTABLISHED`, `VIW_ERR_CLOSED`, `VIW_ERR_TRANSMIT_FULL` or `VIW_ERR_TOO_LARGE`.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `result_json` is readable for `result_json_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_send_result(
    session: *mut viw_agent_session,
    now_ms: u64,
    result_json: *const c_char,
    result_json_len: usize,
) -> viw_status {
    call("viw_agent_session_send_result", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, json) =
            unsafe { (self::session(session)?, input_str(result_json, result_json_len, "result_json")?) };
        let result: CommandResult = parse_body(json, "result")?;
        session.session.send_result(Timestamp::from_millis(now_ms), result)?;
        Ok(())
    })
}

/// Sends a telemetry batch: `telemetry_json` is the telemetry body as UTF-8 JSON,
/// `{"batch_id":..,"samples":[{"ts":..,"key":..,"value":..}],"dropped":..}`. Keep it until
/// the TelemetryAcked event. Fails as [`viw_agent_session_send_result`].
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `telemetry_json` is readable for `telemetry_json_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_send_telemetry(
    session: *mut viw_agent_session,
    now_ms: u64,
    telemetry_json: *const c_char,
    telemetry_json_len: usize,
) -> viw_status {
    call("viw_agent_session_send_telemetry", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, json) =
            unsafe { (self::session(session)?, input_str(telemetry_json, telemetry_json_len, "telemetry_json")?) };
        let telemetry: Telemetry = parse_body(json, "telemetry")?;
        session.session.send_telemetry(Timestamp::from_millis(now_ms), telemetry)?;
        Ok(())
    })
}

/// Ends the session with `close_code` (a `viw_close_code` number, 1 to 6) and `reason`,
/// queueing anything unsent and then a CLOSE when established. Does nothing once closed.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and `reason`
/// is readable for `reason_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_close(
    session: *mut viw_agent_session,
    now_ms: u64,
    close_code: u32,
    reason: *const c_char,
    reason_len: usize,
) -> viw_status {
    call("viw_agent_session_close", || {
        // SAFETY: the caller's contract covers each pointer.
        let (session, reason) = unsafe { (self::session(session)?, input_str(reason, reason_len, "reason")?) };
        let code = close_code_from(close_code)?;
        session.session.close(Timestamp::from_millis(now_ms), code, reason);
        session.take_events();
        Ok(())
    })
}

/// The transport ended without a CLOSE: ends the session as if the host had gone away.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_connection_lost(session: *mut viw_agent_session) -> viw_status {
    call("viw_agent_session_connection_lost", || {
        // SAFETY: the caller's contract covers `session`.
        let session = unsafe { self::session(session) }?;
        session.session.connection_lost();
        session.take_events();
        Ok(())
    })
}

/// Writes to `*out_established` whether the WELCOME has arrived and the session is up.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `out_established` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_is_established(
    session: *mut viw_agent_session,
    out_established: *mut bool,
) -> viw_status {
    call("viw_agent_session_is_established", || {
        // SAFETY: the caller's contract covers each pointer.
        let session = unsafe { self::session(session) }?;
        // SAFETY: as above.
        unsafe { write(out_established, session.session.is_established(), "out_established") }
    })
}

/// Writes to `*out_closed` whether the session has ended.
///
/// # Safety
///
/// `session` is null or a live session used by no other thread during the call, and
/// `out_closed` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_is_closed(
    session: *mut viw_agent_session,
    out_closed: *mut bool,
) -> viw_status {
    call("viw_agent_session_is_closed", || {
        // SAFETY: the caller's contract covers each pointer.
        let session = unsafe { self::session(session) }?;
        // SAFETY: as above.
        unsafe { write(out_closed, session.session.is_closed(), "out_closed") }
    })
}

/// Releases a session. Null does nothing.
///
/// # Safety
///
/// `session` is null or was returned by [`viw_agent_session_new`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_agent_session_free(session: *mut viw_agent_session) {
    catch_value((), || free_handle(session));
}
