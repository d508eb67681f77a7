//! A site's own compute on a secure round of a 1M-parameter model, step by
//! step: what the secure path adds next to a plaintext update (quantising
//! the update, committing to it, replaying the released aggregate into the
//! next model and hashing that model).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tessera_protocol::ids::SiteId;
use tessera_protocol::job::{Aggregation, JobSpec};
use tessera_protocol::ledger::payload::{DeclaredCounts, RoundCompleted};
use tessera_protocol::model::{initial_params, model_hash};
use tessera_protocol::replay::{ModelReplay, round_sum};
use tessera_protocol::secagg::commitment;
use tessera_protocol::strategy;

const SITES: usize = 4;

fn spec() -> JobSpec {
    JobSpec::from_toml(
        "name = \"bench\"\nrounds = 3\nseed = 5\nmin_sites = 3\n\
         [model]\nkind = \"mlp\"\nhidden = [1000, 1000]\n\
         [training]\noptimizer = \"sgd\"\nlearning_rate = 0.01\nbatch_size = 16\nlocal_epochs = 1\n\
         [strategy]\nkind = \"fedavg\"\n\
         [secure_aggregation]\nclip_norm = 10.0\nweight_cap = 1000\n",
    )
    .unwrap()
}

fn bench_site_round(c: &mut Criterion) {
    let spec = spec();
    let Aggregation::Secure(secure) = spec.aggregation else {
        unreachable!()
    };
    let layout = spec.model.layout(15);
    let model = initial_params(&layout, spec.seed);
    let d = model.len();
    let quantizer = secure.quantizer(SITES);
    let delta: Vec<f32> = (0..d).map(|i| ((i * 31) % 1000) as f32 * 1e-6 - 5e-4).collect();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (input, _) = quantizer.encode_update(&delta, 0.5, &mut rng).unwrap();
    let words: Vec<u32> = input.iter().map(|w| w.wrapping_mul(SITES as u32)).collect();
    let sites: Vec<(SiteId, f64)> = (0..SITES)
        .map(|i| (SiteId::new(&format!("site-{i}")).unwrap(), 0.5))
        .collect();
    let declared = |_: &SiteId| {
        Some(DeclaredCounts {
            n_train: 500,
            n_test: 10,
        })
    };
    let sum = round_sum(&quantizer, &words, d, &sites);
    let next = strategy::from_spec(&spec.strategy)
        .aggregate_train(&model, &sum)
        .unwrap();
    let block = RoundCompleted {
        job_id: 1,
        round: 1,
        contributors: sites.iter().map(|(s, _)| s.to_string()).collect(),
        dropouts: Vec::new(),
        commitments: Vec::new(),
        commitment_root: String::new(),
        aggregate_sha256: hex::encode(commitment(&words)),
        base_model_sha256: model_hash(&model),
        model_sha256: model_hash(&next),
        n_params: d as u64,
        total_weight: sum.total_weight,
        strategy: String::new(),
        config_sha256: String::new(),
        secure_aggregation: true,
        clip_norm: Some(secure.clip_norm),
        quantization_bits: Some(quantizer.bits),
        transcript: None,
        privacy_epsilon: None,
    };

    let mut group = c.benchmark_group("site_round_1M");
    group.sample_size(20);
    group.throughput(Throughput::Bytes((d * 4) as u64));
    group.bench_function("encode_update", |b| {
        b.iter(|| quantizer.encode_update(black_box(&delta), 0.5, &mut rng).unwrap())
    });
    group.bench_function("commitment", |b| b.iter(|| commitment(black_box(&words))));
    group.bench_function("model_hash", |b| b.iter(|| model_hash(black_box(&model))));
    group.bench_function("round_sum", |b| {
        b.iter(|| round_sum(&quantizer, black_box(&words), d, &sites))
    });
    group.bench_function("replay_apply", |b| {
        b.iter_batched(
            || ModelReplay::new(&spec, &secure, &layout, SITES),
            |mut replay| replay.apply(&block, black_box(&words), declared).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_site_round);
criterion_main!(benches);
