//! Builds whole ledgers in memory (a consortium with its keys, jobs,
//! rounds, membership changes, forks) for the tamper tests, the
//! equivocation tests and the shared verifier corpus (`corpus`).

use super::payload::*;
use super::writer::{ChainWriter, Tip};
use super::*;
use crate::ids::sha256_hex;

/// A consortium whose every key this builder holds: it can write any chain,
/// honest or not.
pub struct TestConsortium {
    pub sites: Vec<(SiteId, SigningKey)>,
    pub writer: ChainWriter,
    pub blocks: Vec<Block>,
}

/// A fresh Ed25519 key.
pub fn key() -> SigningKey {
    SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap()
}

impl TestConsortium {
    /// `n_sites` members named `site-0`, `site-1`, …; a majority quorum.
    pub fn new(n_sites: usize) -> Self {
        let sites: Vec<(SiteId, SigningKey)> = (0..n_sites)
            .map(|i| (SiteId::new(&format!("site-{i}")).unwrap(), key()))
            .collect();
        let writer = ChainWriter::new(key(), None);
        let genesis = Payload::Genesis(Genesis {
            consortium: "test".into(),
            coordinator_key: hex::encode(writer.public_key()),
            sites: sites
                .iter()
                .map(|(id, k)| Member {
                    id: id.to_string(),
                    key: hex::encode(k.public_key()),
                    certificate_sha256: None,
                })
                .collect(),
            quorum: verify::majority(n_sites),
            software: "test".into(),
        });
        let mut c = Self {
            sites,
            writer,
            blocks: Vec::new(),
        };
        c.append(&genesis);
        c
    }

    /// Appends a block endorsed by every site.
    pub fn append(&mut self, payload: &Payload) {
        let (mut block, tip) = self.writer.next_block(payload, 1_000 + self.blocks.len() as u64);
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

    /// `job_created` for a job whose file is `name = "job {job_id}"`.
    pub fn create_job(&mut self, job_id: u64) {
        let toml = format!("name = \"job {job_id}\"");
        self.append(&Payload::JobCreated(JobCreated {
            job_id,
            name: format!("job {job_id}"),
            job_sha256: sha256_hex(toml.as_bytes()),
            job_toml: toml.clone(),
            software: "test".into(),
            insecure_transport: false,
        }));
    }

    /// Every site accepts the job, declaring counts; then its cohort is sealed.
    pub fn accept_and_seal(&mut self, job_id: u64) {
        for i in 0..self.sites.len() {
            self.append(&self.decision(job_id, i, true));
        }
        self.append(&self.seal(job_id));
    }

    /// A job: created, accepted by every site, `rounds` rounds with their
    /// metrics, ended.
    pub fn job(&mut self, job_id: u64, rounds: u32) {
        self.create_job(job_id);
        self.accept_and_seal(job_id);
        let mut model = sha256_hex(&job_id.to_be_bytes());
        for round in 1..=rounds {
            let next = sha256_hex(format!("{job_id}/{round}").as_bytes());
            self.append(&Payload::RoundCompleted(Box::new(
                self.round(job_id, round, &model, &next),
            )));
            self.append(&Payload::Metrics(Metrics {
                job_id,
                model_of_round: round,
                model_sha256: next.clone(),
                sites: vec![],
                pooled: None,
            }));
            model = next;
        }
        self.append(&Payload::JobEnded(JobEnded {
            job_id,
            status: "finished".into(),
            reason: String::new(),
            rounds_done: rounds,
            final_model_sha256: Some(model),
        }));
    }

    /// Site `index`'s signed decision on a job made by [`Self::create_job`];
    /// an acceptance declares counts.
    pub fn decision(&self, job_id: u64, index: usize, accepted: bool) -> Payload {
        let toml = format!("name = \"job {job_id}\"");
        let job_hash: [u8; 32] = sha256(toml.as_bytes());
        let (id, k) = &self.sites[index];
        let counts = accepted.then_some(DeclaredCounts {
            n_train: 100 + index as u64,
            n_test: 20 + index as u64,
        });
        Payload::JobAccepted(JobAccepted {
            job_id,
            site: id.to_string(),
            job_sha256: hex::encode(job_hash),
            accepted,
            reason: "within policy".into(),
            signature: hex::encode(sign_decision(k, job_id, &job_hash, accepted, counts.as_ref())),
            counts,
        })
    }

    /// The seal of a job every site accepted.
    pub fn seal(&self, job_id: u64) -> Payload {
        let cohort: std::collections::BTreeSet<String> = self.sites.iter().map(|(id, _)| id.to_string()).collect();
        Payload::CohortSealed(CohortSealed {
            job_id,
            cohort: cohort.into_iter().collect(),
        })
    }

    /// A site rotates its key: the change block is endorsed under the old
    /// key, later blocks under the new one.
    pub fn rotate_key(&mut self, index: usize) {
        let new = key();
        let change = Payload::MembershipChange(MembershipChange {
            change: "key_rotated".into(),
            site: Member {
                id: self.sites[index].0.to_string(),
                key: hex::encode(new.public_key()),
                certificate_sha256: None,
            },
            reason: "scheduled rotation".into(),
            rotation_signature: Some(hex::encode(sign_rotation(
                &self.sites[index].1,
                &self.sites[index].0,
                &new.public_key(),
            ))),
        });
        self.append(&change);
        self.sites[index].1 = new;
    }

    /// The tip of the chain as the writer needs it to chain after `height`.
    pub fn tip_at(&self, height: usize) -> Tip {
        let block = &self.blocks[height];
        Tip {
            height: height as u64,
            hash: block.hash(),
            timestamp_ms: Header::decode(&block.header).unwrap().timestamp_ms,
        }
    }

    /// Another block at the tip's height, signed by the same coordinator and
    /// endorsed by no one: what an equivocating coordinator shows some sites.
    pub fn sibling_of_tip(&self, payload: &Payload) -> Block {
        let last = self.blocks.len() - 1;
        let before = (last > 0).then(|| self.tip_at(last - 1));
        self.writer.block_after(before, payload, 1_000 + last as u64).0
    }

    pub fn round(&self, job_id: u64, round: u32, base: &str, model: &str) -> RoundCompleted {
        let commitments: Vec<Commitment> = self
            .sites
            .iter()
            .map(|(id, _)| Commitment {
                site: id.to_string(),
                sha256: sha256_hex(format!("{id}/{job_id}/{round}").as_bytes()),
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
        RoundCompleted {
            job_id,
            round,
            contributors: commitments.iter().map(|c| c.site.clone()).collect(),
            dropouts: vec![],
            commitment_root: hex::encode(merkle::root(&leaves)),
            commitments,
            aggregate_sha256: sha256_hex(b"aggregate"),
            base_model_sha256: base.into(),
            model_sha256: model.into(),
            n_params: 10,
            total_weight: 1.0,
            strategy: "fedavg".into(),
            config_sha256: sha256_hex(b"config"),
            secure_aggregation: true,
            clip_norm: Some(10.0),
            quantization_bits: Some(24),
            transcript: None,
            privacy_epsilon: None,
        }
    }

    /// A `summation` of `purpose` over every site, committed like a round.
    pub fn summation(&self, job_id: u64, purpose: &str) -> Summation {
        let r = self.round(job_id, 0, "", "");
        Summation {
            job_id,
            purpose: purpose.into(),
            contributors: r.contributors,
            dropouts: vec![],
            commitments: r.commitments,
            commitment_root: r.commitment_root,
            aggregate_sha256: sha256_hex(purpose.as_bytes()),
            normalization_sha256: (purpose == Summation::STATISTICS).then(|| sha256_hex(b"normalization")),
            transcript: None,
        }
    }
}
