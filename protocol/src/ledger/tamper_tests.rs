//! Tampering must never go unnoticed: random ledgers, one random change
//! each, and `verify_chain` must fail naming the changed block.

use proptest::prelude::*;

use super::payload::*;
use super::testkit::{TestConsortium, key};
use super::verify::{Problem, verify_chain};
use super::writer::ChainWriter;
use super::*;
use crate::ids::sha256_hex;

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
    let mut c = TestConsortium::new(4);
    c.job(1, 3);
    c.job(2, 2);
    let report = verify_chain(&c.blocks, None).unwrap();
    assert_eq!(report.blocks, c.blocks.len() as u64);
    assert_eq!(report.pending, 0);
    assert_eq!(report.models.len(), 5);
}

#[test]
fn a_removed_endorsement_in_the_middle_is_detected_but_a_pending_tail_is_not_an_error() {
    let mut c = TestConsortium::new(4);
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
    let mut c = TestConsortium::new(3);
    c.create_job(1);
    c.accept_and_seal(1);
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
    let mut c = TestConsortium::new(3);
    c.create_job(1);
    let toml = "name = \"job 1\"";
    let hash = sha256(toml.as_bytes());
    // site-0's name on site-1's signature.
    let forged = JobAccepted {
        job_id: 1,
        site: "site-0".into(),
        job_sha256: hex::encode(hash),
        accepted: true,
        reason: String::new(),
        signature: hex::encode(sign_decision(&c.sites[1].1, 1, &hash, true, None)),
        counts: None,
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
        signature: hex::encode(sign_decision(&c.sites[0].1, 1, &hash, false, None)),
        ..forged.clone()
    };
    let declared = DeclaredCounts {
        n_train: 120,
        n_test: 30,
    };
    let signed_accept = JobAccepted {
        signature: hex::encode(sign_decision(&c.sites[0].1, 1, &hash, true, Some(&declared))),
        counts: Some(declared),
        ..forged.clone()
    };
    let with_counts = |counts| JobAccepted {
        counts,
        ..signed_accept.clone()
    };
    let replace_last = |c: &mut TestConsortium, d: JobAccepted| {
        c.blocks.pop();
        let (block, _) = c.writer.block_after(writer_tip, &Payload::JobAccepted(d), 9_999);
        c.blocks.push(block);
        verify_chain(&c.blocks, None)
    };
    assert!(replace_last(&mut c, signed_reject).is_err());
    replace_last(&mut c, signed_accept.clone()).expect("a signed acceptance with its counts verifies");
    // Declared counts are signed: one edited, or dropped, fails.
    let edited = with_counts(Some(DeclaredCounts {
        n_train: 121,
        ..declared
    }));
    assert!(replace_last(&mut c, edited).is_err());
    assert!(replace_last(&mut c, with_counts(None)).is_err());
    // A rejection declares nothing, even when the site signed counts.
    let reject_with_counts = JobAccepted {
        accepted: false,
        signature: hex::encode(sign_decision(&c.sites[0].1, 1, &hash, false, Some(&declared))),
        ..signed_accept
    };
    assert!(replace_last(&mut c, reject_with_counts).is_err());
}

#[test]
fn membership_changes_decide_who_may_endorse() {
    let mut c = TestConsortium::new(3);
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
        rotation_signature: None,
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
        rotation_signature: None,
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
        let mut c = TestConsortium::new(n_sites);
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

/// A coordinator (or CA) that swaps a site's key for one it holds cannot
/// make the swap stick: a rotation needs the old key's signature, and a
/// majority of the *other* members must endorse it.
#[test]
fn adversarial_key_swap_needs_the_old_key_and_a_majority_without_the_site() {
    let mut c = TestConsortium::new(3);
    let id = c.sites[0].0.clone();
    let attacker = key();
    let swap = |signature: Option<Vec<u8>>| {
        Payload::MembershipChange(MembershipChange {
            change: "key_rotated".into(),
            site: Member {
                id: id.to_string(),
                key: hex::encode(attacker.public_key()),
                certificate_sha256: None,
            },
            reason: "rotation".into(),
            rotation_signature: signature.map(hex::encode),
        })
    };
    for signature in [
        None,
        Some(sign_rotation(&attacker, &id, &attacker.public_key())),
        Some(vec![0; 64]),
    ] {
        let mut forged = TestConsortium::new(3);
        forged.sites = c.sites.iter().map(|(i, _)| (i.clone(), key())).collect();
        let mut chain = c.blocks.clone();
        let tip = c.tip_at(chain.len() - 1);
        chain.push(c.writer.block_after(Some(tip), &swap(signature), 5_000).0);
        let e = verify_chain(&chain, None).unwrap_err();
        assert_eq!(e.height, 1);
        assert!(e.to_string().contains("not signed by its old key"), "{e}");
    }
    // With the old key's consent but endorsed only by the rotating site and
    // one other of three: 1 of the 2 others is no majority.
    let consent = sign_rotation(&c.sites[0].1, &id, &attacker.public_key());
    c.append(&swap(Some(consent)));
    c.blocks[1].endorsements.truncate(1);
    let report = verify_chain(&c.blocks, None).unwrap();
    assert_eq!(report.first_pending, Some((1, 0, 2)));
}

/// Partition by a truncated ledger: the coordinator shows some sites the
/// chain as it stood after three of five acceptances and seals *that* as
/// the cohort, while the others see the two later acceptances and the full
/// seal. Both seals are valid blocks on their own chain; what stops the
/// attack is that they sit at one height, and every honest site endorses
/// one block per height: whichever way the five sites split, at most one
/// seal is final, so at most one group ever starts a summation.
#[test]
fn adversarial_truncated_ledger_cannot_seal_a_second_cohort() {
    let mut c = TestConsortium::new(5);
    c.create_job(1);
    for i in 0..3 {
        c.append(&c.decision(1, i, true));
    }
    let fork_at = c.blocks.len();
    let short_seal = Payload::CohortSealed(CohortSealed {
        job_id: 1,
        cohort: c.sites[..3].iter().map(|(id, _)| id.to_string()).collect(),
    });
    let (short, _) = c.writer.block_after(Some(c.tip_at(fork_at - 1)), &short_seal, 5_000);
    for i in 3..5 {
        c.append(&c.decision(1, i, true));
    }
    c.append(&c.seal(1));
    let endorsed = |block: &Block, sites: &[usize]| {
        let mut b = block.clone();
        b.endorsements = sites
            .iter()
            .map(|&i| Endorsement {
                site: c.sites[i].0.clone(),
                signature: endorse(&c.sites[i].1, &b.hash()),
            })
            .collect();
        b
    };
    let is_final = |chain: &[Block]| verify_chain(chain, None).is_ok_and(|r| r.pending == 0);
    let mut finals = [0; 2];
    for split in 0u32..32 {
        let (short_side, full_side): (Vec<usize>, Vec<usize>) = (0..5).partition(|i| split & (1 << i) != 0);
        let mut truncated = c.blocks[..fork_at].to_vec();
        truncated.push(endorsed(&short, &short_side));
        let mut full = c.blocks[..fork_at].to_vec();
        full.extend(c.blocks[fork_at..].iter().map(|b| endorsed(b, &full_side)));
        // The short seal is a valid block: finality alone decides.
        verify_chain(&truncated, None).expect("the truncated chain verifies");
        let (a, b) = (is_final(&truncated), is_final(&full));
        assert!(
            !(a && b),
            "both seals final with the split {short_side:?} / {full_side:?}"
        );
        finals[0] += usize::from(a);
        finals[1] += usize::from(b);
    }
    // Each side wins exactly when it holds a majority (16 splits each).
    assert_eq!(finals, [16, 16]);
}
