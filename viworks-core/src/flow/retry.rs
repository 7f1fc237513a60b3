//! When to try a failed delivery again, and when to give up and dead-letter it.
//!
//! The waits come from a [`BackoffPolicy`] (exponential, capped, full jitter); this module adds
//! only the attempt budget and the decision.

use std::time::Duration;

use super::BackoffPolicy;
use crate::{Entropy, Timestamp};

/// How often and how patiently a failed delivery is tried again.
///
/// `max_attempts` counts every attempt, the first one included: a policy of 5 makes one
/// attempt and up to four retries. A policy of 0 or 1 never retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling of the wait before the first retry; it doubles for each further retry.
    pub base: Duration,
    /// The largest wait ceiling between two attempts.
    pub cap: Duration,
    /// The most attempts, the first one included, before the delivery is dead-lettered.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// One second doubling up to one minute, eight attempts in all.
    ///
    /// The seven waits have ceilings of 1, 2, 4, 8, 16, 32 and 60 s: at most about two minutes
    /// and about one on average before a delivery is dead-lettered. That outlasts an agent
    /// coming back at its capped reconnect backoff ([`BackoffPolicy::RECONNECT`], one minute),
    /// so a blip does not dead-letter work, while an operator still sees a command that can
    /// never be delivered reach its terminal state within minutes, and a poisoned command
    /// costs at most eight attempts.
    pub const DEFAULT: RetryPolicy =
        RetryPolicy { base: Duration::from_secs(1), cap: Duration::from_secs(60), max_attempts: 8 };

    /// The backoff schedule the waits are drawn from.
    pub fn backoff(&self) -> BackoffPolicy {
        BackoffPolicy { base: self.base, cap: self.cap }
    }

    /// What to do after `attempts_made` attempts have failed, at `now`.
    ///
    /// Once `attempts_made >= max_attempts` the answer is [`RetryDecision::DeadLetter`].
    /// Otherwise it is [`RetryDecision::RetryAt`] `now` plus a full-jitter wait: drawn from
    /// `[0, base]` after the first failure, `[0, 2 * base]` after the second, and so on up to
    /// `cap` (`attempts_made` of 0 is treated like 1). Draws from `entropy` only when it
    /// retries. The time saturates at the far future.
    pub fn decide(&self, attempts_made: u32, now: Timestamp, entropy: &mut Entropy) -> RetryDecision {
        if attempts_made >= self.max_attempts {
            return RetryDecision::DeadLetter { attempts: attempts_made };
        }
        let delay = self.backoff().delay(attempts_made.saturating_sub(1), entropy);
        RetryDecision::RetryAt(now.saturating_add(delay))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::DEFAULT
    }
}

/// The verdict of [`RetryPolicy::decide`] on a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryDecision {
    /// Try again at this time, not before.
    RetryAt(Timestamp),
    /// The attempt budget is spent: move the delivery to the dead letters, with the reason.
    DeadLetter {
        /// The attempts that were made.
        attempts: u32,
    },
}

impl RetryDecision {
    /// Whether the delivery is to be dead-lettered.
    pub fn is_dead_letter(self) -> bool {
        matches!(self, RetryDecision::DeadLetter { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy { base: Duration::from_millis(100), cap: Duration::from_millis(1_000), max_attempts }
    }

    #[test]
    fn the_last_allowed_attempt_is_followed_by_a_dead_letter() {
        let policy = policy(3);
        let mut entropy = Entropy::from_u64(1);
        assert!(matches!(policy.decide(1, NOW, &mut entropy), RetryDecision::RetryAt(_)));
        assert!(matches!(policy.decide(2, NOW, &mut entropy), RetryDecision::RetryAt(_)));
        assert_eq!(policy.decide(3, NOW, &mut entropy), RetryDecision::DeadLetter { attempts: 3 });
        assert_eq!(policy.decide(u32::MAX, NOW, &mut entropy), RetryDecision::DeadLetter { attempts: u32::MAX });
    }

    #[test]
    fn zero_and_one_max_attempts_never_retry() {
        let mut entropy = Entropy::from_u64(2);
        for max in [0, 1] {
            for made in [0, 1, 2] {
                let decision = policy(max).decide(made, NOW, &mut entropy);
                assert_eq!(decision.is_dead_letter(), made >= max, "max {max}, made {made}");
            }
        }
        assert!(policy(0).decide(0, NOW, &mut entropy).is_dead_letter());
    }

    #[test]
    fn waits_follow_the_backoff_schedule_exactly() {
        let policy = policy(u32::MAX);
        for made in [0u32, 1, 2, 3, 4, 10, 1_000] {
            let mut ours = Entropy::from_u64(u64::from(made));
            let mut theirs = Entropy::from_u64(u64::from(made));
            let expected = policy.backoff().delay(made.saturating_sub(1), &mut theirs);
            assert_eq!(
                policy.decide(made, NOW, &mut ours),
                RetryDecision::RetryAt(NOW.saturating_add(expected)),
                "after {made} attempts"
            );
        }
    }

    #[test]
    fn retry_times_saturate_at_the_far_future() {
        let policy = RetryPolicy { base: Duration::MAX, cap: Duration::MAX, max_attempts: 10 };
        let far = Timestamp::from_millis(u64::MAX - 1);
        let mut entropy = Entropy::from_u64(3);
        for _ in 0..20 {
            match policy.decide(5, far, &mut entropy) {
                RetryDecision::RetryAt(at) => assert!(at >= far),
                other => panic!("expected a retry, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_default_budget_outlasts_one_capped_reconnect() {
        let policy = RetryPolicy::default();
        assert_eq!(policy, RetryPolicy::DEFAULT);
        let worst_case: Duration = (1..policy.max_attempts).map(|made| policy.backoff().ceiling(made - 1)).sum();
        // Full jitter waits half the ceiling on average.
        assert!(worst_case / 2 > BackoffPolicy::RECONNECT.cap);
        assert!(worst_case < Duration::from_secs(180));
    }

    proptest! {
        #[test]
        fn retry_dead_letters_exactly_after_max_attempts(
            max_attempts in 0u32..50,
            attempts_made in 0u32..60,
            seed in any::<u64>(),
        ) {
            let decision = policy(max_attempts)
                .decide(attempts_made, NOW, &mut Entropy::from_u64(seed));
            if attempts_made >= max_attempts {
                prop_assert_eq!(decision, RetryDecision::DeadLetter { attempts: attempts_made });
            } else {
                prop_assert!(!decision.is_dead_letter());
            }
        }

        #[test]
        fn a_retry_is_never_earlier_than_now_nor_later_than_the_cap(
            base in 0u64..100_000,
            cap in 0u64..100_000,
            attempts_made in 0u32..100,
            now in any::<u64>(),
            seed in any::<u64>(),
        ) {
            let policy = RetryPolicy {
                base: Duration::from_millis(base),
                cap: Duration::from_millis(cap),
                max_attempts: u32::MAX,
            };
            let now = Timestamp::from_millis(now);
            match policy.decide(attempts_made, now, &mut Entropy::from_u64(seed)) {
                RetryDecision::RetryAt(at) => {
                    prop_assert!(at >= now);
                    prop_assert!(at <= now.saturating_add(Duration::from_millis(cap)));
                }
                other => prop_assert!(false, "expected a retry, got {:?}", other),
            }
        }
    }
}
