//! The HELLO nonce replay cache, for hosts that admit connections with their own code: fixed
//! memory, time-bounded entries, a fair share per agent.

use std::ffi::c_char;
use std::time::Duration;

use viworks_core::auth::{NonceCache, NonceCacheConfig, NonceOutcome, SkewWindow};
use viworks_core::wire::{AgentId, Nonce};
use viworks_core::{Entropy, Timestamp};

use crate::boundary::{call, catch_value};
use crate::memory::{free_handle, handle, input_str, input32, write};
use crate::status::viw_status;

/// A nonce cache. Create with [`viw_nonce_cache_new`], release with [`viw_nonce_cache_free`].
#[derive(Debug)]
pub struct viw_nonce_cache(NonceCache);

/// The verdict on one HELLO nonce.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum viw_nonce_outcome {
    /// Not seen inside the window; it is now remembered. Accept the HELLO.
    Fresh = 0,
    /// Seen before inside the window. Refuse: a replay.
    Replayed = 1,
    /// The timestamp is outside the skew window. Refuse.
    Stale = 2,
    /// This agent already holds its full quota of nonces. Refuse.
    OverQuota = 3,
    /// The cache is full of unexpired nonces. Refuse: accepting would open a replay hole.
    Full = 4,
}

impl From<NonceOutcome> for viw_nonce_outcome {
    fn from(outcome: NonceOutcome) -> Self {
        match outcome {
            NonceOutcome::Fresh => viw_nonce_outcome::Fresh,
            NonceOutcome::Replayed => viw_nonce_outcome::Replayed,
            NonceOutcome::Stale => viw_nonce_outcome::Stale,
            NonceOutcome::OverQuota => viw_nonce_outcome::OverQuota,
            // A verdict added to the core later is a refusal too.
            _ => viw_nonce_outcome::Full,
        }
    }
}

/// Creates a cache of `capacity` nonces, at most `per_agent_quota` of them per agent (0 for
/// `min(capacity, 64)`), holding each for `window_ms` (the clock-skew window) past its HELLO's
/// timestamp. `seed` (32 bytes, from the operating system's generator) keys the fingerprint
/// hash. All memory, about 85 bytes per nonce of capacity, is allocated here.
///
/// Fails with `VIW_ERR_INVALID_ARGUMENT` when a bound is zero or the quota exceeds the
/// capacity. `*out` is set to null on failure.
///
/// # Safety
///
/// `seed` is readable for 32 bytes and `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_nonce_cache_new(
    capacity: usize,
    per_agent_quota: usize,
    window_ms: u64,
    seed: *const u8,
    out: *mut *mut viw_nonce_cache,
) -> viw_status {
    call("viw_nonce_cache_new", || {
        // SAFETY: the caller's contract covers `out`.
        unsafe { write(out, std::ptr::null_mut(), "out") }?;
        // SAFETY: the caller's contract covers `seed`.
        let mut entropy = Entropy::from_seed(unsafe { input32(seed, "seed") }?);
        let mut config = NonceCacheConfig::new(capacity, SkewWindow::new(Duration::from_millis(window_ms)));
        if per_agent_quota != 0 {
            config.per_agent_quota = per_agent_quota;
        }
        let cache = NonceCache::new(config, &mut entropy)?;
        // SAFETY: as above.
        unsafe { write(out, Box::into_raw(Box::new(viw_nonce_cache(cache))), "out") }
    })
}

/// Checks the HELLO nonce `nonce` (32 bytes) from `agent_id`, stamped `ts_ms`, at `now_ms`,
/// remembers it when fresh, and writes the verdict to `*out_outcome`. A `now_ms` earlier than
/// one seen before counts as that earlier-seen time.
///
/// # Safety
///
/// `cache` is null or a live cache used by no other thread during the call; `agent_id` is
/// readable for `agent_id_len` bytes, `nonce` for 32; `out_outcome` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_nonce_cache_check(
    cache: *mut viw_nonce_cache,
    agent_id: *const c_char,
    agent_id_len: usize,
    nonce: *const u8,
    ts_ms: u64,
    now_ms: u64,
    out_outcome: *mut viw_nonce_outcome,
) -> viw_status {
    call("viw_nonce_cache_check", || {
        // SAFETY: the caller's contract covers each pointer with its length.
        let cache = unsafe { handle(cache, "cache") }?;
        // SAFETY: as above.
        let agent = AgentId::new(unsafe { input_str(agent_id, agent_id_len, "agent_id") }?)?;
        // SAFETY: as above.
        let nonce = Nonce(unsafe { input32(nonce, "nonce") }?);
        crate::memory::check_out(out_outcome, "out_outcome")?;
        let outcome = cache.0.check(&agent, &nonce, Timestamp::from_millis(ts_ms), Timestamp::from_millis(now_ms));
        // SAFETY: as above.
        unsafe { write(out_outcome, outcome.into(), "out_outcome") }
    })
}

/// Declares that the cache has seen every HELLO since `start_ms`: HELLOs stamped earlier are
/// stale from now on. A host calls this with its start time, so that a HELLO captured before a
/// restart cannot be replayed into the empty cache.
///
/// # Safety
///
/// `cache` is null or a live cache used by no other thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_nonce_cache_set_horizon(cache: *mut viw_nonce_cache, start_ms: u64) -> viw_status {
    call("viw_nonce_cache_set_horizon", || {
        // SAFETY: the caller's contract covers `cache`.
        unsafe { handle(cache, "cache") }?.0.set_horizon(Timestamp::from_millis(start_ms));
        Ok(())
    })
}

/// Writes to `*out_len` how many nonces the cache holds now.
///
/// # Safety
///
/// `cache` is null or a live cache used by no other thread during the call; `out_len` is null
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_nonce_cache_len(cache: *mut viw_nonce_cache, out_len: *mut usize) -> viw_status {
    call("viw_nonce_cache_len", || {
        // SAFETY: the caller's contract covers both pointers.
        let cache = unsafe { handle(cache, "cache") }?;
        // SAFETY: as above.
        unsafe { write(out_len, cache.0.len(), "out_len") }
    })
}

/// Releases a cache. Null is allowed and does nothing.
///
/// # Safety
///
/// `cache` is null or was returned by [`viw_nonce_cache_new`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn viw_nonce_cache_free(cache: *mut viw_nonce_cache) {
    catch_value((), || free_handle(cache));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misconfigured_cache_is_refused_and_out_is_nulled() {
        let seed = [0u8; 32];
        let mut out = std::ptr::NonNull::<viw_nonce_cache>::dangling().as_ptr();
        // SAFETY: `seed` is 32 bytes and `out` is writable.
        let status = unsafe { viw_nonce_cache_new(0, 0, 1000, seed.as_ptr(), &mut out) };
        assert_eq!(status, crate::status::VIW_ERR_INVALID_ARGUMENT);
        assert!(out.is_null());
    }
}
