//! Per-token and per-client-IP rate limits, each with separate budgets for reads (GET) and
//! writes, kept as token buckets in one bounded map.
//!
//! The map holds at most a fixed number of buckets. When it is full, buckets that have filled
//! up again (their client was idle long enough to lose nothing by forgetting them) are
//! dropped first, then the least recently used; so memory is bounded whatever the number of
//! clients, and the cost of making room is amortised to a constant per new client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use viworks_core::Timestamp;
use viworks_core::flow::{RateLimited, TokenBucket};

/// The most buckets a [`Limiter`] keeps by default (about 10 MB at the most).
pub const MAX_BUCKETS: usize = 100_000;

/// Which budget a request spends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Budget {
    /// `GET` requests.
    Read,
    /// Everything else.
    Write,
}

impl Budget {
    /// The budget of a request with `method`.
    pub fn of_method(method: &str) -> Self {
        if method == "GET" || method == "HEAD" { Budget::Read } else { Budget::Write }
    }
}

/// Whose budget a request spends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    /// A client address. IPv6 addresses are reduced to their /64 network, which one host
    /// usually holds whole; IPv4-mapped IPv6 addresses count as their IPv4 address.
    Ip(IpAddr),
    /// An API token, by its hash.
    Token(String),
}

impl Client {
    /// The budget owner for a request from `ip`.
    pub fn ip(ip: IpAddr) -> Self {
        let ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
            },
            v4 => v4,
        };
        Client::Ip(ip)
    }
}

/// What a request may report in its `X-RateLimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// The budget's size per minute (`X-RateLimit-Limit`).
    pub limit: u32,
    /// Requests left now (`X-RateLimit-Remaining`).
    pub remaining: u32,
    /// When the budget is full again (`X-RateLimit-Reset`, in epoch seconds rounded up).
    pub reset: Timestamp,
}

impl Quota {
    /// `X-RateLimit-Reset`: epoch seconds, rounded up.
    pub fn reset_epoch_secs(&self) -> u64 {
        self.reset.as_millis().div_ceil(1000)
    }

    /// The tighter of two quotas: the one with fewer requests left.
    pub fn tighter(self, other: Quota) -> Quota {
        if other.remaining < self.remaining { other } else { self }
    }
}

/// A request over budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// When to retry (`Retry-After`, rounded up to whole seconds).
    pub retry_after: Duration,
    /// The spent budget.
    pub quota: Quota,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    client: Client,
    budget: Budget,
}

struct Slot {
    bucket: TokenBucket,
    last_used: Timestamp,
}

/// Token buckets by client and budget, bounded in number. Cheap per call: one hash lookup
/// under a mutex.
pub struct Limiter {
    buckets: Mutex<HashMap<Key, Slot>>,
    capacity: usize,
}

impl Default for Limiter {
    /// A limiter of [`MAX_BUCKETS`] buckets.
    fn default() -> Self {
        Limiter::with_capacity(MAX_BUCKETS)
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("buckets", &self.len()).field("capacity", &self.capacity).finish()
    }
}

impl Limiter {
    /// A limiter that keeps at most `capacity` buckets (at least 16).
    pub fn with_capacity(capacity: usize) -> Self {
        Limiter { buckets: Mutex::new(HashMap::new()), capacity: capacity.max(16) }
    }

    /// Spends one request of `client`'s `budget`, which allows `per_minute` requests a minute
    /// in bursts of up to `per_minute`. Fails with the wait when the budget is spent.
    pub fn take(&self, client: &Client, budget: Budget, per_minute: u32, now: Timestamp) -> Result<Quota, Refused> {
        let per_minute = per_minute.max(1);
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = Key { client: client.clone(), budget };
        if !buckets.contains_key(&key) && buckets.len() >= self.capacity {
            make_room(&mut buckets, now, self.capacity);
        }
        let refill = Duration::from_millis((60_000 / u64::from(per_minute)).max(1));
        let slot = buckets
            .entry(key)
            .or_insert_with(|| Slot { bucket: TokenBucket::new(per_minute, refill, now), last_used: now });
        if slot.bucket.capacity() != per_minute {
            // The configured budget changed: start the client over on the new one.
            slot.bucket = TokenBucket::new(per_minute, refill, now);
        }
        slot.last_used = slot.last_used.max(now);
        let outcome = slot.bucket.try_take(now, 1);
        let quota =
            Quota { limit: per_minute, remaining: slot.bucket.available(now), reset: slot.bucket.reset_at(now) };
        match outcome {
            Ok(()) => Ok(quota),
            Err(RateLimited::Wait { retry_after }) => Err(Refused { retry_after, quota }),
            // One token never exceeds a capacity of at least one.
            Err(_) => Err(Refused { retry_after: Duration::from_secs(60), quota }),
        }
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Brings the map to at most 15/16 of `capacity`: drops full buckets (their clients lose
/// nothing), then the least recently used. One O(n) pass frees n/16 slots, so each new
/// client costs O(1) amortised. A client whose partly spent bucket is evicted starts over with
/// a full one; under a flood of distinct clients that is the price of bounded memory.
fn make_room(buckets: &mut HashMap<Key, Slot>, now: Timestamp, capacity: usize) {
    buckets.retain(|_, slot| slot.bucket.available(now) < slot.bucket.capacity());
    let target = capacity - capacity / 16;
    if buckets.len() <= target {
        return;
    }
    let excess = buckets.len() - target;
    let mut ages: Vec<Timestamp> = buckets.values().map(|slot| slot.last_used).collect();
    let (_, cutoff, _) = ages.select_nth_unstable(excess - 1);
    let cutoff = *cutoff;
    let mut left = excess;
    buckets.retain(|_, slot| {
        if left > 0 && slot.last_used <= cutoff {
            left -= 1;
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Client {
        Client::ip(text.parse().expect("an address"))
    }

    #[test]
    fn a_budget_runs_out_then_refills_and_reports_when() {
        let limiter = Limiter::default();
        let now = Timestamp::from_millis(1_000_000);
        let client = Client::Token("t".into());
        for left in (0..3).rev() {
            let quota = limiter.take(&client, Budget::Write, 3, now).expect("within budget");
            assert_eq!((quota.limit, quota.remaining), (3, left));
        }
        let refused = limiter.take(&client, Budget::Write, 3, now).expect_err("over budget");
        assert_eq!(refused.retry_after, Duration::from_secs(20), "one request per 20 s at 3 a minute");
        assert_eq!(refused.quota.remaining, 0);
        assert_eq!(refused.quota.reset, Timestamp::from_millis(1_060_000), "full again after a minute");
        assert_eq!(refused.quota.reset_epoch_secs(), 1060);
        assert!(limiter.take(&client, Budget::Write, 3, now.saturating_add(Duration::from_secs(20))).is_ok());
    }

    #[test]
    fn budgets_are_separate_per_client_and_for_reads_and_writes() {
        let limiter = Limiter::default();
        let now = Timestamp::from_millis(5_000);
        let client = ip("192.0.2.1");
        assert!(limiter.take(&client, Budget::Write, 1, now).is_ok());
        assert!(limiter.take(&client, Budget::Write, 1, now).is_err());
        assert!(limiter.take(&client, Budget::Read, 1, now).is_ok(), "reads have their own budget");
        assert!(limiter.take(&ip("192.0.2.2"), Budget::Write, 1, now).is_ok(), "another address");
        assert!(limiter.take(&Client::Token("192.0.2.1".into()), Budget::Write, 1, now).is_ok());
    }

    #[test]
    fn an_ipv6_network_shares_one_budget_and_mapped_ipv4_counts_as_ipv4() {
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::2"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_eq!(Budget::of_method("GET"), Budget::Read);
        assert_eq!(Budget::of_method("DELETE"), Budget::Write);
    }

    #[test]
    fn the_map_never_exceeds_its_capacity_under_a_flood_of_new_clients() {
        let limiter = Limiter::with_capacity(64);
        let mut now = Timestamp::from_millis(1);
        for n in 0..20_000u32 {
            now = now.saturating_add(Duration::from_millis(1));
            let _ = limiter.take(&Client::Ip(IpAddr::from(n.to_be_bytes())), Budget::Read, 100, now);
            assert!(limiter.len() <= 64, "{} buckets after {n} clients", limiter.len());
        }
        assert!(limiter.len() > 32, "room is made in small steps, not by clearing the map");
    }

    #[test]
    fn making_room_drops_refilled_buckets_before_the_recently_throttled() {
        let limiter = Limiter::with_capacity(16);
        let start = Timestamp::from_millis(1_000);
        let throttled = Client::Token("busy".into());
        // Idle clients, seen first and full again a minute later.
        for n in 0..15u32 {
            let _ = limiter.take(&Client::Ip(IpAddr::from(n.to_be_bytes())), Budget::Read, 60, start);
        }
        let later = start.saturating_add(Duration::from_secs(61));
        for _ in 0..60 {
            let _ = limiter.take(&throttled, Budget::Write, 60, later);
        }
        assert!(limiter.take(&throttled, Budget::Write, 60, later).is_err());
        assert_eq!(limiter.len(), 16);
        assert!(limiter.take(&Client::Token("new".into()), Budget::Read, 60, later).is_ok());
        assert_eq!(limiter.len(), 2, "the 15 refilled buckets were dropped, the spent one kept");
        assert!(limiter.take(&throttled, Budget::Write, 60, later).is_err(), "still throttled");
    }

    #[test]
    fn the_tighter_quota_is_the_one_with_fewer_requests_left() {
        let at = Timestamp::from_millis(0);
        let a = Quota { limit: 10, remaining: 3, reset: at };
        let b = Quota { limit: 100, remaining: 50, reset: at };
        assert_eq!(a.tighter(b), a);
        assert_eq!(b.tighter(a), a);
    }
}
