//! The composite key telemetry is upserted under, `(agent_id, ts, metric_key)`, and the
//! collapse of one batch onto those keys, so a replayed or restarted batch overwrites itself
//! instead of adding rows.

use serde::{Deserialize, Serialize};

use crate::Timestamp;
use crate::wire::{AgentId, MetricKey, Sample};

/// Where one telemetry value is stored: one value per agent, instant and metric. Ordered by
/// agent, then time, then metric, as the store's unique index is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TelemetryKey {
    /// The agent that measured.
    pub agent_id: AgentId,
    /// When it measured.
    pub ts: Timestamp,
    /// What it measured.
    pub metric_key: MetricKey,
}

/// The samples of one batch from `agent`, keyed and collapsed: one entry per distinct key,
/// holding the value of the key's last sample in the batch (later samples overwrite earlier
/// ones, as the store's upsert does), sorted by key.
///
/// The output is never longer than `samples`. Values pass through unchanged; samples decoded
/// from the wire are always finite. Costs a sort of `samples.len()` references and one key
/// allocation per output entry.
pub fn dedupe_batch(agent: &AgentId, samples: &[Sample]) -> Vec<(TelemetryKey, f64)> {
    // The agent is the same for every sample, so (ts, key) orders the output; the position
    // breaks ties so that the last of equal keys ends each run.
    let mut order: Vec<(Timestamp, &MetricKey, usize)> =
        samples.iter().enumerate().map(|(at, sample)| (sample.ts, &sample.key, at)).collect();
    order.sort_unstable();
    let mut out = Vec::with_capacity(order.len());
    for (i, &(ts, key, at)) in order.iter().enumerate() {
        let last_of_run = order.get(i + 1).is_none_or(|&(next_ts, next_key, _)| (next_ts, next_key) != (ts, key));
        if last_of_run {
            let key = TelemetryKey { agent_id: agent.clone(), ts, metric_key: key.clone() };
            out.push((key, samples[at].value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn sample(ts: u64, key: &str, value: f64) -> Sample {
        Sample { ts: Timestamp::from_millis(ts), key: MetricKey::new(key).expect("valid metric key"), value }
    }

    fn agent() -> AgentId {
        AgentId::new("gw-1").expect("valid agent id")
    }

    #[test]
    fn a_replayed_batch_collapses_onto_its_keys_and_the_last_value_wins() {
        let batch = [
            sample(2_000, "mem.used", 5.0),
            sample(1_000, "cpu.pct", 10.0),
            sample(1_000, "cpu.pct", 11.0),
            sample(1_000, "disk:/var.used", 7.0),
            sample(2_000, "mem.used", 6.0),
        ];
        let out = dedupe_batch(&agent(), &batch);
        let summary: Vec<(u64, &str, f64)> =
            out.iter().map(|(k, v)| (k.ts.as_millis(), k.metric_key.as_str(), *v)).collect();
        assert_eq!(summary, [(1_000, "cpu.pct", 11.0), (1_000, "disk:/var.used", 7.0), (2_000, "mem.used", 6.0),]);
        assert!(out.iter().all(|(k, _)| k.agent_id == agent()));
        let replayed: Vec<Sample> = batch.iter().chain(batch.iter()).cloned().collect();
        assert_eq!(dedupe_batch(&agent(), &replayed), out);
        assert!(dedupe_batch(&agent(), &[]).is_empty());
    }

    #[test]
    fn keys_order_by_agent_then_time_then_metric() {
        let key = |a: &str, ts: u64, m: &str| TelemetryKey {
            agent_id: AgentId::new(a).expect("valid agent id"),
            ts: Timestamp::from_millis(ts),
            metric_key: MetricKey::new(m).expect("valid metric key"),
        };
        assert!(key("a", 9, "z") < key("b", 1, "a"));
        assert!(key("a", 1, "z") < key("a", 2, "a"));
        assert!(key("a", 1, "a") < key("a", 1, "b"));
    }

    proptest! {
        #[test]
        fn dedupe_never_grows_a_batch_and_keeps_the_last_value(
            raw in proptest::collection::vec((0u64..4, 0u8..4, -1e6f64..1e6), 0..64),
        ) {
            let samples: Vec<Sample> = raw
                .iter()
                .map(|&(ts, m, v)| sample(ts, &format!("m{m}"), v))
                .collect();
            let out = dedupe_batch(&agent(), &samples);
            prop_assert!(out.len() <= samples.len());
            prop_assert!(
                out.windows(2).all(|pair| pair[0].0 < pair[1].0),
                "sorted by key, each key once"
            );
            let mut last = BTreeMap::new();
            for s in &samples {
                last.insert((s.ts, s.key.clone()), s.value);
            }
            prop_assert_eq!(out.len(), last.len(), "every key of the batch is kept");
            for (key, value) in &out {
                prop_assert_eq!(&key.agent_id, &agent());
                prop_assert_eq!(
                    last.get(&(key.ts, key.metric_key.clone())).map(|v| v.to_bits()),
                    Some(value.to_bits())
                );
            }
        }
    }
}
