//! Sealing and opening messages whose authenticated part is 64 B, 256 B and 4 KiB, beside a
//! bare BLAKE3 keyed hash of the same bytes, so that the cost of the JSON envelope over the
//! MAC itself can be read off one run.
//!
//! - `seal`: encode the envelope, MAC it, append the tag.
//! - `verify`: size and version checks and the MAC, no parsing.
//! - `open`: `verify`, then decode the envelope.
//! - `seal_open`: both ends of one message, the figure the design's target is stated in.
//! - `blake3_keyed`: the baseline, one keyed hash of the bytes the tag covers.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use viworks_benches::envelope_of_len;
use viworks_core::auth::{MacKey, open, seal, verify};
use viworks_core::wire::{self, Limits};

fn seal_and_open(c: &mut Criterion) {
    let key = MacKey::from_bytes([42; 32]);
    let limits = Limits::default();
    for len in [64, 256, 4096] {
        let envelope = envelope_of_len(len);
        let covered = wire::encode(&envelope).expect("encodes");
        let sealed = seal(&key, &envelope).expect("seals");
        assert_eq!(open(&key, &sealed, limits).expect("opens"), envelope);

        let mut group = c.benchmark_group(format!("seal_open/{len}B"));
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::from_parameter("blake3_keyed"), |b| {
            b.iter(|| blake3::keyed_hash(key.as_bytes(), black_box(&covered)))
        });
        group.bench_function(BenchmarkId::from_parameter("seal"), |b| {
            b.iter(|| seal(&key, black_box(&envelope)).expect("seals"))
        });
        group.bench_function(BenchmarkId::from_parameter("verify"), |b| {
            b.iter(|| verify(&key, black_box(&sealed), limits).expect("verifies").len())
        });
        group.bench_function(BenchmarkId::from_parameter("open"), |b| {
            b.iter(|| open(&key, black_box(&sealed), limits).expect("opens"))
        });
        group.bench_function(BenchmarkId::from_parameter("seal_open"), |b| {
            b.iter(|| {
                let sealed = seal(&key, black_box(&envelope)).expect("seals");
                open(&key, &sealed, limits).expect("opens")
            })
        });
        group.finish();
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    seal_and_open(&mut c);
    c.final_summary();
}
