//! The replay cache for HELLO nonces: fixed memory, time-bounded entries, a fair share per
//! agent.

use std::hash::BuildHasher;

use foldhash::quality::FixedState;

use super::agent_counts::{AgentCounts, MAX_AGENTS};
use super::nonce_table::{Lookup, NonceTable};
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

/// One remembered nonce, in arrival order: the whole truth about it. The table is an index
/// that can be rebuilt from these.
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    fingerprint: u64,
    expires: Timestamp,
    agent_slot: usize,
}

/// How far the clock may move from the table's time origin before the origin is moved: half
/// the range of the table's 32-bit times, about 24.8 days.
const REBASE_AFTER_MS: u64 = 1 << 31;

/// Remembers HELLO nonces for as long as their HELLO could still be accepted.
///
/// All memory is allocated at construction and never grows: a table of fingerprints and
/// expiries in 64-byte buckets of five slots (at least two slots per nonce of capacity, so
/// 26 to 52 bytes per nonce), a ring of the nonces held in arrival order (24 bytes per nonce)
/// and per-agent counts (24 to 32 bytes per agent of `max_agents`): about 80 bytes per nonce
/// of capacity with the default `max_agents`.
///
/// Cost of a check: two keyed hashes (of the agent id, then of agent and nonce), one cache
/// line of the fingerprint table (two when its bucket overflowed), one probe of the agent
/// index, and the amortised release of one expired nonce, which reads the ring in order and
/// updates a dense array of counts without touching the table: the table forgets lazily, a
/// slot whose expiry has passed being free. No allocation. About every 24 days of clock time
/// the table's time origin is moved and the table rebuilt from the ring, once, in time
/// linear in the capacity.
///
/// Nonces are identified by a 64-bit fingerprint of (agent id, nonce) under a secret seed, so
/// nobody can aim collisions at another agent's nonces; two honest nonces collide with
/// probability about `len / 2^64` per check, which costs one spurious refusal and a retry.
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
    /// The table stores times as offsets from this origin (see [`NonceCache::relative`]).
    origin: Timestamp,
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
            origin: Timestamp::ZERO,
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
        if now_ms - self.origin.as_millis() >= REBASE_AFTER_MS {
            self.rebase(now);
        }
        let agent = non_zero(self.hasher.hash_one(agent.as_str()));
        let fingerprint = self.fingerprint(agent, nonce);
        let now_rel = self.relative(now);
        let Lookup::Absent(vacancy) = self.table.lookup(fingerprint, now_rel) else {
            return NonceOutcome::Replayed;
        };
        let slot = self.agents.find(agent);
        let held = slot.map_or(0, |slot| self.agents.held(slot));
        if held >= self.config.per_agent_quota {
            return NonceOutcome::OverQuota;
        }
        if self.len == self.ring.len() || (held == 0 && self.agents.is_full()) {
            return NonceOutcome::Full;
        }
        let expires = self.config.window.expiry(ts);
        // Room for the agent was checked above, and the table has more slots than the ring
        // holds entries, so neither refuses; if one did, nothing is remembered.
        let Some(agent_slot) = self.agents.acquire(agent, slot) else {
            return NonceOutcome::Full;
        };
        if !self.table.insert(fingerprint, self.relative(expires), now_rel, vacancy) {
            self.agents.release(agent_slot);
            return NonceOutcome::Full;
        }
        let mut tail = self.head + self.len;
        if tail >= self.ring.len() {
            tail -= self.ring.len();
        }
        self.ring[tail] = Entry { fingerprint, expires, agent_slot };
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
            let entry = self.ring[self.head];
            if entry.expires >= now {
                break;
            }
            // The table forgets the fingerprint by itself once its expiry has passed.
            self.agents.release(entry.agent_slot);
            self.head += 1;
            if self.head == self.ring.len() {
                self.head = 0;
            }
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

    /// `t` as the table stores it: milliseconds after the origin, plus one so that 0 (an
    /// unused slot) is always in the past, saturated at `u32::MAX` (a time after the next
    /// rebase, which is when the table learns it again).
    fn relative(&self, t: Timestamp) -> u32 {
        let offset = t.as_millis().saturating_sub(self.origin.as_millis()).saturating_add(1);
        u32::try_from(offset).unwrap_or(u32::MAX)
    }

    /// Moves the table's time origin to `now` and rebuilds the table from the ring, which
    /// holds every nonce that can still be live.
    fn rebase(&mut self, now: Timestamp) {
        self.origin = now;
        self.table.clear();
        let now_rel = self.relative(now);
        for i in 0..self.len {
            let entry = self.ring[(self.head + i) % self.ring.len()];
            // At most one entry per fingerprint is live: a live one is never inserted again.
            if entry.expires >= now {
                self.table.insert(entry.fingerprint, self.relative(entry.expires), now_rel, None);
            }
        }
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
    fn verdicts_hold_across_moves_of_the_time_origin_even_for_huge_windows() {
        const DAY: u64 = 24 * 3600;
        // 30 days: entries outlive one move of the origin (every 2^31 ms, about 24.8 days).
        // 100 days: expiries do not fit the table's 32-bit times and are saturated.
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
        // Months later, past several moves of the time origin.
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
}
