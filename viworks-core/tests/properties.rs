//! Invariants of the wire format, message authentication and the nonce cache, checked over
//! generated inputs.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use viworks_core::auth::{self, AuthError, MacKey, NonceCache, NonceCacheConfig, NonceOutcome, SkewWindow};
use viworks_core::wire::{self, AgentId, Envelope, Limits, Message, Nonce};
use viworks_core::{Entropy, Timestamp};

mod support;
use support::arb_envelope;

fn key(byte: u8) -> MacKey {
    MacKey::from_bytes([byte; 32])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_give_a_message_or_a_typed_error_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = wire::decode(&bytes);
        let _ = auth::open(&key(1), &bytes, Limits::default());
        let _ = auth::read_hello_unverified(&bytes);
    }

    #[test]
    fn json_shaped_garbage_gives_a_typed_error_never_a_panic(text in r#"\x01[{}\[\]",:a-z0-9 .\-\\]{0,300}"#) {
        let _ = wire::decode(text.as_bytes());
    }

    #[test]
    fn mutated_messages_give_a_typed_error_never_a_panic(
        envelope in arb_envelope(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = wire::encode(&envelope).expect("encodes");
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
        }
        let _ = wire::decode(&bytes);
    }

    #[test]
    fn seal_then_open_round_trips_every_kind(envelope in arb_envelope(), k in any::<[u8; 32]>()) {
        let key = MacKey::from_bytes(k);
        let sealed = auth::seal(&key, &envelope).expect("seals");
        prop_assert_eq!(auth::open(&key, &sealed, Limits::default()).expect("opens"), envelope);
    }

    #[test]
    fn any_single_bit_flip_is_rejected(envelope in arb_envelope(), bit in any::<prop::sample::Index>()) {
        let sealed = auth::seal(&key(9), &envelope).expect("seals");
        let mut flipped = sealed.clone();
        let bit = bit.index(sealed.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        let refused = auth::open(&key(9), &flipped, Limits::default());
        prop_assert!(refused.is_err(), "a flip of bit {} was accepted", bit);
        if bit >= 8 {
            prop_assert!(matches!(refused, Err(AuthError::BadMac)), "expected BadMac, got {:?}", refused);
        }
    }

    #[test]
    fn a_message_sealed_for_one_direction_never_opens_in_the_other(envelope in arb_envelope()) {
        let keys = auth::DirectionKeys::session(
            &auth::AgentKey::from_bytes([3; 32]), &Nonce([1; 32]), &Nonce([2; 32]));
        let sealed = auth::seal(&keys.agent_to_host, &envelope).expect("seals");
        prop_assert!(matches!(auth::open(&keys.host_to_agent, &sealed, Limits::default()), Err(AuthError::BadMac)));
    }

    #[test]
    fn a_hello_replayed_inside_the_window_is_rejected_and_outside_it_is_stale(
        window_s in 1u64..600,
        skew_pct in -100i64..=100,
        replay_after_ms in 0u64..1_300_000,
    ) {
        let window = SkewWindow::new(Duration::from_secs(window_s));
        let mut cache = NonceCache::new(NonceCacheConfig::new(16, window), &mut Entropy::from_u64(5)).expect("valid");
        let agent = AgentId::new("gw-1").expect("valid");
        let now = Timestamp::from_millis(10_000_000);
        let skew_ms = window_s as i64 * 10 * skew_pct;
        let ts = Timestamp::from_millis(now.as_millis().saturating_add_signed(skew_ms));
        prop_assert_eq!(cache.check(&agent, &Nonce([7; 32]), ts, now), NonceOutcome::Fresh);
        let later = now.saturating_add(Duration::from_millis(replay_after_ms));
        let replay = cache.check(&agent, &Nonce([7; 32]), ts, later);
        let expected = if window.contains(ts, later) { NonceOutcome::Replayed } else { NonceOutcome::Stale };
        prop_assert_eq!(replay, expected);
    }

    #[test]
    fn a_hello_stamped_outside_the_window_is_stale_and_not_remembered(
        window_s in 1u64..600,
        beyond_ms in 1u64..1_000_000,
        ahead in any::<bool>(),
    ) {
        let window = SkewWindow::new(Duration::from_secs(window_s));
        let mut cache = NonceCache::new(NonceCacheConfig::new(16, window), &mut Entropy::from_u64(6)).expect("valid");
        let agent = AgentId::new("gw-1").expect("valid");
        let now = Timestamp::from_millis(10_000_000);
        let off = window_s * 1000 + beyond_ms;
        let ts = if ahead { now.saturating_add(Duration::from_millis(off)) } else { now.saturating_sub(Duration::from_millis(off)) };
        prop_assert_eq!(cache.check(&agent, &Nonce([7; 32]), ts, now), NonceOutcome::Stale);
        prop_assert!(cache.is_empty());
    }

    #[test]
    fn cache_never_exceeds_its_capacity_quota_or_memory(
        capacity in 1usize..64,
        quota_pct in 1usize..=100,
        events in proptest::collection::vec((0u8..12, 0u8..40, -20i64..20, 0u64..4_000), 0..600),
    ) {
        let quota = (capacity * quota_pct / 100).max(1);
        let config = NonceCacheConfig {
            capacity,
            per_agent_quota: quota,
            max_agents: capacity.min(8),
            window: SkewWindow::new(Duration::from_secs(10)),
        };
        let mut cache = NonceCache::new(config, &mut Entropy::from_u64(2)).expect("valid");
        let bytes = cache.allocated_bytes();
        let agents: Vec<AgentId> = (0..12).map(|i| AgentId::new(format!("agent-{i}")).expect("valid")).collect();
        let mut now = 1_000_000u64;
        let mut held: HashMap<u8, usize> = HashMap::new();
        for (agent, nonce, skew_s, advance_ms) in events {
            now += advance_ms;
            let ts = Timestamp::from_millis(now.saturating_add_signed(skew_s * 1000));
            let outcome = cache.check(&agents[usize::from(agent)], &Nonce([nonce; 32]), ts, Timestamp::from_millis(now));
            if outcome.is_fresh() {
                *held.entry(agent).or_default() += 1;
            }
            prop_assert!(cache.len() <= capacity);
            prop_assert!(cache.agents() <= config.max_agents);
            prop_assert_eq!(cache.allocated_bytes(), bytes);
        }
        prop_assert!(cache.len() <= held.values().sum::<usize>());
    }

    #[test]
    fn cache_agrees_with_a_reference_model_while_it_has_room(
        events in proptest::collection::vec((0u8..4, 0u8..6, -15i64..15, 0u64..3_000), 0..400),
    ) {
        let window = SkewWindow::new(Duration::from_secs(10));
        let config = NonceCacheConfig { capacity: 4096, per_agent_quota: 4096, max_agents: 64, window };
        let mut cache = NonceCache::new(config, &mut Entropy::from_u64(3)).expect("valid");
        // The model remembers every accepted (agent, nonce) with the last instant it may replay.
        let mut model: HashMap<(u8, u8), Timestamp> = HashMap::new();
        let mut now = 5_000_000u64;
        for (agent, nonce, skew_s, advance_ms) in events {
            now += advance_ms;
            let at = Timestamp::from_millis(now);
            let ts = Timestamp::from_millis(now.saturating_add_signed(skew_s * 1000));
            let expected = if !window.contains(ts, at) {
                NonceOutcome::Stale
            } else if model.get(&(agent, nonce)).is_some_and(|until| *until >= at) {
                NonceOutcome::Replayed
            } else {
                model.insert((agent, nonce), window.expiry(ts));
                NonceOutcome::Fresh
            };
            let id = AgentId::new(format!("a{agent}")).expect("valid");
            prop_assert_eq!(cache.check(&id, &Nonce([nonce; 32]), ts, at), expected);
        }
    }

    #[test]
    fn one_flooding_agent_never_locks_out_honest_agents(flood in 1usize..2_000, honest in 1usize..20) {
        let window = SkewWindow::new(Duration::from_secs(30));
        let config = NonceCacheConfig { capacity: 64, per_agent_quota: 16, max_agents: 64, window };
        let mut cache = NonceCache::new(config, &mut Entropy::from_u64(4)).expect("valid");
        let now = Timestamp::from_millis(1_000_000);
        let flooder = AgentId::new("flooder").expect("valid");
        for n in 0..flood {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&(n as u64).to_le_bytes());
            let _ = cache.check(&flooder, &Nonce(bytes), now, now);
        }
        for h in 0..honest {
            let id = AgentId::new(format!("honest-{h}")).expect("valid");
            prop_assert_eq!(cache.check(&id, &Nonce([1; 32]), now, now), NonceOutcome::Fresh);
        }
    }
}

#[test]
fn an_oversized_message_is_refused_before_it_is_parsed() {
    let limits = Limits { max_message_len: 64 };
    let junk = vec![b'{'; 65];
    assert!(matches!(
        auth::open(&key(1), &junk, limits),
        Err(AuthError::Wire(wire::WireError::TooLarge { len: 65, max: 64 }))
    ));
}

#[test]
fn every_kind_is_generated_by_the_strategy() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2_000 {
        let envelope: Envelope = arb_envelope().new_tree(&mut runner).expect("tree").current();
        seen.insert(envelope.message.kind());
    }
    assert_eq!(seen.len(), wire::Kind::ALL.len(), "kinds generated: {seen:?}");
    let _: Option<Message> = None;
}
