//! Tampering must never go unnoticed: random ledgers, one random change
//! each, and `verify_chain` must fail naming the changed block.

use proptest::prelude::*;

use super::payload::*;
use super::verify::{Problem, verify_chain};
use super::writer::ChainWriter;
use super::*;
use crate::ids::sha256_hex;

pub(crate) struct TestConsortium {
    pub sites: Vec<(SiteId, SigningKey)>,
    pub writer: ChainWriter,
    pub blocks: Vec<Block>,
}

fn key() -> SigningKey {
    SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap()
}

impl TestConsortium {
    pub fn new(n_sites: usize, quorum: usize) -> Self {
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
            quorum,
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

    /// A job: created, accepted by every site, `rounds` rounds with their
    /// metrics, ended.
    pub fn job(&mut self, job_id: u64, rounds: u32) {
        let toml = format!("name = \"job {job_id}\"");
        self.append(&Payload::JobCreated(JobCreated {
            job_id,
            name: format!("job {job_id}"),
            job_sha256: sha256_hex(toml.as_bytes()),
            job_toml: toml.clone(),
            software: "test".into(),
            insecure_transport: false,
        }));
        let job_hash: [u8; 32] = sha256(toml.as_bytes());
        let decisions: Vec<Payload> = self
            .sites
            .iter()
            .map(|(id, k)| {
                Payload::JobAccepted(JobAccepted {
                    job_id,
                    site: id.to_string(),
                    job_sha256: hex::encode(job_hash),
                    accepted: true,
                    reason: "within policy".into(),
                    signature: hex::encode(sign_decision(k, job_id, &job_hash, true)),
                })
            })
            .collect();
        for d in &decisions {
            self.append(d);
        }
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
        });
        self.append(&change);
        self.sites[index].1 = new;
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
}

fn fails_at(blocks: &[Block], height: u64) -> Result<(), TestCaseError> {
    match verify_chain(blocks, None) {
        Ok(_) => Err(TestCaseError::fail(format!(
            "tampering at block {height} went unnoticed"
        ))),
        Err(e) => {
            prop_assert_eq!(e.height, height, "{}", e);
            Ok(())
        }
    }
}

#[test]
fn an_untouched_ledger_verifies_and_lists_its_models() {
    let mut c = TestConsortium::new(4, 3);
    c.job(1, 3);
    c.job(2, 2);
    let report = verify_chain(&c.blocks, None).unwrap();
    assert_eq!(report.blocks, c.blocks.len() as u64);
    assert_eq!(report.pending, 0);
    assert_eq!(report.models.len(), 5);
}

#[test]
fn a_removed_endorsement_in_the_middle_is_detected_but_a_pending_tail_is_not_an_error() {
    let mut c = TestConsortium::new(4, 3);
    c.job(1, 2);
    let last = c.blocks.len() - 1;
    c.blocks[last].endorsements.truncate(2);
    assert_eq!(verify_chain(&c.blocks, None).unwrap().pending, 1);
    c.blocks[2].endorsements.clear();
    let e = verify_chain(&c.blocks, None).unwrap_err();
    assert_eq!(e.height, 2);
    assert!(matches!(e.problem, Problem::NotFinal { have: 0, need: 3 }), "{e}");
}

#[test]
fn a_round_that_does_not_start_from_the_previous_model_is_refused() {
    let mut c = TestConsortium::new(3, 2);
    let toml = "name = \"j\"".to_owned();
    c.append(&Payload::JobCreated(JobCreated {
        job_id: 1,
        name: "j".into(),
        job_sha256: sha256_hex(toml.as_bytes()),
        job_toml: toml,
        software: "test".into(),
        insecure_transport: false,
    }));
    let first = c.round(1, 1, &sha256_hex(b"initial"), &sha256_hex(b"after round 1"));
    c.append(&Payload::RoundCompleted(Box::new(first)));
    let bad = c.round(1, 2, &sha256_hex(b"some other model"), &sha256_hex(b"next"));
    c.append(&Payload::RoundCompleted(Box::new(bad)));
    let e = verify_chain(&c.blocks, None).unwrap_err();
    assert_eq!(e.height, c.blocks.len() as u64 - 1);
    assert!(e.to_string().contains("starts from model"), "{e}");
}

#[test]
fn a_job_decision_must_be_signed_by_the_site_it_names() {
    let mut c = TestConsortium::new(3, 2);
    c.job(1, 0);
    c.blocks.pop(); // job_ended: decisions may still come
    let toml = "name = \"job 1\"";
    let hash = sha256(toml.as_bytes());
    // site-0's name on site-1's signature.
    let forged = JobAccepted {
        job_id: 1,
        site: "site-0".into(),
        job_sha256: hex::encode(hash),
        accepted: true,
        reason: String::new(),
        signature: hex::encode(sign_decision(&c.sites[1].1, 1, &hash, true)),
    };
    let mut writer_tip = None;
    for (h, b) in c.blocks.iter().enumerate() {
        writer_tip = Some(super::writer::Tip {
            height: h as u64,
            hash: b.hash(),
            timestamp_ms: Header::decode(&b.header).unwrap().timestamp_ms,
        });
    }
    let (block, _) = c
        .writer
        .block_after(writer_tip, &Payload::JobAccepted(forged.clone()), 9_999);
    c.blocks.push(block);
    let e = verify_chain(&c.blocks, None).unwrap_err();
    assert!(e.to_string().contains("not signed by `site-0`"), "{e}");
    // A decision that flips `accepted` after signing fails the same way.
    let signed_reject = JobAccepted {
        accepted: true,
        signature: hex::encode(sign_decision(&c.sites[0].1, 1, &hash, false)),
        ..forged
    };
    c.blocks.pop();
    let (block, _) = c
        .writer
        .block_after(writer_tip, &Payload::JobAccepted(signed_reject), 9_999);
    c.blocks.push(block);
    assert!(verify_chain(&c.blocks, None).is_err());
}

#[test]
fn membership_changes_decide_who_may_endorse() {
    let mut c = TestConsortium::new(3, 2);
    let newcomer = key();
    let revoked = c.sites.remove(0);
    c.append(&Payload::MembershipChange(MembershipChange {
        change: "site_revoked".into(),
        site: Member {
            id: revoked.0.to_string(),
            key: hex::encode(revoked.1.public_key()),
            certificate_sha256: None,
        },
        reason: "left the consortium".into(),
    }));
    let newcomer_key = hex::encode(newcomer.public_key());
    c.sites.push((SiteId::new("newcomer").unwrap(), newcomer));
    c.sites.sort_by(|a, b| a.0.cmp(&b.0));
    // The newcomer is not yet a member: its endorsement of the block that
    // adds it is refused.
    let add = Payload::MembershipChange(MembershipChange {
        change: "site_added".into(),
        site: Member {
            id: "newcomer".into(),
            key: newcomer_key,
            certificate_sha256: None,
        },
        reason: "joined".into(),
    });
    c.append(&add);
    let e = verify_chain(&c.blocks, None).unwrap_err();
    assert_eq!(e.height, 2);
    assert_eq!(e.problem, Problem::UnknownEndorser("newcomer".into()));
    c.blocks[2].endorsements.retain(|e| e.site.as_str() != "newcomer");
    c.job(1, 1);
    verify_chain(&c.blocks, None).unwrap();
    // The revoked site can no longer endorse.
    let hash = c.blocks[4].hash();
    c.blocks[4].endorsements.push(Endorsement {
        site: revoked.0.clone(),
        signature: endorse(&revoked.1, &hash),
    });
    assert_eq!(verify_chain(&c.blocks, None).unwrap_err().height, 4);
}

/// One way of tampering with a stored chain.
#[derive(Debug, Clone)]
enum Tamper {
    FlipHeader { byte: usize, bit: u8 },
    FlipPayload { byte: usize, bit: u8 },
    FlipSignature { byte: usize },
    FlipEndorsement { which: usize, byte: usize },
    Delete,
    SwapWithNext,
    InsertForged,
    EndorsementFromAnotherSite { which: usize },
    ResignWithOutsideKey,
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        (0..HEADER_LEN, 0u8..8).prop_map(|(byte, bit)| Tamper::FlipHeader { byte, bit }),
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, bit)| Tamper::FlipPayload {
            byte: i.index(usize::MAX / 2),
            bit
        }),
        (0usize..64).prop_map(|byte| Tamper::FlipSignature { byte }),
        (0usize..8, 0usize..64).prop_map(|(which, byte)| Tamper::FlipEndorsement { which, byte }),
        Just(Tamper::Delete),
        Just(Tamper::SwapWithNext),
        Just(Tamper::InsertForged),
        (0usize..8).prop_map(|which| Tamper::EndorsementFromAnotherSite { which }),
        Just(Tamper::ResignWithOutsideKey),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_tampering_fails_verification_at_the_tampered_block(
        n_sites in 3usize..6,
        jobs in proptest::collection::vec(0u32..4, 1..3),
        target: prop::sample::Index,
        how in tamper(),
    ) {
        let mut c = TestConsortium::new(n_sites, n_sites - 1);
        for (i, rounds) in jobs.iter().enumerate() {
            c.job(i as u64 + 1, *rounds);
            c.rotate_key(i % n_sites);
        }
        let n = c.blocks.len();
        let at = target.index(n);
        let blocks = &mut c.blocks;
        match how {
            Tamper::FlipHeader { byte, bit } => blocks[at].header[byte] ^= 1 << bit,
            Tamper::FlipPayload { byte, bit } => {
                let len = blocks[at].payload.len();
                blocks[at].payload[byte % len] ^= 1 << bit;
            }
            Tamper::FlipSignature { byte } => blocks[at].signature[byte] ^= 1,
            Tamper::FlipEndorsement { which, byte } => {
                let e = &mut blocks[at].endorsements;
                let k = which % e.len();
                e[k].signature[byte] ^= 1;
            }
            Tamper::Delete => {
                prop_assume!(at + 1 < n);
                blocks.remove(at);
            }
            Tamper::SwapWithNext => {
                prop_assume!(at + 1 < n);
                blocks.swap(at, at + 1);
            }
            Tamper::InsertForged => {
                // A well-formed block signed by a key outside genesis,
                // linked correctly to its predecessor.
                let prev = if at == 0 { None } else { Some(&blocks[at - 1]) };
                let tip = prev.map(|b| super::writer::Tip {
                    height: at as u64 - 1,
                    hash: b.hash(),
                    timestamp_ms: Header::decode(&b.header).unwrap().timestamp_ms,
                });
                let forger = ChainWriter::new(key(), tip);
                let (forged, _) = forger.next_block(
                    &Payload::JobEnded(JobEnded {
                        job_id: 1,
                        status: "cancelled".into(),
                        reason: "forged".into(),
                        rounds_done: 0,
                        final_model_sha256: None,
                    }),
                    5_000,
                );
                blocks.insert(at, forged);
            }
            Tamper::EndorsementFromAnotherSite { which } => {
                let e = &mut blocks[at].endorsements;
                let k = which % e.len();
                let other = e[(k + 1) % e.len()].site.clone();
                e[k].site = other;
            }
            Tamper::ResignWithOutsideKey => {
                // Change the payload, fix the header, re-sign with a key
                // that is not the genesis coordinator key.
                let header = Header::decode(&blocks[at].header).unwrap();
                let mut payload = blocks[at].payload.clone();
                payload.insert(payload.len() - 1, b' ');
                let header = Header { payload_hash: sha256(&payload), ..header };
                blocks[at].header = header.encode().to_vec();
                blocks[at].payload = payload;
                blocks[at].signature = sign_block(&key(), &header.hash());
            }
        }
        fails_at(blocks, at as u64)?;
    }
}
