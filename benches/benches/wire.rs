//! JSON encoding and decoding of one envelope of every message kind, without the tag.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use viworks_benches::one_of_each_kind;
use viworks_core::wire::{decode, encode};

fn encode_and_decode(c: &mut Criterion) {
    let envelopes = one_of_each_kind();
    let mut group = c.benchmark_group("wire/encode");
    group.throughput(Throughput::Elements(1));
    for (kind, envelope) in &envelopes {
        let len = encode(envelope).expect("encodes").len();
        group.bench_function(BenchmarkId::new(*kind, format!("{len}B")), |b| {
            b.iter(|| encode(black_box(envelope)).expect("encodes"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("wire/decode");
    group.throughput(Throughput::Elements(1));
    for (kind, envelope) in &envelopes {
        let bytes = encode(envelope).expect("encodes");
        assert_eq!(&decode(&bytes).expect("decodes"), envelope, "the round trip is exact");
        group.bench_function(BenchmarkId::new(*kind, format!("{}B", bytes.len())), |b| {
            b.iter(|| decode(black_box(&bytes)).expect("decodes"))
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    encode_and_decode(&mut c);
    c.final_summary();
}
