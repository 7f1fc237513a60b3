//! Latency summaries: exact percentiles of every sample taken (the phases take at most a few
//! hundred thousand, so sorting them all is cheaper than it is worth approximating).

use std::fmt;
use std::time::Duration;

/// Percentiles of a set of durations, by the nearest-rank method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest.
    pub max: Duration,
    /// Arithmetic mean.
    pub mean: Duration,
}

impl Summary {
    /// The summary of `samples`; all zero when there are none.
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let count = samples.len();
        let rank = |p: f64| samples[((p * count as f64).ceil() as usize).clamp(1, count) - 1];
        let total: Duration = samples.iter().sum();
        Summary {
            count,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: samples[count - 1],
            mean: total / count as u32,
        }
    }

    /// As JSON, in milliseconds.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "p50_ms": ms(self.p50),
            "p90_ms": ms(self.p90),
            "p99_ms": ms(self.p99),
            "p999_ms": ms(self.p999),
            "max_ms": ms(self.max),
            "mean_ms": ms(self.mean),
        })
    }
}

/// A duration in milliseconds, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms (n={})",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max),
            self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_thousand() {
        let samples = (1..=1000).rev().map(Duration::from_millis).collect();
        let summary = Summary::of(samples);
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50, Duration::from_millis(500));
        assert_eq!(summary.p90, Duration::from_millis(900));
        assert_eq!(summary.p99, Duration::from_millis(990));
        assert_eq!(summary.p999, Duration::from_millis(999));
        assert_eq!(summary.max, Duration::from_millis(1000));
    }

    #[test]
    fn no_samples_summarise_to_zero() {
        assert_eq!(Summary::of(Vec::new()), Summary::default());
    }
}
