//! Open-loop pacing to the tenth of a millisecond.
//!
//! Latencies here are measured from when a request was due, so that a late submitter shows
//! as latency instead of hiding it. Tokio's timer cannot be the clock for that: it fires on
//! whole-millisecond ticks and rounds every deadline up to the next one, which made each
//! request leave 0–2 ms after it was due (about 1 ms on average) and added that much to every
//! figure, the bare echo's included. A thread of its own sleeps to each due instant with the
//! kernel's high-resolution timer instead, and hands it to the async side.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// The due instants `start + k * interval` for `k` in `0..count`, each delivered as close
/// after it as the machine allows: `(k, due)`. Stops early when the receiver is dropped.
pub fn ticks(start: Instant, interval: Duration, count: usize) -> mpsc::UnboundedReceiver<(usize, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let pacer = move || {
        for k in 0..count {
            let due = start + interval.mul_f64(k as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if tx.send((k, due)).is_err() {
                return;
            }
        }
    };
    if let Err(error) = std::thread::Builder::new().name("loadgen-pacer".into()).spawn(pacer) {
        // The receiver sees no ticks: the phase reports nothing sent instead of hanging.
        tracing::error!(%error, "cannot start the pacing thread");
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_come_in_order_at_their_due_instants_and_stop_at_the_count() {
        let start = Instant::now() + Duration::from_millis(5);
        let mut ticks = ticks(start, Duration::from_micros(300), 20);
        let mut seen = Vec::new();
        while let Some((k, due)) = ticks.recv().await {
            assert!(Instant::now() >= due, "tick {k} delivered before it was due");
            assert_eq!(due, start + Duration::from_micros(300).mul_f64(k as f64));
            seen.push(k);
        }
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
    }
}
