//! A host session handling what an established agent sends: results, heartbeats and telemetry
//! batches. Each message is verified, sequence-checked, decoded and turned into an event,
//! which is drained as a driver would; the agent's sealing is done outside the timing.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use viworks_benches::{Feed, SessionPair, at};

/// Messages sealed ahead of each timed stretch; bounds the memory a long run needs.
const CHUNK: usize = 4096;

fn handle_messages(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_session/handle_message");
    group.throughput(Throughput::Elements(1));
    for (name, feed) in
        [("result", Feed::Results), ("heartbeat", Feed::Heartbeats), ("telemetry_20_samples", Feed::Telemetry(20))]
    {
        let mut pair = SessionPair::established();
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut left = iters as usize;
                let mut spent = Duration::ZERO;
                while left > 0 {
                    let messages = pair.agent_messages(feed, left.min(CHUNK));
                    left -= messages.len();
                    let start = Instant::now();
                    std::hint::black_box(pair.host_handles(at(0), &messages));
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    handle_messages(&mut c);
    c.final_summary();
}
