//! A token-bucket rate limiter in integer milliseconds, for per-token and per-IP API limits.
//!
//! The bucket keeps a token count and the instant of the last refill boundary, so refills are
//! exact however unevenly it is consulted: no floating point, no drift, no minting when the
//! clock runs backwards.

use std::time::Duration;

use thiserror::Error;

use crate::Timestamp;
use crate::time::millis_of;

/// Why [`TokenBucket::try_take`] refused. Nothing was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
#[non_exhaustive]
pub enum RateLimited {
    /// Not enough tokens now; exactly enough will exist after `retry_after`, if nothing else
    /// takes them first. Answer 429 with this as `Retry-After`.
    #[error("rate limited: enough tokens in {retry_after:?}")]
    Wait {
        /// The exact span until the bucket holds the tokens asked for; never zero.
        retry_after: Duration,
    },
    /// More tokens were asked for than the bucket can ever hold, so waiting would not help.
    /// Answer with a permanent refusal (for example 413 or 400), not a `Retry-After`.
    #[error("{requested} tokens asked for, but the bucket holds at most {capacity}")]
    ExceedsCapacity {
        /// The tokens asked for.
        requested: u32,
        /// The bucket's capacity.
        capacity: u32,
    },
}

impl RateLimited {
    /// The wait to advertise, or `None` when retrying can never succeed.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            RateLimited::Wait { retry_after } => Some(retry_after),
            RateLimited::ExceedsCapacity { .. } => None,
        }
    }
}

/// A token bucket: it holds up to `capacity` tokens, starts full, and gains one token every
/// `refill_every`. A request takes tokens or is refused with the exact wait.
///
/// `refill_every` has millisecond resolution and is rounded up, so the bucket never refills
/// faster than configured. A `refill_every` of zero means unlimited refill: the bucket is
/// always full, and only the size of one take is limited (to `capacity`). A full bucket banks
/// nothing: the period of the next token starts when a token is taken.
///
/// Time running backwards mints nothing: tokens accrue only once `now` passes the last refill
/// boundary again. Costs a few integer operations per call and 24 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    capacity: u32,
    /// Milliseconds per token; zero means always full.
    refill_millis: u64,
    tokens: u32,
    /// The instant at which `tokens` is exact: the last refill boundary reached, or the last
    /// time the bucket was seen full.
    last_refill: Timestamp,
}

impl TokenBucket {
    /// A full bucket of `capacity` tokens at `now`, gaining one token every `refill_every`
    /// (zero: always full; sub-millisecond parts round up to the next millisecond).
    pub fn new(capacity: u32, refill_every: Duration, now: Timestamp) -> Self {
        TokenBucket {
            capacity,
            refill_millis: whole_millis_rounded_up(refill_every),
            tokens: capacity,
            last_refill: now,
        }
    }

    /// Takes `tokens` at `now`, or refuses without taking any: [`RateLimited::Wait`] when
    /// there are too few now, [`RateLimited::ExceedsCapacity`] when `tokens > capacity`.
    /// Taking zero tokens always succeeds.
    pub fn try_take(&mut self, now: Timestamp, tokens: u32) -> Result<(), RateLimited> {
        if tokens > self.capacity {
            return Err(RateLimited::ExceedsCapacity { requested: tokens, capacity: self.capacity });
        }
        self.refill(now);
        if let Some(left) = self.tokens.checked_sub(tokens) {
            self.tokens = left;
            return Ok(());
        }
        // A zero-period bucket is always full and `tokens <= capacity`, so here the period is
        // non-zero and every missing token arrives one period after the previous boundary.
        let missing = u64::from(tokens.saturating_sub(self.tokens));
        let ready = self.boundary_after(missing);
        // The boundary lies after `now` unless it saturated at the end of time; never
        // advertise a zero wait, which would invite a busy loop.
        let retry_after = ready.saturating_since(now).max(Duration::from_millis(1));
        Err(RateLimited::Wait { retry_after })
    }

    /// The tokens available at `now`.
    pub fn available(&mut self, now: Timestamp) -> u32 {
        self.refill(now);
        self.tokens
    }

    /// The most tokens the bucket holds, and the most one take may ask for.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The refill period, rounded up to whole milliseconds; zero means always full.
    pub fn refill_every(&self) -> Duration {
        Duration::from_millis(self.refill_millis)
    }

    /// When the bucket will be full again if nothing is taken: `now` when it is full already.
    /// This is the instant for `X-RateLimit-Reset` (round it up when converting to seconds).
    pub fn reset_at(&mut self, now: Timestamp) -> Timestamp {
        self.refill(now);
        if self.tokens >= self.capacity {
            return now;
        }
        self.boundary_after(u64::from(self.capacity.saturating_sub(self.tokens)))
    }

    /// The refill boundary at which `periods` more tokens will have been added.
    fn boundary_after(&self, periods: u64) -> Timestamp {
        let span = periods.saturating_mul(self.refill_millis);
        self.last_refill.saturating_add(Duration::from_millis(span))
    }

    /// Adds the tokens of every whole period between the last boundary and `now`.
    fn refill(&mut self, now: Timestamp) {
        if self.tokens >= self.capacity || self.refill_millis == 0 {
            self.tokens = self.capacity;
            self.last_refill = self.last_refill.max(now);
            return;
        }
        // Zero when the clock ran backwards: nothing accrues until `now` passes the boundary.
        let elapsed = millis_of(now.saturating_since(self.last_refill));
        let periods = elapsed / self.refill_millis;
        let missing = self.capacity.saturating_sub(self.tokens);
        match u32::try_from(periods) {
            Ok(periods) if periods < missing => {
                self.tokens = self.tokens.saturating_add(periods);
                self.last_refill = self.boundary_after(u64::from(periods));
            }
            _ => {
                self.tokens = self.capacity;
                self.last_refill = now;
            }
        }
    }
}

/// `span` in whole milliseconds, any sub-millisecond remainder counted as one more.
fn whole_millis_rounded_up(span: Duration) -> u64 {
    let whole = millis_of(span);
    if span.subsec_nanos() % 1_000_000 == 0 { whole } else { whole.saturating_add(1) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(millis: u64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn wait(millis: u64) -> Result<(), RateLimited> {
        Err(RateLimited::Wait { retry_after: ms(millis) })
    }

    #[test]
    fn a_new_bucket_is_full_and_drains_one_take_at_a_time() {
        let mut bucket = TokenBucket::new(3, ms(100), at(1_000));
        assert_eq!(bucket.available(at(1_000)), 3);
        assert_eq!(bucket.try_take(at(1_000), 2), Ok(()));
        assert_eq!(bucket.try_take(at(1_000), 1), Ok(()));
        assert_eq!(bucket.try_take(at(1_000), 1), wait(100));
        assert_eq!(bucket.available(at(1_000)), 0, "a refusal takes nothing");
    }

    #[test]
    fn a_token_arrives_exactly_one_period_after_the_take() {
        let mut bucket = TokenBucket::new(1, ms(100), at(0));
        assert_eq!(bucket.try_take(at(0), 1), Ok(()));
        assert_eq!(bucket.try_take(at(99), 1), wait(1));
        assert_eq!(bucket.try_take(at(100), 1), Ok(()));
        assert_eq!(bucket.try_take(at(150), 1), wait(50));
    }

    #[test]
    fn partial_periods_carry_over_without_drift() {
        let mut bucket = TokenBucket::new(10, ms(100), at(0));
        assert_eq!(bucket.try_take(at(0), 10), Ok(()));
        assert_eq!(bucket.available(at(150)), 1);
        assert_eq!(bucket.available(at(199)), 1);
        assert_eq!(bucket.available(at(200)), 2, "the 50 ms left over counted");
        for t in (201..1_000).step_by(7) {
            let _ = bucket.available(at(t));
        }
        assert_eq!(bucket.available(at(999)), 9);
        assert_eq!(bucket.available(at(1_000)), 10);
    }

    #[test]
    fn retry_after_counts_every_missing_token() {
        let mut bucket = TokenBucket::new(5, ms(100), at(0));
        assert_eq!(bucket.try_take(at(0), 5), Ok(()));
        assert_eq!(bucket.try_take(at(30), 3), wait(270));
        assert_eq!(bucket.try_take(at(299), 3), wait(1));
        assert_eq!(bucket.try_take(at(300), 3), Ok(()));
    }

    #[test]
    fn an_idle_full_bucket_banks_nothing() {
        let mut bucket = TokenBucket::new(2, ms(100), at(0));
        assert_eq!(bucket.available(at(3_600_000)), 2);
        assert_eq!(bucket.try_take(at(3_600_000), 2), Ok(()));
        assert_eq!(bucket.try_take(at(3_600_050), 1), wait(50));
    }

    #[test]
    fn a_clock_running_backwards_mints_no_tokens() {
        let mut bucket = TokenBucket::new(2, ms(100), at(10_000));
        assert_eq!(bucket.try_take(at(10_000), 2), Ok(()));
        assert_eq!(bucket.available(at(0)), 0);
        assert_eq!(bucket.try_take(at(0), 1), wait(10_100));
        assert_eq!(bucket.available(at(10_099)), 0);
        assert_eq!(bucket.available(at(10_100)), 1);
    }

    #[test]
    fn asking_for_more_than_the_capacity_can_never_succeed() {
        let mut bucket = TokenBucket::new(4, ms(100), at(0));
        let refusal = bucket.try_take(at(0), 5);
        assert_eq!(refusal, Err(RateLimited::ExceedsCapacity { requested: 5, capacity: 4 }));
        assert_eq!(refusal.err().and_then(RateLimited::retry_after), None);
        assert_eq!(bucket.available(at(0)), 4, "nothing was taken");
        assert_eq!(bucket.try_take(at(0), 0), Ok(()));
    }

    #[test]
    fn a_zero_capacity_bucket_grants_only_empty_takes() {
        let mut bucket = TokenBucket::new(0, ms(100), at(0));
        assert_eq!(bucket.try_take(at(0), 0), Ok(()));
        assert!(matches!(bucket.try_take(at(1_000), 1), Err(RateLimited::ExceedsCapacity { .. })));
        assert_eq!(bucket.reset_at(at(5)), at(5));
    }

    #[test]
    fn a_zero_refill_period_means_always_full() {
        let mut bucket = TokenBucket::new(3, Duration::ZERO, at(0));
        for _ in 0..100 {
            assert_eq!(bucket.try_take(at(0), 3), Ok(()));
        }
        assert_eq!(bucket.available(at(0)), 3);
        assert_eq!(bucket.reset_at(at(0)), at(0));
        assert!(matches!(bucket.try_take(at(0), 4), Err(RateLimited::ExceedsCapacity { .. })));
    }

    #[test]
    fn a_sub_millisecond_period_rounds_up() {
        let bucket = TokenBucket::new(1, Duration::from_micros(1_500), at(0));
        assert_eq!(bucket.refill_every(), ms(2));
        let bucket = TokenBucket::new(1, Duration::from_nanos(1), at(0));
        assert_eq!(bucket.refill_every(), ms(1));
        let bucket = TokenBucket::new(1, Duration::MAX, at(0));
        assert_eq!(bucket.refill_every(), ms(u64::MAX));
    }

    #[test]
    fn reset_at_is_when_the_last_missing_token_arrives() {
        let mut bucket = TokenBucket::new(4, ms(250), at(1_000));
        assert_eq!(bucket.reset_at(at(1_000)), at(1_000), "full now");
        assert_eq!(bucket.try_take(at(1_100), 3), Ok(()));
        assert_eq!(bucket.reset_at(at(1_100)), at(1_850));
        assert_eq!(bucket.available(at(1_849)), 3);
        assert_eq!(bucket.available(at(1_850)), 4);
    }

    #[test]
    fn the_far_future_saturates_instead_of_overflowing() {
        let end = at(u64::MAX);
        let mut bucket = TokenBucket::new(u32::MAX, Duration::MAX, at(u64::MAX - 5));
        assert_eq!(bucket.try_take(end, u32::MAX), Ok(()));
        assert_eq!(bucket.try_take(end, 1), wait(1), "never a zero wait");
        assert_eq!(bucket.reset_at(end), end, "saturated");
    }

    fn small_bucket() -> impl Strategy<Value = (u32, u64)> {
        (0u32..20, 0u64..500)
    }

    fn steps() -> impl Strategy<Value = Vec<(i64, u32)>> {
        proptest::collection::vec((-2_000i64..3_000, 0u32..24), 0..200)
    }

    fn advance(now: u64, step: i64) -> u64 {
        now.saturating_add_signed(step)
    }

    proptest! {
        #[test]
        fn bucket_never_exceeds_capacity_and_never_goes_negative(
            (capacity, refill) in small_bucket(),
            start in 0u64..1_000_000,
            steps in steps(),
        ) {
            let mut bucket = TokenBucket::new(capacity, ms(refill), at(start));
            let mut now = start;
            for (step, take) in steps {
                now = advance(now, step);
                let before = bucket.available(at(now));
                let outcome = bucket.try_take(at(now), take);
                let after = bucket.available(at(now));
                prop_assert!(after <= capacity);
                match outcome {
                    Ok(()) => {
                        prop_assert!(before >= take, "granted without the tokens");
                        // A zero refill period refills at once: it is always full.
                        let expected = if refill == 0 { capacity } else { before - take };
                        prop_assert_eq!(after, expected);
                    }
                    Err(RateLimited::Wait { retry_after }) => {
                        prop_assert!(before < take && take <= capacity);
                        prop_assert!(retry_after > Duration::ZERO);
                        prop_assert_eq!(after, before);
                    }
                    Err(RateLimited::ExceedsCapacity { .. }) => {
                        prop_assert!(take > capacity);
                        prop_assert_eq!(after, before);
                    }
                }
                let reset = bucket.reset_at(at(now));
                prop_assert!(reset >= at(now));
                prop_assert_eq!(reset == at(now), after == capacity);
            }
        }

        #[test]
        fn tokens_granted_over_a_span_never_exceed_capacity_plus_refills(
            capacity in 0u32..20,
            refill in 1u64..500,
            steps in steps(),
        ) {
            let start = 1_000_000;
            let mut bucket = TokenBucket::new(capacity, ms(refill), at(start));
            let (mut now, mut latest, mut granted) = (start, start, 0u64);
            for (step, take) in steps {
                now = advance(now, step);
                latest = latest.max(now);
                if bucket.try_take(at(now), take).is_ok() {
                    granted += u64::from(take);
                }
                let refills = (latest - start) / refill;
                prop_assert!(
                    granted <= u64::from(capacity) + refills,
                    "granted {} > {} + {}", granted, capacity, refills
                );
            }
        }

        #[test]
        fn retry_after_is_exactly_when_the_take_succeeds(
            capacity in 1u32..20,
            refill in 1u64..500,
            steps in steps(),
            take in 1u32..20,
        ) {
            let take = take.min(capacity);
            let start = 1_000_000;
            let mut bucket = TokenBucket::new(capacity, ms(refill), at(start));
            let mut now = start;
            for (step, amount) in steps {
                now = advance(now, step);
                let _ = bucket.try_take(at(now), amount);
            }
            let _ = bucket.try_take(at(now), capacity);
            if let Err(RateLimited::Wait { retry_after }) = bucket.try_take(at(now), take) {
                let ready = at(now).saturating_add(retry_after);
                let mut early = bucket.clone();
                prop_assert!(early.try_take(ready.saturating_sub(ms(1)), take).is_err());
                prop_assert_eq!(bucket.try_take(ready, take), Ok(()));
            }
        }

        #[test]
        fn the_bucket_is_full_exactly_at_reset_at(
            capacity in 1u32..20,
            refill in 1u64..500,
            steps in steps(),
        ) {
            let start = 1_000_000;
            let mut bucket = TokenBucket::new(capacity, ms(refill), at(start));
            let mut now = start;
            for (step, amount) in steps {
                now = advance(now, step);
                let _ = bucket.try_take(at(now), amount);
            }
            let reset = bucket.reset_at(at(now));
            if reset > at(now) {
                prop_assert!(bucket.clone().available(reset.saturating_sub(ms(1))) < capacity);
            }
            prop_assert_eq!(bucket.available(reset), capacity);
        }
    }
}
