//! The replay cache for HELLO nonces: fixed memory, time-bounded entries, a fair share per
//! agent.

use std::hash::BuildHasher;

use foldhash::quality::FixedState;

use super::agent_counts::{AgentCounts, MAX_AGENTS};
use super::nonce_table::{Lookup, MAX_CAPACITY, NonceTable};
use super::{AuthError, SkewWindow};
use crate::time::millis_of;
use crate::wire::{AgentId, Nonce};
use crate::{Entropy, Timestamp};

/// The size and fairness bounds of a [`NonceCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NonceCacheConfig {
    /// The most nonces held at once, across all agents.
    pub capacity: usize,
    /// The most nonces one agent may hold at once, so that one agent flooding HELLOs cannot
    /// take the capacity honest agents need.
    pub per_agent_quota: usize,
    /// The most distinct agents tracked at once.
    pub max_agents: usize,
    /// The skew window; nonces are held until their HELLO would be stale anyway.
    pub window: SkewWindow,
}

impl NonceCacheConfig {
    /// A cache of `capacity` nonces, a quota of 64 per agent, and room for as many agents as
    /// nonces.
    pub fn new(capacity: usize, window: SkewWindow) -> Self {
        NonceCacheConfig { capacity, per_agent_quota: capacity.min(64), max_agents: capacity, window }
    }

    fn validate(&self) -> Result<(), AuthError> {
        let problem = if self.capacity == 0 {
            "capacity must be at least 1"
        } else if self.capacity > MAX_CAPACITY {
            "capacity must be below 2^32"
        } else if self.per_agent_quota == 0 || self.per_agent_quota > self.capacity {
            "per_agent_quota must be between 1 and capacity"
        } else if self.max_agents == 0 || self.max_agents > self.capacity {
            "max_agents must be between 1 and capacity"
        } else if self.max_agents > MAX_AGENTS {
            "max_agents must be below 2^32 - 1"
        } else {
            return Ok(());
        };
        Err(AuthError::InvalidCacheConfig(problem))
    }
}

/// The verdict on one HELLO nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NonceOutcome {
    /// Not seen inside the window; it is now remembered. Accept the HELLO.
    Fresh,
    /// Seen before inside the window. Refuse: a replay.
    Replayed,
    /// The timestamp is outside the skew window. Refuse.
    Stale,
    /// This agent already holds its full quota of nonces. Refuse; the agent is sending HELLOs
    /// faster than any honest agent does.
    OverQuota,
    /// The cache holds its full capacity (or its full count of agents) of unexpired nonces.
    /// Refuse: accepting without remembering would open a replay hole.
    Full,
}

impl NonceOutcome {
    /// Whether the HELLO may be accepted.
    pub fn is_fresh(self) -> bool {
        self == NonceOutcome::Fresh
    }
}

/// One nonce held, in arrival order: the whole truth about it, which the table indexes.
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    fingerprint: u64,
    /// The last instant, in milliseconds, at which its HELLO could be accepted.
    expires: u64,
    agent_slot: u32,
    /// Its bucket in the table, to release it there.
    bucket: u32,
}

/// Remembers HELLO nonces for as long as their HELLO could still be accepted.
///
/// All memory is allocated at construction and never grows: a ring of the nonces held, in
/// arrival order (24 bytes per nonce: fingerprint, expiry, agent and table bucket), a table
/// indexing them by fingerprint (7.7 bytes per nonce, of which 2.7 are read by checks, see
/// `nonce_table`) and per-agent counts (20 to 28 bytes per agent of `max_agents`): about 58
/// bytes per nonce of capacity with the default `max_agents`, 63 MiB for 1.125 M.
///
/// Cost of a check: two keyed hashes (of the agent id, then of agent and nonce), one 64-byte
/// bucket of the table's hot part (and the next one when a nonce went past it), one write to
/// its cold part that nothing waits for, one probe of the agent index, and the amortised
/// release of one expired nonce: the next ring entry in order, a decrement in its table
/// bucket and one in its agent's count. No allocation, no rebuild. What checks read at
/// random is the hot part and the counts of the agents present: about 4 MiB for a million
/// nonces held by 62,500 agents.
///
/// Nonces are identified by a 64-bit fingerprint of (agent id, nonce) under a secret seed, so
/// nobody can aim collisions at another agent's nonces. The table keeps 16 bits of each; a
/// lookup compares the whole fingerprint, kept in the ring, whenever those agree, so two
/// honest nonces are taken for one with probability about `len / 2^64` per check, which
/// costs one spurious refusal and a retry.
///
/// Verdicts are exact: a nonce is `Replayed` exactly while its HELLO could still be accepted.
/// Capacity and quotas are released in arrival order, so an entry stamped far ahead of its
/// arrival can keep later, already expired entries occupying capacity (and their agent's
/// quota) a little longer, never more than one window past their own expiry. Size the
/// capacity for the HELLOs that arrive in two windows.
#[derive(Debug)]
pub struct NonceCache {
    config: NonceCacheConfig,
    /// The window in milliseconds, for the check's arithmetic.
    window_ms: u64,
    hasher: FixedState,
    /// Secret keys of the fingerprint, drawn from the same seed as `hasher`.
    keys: [u64; 5],
    table: NonceTable,
    agents: AgentCounts,
    ring: Box<[Entry]>,
    head: usize,
    len: usize,
    latest: Timestamp,
    horizon: Timestamp,
}

impl NonceCache {
    /// An empty cache. `entropy` seeds the fingerprint hash. Fails on a configuration whose
    /// bounds are zero or inconsistent.
    pub fn new(config: NonceCacheConfig, entropy: &mut Entropy) -> Result<Self, AuthError> {
        config.validate()?;
        let seed = entropy.next_u64();
        let mut stream = seed;
        let keys = std::array::from_fn(|_| splitmix64(&mut stream));
        Ok(NonceCache {
            config,
            window_ms: millis_of(config.window.width()),
            hasher: FixedState::with_seed(seed),
            keys,
            table: NonceTable::with_capacity(config.capacity),
            agents: AgentCounts::with_capacity(config.max_agents),
            ring: vec![Entry::default(); config.capacity].into_boxed_slice(),
            head: 0,
            len: 0,
            latest: Timestamp::ZERO,
            horizon: Timestamp::ZERO,
        })
    }

    /// Declares that the cache has seen every HELLO since `start` and none before: HELLOs
    /// stamped earlier are stale from now on. A host calls this with its start time, so that a
    /// HELLO captured before a restart cannot be replayed into the empty cache after it. An
    /// agent whose clock lags by `d` is refused for the first `d` after a restart and
    /// retries.
    pub fn set_horizon(&mut self, start: Timestamp) {
        self.horizon = self.horizon.max(start);
    }

    /// Checks the HELLO nonce `nonce` from `agent`, stamped `ts`, at time `now`, and
    /// remembers it when it is fresh.
    ///
    /// Time never runs backwards inside the cache: a `now` earlier than one seen before is
    /// treated as that earlier-seen time.
    pub fn check(&mut self, agent: &AgentId, nonce: &Nonce, ts: Timestamp, now: Timestamp) -> NonceOutcome {
        self.release_expired(now);
        let now = self.latest;
        // The skew window, as SkewWindow::contains computes it.
        let (ts_ms, now_ms) = (ts.as_millis(), now.as_millis());
        if ts < self.horizon
            || ts_ms.saturating_add(self.window_ms) < now_ms
            || ts_ms > now_ms.saturating_add(self.window_ms)
        {
            return NonceOutcome::Stale;
        }
        let agent = non_zero(self.hasher.hash_one(agent.as_str()));
        let fingerprint = self.fingerprint(agent, nonce);
        let ring = &self.ring;
        let found = self.table.lookup(fingerprint, |position| {
            let entry = &ring[position as usize];
            entry.fingerprint == fingerprint && entry.expires >= now_ms
        });
        let Lookup::Absent(vacancy) = found else {
            return NonceOutcome::Replayed;
        };
        let slot = self.agents.find(agent);
        let held_by_agent = slot.map_or(0, |slot| self.agents.held(slot));
        if held_by_agent >= self.config.per_agent_quota {
            return NonceOutcome::OverQuota;
        }
        if self.len == self.config.capacity || (held_by_agent == 0 && self.agents.is_full()) {
            return NonceOutcome::Full;
        }
        // Room for the agent was checked above, and the table has more slots than the ring
        // holds entries, so neither refuses; if one did, nothing is remembered.
        let Some(agent_slot) = self.agents.acquire(agent, slot) else {
            return NonceOutcome::Full;
        };
        let tail = wrap(self.head + self.len, self.config.capacity);
        // The capacity is at most MAX_CAPACITY, so positions fit a u32.
        let Some(bucket) = self.table.insert(fingerprint, tail as u32, vacancy) else {
            self.agents.release(agent_slot);
            return NonceOutcome::Full;
        };
        self.ring[tail] = Entry { fingerprint, expires: ts_ms.saturating_add(self.window_ms), agent_slot, bucket };
        self.len += 1;
        NonceOutcome::Fresh
    }

    /// Forgets every nonce whose HELLO is stale at `now`, oldest arrival first. [`check`]
    /// does this itself; call it when idle to release quota sooner. Like `check`, it moves the
    /// cache's clock forward to `now`.
    ///
    /// [`check`]: NonceCache::check
    pub fn evict_expired(&mut self, now: Timestamp) {
        self.release_expired(now);
    }

    /// [`evict_expired`](NonceCache::evict_expired), inlined into [`check`](NonceCache::check).
    #[inline(always)]
    fn release_expired(&mut self, now: Timestamp) {
        let now = now.max(self.latest);
        self.latest = now;
        while self.len > 0 {
            let entry = &self.ring[self.head];
            if entry.expires >= now.as_millis() {
                break;
            }
            self.agents.release(entry.agent_slot);
            self.table.release(entry.fingerprint, entry.bucket);
            self.head = wrap(self.head + 1, self.config.capacity);
            self.len -= 1;
        }
    }

    /// The keyed fingerprint of `nonce` from the agent whose keyed hash is `agent`: folded
    /// 64×64→128-bit multiplications of the nonce's words and the agent hash, each mixed with a
    /// secret key, as foldhash does. Never 0.
    fn fingerprint(&self, agent: u64, nonce: &Nonce) -> u64 {
        let [k0, k1, k2, k3, k4] = self.keys;
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&nonce.0[i * 8..i * 8 + 8]);
            u64::from_le_bytes(bytes)
        };
        let low = folded_multiply(word(0) ^ k0, word(1) ^ k1);
        let high = folded_multiply(word(2) ^ k2, word(3) ^ k3);
        non_zero(folded_multiply(low ^ agent, high ^ k4))
    }

    /// Nonces held now.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no nonce is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Distinct agents holding at least one nonce.
    pub fn agents(&self) -> usize {
        self.agents.len()
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &NonceCacheConfig {
        &self.config
    }

    /// Bytes allocated for the cache's tables; fixed at construction.
    pub fn allocated_bytes(&self) -> usize {
        self.table.allocated_bytes() + self.agents.allocated_bytes() + std::mem::size_of_val(&*self.ring)
    }
}

/// `i`, an index into a ring of `len` entries or one lap past it, as an index into it.
fn wrap(i: usize, len: usize) -> usize {
    if i >= len { i - len } else { i }
}

fn non_zero(hash: u64) -> u64 {
    hash.max(1)
}

/// The high and low halves of the full product, combined.
fn folded_multiply(x: u64, y: u64) -> u64 {
    let product = u128::from(x) * u128::from(y);
    // Truncation is intended: the low half, then the high half.
    (product as u64) ^ ((product >> 64) as u64)
}

/// The next output of the SplitMix64 generator, which turns one seed into several keys.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const WINDOW: SkewWindow = SkewWindow::new(Duration::from_secs(10));

    fn cache(capacity: usize, quota: usize) -> NonceCache {
        let config = NonceCacheConfig { capacity, per_agent_quota: quota, max_agents: capacity, window: WINDOW };
        NonceCache::new(config, &mut Entropy::from_u64(1)).expect("valid config")
    }

    fn agent(id: &str) -> AgentId {
        AgentId::new(id).expect("valid id")
    }

    fn nonce(n: u32) -> Nonce {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        Nonce(bytes)
    }

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_millis(secs * 1000)
    }

    #[test]
    fn a_nonce_is_fresh_once_then_replayed_until_stale() {
        let mut cache = cache(8, 8);
        let gw = agent("gw");
        assert_eq!(cache.check(&gw, &nonce(1), at(100), at(100)), NonceOutcome::Fresh);
        assert_eq!(cache.check(&gw, &nonce(1), at(100), at(105)), NonceOutcome::Replayed);
        assert_eq!(cache.check(&gw, &nonce(1), at(100), at(110)), NonceOutcome::Replayed);
        assert_eq!(cache.check(&gw, &nonce(1), at(100), at(111)), NonceOutcome::Stale);
        assert!(cache.is_empty(), "the expired nonce was evicted");
    }

    #[test]
    fn the_same_nonce_from_another_agent_is_a_different_nonce() {
        let mut cache = cache(8, 8);
        assert!(cache.check(&agent("a"), &nonce(1), at(5), at(5)).is_fresh());
        assert!(cache.check(&agent("b"), &nonce(1), at(5), at(5)).is_fresh());
    }

    #[test]
    fn a_flooding_agent_hits_its_quota_and_honest_agents_still_get_in() {
        let mut cache = cache(16, 4);
        let flooder = agent("flooder");
        let outcomes: Vec<_> = (0..100).map(|n| cache.check(&flooder, &nonce(n), at(50), at(50))).collect();
        assert_eq!(outcomes.iter().filter(|o| o.is_fresh()).count(), 4);
        assert!(outcomes[4..].iter().all(|o| *o == NonceOutcome::OverQuota));
        for n in 0..12 {
            assert!(cache.check(&agent(&format!("honest-{n}")), &nonce(n), at(50), at(50)).is_fresh());
        }
        assert_eq!(cache.check(&agent("late"), &nonce(0), at(50), at(50)), NonceOutcome::Full);
        assert_eq!(cache.check(&flooder, &nonce(999), at(61), at(61)), NonceOutcome::Fresh, "quota returns with time");
    }

    #[test]
    fn an_earlier_now_does_not_resurrect_forgotten_nonces() {
        let mut cache = cache(8, 8);
        let gw = agent("gw");
        assert!(cache.check(&gw, &nonce(1), at(100), at(100)).is_fresh());
        assert_eq!(cache.check(&gw, &nonce(2), at(100), at(200)), NonceOutcome::Stale);
        assert_eq!(cache.check(&gw, &nonce(1), at(100), at(100)), NonceOutcome::Stale, "time only moves forward");
    }

    #[test]
    fn hellos_stamped_before_the_horizon_are_stale() {
        let mut cache = cache(8, 8);
        cache.set_horizon(at(100));
        assert_eq!(cache.check(&agent("gw"), &nonce(1), at(99), at(100)), NonceOutcome::Stale);
        assert!(cache.check(&agent("gw"), &nonce(1), at(100), at(100)).is_fresh());
    }

    #[test]
    fn verdicts_hold_for_windows_of_months() {
        const DAY: u64 = 24 * 3600;
        // 30 and 100 days: more milliseconds than 32 bits count (about 49.7 days), so no part
        // of the cache may keep expiries in 32 bits, nor drop one that is still in the window.
        for window_days in [30, 100] {
            let window = SkewWindow::new(Duration::from_secs(window_days * DAY));
            let config = NonceCacheConfig { capacity: 8, per_agent_quota: 8, max_agents: 8, window };
            let mut cache = NonceCache::new(config, &mut Entropy::from_u64(1)).expect("valid config");
            let gw = agent("gw");
            let start = at(1_000);
            assert!(cache.check(&gw, &nonce(1), start, start).is_fresh());
            for days in [10, 26, 29, 33, 52, 79, 103] {
                let now = at(1_000 + days * DAY);
                assert_eq!(
                    cache.check(&gw, &nonce(1), start, now),
                    if days <= window_days { NonceOutcome::Replayed } else { NonceOutcome::Stale },
                    "window {window_days} days, {days} days later"
                );
                let fresh = cache.check(&gw, &nonce(1000 + days as u32), now, now);
                assert_eq!(fresh, NonceOutcome::Fresh, "window {window_days} days, {days} days later");
            }
        }
    }

    #[test]
    fn a_long_idle_gap_forgets_everything_and_accepts_again() {
        let mut cache = cache(4, 4);
        let gw = agent("gw");
        for n in 0..4 {
            assert!(cache.check(&gw, &nonce(n), at(10), at(10)).is_fresh());
        }
        assert_eq!(cache.check(&gw, &nonce(9), at(10), at(10)), NonceOutcome::OverQuota);
        // Months later, when every held nonce has long expired.
        let later = at(10 + 200 * 24 * 3600);
        for n in 0..4 {
            assert!(cache.check(&gw, &nonce(n), later, later).is_fresh(), "nonce {n}");
        }
        assert_eq!(cache.len(), 4);
    }

    #[test]
    fn inconsistent_bounds_are_refused() {
        let mut entropy = Entropy::from_u64(0);
        for config in [
            NonceCacheConfig::new(0, WINDOW),
            NonceCacheConfig { per_agent_quota: 9, ..NonceCacheConfig::new(8, WINDOW) },
            NonceCacheConfig { max_agents: 0, ..NonceCacheConfig::new(8, WINDOW) },
        ] {
            assert!(matches!(NonceCache::new(config, &mut entropy), Err(AuthError::InvalidCacheConfig(_))));
        }
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_a_queue_of_held_nonces_through_wraps_quotas_and_refusals(
            capacity in 1usize..40,
            quota in 1usize..12,
            max_agents in 1usize..6,
            events in proptest::collection::vec((0u8..6, 0u32..12, -12i64..12, 0u64..1_500), 0..800),
        ) {
            let config = NonceCacheConfig {
                capacity,
                per_agent_quota: quota.min(capacity),
                max_agents: max_agents.min(capacity),
                window: WINDOW,
            };
            let mut cache = NonceCache::new(config, &mut Entropy::from_u64(7)).expect("valid config");
            let window_ms = millis_of(WINDOW.width());
            // The model: (agent, nonce, last instant it may replay) in arrival order, released
            // oldest first once expired, as the cache documents.
            let mut held: std::collections::VecDeque<(u8, u32, u64)> = std::collections::VecDeque::new();
            let mut now = 1_000_000u64;
            for (a, n, skew_s, advance_ms) in events {
                now += advance_ms;
                let ts = now.saturating_add_signed(skew_s * 1000);
                while held.front().is_some_and(|&(_, _, until)| until < now) {
                    held.pop_front();
                }
                let holds = |agent: u8| held.iter().filter(|&&(h, _, _)| h == agent).count();
                let agents = {
                    let mut present: Vec<u8> = held.iter().map(|&(h, _, _)| h).collect();
                    present.sort_unstable();
                    present.dedup();
                    present.len()
                };
                let expected = if ts + window_ms < now || ts > now + window_ms {
                    NonceOutcome::Stale
                } else if held.iter().any(|&(h, m, until)| (h, m) == (a, n) && until >= now) {
                    NonceOutcome::Replayed
                } else if holds(a) >= config.per_agent_quota {
                    NonceOutcome::OverQuota
                } else if held.len() == capacity || (holds(a) == 0 && agents == config.max_agents) {
                    NonceOutcome::Full
                } else {
                    held.push_back((a, n, ts + window_ms));
                    NonceOutcome::Fresh
                };
                let outcome = cache.check(&agent(&format!("a{a}")), &nonce(n), Timestamp::from_millis(ts), Timestamp::from_millis(now));
                proptest::prop_assert_eq!(outcome, expected);
                proptest::prop_assert_eq!(cache.len(), held.len());
            }
        }
    }
}
