//! The physical limit of mask generation (ChaCha20 keystream, one core) next
//! to the cost of applying a mask (keystream + wrapping add).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_protocol::secagg::mask::{Sign, apply_mask, keystream};

fn bench_mask(c: &mut Criterion) {
    let d = 1_000_000usize;
    let mut group = c.benchmark_group("mask_1M_words");
    group.throughput(Throughput::Bytes((d * 4) as u64));
    let mut bytes = vec![0u8; d * 4];
    group.bench_function("chacha20_keystream", |b| {
        b.iter(|| keystream(black_box(&[7; 32]), &mut bytes))
    });
    let mut acc = vec![0u32; d];
    group.bench_function("apply_mask", |b| {
        b.iter(|| apply_mask(black_box(&mut acc), &[7; 32], Sign::Plus))
    });
    group.finish();
}

criterion_group!(benches, bench_mask);
criterion_main!(benches);
