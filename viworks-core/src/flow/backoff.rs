//! Exponential backoff with full jitter, and the agent's reconnect schedule built on it.
//!
//! A delay is drawn uniformly from zero up to an exponentially growing, capped ceiling. The
//! reconnect schedule only forgets its failures after a session that stayed up for a while, so
//! an agent whose sessions die at once keeps backing off instead of hammering the host.

use std::time::Duration;

use crate::time::millis_of;
use crate::{Entropy, Timestamp};

/// An exponential backoff schedule with full jitter: the delay before try `attempt + 1` is
/// drawn uniformly from `[0, min(cap, base * 2^attempt)]`, in whole milliseconds.
///
/// Why full jitter: when a host restarts, thousands of agents lose their session in the same
/// instant. With a fixed or only slightly jittered delay they come back in the same instant
/// too, in waves that grow with every failed round. Drawing the whole delay uniformly spreads
/// them evenly over the window, so the host sees a steady arrival rate of about
/// `agents / window` instead of spikes, and the window doubles while the host keeps refusing.
///
/// Sub-millisecond parts of `base` and `cap` are dropped. A `cap` below `base` caps every
/// delay, the first one included. Arithmetic saturates, so no attempt number overflows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The ceiling of the first delay (attempt 0); each further attempt doubles it.
    pub base: Duration,
    /// The largest ceiling, however many attempts have failed.
    pub cap: Duration,
}

impl BackoffPolicy {
    /// The agent's reconnect schedule: a first window of one second, doubling up to one minute.
    ///
    /// One minute bounds how long an agent stays away after the host is back; at that cap a
    /// fleet of 10,000 agents still arrives at under 170 handshakes per second on average.
    pub const RECONNECT: BackoffPolicy = BackoffPolicy { base: Duration::from_secs(1), cap: Duration::from_secs(60) };

    /// The largest delay [`delay`] can return for `attempt`: `min(cap, base * 2^attempt)`,
    /// saturating instead of overflowing.
    ///
    /// [`delay`]: BackoffPolicy::delay
    pub fn ceiling(&self, attempt: u32) -> Duration {
        Duration::from_millis(self.ceiling_millis(attempt))
    }

    /// A delay drawn uniformly from `[0, ceiling(attempt)]`, in whole milliseconds. Attempt 0
    /// is the first retry, drawn from `[0, base]`. Draws one or more values from `entropy`.
    pub fn delay(&self, attempt: u32, entropy: &mut Entropy) -> Duration {
        Duration::from_millis(entropy.below_or_equal(self.ceiling_millis(attempt)))
    }

    fn ceiling_millis(&self, attempt: u32) -> u64 {
        let base = millis_of(self.base);
        let grown = match 1u64.checked_shl(attempt) {
            Some(factor) => base.saturating_mul(factor),
            // 2^attempt does not fit in a u64: any non-zero base saturates.
            None if base == 0 => 0,
            None => u64::MAX,
        };
        grown.min(millis_of(self.cap))
    }
}

/// The agent's reconnect schedule: how long to wait before the next connection attempt.
///
/// Every call to [`next_delay`] moves one step up the [`BackoffPolicy`]. The count returns to
/// zero only when a session that was established lasted at least `healthy_after`: a host that
/// accepts the handshake and then drops the connection at once (overloaded, or refusing this
/// agent) is treated like one that refused outright, which is what stops reconnect storms.
///
/// [`next_delay`]: ReconnectBackoff::next_delay
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconnectBackoff {
    policy: BackoffPolicy,
    healthy_after: Duration,
    attempt: u32,
    established_at: Option<Timestamp>,
}

impl ReconnectBackoff {
    /// A schedule at attempt 0 that forgets failures after a session of at least
    /// `healthy_after`.
    pub fn new(policy: BackoffPolicy, healthy_after: Duration) -> Self {
        ReconnectBackoff { policy, healthy_after, attempt: 0, established_at: None }
    }

    /// The delay before the next connection attempt, drawn from `entropy`; moves the schedule
    /// one step up. The first call after start-up, or after a healthy session, is drawn from
    /// `[0, base]`, so a fleet that lost its host at the same moment does not return at once.
    pub fn next_delay(&mut self, entropy: &mut Entropy) -> Duration {
        let delay = self.policy.delay(self.attempt, entropy);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Records that a session came up (handshake complete) at `now`.
    pub fn on_session_established(&mut self, now: Timestamp) {
        self.established_at = Some(now);
    }

    /// Records that the session ended at `now`. The attempt count returns to zero only when
    /// the session was established and lasted at least `healthy_after`; a session that was
    /// never established, or ended sooner (a clock that ran backwards counts as zero length),
    /// leaves the count where it was.
    pub fn on_session_ended(&mut self, now: Timestamp) {
        if let Some(started) = self.established_at.take() {
            if now.saturating_since(started) >= self.healthy_after {
                self.attempt = 0;
            }
        }
    }

    /// Connection attempts since the schedule last started over.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The policy delays are drawn from.
    pub fn policy(&self) -> BackoffPolicy {
        self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn at(millis: u64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    const POLICY: BackoffPolicy = BackoffPolicy { base: Duration::from_millis(100), cap: Duration::from_millis(1_000) };

    #[test]
    fn the_ceiling_doubles_per_attempt_until_the_cap() {
        let ceilings: Vec<u64> = (0..6).map(|a| millis_of(POLICY.ceiling(a))).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn huge_attempts_and_durations_saturate_at_the_cap() {
        assert_eq!(POLICY.ceiling(63), POLICY.cap);
        assert_eq!(POLICY.ceiling(64), POLICY.cap);
        assert_eq!(POLICY.ceiling(u32::MAX), POLICY.cap);
        let wide = BackoffPolicy { base: Duration::MAX, cap: Duration::MAX };
        assert_eq!(wide.ceiling(0), ms(u64::MAX));
        assert_eq!(wide.ceiling(5), ms(u64::MAX));
        let mut entropy = Entropy::from_u64(3);
        assert!(wide.delay(u32::MAX, &mut entropy) <= ms(u64::MAX));
    }

    #[test]
    fn a_zero_base_or_cap_means_no_delay() {
        let mut entropy = Entropy::from_u64(4);
        let zero_base = BackoffPolicy { base: Duration::ZERO, cap: Duration::from_secs(60) };
        let zero_cap = BackoffPolicy { base: Duration::from_secs(1), cap: Duration::ZERO };
        for attempt in [0, 1, 63, 64, u32::MAX] {
            assert_eq!(zero_base.delay(attempt, &mut entropy), Duration::ZERO);
            assert_eq!(zero_cap.delay(attempt, &mut entropy), Duration::ZERO);
        }
    }

    #[test]
    fn a_cap_below_the_base_caps_the_first_delay() {
        let policy = BackoffPolicy { base: ms(500), cap: ms(50) };
        assert_eq!(policy.ceiling(0), ms(50));
    }

    #[test]
    fn sub_millisecond_parts_are_dropped() {
        let policy = BackoffPolicy { base: Duration::from_micros(1_999), cap: Duration::from_secs(1) };
        assert_eq!(policy.ceiling(0), ms(1));
        assert_eq!(policy.ceiling(3), ms(8));
    }

    #[test]
    fn full_jitter_covers_the_whole_range() {
        let mut entropy = Entropy::from_u64(42);
        // Small ceiling: every millisecond value, both ends included, is drawn.
        let small = BackoffPolicy { base: ms(10), cap: ms(10) };
        let mut seen = [false; 11];
        for _ in 0..2_000 {
            let d = millis_of(small.delay(0, &mut entropy));
            let slot = seen.get_mut(d as usize).expect("delay within [0, 10]");
            *slot = true;
        }
        assert!(seen.iter().all(|s| *s), "every value drawn: {seen:?}");

        // Large ceiling: each tenth of the window gets close to a tenth of the draws, so
        // agents are spread out rather than bunched at either end.
        let draws = 20_000;
        let mut deciles = [0u32; 10];
        for _ in 0..draws {
            let d = millis_of(POLICY.delay(10, &mut entropy));
            assert!(d <= 1_000);
            let decile = (d.min(999) / 100) as usize;
            if let Some(count) = deciles.get_mut(decile) {
                *count += 1;
            }
        }
        for count in deciles {
            assert!((1_700..=2_300).contains(&count), "roughly uniform: {deciles:?}");
        }
    }

    #[test]
    fn a_session_that_dies_at_once_keeps_backing_off() {
        let mut entropy = Entropy::from_u64(5);
        let mut backoff = ReconnectBackoff::new(POLICY, Duration::from_secs(30));
        for expected in 1..=5 {
            backoff.next_delay(&mut entropy);
            backoff.on_session_established(at(1_000));
            backoff.on_session_ended(at(1_500));
            assert_eq!(backoff.attempt(), expected);
        }
    }

    #[test]
    fn a_healthy_session_starts_the_schedule_over_from_exactly_healthy_after() {
        let mut entropy = Entropy::from_u64(6);
        let healthy_after = Duration::from_secs(30);

        let mut backoff = ReconnectBackoff::new(POLICY, healthy_after);
        backoff.next_delay(&mut entropy);
        backoff.next_delay(&mut entropy);
        backoff.on_session_established(at(10_000));
        backoff.on_session_ended(at(39_999));
        assert_eq!(backoff.attempt(), 2, "1 ms short of healthy");

        backoff.on_session_established(at(50_000));
        backoff.on_session_ended(at(80_000));
        assert_eq!(backoff.attempt(), 0, "exactly healthy_after is healthy");
    }

    #[test]
    fn an_end_without_an_established_session_does_not_reset() {
        let mut entropy = Entropy::from_u64(7);
        let mut backoff = ReconnectBackoff::new(POLICY, Duration::ZERO);
        backoff.next_delay(&mut entropy);
        backoff.on_session_ended(at(1_000_000));
        assert_eq!(backoff.attempt(), 1);

        backoff.on_session_established(at(0));
        backoff.on_session_ended(at(0));
        assert_eq!(backoff.attempt(), 0, "a zero healthy_after resets on any session");
        backoff.next_delay(&mut entropy);
        backoff.on_session_ended(at(5_000));
        assert_eq!(backoff.attempt(), 1, "the last session was already counted");
    }

    #[test]
    fn a_clock_running_backwards_does_not_make_a_session_healthy() {
        let mut entropy = Entropy::from_u64(8);
        let mut backoff = ReconnectBackoff::new(POLICY, ms(1));
        backoff.next_delay(&mut entropy);
        backoff.on_session_established(at(10_000));
        backoff.on_session_ended(at(0));
        assert_eq!(backoff.attempt(), 1);

        // Zero length is still healthy when nothing longer is asked for.
        let mut backoff = ReconnectBackoff::new(POLICY, Duration::ZERO);
        backoff.next_delay(&mut entropy);
        backoff.on_session_established(at(10_000));
        backoff.on_session_ended(at(0));
        assert_eq!(backoff.attempt(), 0);
    }

    #[test]
    fn the_first_reconnect_is_drawn_from_the_base_window_and_later_ones_grow() {
        let mut entropy = Entropy::from_u64(9);
        let mut backoff = ReconnectBackoff::new(POLICY, Duration::from_secs(30));
        for attempt in 0..12u32 {
            assert_eq!(backoff.attempt(), attempt);
            let delay = backoff.next_delay(&mut entropy);
            assert!(delay <= POLICY.ceiling(attempt));
        }
        assert_eq!(backoff.attempt(), 12);
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_the_cap(
            base in any::<u64>(),
            cap in any::<u64>(),
            attempt in any::<u32>(),
            seed in any::<u64>(),
        ) {
            let policy = BackoffPolicy { base: ms(base), cap: ms(cap) };
            let delay = policy.delay(attempt, &mut Entropy::from_u64(seed));
            prop_assert!(delay <= ms(cap));
            prop_assert!(delay <= policy.ceiling(attempt));
        }

        #[test]
        fn delay_never_exceeds_base_times_two_to_the_attempt(
            base in 0u64..10_000,
            attempt in 0u32..40,
            seed in any::<u64>(),
        ) {
            let policy = BackoffPolicy { base: ms(base), cap: Duration::MAX };
            let delay = policy.delay(attempt, &mut Entropy::from_u64(seed));
            prop_assert!(u128::from(millis_of(delay)) <= u128::from(base) << attempt);
            prop_assert_eq!(
                u128::from(millis_of(policy.ceiling(attempt))),
                u128::from(base) << attempt
            );
        }

        #[test]
        fn the_ceiling_never_shrinks_as_attempts_grow(
            base in any::<u64>(),
            cap in any::<u64>(),
            attempt in 0u32..u32::MAX,
        ) {
            let policy = BackoffPolicy { base: ms(base), cap: ms(cap) };
            prop_assert!(policy.ceiling(attempt) <= policy.ceiling(attempt + 1));
        }

        #[test]
        fn only_a_session_of_at_least_healthy_after_resets_the_attempts(
            steps in proptest::collection::vec((0u8..3, 0u64..10_000), 0..60),
            healthy_after in 0u64..5_000,
            seed in any::<u64>(),
        ) {
            let mut entropy = Entropy::from_u64(seed);
            let mut backoff = ReconnectBackoff::new(POLICY, ms(healthy_after));
            let mut model_attempt = 0u32;
            let mut model_started = None;
            for (op, time) in steps {
                match op {
                    0 => {
                        let delay = backoff.next_delay(&mut entropy);
                        prop_assert!(delay <= POLICY.ceiling(model_attempt));
                        model_attempt += 1;
                    }
                    1 => {
                        backoff.on_session_established(at(time));
                        model_started = Some(time);
                    }
                    _ => {
                        backoff.on_session_ended(at(time));
                        // A clock that ran backwards gives a zero-length session, which
                        // is healthy only when `healthy_after` is zero.
                        if let Some(started) = model_started.take() {
                            if time.saturating_sub(started) >= healthy_after {
                                model_attempt = 0;
                            }
                        }
                    }
                }
                prop_assert_eq!(backoff.attempt(), model_attempt);
            }
        }
    }
}
