//! Coordinator-side cost of a round: summing site updates and applying the
//! server strategy, for models of 10^4 to 10^6 parameters.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tessera_protocol::aggregate::Summation;
use tessera_protocol::ids::SiteId;
use tessera_protocol::job::{FedOptParams, FedOptVariant, StrategySpec};
use tessera_protocol::model::{decode_params, encode_params};
use tessera_protocol::strategy;

fn updates(n_sites: usize, d: usize) -> Vec<Vec<f32>> {
    (0..n_sites)
        .map(|s| (0..d).map(|i| ((i * 31 + s * 7) % 1000) as f32 * 1e-4).collect())
        .collect()
}

fn bench_sum(c: &mut Criterion) {
    let mut group = c.benchmark_group("summation_add");
    for d in [10_000usize, 100_000, 1_000_000] {
        let update = updates(1, d).remove(0);
        group.throughput(Throughput::Elements(d as u64));
        group.bench_with_input(BenchmarkId::from_parameter(d), &update, |b, update| {
            b.iter(|| {
                let mut sum = Summation::new(d);
                sum.add(SiteId::new("s").unwrap(), 10.0, black_box(update)).unwrap();
                black_box(sum.n_contributors())
            })
        });
    }
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_update");
    let d = 1_000_000;
    let bytes = encode_params(&updates(1, d)[0]);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("1000000", |b| b.iter(|| decode_params(black_box(&bytes)).unwrap()));
    group.finish();
}

fn bench_round(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_aggregate_10_sites");
    group.sample_size(20);
    for d in [10_000usize, 100_000, 1_000_000] {
        let ups = updates(10, d);
        let global = vec![0.5f32; d];
        for (name, spec) in [
            ("fedavg", StrategySpec::FedAvg),
            (
                "fedadam",
                StrategySpec::FedOpt(FedOptParams {
                    variant: FedOptVariant::Adam,
                    server_learning_rate: 0.1,
                    beta1: 0.9,
                    beta2: 0.99,
                    tau: 1e-3,
                }),
            ),
        ] {
            group.throughput(Throughput::Elements(d as u64));
            group.bench_with_input(BenchmarkId::new(name, d), &ups, |b, ups| {
                b.iter(|| {
                    let mut sum = Summation::new(d);
                    for (i, u) in ups.iter().enumerate() {
                        sum.add(SiteId::new(&format!("s{i}")).unwrap(), 10.0, u).unwrap();
                    }
                    let mut strategy = strategy::from_spec(&spec);
                    black_box(strategy.aggregate_train(&global, &sum.finish(3).unwrap()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_sum, bench_decode, bench_round);
criterion_main!(benches);
