//! The HELLO nonce cache: check+insert of fresh nonces with 10k and 1M nonces live, and the
//! refusal path of one agent flooding HELLOs past its quota.
//!
//! The live count is held steady: the clock moves forward by one millisecond every
//! `live / window_ms` checks, so each check inserts one nonce and (amortised) evicts one.
//!
//! The nonces are counters (`viworks_benches::nonce`), except in
//! `check_insert_fresh_random_nonce`, which draws 32 random-looking bytes per nonce as real
//! agents do, so that no table layout can profit from the counters' structure.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use viworks_benches::{agent_id, at, nonce};
use viworks_core::Entropy;
use viworks_core::auth::{NonceCache, NonceCacheConfig, NonceOutcome, SkewWindow};
use viworks_core::wire::{AgentId, Nonce};

/// The skew window; nonces live this long.
const WINDOW: Duration = Duration::from_secs(10);
/// Nonces each honest agent holds at once, well under its quota.
const LIVE_PER_AGENT: usize = 16;
/// The per-agent quota.
const QUOTA: usize = 64;

/// A cache kept at `live` nonces by honest agents taking turns.
struct SteadyCache {
    cache: NonceCache,
    agents: Vec<AgentId>,
    checks_per_ms: u64,
    next: u64,
    random_nonces: bool,
}

impl SteadyCache {
    /// Fills a cache sized for `live` nonces (plus room for one millisecond of arrivals and
    /// slack) until it holds `live`, the same way the benchmark then keeps it there.
    fn filled(live: usize, random_nonces: bool) -> Self {
        let window_ms = WINDOW.as_millis() as u64;
        let config = NonceCacheConfig {
            capacity: live + live / 8,
            per_agent_quota: QUOTA,
            max_agents: live + live / 8,
            window: SkewWindow::new(WINDOW),
        };
        let cache = NonceCache::new(config, &mut Entropy::from_u64(1)).expect("a valid configuration");
        let agents = (0..live / LIVE_PER_AGENT).map(|n| agent_id(&format!("gw-{n:07}"))).collect();
        let checks_per_ms = (live as u64 / window_ms).max(1);
        let mut steady = SteadyCache { cache, agents, checks_per_ms, next: 0, random_nonces };
        for _ in 0..live {
            assert_eq!(steady.check(), NonceOutcome::Fresh, "filling takes every nonce");
        }
        let held = steady.cache.len();
        assert!(held >= live - live / 100 && held <= live + live / 100, "{held} nonces live, wanted {live}");
        let mib = steady.cache.allocated_bytes() as f64 / (1024.0 * 1024.0);
        println!("nonce cache: {held} nonces live from {} agents, {mib:.1} MiB allocated", steady.cache.agents());
        steady
    }

    /// One check of a fresh nonce from the next agent in turn, stamped now.
    fn check(&mut self) -> NonceOutcome {
        let n = self.next;
        self.next += 1;
        let now = at(n / self.checks_per_ms);
        let agent = &self.agents[(n % self.agents.len() as u64) as usize];
        let nonce = if self.random_nonces { random_nonce(n) } else { nonce(n) };
        self.cache.check(agent, &nonce, now, now)
    }
}

/// 32 bytes that look random, distinct for every `n`: SplitMix64 outputs.
fn random_nonce(n: u64) -> Nonce {
    let mut bytes = [0u8; 32];
    let mut state = n.wrapping_mul(4);
    for chunk in bytes.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    Nonce(bytes)
}

/// Fresh nonces into a cache held at `live` entries: sequential nonces at 10k and 1M, and
/// random-looking ones at 1M.
fn check_and_insert(c: &mut Criterion) {
    let cases: [(&str, bool, &[usize]); 2] =
        [("check_insert_fresh", false, &[10_000, 1_000_000]), ("check_insert_fresh_random_nonce", true, &[1_000_000])];
    for (name, random_nonces, lives) in cases {
        let mut group = c.benchmark_group(format!("nonce_cache/{name}"));
        group.throughput(Throughput::Elements(1));
        for &live in lives {
            let mut steady = SteadyCache::filled(live, random_nonces);
            group.bench_with_input(BenchmarkId::from_parameter(format!("{live}_live")), &live, |b, _| {
                b.iter(|| {
                    let outcome = steady.check();
                    assert_eq!(outcome, NonceOutcome::Fresh);
                    black_box(outcome)
                })
            });
        }
        group.finish();
    }
}

fn flood_over_quota(c: &mut Criterion) {
    let mut group = c.benchmark_group("nonce_cache/flood_over_quota");
    group.throughput(Throughput::Elements(1));
    for live in [10_000, 1_000_000] {
        let mut steady = SteadyCache::filled(live, false);
        let flooder = agent_id("flooder");
        // The clock stands still from here: the flooder's nonces never expire.
        let now = at(steady.next / steady.checks_per_ms);
        let mut n = u64::MAX / 2;
        for _ in 0..QUOTA {
            n += 1;
            assert_eq!(steady.cache.check(&flooder, &nonce(n), now, now), NonceOutcome::Fresh);
        }
        group.bench_with_input(BenchmarkId::from_parameter(format!("{live}_live")), &live, |b, _| {
            b.iter(|| {
                n += 1;
                let outcome = steady.cache.check(&flooder, &nonce(n), now, now);
                assert_eq!(outcome, NonceOutcome::OverQuota);
                black_box(outcome)
            })
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    check_and_insert(&mut c);
    flood_over_quota(&mut c);
    c.final_summary();
}
