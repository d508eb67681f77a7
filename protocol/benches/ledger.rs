//! Ledger costs: writing (sign) a round block, a site verifying and
//! endorsing one, and a regulator verifying a whole chain of 1 000 blocks
//! (a 330-round job with 4 endorsing sites).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tessera_protocol::ids::{SiteId, sha256_hex};
use tessera_protocol::ledger::payload::{Commitment, Genesis, JobCreated, Member, Payload, RoundCompleted};
use tessera_protocol::ledger::verify::{Verifier, verify_chain};
use tessera_protocol::ledger::writer::ChainWriter;
use tessera_protocol::ledger::{Block, Endorsement, endorse, merkle};
use tessera_protocol::secagg::crypto::SigningKey;

fn key() -> SigningKey {
    SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap()
}

struct Chain {
    sites: Vec<(SiteId, SigningKey)>,
    writer: ChainWriter,
    blocks: Vec<Block>,
}

impl Chain {
    fn new() -> Self {
        let sites: Vec<_> = ["cleveland", "hungary", "switzerland", "va"]
            .iter()
            .map(|s| (SiteId::new(s).unwrap(), key()))
            .collect();
        let writer = ChainWriter::new(key(), None);
        let mut chain = Self {
            writer,
            sites,
            blocks: Vec::new(),
        };
        let genesis = Payload::Genesis(Genesis {
            consortium: "bench".into(),
            coordinator_key: hex::encode(chain.writer.public_key()),
            sites: chain
                .sites
                .iter()
                .map(|(id, k)| Member {
                    id: id.to_string(),
                    key: hex::encode(k.public_key()),
                    certificate_sha256: None,
                })
                .collect(),
            quorum: 3,
            software: "bench".into(),
        });
        chain.push(&genesis);
        let toml = "name = \"bench\"".to_owned();
        chain.push(&Payload::JobCreated(JobCreated {
            job_id: 1,
            name: "bench".into(),
            job_sha256: sha256_hex(toml.as_bytes()),
            job_toml: toml,
            software: "bench".into(),
            insecure_transport: false,
        }));
        chain
    }

    fn push(&mut self, payload: &Payload) {
        let (mut block, tip) = self.writer.next_block(payload, 1);
        let hash = block.hash();
        block.endorsements = self
            .sites
            .iter()
            .map(|(id, k)| Endorsement {
                site: id.clone(),
                signature: endorse(k, &hash),
            })
            .collect();
        self.writer.commit(tip);
        self.blocks.push(block);
    }

    fn round(&self, round: u32) -> Payload {
        let commitments: Vec<Commitment> = self
            .sites
            .iter()
            .map(|(id, _)| Commitment {
                site: id.to_string(),
                sha256: sha256_hex(format!("{id}{round}").as_bytes()),
            })
            .collect();
        let leaves: Vec<Vec<u8>> = commitments
            .iter()
            .map(|c| {
                merkle::leaf(
                    &SiteId::new(&c.site).unwrap(),
                    &hex::decode(&c.sha256).unwrap().try_into().unwrap(),
                )
            })
            .collect();
        Payload::RoundCompleted(Box::new(RoundCompleted {
            job_id: 1,
            round,
            contributors: commitments.iter().map(|c| c.site.clone()).collect(),
            dropouts: vec![],
            commitment_root: hex::encode(merkle::root(&leaves)),
            commitments,
            aggregate_sha256: sha256_hex(b"a"),
            base_model_sha256: sha256_hex(&(round - 1).to_be_bytes()),
            model_sha256: sha256_hex(&round.to_be_bytes()),
            n_params: 16,
            total_weight: 0.5,
            strategy: "fedavg".into(),
            config_sha256: sha256_hex(b"c"),
            secure_aggregation: true,
            clip_norm: Some(10.0),
            quantization_bits: Some(24),
            transcript: None,
            privacy_epsilon: None,
        }))
    }
}

fn bench_ledger(c: &mut Criterion) {
    let mut chain = Chain::new();
    for round in 1..=998 {
        let payload = chain.round(round);
        chain.push(&payload);
    }
    let mut group = c.benchmark_group("ledger");
    let next = chain.round(999);
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
