//! A circuit breaker: stop calling something that keeps failing, then probe it carefully.
//!
//! Closed, it counts failures in a sliding time window and opens after too many. Open, it
//! refuses every call until a deadline. Half-open, it lets a few trial calls through: enough
//! successes close it, any failure opens it again.

use std::collections::VecDeque;
use std::time::Duration;

use thiserror::Error;

use crate::Timestamp;

/// When a [`CircuitBreaker`] opens, how long it stays open, and what closes it again.
///
/// Thresholds of zero are treated as one. `failure_threshold` is capped at
/// [`CircuitPolicy::MAX_FAILURE_THRESHOLD`], because the breaker remembers that many failure
/// times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitPolicy {
    /// Failures inside `window` that open the breaker (N).
    pub failure_threshold: u32,
    /// The sliding window failures are counted in; a failure at `t` counts while
    /// `now - t <= window`.
    pub window: Duration,
    /// How long the breaker stays open before it lets trial calls through.
    pub open_for: Duration,
    /// Consecutive trial successes that close a half-open breaker (M). It is also the number
    /// of trial calls admitted at once while half-open.
    pub success_threshold: u32,
}

impl CircuitPolicy {
    /// The largest `failure_threshold` honoured; larger values count as this one. It bounds
    /// the breaker's memory to 8 KiB of failure times.
    pub const MAX_FAILURE_THRESHOLD: u32 = 1024;

    /// Five failures within ten seconds open the breaker for thirty; two successes close it.
    ///
    /// Five failures in ten seconds is well above the occasional error of a healthy peer and
    /// well below what a dead one produces under load. Thirty seconds is long enough for a
    /// restarting process to come back without being hammered, and two successes in a row
    /// make it unlikely that one lucky call closes the breaker on a peer that is still sick.
    pub const DEFAULT: CircuitPolicy = CircuitPolicy {
        failure_threshold: 5,
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(30),
        success_threshold: 2,
    };
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        CircuitPolicy::DEFAULT
    }
}

/// The state of a [`CircuitBreaker`] as its callers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through; failures are being counted.
    Closed,
    /// Calls are refused until `until`.
    Open {
        /// When the breaker turns half-open.
        until: Timestamp,
    },
    /// A limited number of trial calls go through to probe whether the peer has recovered.
    HalfOpen,
}

/// A call refused by [`CircuitBreaker::allow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Error)]
#[error("circuit open: retry at {retry_at}")]
pub struct CircuitOpen {
    /// The earliest time a call may be admitted; always later than the `now` refused.
    pub retry_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open {
        until: Timestamp,
    },
    HalfOpen {
        /// When the trials admitted in this round are given up on and a new round may start.
        round_ends: Timestamp,
        /// Trial calls admitted this round.
        trials: u32,
        /// Trial successes since the breaker turned half-open.
        successes: u32,
    },
}

/// A closed / open / half-open circuit breaker driven by the caller's clock.
///
/// Ask [`allow`] before each call and report its outcome with [`on_success`] or
/// [`on_failure`]. The breaker opens after N failures within the sliding window (successes in
/// between do not erase them: it counts failures in time, not in a row), refuses calls for
/// `open_for`, then turns half-open and admits up to M trial calls per round. M successes
/// close it; any failure opens it again for a fresh `open_for`. Trials that never report back
/// do not wedge it: after `open_for` a new round of M trials is admitted.
///
/// Outcomes reported while open are ignored, since they belong to calls admitted before it
/// opened. The breaker cannot tell calls apart, so a late outcome arriving while half-open
/// counts as a trial's. Time never runs backwards inside the breaker: a `now` earlier than
/// one already seen is treated as that one. Memory is fixed at construction (the last N
/// failure times); every call is O(1).
///
/// [`allow`]: CircuitBreaker::allow
/// [`on_success`]: CircuitBreaker::on_success
/// [`on_failure`]: CircuitBreaker::on_failure
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    policy: CircuitPolicy,
    failure_threshold: usize,
    success_threshold: u32,
    /// The times of the most recent failures while closed, oldest first, at most
    /// `failure_threshold` of them.
    failures: VecDeque<Timestamp>,
    phase: Phase,
    latest: Timestamp,
}

impl CircuitBreaker {
    /// A closed breaker with no failures counted. Allocates room for the last
    /// `failure_threshold` failure times (at most [`CircuitPolicy::MAX_FAILURE_THRESHOLD`]).
    pub fn new(policy: CircuitPolicy) -> Self {
        let failure_threshold = policy.failure_threshold.clamp(1, CircuitPolicy::MAX_FAILURE_THRESHOLD);
        let failure_threshold = usize::try_from(failure_threshold).unwrap_or(1);
        CircuitBreaker {
            policy,
            failure_threshold,
            success_threshold: policy.success_threshold.max(1),
            failures: VecDeque::with_capacity(failure_threshold),
            phase: Phase::Closed,
            latest: Timestamp::ZERO,
        }
    }

    /// Whether a call may be made at `now`. Refused while open, and while half-open once this
    /// round's M trial calls have been admitted; the refusal says when to ask again.
    pub fn allow(&mut self, now: Timestamp) -> Result<(), CircuitOpen> {
        let now = self.advance(now);
        let open_for = self.policy.open_for;
        let success_threshold = self.success_threshold;
        match &mut self.phase {
            Phase::Closed => Ok(()),
            Phase::Open { until } => Err(CircuitOpen { retry_at: *until }),
            Phase::HalfOpen { round_ends, trials, .. } => {
                if *trials >= success_threshold {
                    if now < *round_ends {
                        return Err(CircuitOpen { retry_at: *round_ends });
                    }
                    // This round's trials never all reported back: start another round.
                    *trials = 0;
                    *round_ends = now.saturating_add(open_for);
                }
                *trials = trials.saturating_add(1);
                Ok(())
            }
        }
    }

    /// Records a call that succeeded at `now`. Half-open, the M-th success closes the breaker;
    /// otherwise it changes nothing.
    pub fn on_success(&mut self, now: Timestamp) {
        self.advance(now);
        if let Phase::HalfOpen { successes, .. } = &mut self.phase {
            *successes = successes.saturating_add(1);
            if *successes >= self.success_threshold {
                self.phase = Phase::Closed;
                self.failures.clear();
            }
        }
    }

    /// Records a call that failed at `now`. Closed, the breaker opens when this is the N-th
    /// failure within the window; half-open, it opens at once; open, nothing changes.
    pub fn on_failure(&mut self, now: Timestamp) {
        let now = self.advance(now);
        match self.phase {
            Phase::Closed => {
                if self.failures.len() >= self.failure_threshold {
                    self.failures.pop_front();
                }
                self.failures.push_back(now);
                let oldest = self.failures.front().copied().unwrap_or(now);
                if self.failures.len() >= self.failure_threshold && now.saturating_since(oldest) <= self.policy.window {
                    self.trip(now);
                }
            }
            Phase::HalfOpen { .. } => self.trip(now),
            Phase::Open { .. } => {}
        }
    }

    /// The state at `now`; an open breaker whose time is up turns half-open here.
    pub fn state(&mut self, now: Timestamp) -> CircuitState {
        self.advance(now);
        match self.phase {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { until } => CircuitState::Open { until },
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// The policy the breaker was built with, as given (thresholds not yet normalised).
    pub fn policy(&self) -> CircuitPolicy {
        self.policy
    }

    /// Moves the breaker's clock to `now` (never backwards) and turns an expired open state
    /// half-open. Returns the breaker's `now`.
    fn advance(&mut self, now: Timestamp) -> Timestamp {
        let now = now.max(self.latest);
        self.latest = now;
        if let Phase::Open { until } = self.phase {
            if now >= until {
                self.phase =
                    Phase::HalfOpen { round_ends: now.saturating_add(self.policy.open_for), trials: 0, successes: 0 };
            }
        }
        now
    }

    fn trip(&mut self, now: Timestamp) {
        self.phase = Phase::Open { until: now.saturating_add(self.policy.open_for) };
        self.failures.clear();
    }
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

    const POLICY: CircuitPolicy = CircuitPolicy {
        failure_threshold: 3,
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(30),
        success_threshold: 2,
    };

    /// A breaker that opened at `t` under [`POLICY`].
    fn opened_at(t: u64) -> CircuitBreaker {
        let mut breaker = CircuitBreaker::new(POLICY);
        for _ in 0..3 {
            breaker.on_failure(at(t));
        }
        assert_eq!(breaker.state(at(t)), CircuitState::Open { until: at(t + 30_000) });
        breaker
    }

    /// A breaker that turned half-open at `t` under [`POLICY`].
    fn half_open_at(t: u64) -> CircuitBreaker {
        let mut breaker = opened_at(t - 30_000);
        assert_eq!(breaker.state(at(t)), CircuitState::HalfOpen);
        breaker
    }

    #[test]
    fn it_opens_on_the_nth_failure_inside_the_window() {
        let mut breaker = CircuitBreaker::new(POLICY);
        breaker.on_failure(at(0));
        breaker.on_failure(at(1_000));
        assert_eq!(breaker.state(at(1_000)), CircuitState::Closed);
        assert_eq!(breaker.allow(at(1_000)), Ok(()));
        breaker.on_failure(at(2_000));
        assert_eq!(breaker.state(at(2_000)), CircuitState::Open { until: at(32_000) });
        assert_eq!(breaker.allow(at(2_000)), Err(CircuitOpen { retry_at: at(32_000) }));
    }

    #[test]
    fn the_window_includes_its_edge_and_slides() {
        let mut breaker = CircuitBreaker::new(POLICY);
        breaker.on_failure(at(0));
        breaker.on_failure(at(5_000));
        breaker.on_failure(at(10_001));
        assert_eq!(breaker.state(at(10_001)), CircuitState::Closed, "the first failure is 1 ms outside the window");
        breaker.on_failure(at(15_000));
        assert!(matches!(breaker.state(at(15_000)), CircuitState::Open { .. }));

        let mut breaker = CircuitBreaker::new(POLICY);
        breaker.on_failure(at(0));
        breaker.on_failure(at(5_000));
        breaker.on_failure(at(10_000));
        assert!(
            matches!(breaker.state(at(10_000)), CircuitState::Open { .. }),
            "exactly one window apart is inside it"
        );
    }

    #[test]
    fn successes_while_closed_do_not_erase_failures() {
        let mut breaker = CircuitBreaker::new(POLICY);
        breaker.on_failure(at(0));
        breaker.on_success(at(1));
        breaker.on_failure(at(2));
        breaker.on_success(at(3));
        breaker.on_failure(at(4));
        assert!(matches!(breaker.state(at(4)), CircuitState::Open { .. }));
    }

    #[test]
    fn it_turns_half_open_exactly_at_until() {
        let mut breaker = opened_at(0);
        assert_eq!(breaker.allow(at(29_999)), Err(CircuitOpen { retry_at: at(30_000) }));
        assert_eq!(breaker.state(at(29_999)), CircuitState::Open { until: at(30_000) });
        assert_eq!(breaker.allow(at(30_000)), Ok(()));
        assert_eq!(breaker.state(at(30_000)), CircuitState::HalfOpen);
    }

    #[test]
    fn m_successes_close_a_half_open_breaker_and_fewer_do_not() {
        let mut breaker = half_open_at(30_000);
        assert_eq!(breaker.allow(at(30_000)), Ok(()));
        breaker.on_success(at(30_010));
        assert_eq!(breaker.state(at(30_010)), CircuitState::HalfOpen);
        assert_eq!(breaker.allow(at(30_010)), Ok(()));
        breaker.on_success(at(30_020));
        assert_eq!(breaker.state(at(30_020)), CircuitState::Closed);

        // Closing starts the failure count over.
        breaker.on_failure(at(30_030));
        breaker.on_failure(at(30_040));
        assert_eq!(breaker.state(at(30_040)), CircuitState::Closed);
    }

    #[test]
    fn any_failure_while_half_open_opens_again_for_a_fresh_period() {
        let mut breaker = half_open_at(30_000);
        assert_eq!(breaker.allow(at(30_000)), Ok(()));
        breaker.on_success(at(30_100));
        assert_eq!(breaker.allow(at(30_100)), Ok(()));
        breaker.on_failure(at(30_200));
        assert_eq!(breaker.state(at(30_200)), CircuitState::Open { until: at(60_200) });
        // The success before the failure does not carry over into the next half-open spell.
        assert_eq!(breaker.state(at(60_200)), CircuitState::HalfOpen);
        breaker.on_success(at(60_300));
        assert_eq!(breaker.state(at(60_300)), CircuitState::HalfOpen);
    }

    #[test]
    fn half_open_admits_m_trials_per_round() {
        let mut breaker = half_open_at(30_000);
        assert_eq!(breaker.allow(at(30_000)), Ok(()));
        assert_eq!(breaker.allow(at(30_001)), Ok(()));
        assert_eq!(breaker.allow(at(30_002)), Err(CircuitOpen { retry_at: at(60_000) }));
        assert_eq!(breaker.state(at(59_999)), CircuitState::HalfOpen);
        assert!(breaker.allow(at(59_999)).is_err());
        // The trials never reported back: a new round is admitted rather than wedging.
        assert_eq!(breaker.allow(at(60_000)), Ok(()));
        assert_eq!(breaker.allow(at(60_000)), Ok(()));
        assert!(breaker.allow(at(60_000)).is_err());
    }

    #[test]
    fn outcomes_reported_while_open_are_ignored() {
        let mut breaker = opened_at(0);
        breaker.on_failure(at(10_000));
        breaker.on_success(at(10_000));
        breaker.on_success(at(10_000));
        assert_eq!(breaker.state(at(10_000)), CircuitState::Open { until: at(30_000) });
    }

    #[test]
    fn zero_thresholds_mean_one() {
        let policy = CircuitPolicy { failure_threshold: 0, success_threshold: 0, ..POLICY };
        let mut breaker = CircuitBreaker::new(policy);
        assert_eq!(breaker.allow(at(0)), Ok(()));
        breaker.on_failure(at(0));
        assert!(matches!(breaker.state(at(0)), CircuitState::Open { .. }));
        assert_eq!(breaker.allow(at(30_000)), Ok(()));
        assert!(breaker.allow(at(30_000)).is_err(), "one trial at a time");
        breaker.on_success(at(30_000));
        assert_eq!(breaker.state(at(30_000)), CircuitState::Closed);
    }

    #[test]
    fn a_huge_failure_threshold_is_capped_and_memory_stays_bounded() {
        let policy = CircuitPolicy { failure_threshold: u32::MAX, window: Duration::MAX, ..POLICY };
        let mut breaker = CircuitBreaker::new(policy);
        assert!(breaker.failures.capacity() < 2 * 1024);
        for _ in 0..CircuitPolicy::MAX_FAILURE_THRESHOLD - 1 {
            breaker.on_failure(at(0));
        }
        assert_eq!(breaker.state(at(0)), CircuitState::Closed);
        breaker.on_failure(at(0));
        assert!(matches!(breaker.state(at(0)), CircuitState::Open { .. }));
    }

    #[test]
    fn a_zero_window_counts_only_simultaneous_failures() {
        let policy = CircuitPolicy { window: Duration::ZERO, ..POLICY };
        let mut breaker = CircuitBreaker::new(policy);
        for t in 0..10 {
            breaker.on_failure(at(t));
        }
        assert_eq!(breaker.state(at(10)), CircuitState::Closed);
        for _ in 0..3 {
            breaker.on_failure(at(20));
        }
        assert!(matches!(breaker.state(at(20)), CircuitState::Open { .. }));
    }

    #[test]
    fn a_clock_running_backwards_neither_closes_nor_half_opens_it() {
        let mut breaker = opened_at(10_000);
        assert_eq!(breaker.allow(at(0)), Err(CircuitOpen { retry_at: at(40_000) }));
        assert_eq!(breaker.state(at(0)), CircuitState::Open { until: at(40_000) });
    }

    #[test]
    fn an_endless_open_period_saturates() {
        let policy = CircuitPolicy { failure_threshold: 1, open_for: Duration::MAX, ..POLICY };
        let mut breaker = CircuitBreaker::new(policy);
        breaker.on_failure(at(5));
        assert_eq!(breaker.state(at(u64::MAX - 1)), CircuitState::Open { until: at(u64::MAX) });
        assert_eq!(breaker.allow(at(u64::MAX)), Ok(()));
        assert_eq!(breaker.state(at(u64::MAX)), CircuitState::HalfOpen);
    }

    /// Whether the `n` most recent of `times` lie within `window` of the last one.
    fn model_trips(times: &[u64], n: usize, window: u64) -> bool {
        times.len() >= n
            && times
                .len()
                .checked_sub(n)
                .and_then(|first| times.get(first))
                .zip(times.last())
                .is_some_and(|(first, last)| last - first <= window)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allow,
        Success,
        Failure,
        State,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![Just(Op::Allow), Just(Op::Success), Just(Op::Failure), Just(Op::State),]
    }

    proptest! {
        #[test]
        fn breaker_opens_only_after_n_failures_inside_the_window(
            n in 1u32..6,
            window in 0u64..2_000,
            gaps in proptest::collection::vec(0u64..1_000, 1..60),
        ) {
            let policy = CircuitPolicy { failure_threshold: n, window: ms(window), ..POLICY };
            let mut breaker = CircuitBreaker::new(policy);
            let mut times = Vec::new();
            let mut now = 0u64;
            for gap in gaps {
                now += gap;
                times.push(now);
                breaker.on_failure(at(now));
                let state = breaker.state(at(now));
                if model_trips(&times, n as usize, window) {
                    prop_assert_eq!(state, CircuitState::Open { until: at(now + 30_000) });
                    break;
                }
                prop_assert_eq!(state, CircuitState::Closed);
            }
        }

        #[test]
        fn a_half_open_breaker_closes_only_after_m_consecutive_successes(
            m in 1u32..5,
            outcomes in proptest::collection::vec(any::<bool>(), 1..30),
        ) {
            let policy = CircuitPolicy { success_threshold: m, failure_threshold: 1, ..POLICY };
            let mut breaker = CircuitBreaker::new(policy);
            let mut now = 0u64;
            breaker.on_failure(at(now));
            let mut streak = 0u32;
            for ok in outcomes {
                now += 30_000;
                // Open spells last 30 s, so every step finds the breaker half-open or closed.
                let before = breaker.state(at(now));
                let open = matches!(before, CircuitState::Open { .. });
                prop_assert!(!open, "never found open: {:?}", before);
                if before == CircuitState::Closed {
                    break;
                }
                if ok {
                    breaker.on_success(at(now));
                    streak += 1;
                } else {
                    breaker.on_failure(at(now));
                    streak = 0;
                }
                let after = breaker.state(at(now));
                if streak >= m {
                    prop_assert_eq!(after, CircuitState::Closed);
                } else if ok {
                    prop_assert_eq!(after, CircuitState::HalfOpen);
                } else {
                    prop_assert_eq!(after, CircuitState::Open { until: at(now + 30_000) });
                }
            }
        }

        #[test]
        fn no_input_sequence_panics(
            failure_threshold in any::<u32>(),
            success_threshold in any::<u32>(),
            window in any::<u64>(),
            open_for in prop_oneof![0u64..100_000, any::<u64>()],
            ops in proptest::collection::vec((op(), any::<u64>(), -5_000i64..50_000), 0..200),
            start in any::<u64>(),
        ) {
            let policy = CircuitPolicy {
                failure_threshold,
                window: ms(window),
                open_for: ms(open_for),
                success_threshold,
            };
            let mut breaker = CircuitBreaker::new(policy);
            let mut now = start;
            let mut latest = 0u64;
            for (op, jump, step) in ops {
                // Mostly small steps either way, now and then a jump anywhere.
                now = if jump % 16 == 0 { jump } else { now.saturating_add_signed(step) };
                latest = latest.max(now);
                match op {
                    Op::Allow => match breaker.allow(at(now)) {
                        Ok(()) => {
                            let state = breaker.state(at(now));
                            let open = matches!(state, CircuitState::Open { .. });
                            prop_assert!(!open, "admitted while open: {:?}", state);
                        }
                        Err(refused) => prop_assert!(
                            refused.retry_at > at(latest),
                            "a refusal names a later time"
                        ),
                    },
                    Op::Success => breaker.on_success(at(now)),
                    Op::Failure => breaker.on_failure(at(now)),
                    Op::State => {}
                }
                if let CircuitState::Open { until } = breaker.state(at(now)) {
                    prop_assert!(until > at(latest));
                }
                prop_assert!(breaker.failures.len() <= CircuitPolicy::MAX_FAILURE_THRESHOLD as usize);
            }
        }
    }
}
