//! The replay cache for HELLO nonces: fixed memory, time-bounded entries, a fair share per
//! agent.

use std::hash::BuildHasher;

use foldhash::quality::FixedState;

use super::fixed_table::FixedTable;
use super::{AuthError, SkewWindow};
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

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    fingerprint: u64,
    agent: u64,
    expires: Timestamp,
}

/// Remembers HELLO nonces for as long as their HELLO could still be accepted.
///
/// All memory is allocated at construction and never grows: a fingerprint table (fingerprint
/// and expiry), a per-agent count table and a ring of entries in arrival order, about 56 bytes
/// per nonce of capacity. A check costs two hash computations, one or two table probes, and
/// the amortised eviction of one expired entry.
///
/// Nonces are identified by a 64-bit fingerprint of (agent id, nonce) under a secret seed, so
/// nobody can aim collisions at another agent's nonces; two honest nonces collide with
/// probability about `len / 2^64` per check, which costs one spurious refusal and a retry.
///
/// Verdicts are exact: a nonce is `Replayed` exactly while its HELLO could still be accepted.
/// Storage is released in arrival order, so an entry stamped far ahead of its arrival can keep
/// later, already expired entries occupying capacity (and their agent's quota) a little longer,
/// never more than one window past their own expiry. Size the capacity for the HELLOs that
/// arrive in two windows.
#[derive(Debug)]
pub struct NonceCache {
    config: NonceCacheConfig,
    hasher: FixedState,
    seen: FixedTable<Timestamp>,
    agents: FixedTable<u32>,
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
        Ok(NonceCache {
            config,
            hasher: FixedState::with_seed(entropy.next_u64()),
            seen: FixedTable::with_capacity(config.capacity),
            agents: FixedTable::with_capacity(config.max_agents),
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
        let now = now.max(self.latest);
        self.latest = now;
        self.evict_expired(now);
        if ts < self.horizon || !self.config.window.contains(ts, now) {
            return NonceOutcome::Stale;
        }
        let agent = non_zero(self.hasher.hash_one(agent.as_str()));
        let fingerprint = non_zero(self.hasher.hash_one((agent, &nonce.0)));
        let remembered = self.seen.get(fingerprint);
        if remembered.is_some_and(|until| until >= now) {
            return NonceOutcome::Replayed;
        }
        let held = self.agents.get(agent).unwrap_or(0);
        if held as usize >= self.config.per_agent_quota {
            return NonceOutcome::OverQuota;
        }
        if self.len == self.ring.len() || (held == 0 && self.agents.is_full()) {
            return NonceOutcome::Full;
        }
        let expires = self.config.window.expiry(ts);
        // Room was checked above, so no insertion below can fail.
        match self.agents.get_mut(agent) {
            Some(count) => *count += 1,
            None => {
                self.agents.insert(agent, 1);
            }
        }
        match self.seen.get_mut(fingerprint) {
            // An expired entry still queued behind a longer-lived one: renew it in place. Its
            // old ring entry will see a different expiry and leave the table alone.
            Some(until) => *until = expires,
            None => {
                self.seen.insert(fingerprint, expires);
            }
        }
        let tail = (self.head + self.len) % self.ring.len();
        self.ring[tail] = Entry { fingerprint, agent, expires };
        self.len += 1;
        NonceOutcome::Fresh
    }

    /// Forgets every nonce whose HELLO is stale at `now`, oldest arrival first. [`check`]
    /// does this itself; call it when idle to release quota sooner.
    ///
    /// [`check`]: NonceCache::check
    pub fn evict_expired(&mut self, now: Timestamp) {
        while self.len > 0 {
            let entry = self.ring[self.head];
            if entry.expires >= now {
                break;
            }
            // Only the incarnation this ring entry created; a renewed one expires later.
            if self.seen.get(entry.fingerprint) == Some(entry.expires) {
                self.seen.remove(entry.fingerprint);
            }
            if let Some(count) = self.agents.get_mut(entry.agent) {
                *count -= 1;
                if *count == 0 {
                    self.agents.remove(entry.agent);
                }
            }
            self.head = (self.head + 1) % self.ring.len();
            self.len -= 1;
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
        self.seen.allocated_bytes() + self.agents.allocated_bytes() + std::mem::size_of_val(&*self.ring)
    }
}

fn non_zero(hash: u64) -> u64 {
    hash.max(1)
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
