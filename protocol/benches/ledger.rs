//! Ledger costs: writing (sign) a round block, a site verifying and
//! endorsing one, and a regulator verifying a whole chain of 1 000 blocks
//! (a 330-round job with 4 endorsing sites).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_protocol::ids::sha256_hex;
use tessera_protocol::ledger::endorse;
use tessera_protocol::ledger::payload::{JobCreated, Payload};
use tessera_protocol::ledger::testkit::TestConsortium;
use tessera_protocol::ledger::verify::{Verifier, verify_chain};

fn model(round: u32) -> String {
    sha256_hex(&round.to_be_bytes())
}

fn round(chain: &TestConsortium, round: u32) -> Payload {
    Payload::RoundCompleted(Box::new(chain.round(1, round, &model(round - 1), &model(round))))
}

/// Genesis, a job and 998 rounds, every block endorsed by the 4 sites.
fn chain() -> TestConsortium {
    let mut chain = TestConsortium::new(4);
    let toml = "name = \"bench\"".to_owned();
    chain.append(&Payload::JobCreated(JobCreated {
        job_id: 1,
        name: "bench".into(),
        job_sha256: sha256_hex(toml.as_bytes()),
        job_toml: toml,
        software: "bench".into(),
        insecure_transport: false,
    }));
    for r in 1..=998 {
        let payload = round(&chain, r);
        chain.append(&payload);
    }
    chain
}

fn bench_ledger(c: &mut Criterion) {
    let chain = chain();
    let mut group = c.benchmark_group("ledger");
    let next = round(&chain, 999);
    group.bench_function("coordinator_writes_round_block", |b| {
        b.iter(|| chain.writer.next_block(black_box(&next), 2))
    });
    let (block, _) = chain.writer.next_block(&next, 2);
    let mut verifier = Verifier::new();
    for b in &chain.blocks {
        verifier.push(b).unwrap();
    }
    let (_, site_key) = &chain.sites[0];
    group.bench_function("site_verifies_and_endorses_round_block", |b| {
        b.iter(|| {
            let mut v = verifier.clone();
            let verified = v.push(black_box(&block)).unwrap();
            endorse(site_key, &verified.hash)
        })
    });
    group.throughput(Throughput::Elements(chain.blocks.len() as u64));
    group.sample_size(10);
    group.bench_function("verify_chain_1000_blocks_4_endorsements", |b| {
        b.iter(|| verify_chain(black_box(&chain.blocks), None).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_ledger);
criterion_main!(benches);
