//! The shared corpus: ledgers, valid and invalid, with the verdict the
//! specification (`docs/ledger-format.md`) gives each. The workspace's tests
//! write every case to an SQLite file and run both verifiers on it
//! (`tessera ledger verify` and `scripts/verify_ledger.py`): they must agree
//! with each other and with the verdict. Cases concentrate on the rules two
//! independent readers of the page could read differently: finality under
//! membership changes, key rotation, equivocation evidence.

use super::equivocation::Conflict;
use super::payload::*;
use super::testkit::{TestConsortium, key};
use super::*;
use crate::ids::sha256_hex;

/// What a verifier must say about a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Intact and final: exit 0.
    Final,
    /// Intact, but blocks from `first` on lack their quorum: exit 1, or 0
    /// with `--allow-pending`.
    Pending { first: u64 },
    /// Invalid at `height`: exit 1 whatever the options, naming the height.
    Invalid { height: u64 },
}

/// One ledger of the corpus.
pub struct Case {
    pub name: &'static str,
    pub blocks: Vec<Block>,
    /// Rows of `ledger_conflicts`.
    pub conflicts: Vec<Conflict>,
    pub expect: Expect,
}

fn case(name: &'static str, c: TestConsortium, expect: Expect) -> Case {
    Case {
        name,
        blocks: c.blocks,
        conflicts: Vec::new(),
        expect,
    }
}

fn last(c: &TestConsortium) -> u64 {
    c.blocks.len() as u64 - 1
}

/// Keeps only the endorsements of `block` by the sites at `keep` indexes.
fn endorsed_by(c: &mut TestConsortium, block: usize, keep: &[usize]) {
    let names: Vec<SiteId> = keep.iter().map(|&i| c.sites[i].0.clone()).collect();
    c.blocks[block].endorsements.retain(|e| names.contains(&e.site));
}

fn change(kind: &str, id: &SiteId, key: [u8; 32], rotation_signature: Option<Vec<u8>>) -> Payload {
    Payload::MembershipChange(MembershipChange {
        change: kind.into(),
        site: Member {
            id: id.to_string(),
            key: hex::encode(key),
            certificate_sha256: None,
        },
        reason: "corpus".into(),
        rotation_signature: rotation_signature.map(hex::encode),
    })
}

fn ended(job_id: u64, reason: &str) -> Payload {
    Payload::JobEnded(JobEnded {
        job_id,
        status: "cancelled".into(),
        reason: reason.into(),
        rounds_done: 0,
        final_model_sha256: None,
    })
}

fn created(job_id: u64) -> Payload {
    let toml = format!("name = \"corpus {job_id}\"");
    Payload::JobCreated(JobCreated {
        job_id,
        name: format!("corpus {job_id}"),
        job_sha256: sha256_hex(toml.as_bytes()),
        job_toml: toml,
        software: "corpus".into(),
        insecure_transport: false,
    })
}

/// Site `site`'s decision on job 1, signed over `n_test = signed` (and
/// `n_train = 100`) but stored with `n_test = stored`.
fn decision(c: &TestConsortium, site: usize, accepted: bool, signed: Option<u64>, stored: Option<u64>) -> Payload {
    let toml = "name = \"corpus 1\"";
    let hash = sha256(toml.as_bytes());
    let counts = |n_test| DeclaredCounts { n_train: 100, n_test };
    Payload::JobAccepted(JobAccepted {
        job_id: 1,
        site: c.sites[site].0.to_string(),
        job_sha256: hex::encode(hash),
        accepted,
        reason: "corpus".into(),
        signature: hex::encode(sign_decision(
            &c.sites[site].1,
            1,
            &hash,
            accepted,
            signed.map(counts).as_ref(),
        )),
        counts: stored.map(counts),
    })
}

/// Every site accepts job 1, then its cohort is sealed.
fn accepted_and_sealed(c: &mut TestConsortium) {
    for site in 0..c.sites.len() {
        c.append(&decision(c, site, true, Some(30), Some(30)));
    }
    c.append(&c.seal(1));
}

fn seal(c: &TestConsortium, sites: &[usize]) -> Payload {
    Payload::CohortSealed(CohortSealed {
        job_id: 1,
        cohort: sites.iter().map(|&i| c.sites[i].0.to_string()).collect(),
    })
}

/// The sealed cohort (§5 cohort_sealed, §6 rule 8): exactly the accepting
/// sites, once, before any sum, no acceptance after it and nothing contributed
/// outside it.
fn cohort_cases(out: &mut Vec<Case>) {
    let accept = |c: &mut TestConsortium, verdicts: &[bool]| {
        for (site, &accepted) in verdicts.iter().enumerate() {
            let counts = accepted.then_some(30);
            c.append(&decision(c, site, accepted, counts, counts));
        }
    };
    let mut c = TestConsortium::new(3);
    c.append(&created(1));
    accept(&mut c, &[true, false, true]);
    c.append(&seal(&c, &[0, 2]));
    out.push(case("cohort_of_the_accepting_sites", c, Expect::Final));
    // A data team's late "no" is recorded and changes nothing.
    let mut c = TestConsortium::new(3);
    c.append(&created(1));
    accept(&mut c, &[true, true]);
    c.append(&seal(&c, &[0, 1]));
    c.append(&decision(&c, 2, false, None, None));
    out.push(case("rejection_after_the_seal", c, Expect::Final));

    type Build = fn(&mut TestConsortium);
    let invalid: [(&'static str, Build); 8] = [
        ("acceptance_after_the_seal", |c| {
            c.append(&decision(c, 2, true, Some(30), Some(30)));
        }),
        ("seal_missing_an_accepting_site", |c| {
            c.append(&decision(c, 2, true, Some(30), Some(30)));
            c.append(&seal(c, &[0, 1]));
        }),
        ("seal_with_a_site_that_did_not_accept", |c| {
            c.append(&decision(c, 2, false, None, None));
            c.append(&seal(c, &[0, 1, 2]));
        }),
        ("second_seal", |c| c.append(&seal(c, &[0, 1]))),
        ("seal_out_of_order", |c| c.append(&seal(c, &[1, 0]))),
        ("site_decides_twice", |c| {
            c.append(&decision(c, 0, true, Some(30), Some(30)));
        }),
        ("summation_by_a_site_outside_the_cohort", |c| {
            c.append(&Payload::Summation(Box::new(c.summation(1, Summation::STATISTICS))));
        }),
        ("round_without_a_seal", |c| {
            c.append(&Payload::RoundCompleted(Box::new(c.round(
                1,
                1,
                &sha256_hex(b"m0"),
                &sha256_hex(b"m1"),
            ))));
        }),
    ];
    for (name, build) in invalid {
        let mut c = TestConsortium::new(3);
        c.append(&created(1));
        accept(&mut c, &[true, true]);
        // Sealed first, except where the case is about what comes before
        // (or instead of) the seal.
        if !matches!(
            name,
            "seal_missing_an_accepting_site"
                | "seal_with_a_site_that_did_not_accept"
                | "seal_out_of_order"
                | "site_decides_twice"
                | "round_without_a_seal"
        ) {
            c.append(&seal(&c, &[0, 1]));
        }
        build(&mut c);
        let height = last(&c);
        out.push(case(name, c, Expect::Invalid { height }));
    }
}

/// A `models_pruned` block naming `models` of job 1.
fn pruned(models: &[String]) -> Payload {
    Payload::ModelsPruned(ModelsPruned {
        job_id: 1,
        models: models.to_vec(),
        by: "operator-1".into(),
        reason: "corpus".into(),
    })
}

/// Pruning (§5 models_pruned): only models of an ended job's rounds, each
/// once, in ascending order.
fn pruned_cases(out: &mut Vec<Case>) {
    // `TestConsortium::job`'s models: the initial one, then one per round.
    let initial = sha256_hex(&1u64.to_be_bytes());
    let of_round = |job: u64, round: u32| sha256_hex(format!("{job}/{round}").as_bytes());
    let mut two = vec![initial.clone(), of_round(1, 1)];
    two.sort();

    let mut c = TestConsortium::new(3);
    c.job(1, 2);
    c.append(&pruned(&two));
    c.append(&pruned(&[of_round(1, 2)]));
    out.push(case("models_pruned_after_the_job_ended", c, Expect::Final));

    type Build = fn(&mut TestConsortium, &[String]);
    let invalid: [(&'static str, Build); 5] = [
        ("models_pruned_twice", |c, two| {
            c.append(&pruned(two));
            c.append(&pruned(&two[..1]));
        }),
        ("models_pruned_out_of_order", |c, two| {
            c.append(&pruned(&[two[1].clone(), two[0].clone()]));
        }),
        ("models_pruned_none", |c, _| c.append(&pruned(&[]))),
        ("models_pruned_of_another_job", |c, _| {
            c.job(2, 1);
            c.append(&pruned(&[sha256_hex(b"2/1")]));
        }),
        ("models_pruned_in_uppercase", |c, two| {
            c.append(&pruned(&[two[0].to_uppercase()]));
        }),
    ];
    for (name, build) in invalid {
        let mut c = TestConsortium::new(3);
        c.job(1, 2);
        build(&mut c, &two);
        let height = last(&c);
        out.push(case(name, c, Expect::Invalid { height }));
    }

    // Two jobs that started from one model (one seed): each job's block may
    // name it, once per job.
    let mut c = TestConsortium::new(3);
    c.job(1, 1);
    c.create_job(2);
    c.accept_and_seal(2);
    c.append(&Payload::RoundCompleted(Box::new(c.round(
        2,
        1,
        &initial,
        &of_round(2, 1),
    ))));
    c.append(&Payload::JobEnded(JobEnded {
        job_id: 2,
        status: "failed".into(),
        reason: "corpus".into(),
        rounds_done: 1,
        final_model_sha256: None,
    }));
    c.append(&pruned(std::slice::from_ref(&initial)));
    let mut of_two = vec![initial.clone(), of_round(2, 1)];
    of_two.sort();
    c.append(&Payload::ModelsPruned(ModelsPruned {
        job_id: 2,
        models: of_two,
        by: "operator-1".into(),
        reason: "corpus".into(),
    }));
    out.push(case("models_pruned_shared_by_two_jobs", c, Expect::Final));

    // While the job runs, its models are still in use.
    let mut c = TestConsortium::new(3);
    c.append(&created(1));
    accepted_and_sealed(&mut c);
    c.append(&Payload::RoundCompleted(Box::new(c.round(
        1,
        1,
        &initial,
        &of_round(1, 1),
    ))));
    c.append(&pruned(&[initial]));
    let height = last(&c);
    out.push(case("models_pruned_while_the_job_runs", c, Expect::Invalid { height }));
}

/// Every case. Keys are fresh on each call; verdicts do not depend on them.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();

    let mut c = TestConsortium::new(3);
    c.job(1, 2);
    out.push(case("final", c, Expect::Final));

    let mut c = TestConsortium::new(3);
    c.job(1, 1);
    let tip = c.blocks.len() - 1;
    endorsed_by(&mut c, tip, &[0]);
    let first = last(&c);
    out.push(case("pending_tail", c, Expect::Pending { first }));

    let mut c = TestConsortium::new(4);
    c.job(1, 1);
    endorsed_by(&mut c, 2, &[0, 1]);
    out.push(case("endorsements_removed_mid_chain", c, Expect::Invalid { height: 2 }));

    let mut c = TestConsortium::new(3);
    c.rotate_key(1);
    c.job(1, 1);
    out.push(case("key_rotation_signed_by_old_key", c, Expect::Final));

    // Declared row counts are part of what the site signs (§5).
    for (name, accepted, signed, stored) in [
        ("decision_counts_edited_after_signing", true, Some(30), Some(31)),
        ("decision_counts_dropped_after_signing", true, Some(30), None),
        ("rejection_declaring_counts", false, Some(30), Some(30)),
    ] {
        let mut c = TestConsortium::new(3);
        c.append(&created(1));
        c.append(&decision(&c, 1, accepted, signed, stored));
        let height = last(&c);
        out.push(case(name, c, Expect::Invalid { height }));
    }
    // Summations outside the rounds (§5 summation, §6 rule 8).
    let stats = |c: &TestConsortium| Payload::Summation(Box::new(c.summation(1, Summation::STATISTICS)));
    let final_eval = |c: &TestConsortium| Payload::Summation(Box::new(c.summation(1, Summation::FINAL_EVALUATION)));
    let round =
        |c: &TestConsortium| Payload::RoundCompleted(Box::new(c.round(1, 1, &sha256_hex(b"m0"), &sha256_hex(b"m1"))));
    let mut c = TestConsortium::new(3);
    c.append(&created(1));
    accepted_and_sealed(&mut c);
    c.append(&stats(&c));
    c.append(&round(&c));
    c.append(&final_eval(&c));
    out.push(case("summations_before_and_after_the_rounds", c, Expect::Final));
    for (name, build) in [
        ("statistics_summation_after_a_round", 0),
        ("second_statistics_summation", 1),
        ("round_after_the_final_evaluation", 2),
        ("statistics_summation_without_normalization", 3),
        ("final_evaluation_with_a_normalization", 4),
        ("summation_with_an_unsorted_commitment", 5),
    ] {
        let mut c = TestConsortium::new(3);
        c.append(&created(1));
        accepted_and_sealed(&mut c);
        match build {
            0 => {
                c.append(&round(&c));
                c.append(&stats(&c));
            }
            1 => {
                c.append(&stats(&c));
                c.append(&stats(&c));
            }
            2 => {
                c.append(&final_eval(&c));
                c.append(&round(&c));
            }
            3 | 4 => {
                let purpose = if build == 3 {
                    Summation::STATISTICS
                } else {
                    Summation::FINAL_EVALUATION
                };
                let mut s = c.summation(1, purpose);
                s.normalization_sha256 = if build == 3 { None } else { Some(sha256_hex(b"n")) };
                c.append(&Payload::Summation(Box::new(s)));
            }
            _ => {
                let mut s = c.summation(1, Summation::STATISTICS);
                s.commitments.swap(0, 1);
                c.append(&Payload::Summation(Box::new(s)));
            }
        }
        let height = last(&c);
        out.push(case(name, c, Expect::Invalid { height }));
    }

    let mut c = TestConsortium::new(3);
    c.append(&created(1));
    c.append(&decision(&c, 1, true, None, None));
    c.append(&decision(&c, 0, false, None, None));
    out.push(case("decisions_without_counts", c, Expect::Final));

    cohort_cases(&mut out);

    // The coordinator swaps a site's key for one it holds: no consent.
    let mut c = TestConsortium::new(3);
    let (id, new) = (c.sites[1].0.clone(), key());
    c.append(&change("key_rotated", &id, new.public_key(), None));
    out.push(case("key_rotation_without_old_key", c, Expect::Invalid { height: 1 }));

    // Signed by the new key only: whoever holds it consents to nothing.
    let mut c = TestConsortium::new(3);
    let (id, new) = (c.sites[1].0.clone(), key());
    let signature = sign_rotation(&new, &id, &new.public_key());
    c.append(&change("key_rotated", &id, new.public_key(), Some(signature)));
    out.push(case("key_rotation_signed_by_new_key", c, Expect::Invalid { height: 1 }));

    // 4 members; the rotating site's own endorsement does not count, so
    // itself and one other (1 of the 3 others) leave the block pending, and a
    // final block after it makes the chain invalid.
    let mut c = TestConsortium::new(4);
    c.rotate_key(0);
    endorsed_by(&mut c, 1, &[0, 1]);
    c.job(1, 0);
    out.push(case(
        "key_rotation_endorsed_by_itself",
        c,
        Expect::Invalid { height: 1 },
    ));

    // A rotation signature, even where it is ignored, must be well-formed.
    let mut c = TestConsortium::new(3);
    let (id, old) = (c.sites[0].0.clone(), c.sites[0].1.public_key());
    let mut revocation = change("site_revoked", &id, old, None);
    if let Payload::MembershipChange(m) = &mut revocation {
        m.rotation_signature = Some("AB".repeat(64));
    }
    c.append(&revocation);
    out.push(case("malformed_rotation_signature", c, Expect::Invalid { height: 1 }));

    // A block is judged whole before the order of finality: an unconsented
    // rotation after a pending block is invalid at its own height.
    let mut c = TestConsortium::new(3);
    c.append(&created(1));
    endorsed_by(&mut c, 1, &[0]);
    let (id, new) = (c.sites[2].0.clone(), key());
    c.append(&change("key_rotated", &id, new.public_key(), None));
    out.push(case(
        "bad_rotation_after_pending_block",
        c,
        Expect::Invalid { height: 2 },
    ));

    // Revocation endorsed by the two remaining members: a majority of 3.
    let mut c = TestConsortium::new(3);
    let (id, old) = (c.sites[0].0.clone(), c.sites[0].1.public_key());
    c.append(&change("site_revoked", &id, old, None));
    c.sites.remove(0);
    c.job(1, 1);
    out.push(case("site_revoked", c, Expect::Final));

    // The revoked site's endorsement of its own revocation does not count.
    let mut c = TestConsortium::new(3);
    let (id, old) = (c.sites[0].0.clone(), c.sites[0].1.public_key());
    c.append(&change("site_revoked", &id, old, None));
    endorsed_by(&mut c, 1, &[0, 1]);
    out.push(case("site_revoked_counting_itself", c, Expect::Pending { first: 1 }));

    // Two members, each shown the other's revocation: the subject counts in
    // the majority (2 of 2), so neither revocation can be final.
    let mut c = TestConsortium::new(2);
    let (id, old) = (c.sites[0].0.clone(), c.sites[0].1.public_key());
    c.append(&change("site_revoked", &id, old, None));
    endorsed_by(&mut c, 1, &[1]);
    out.push(case(
        "revocation_in_a_consortium_of_two",
        c,
        Expect::Pending { first: 1 },
    ));

    // Quorum is a majority of the *current* members: after two of five
    // leave, two endorsements of three members make a block final.
    let mut c = TestConsortium::new(5);
    for _ in 0..2 {
        let (id, old) = (c.sites[0].0.clone(), c.sites[0].1.public_key());
        c.append(&change("site_revoked", &id, old, None));
        c.sites.remove(0);
    }
    c.append(&created(1));
    let tip = c.blocks.len() - 1;
    endorsed_by(&mut c, tip, &[0, 1]);
    out.push(case("quorum_follows_membership", c, Expect::Final));

    // A member added: later blocks need a majority of four.
    let mut c = TestConsortium::new(3);
    let newcomer = key();
    let id = SiteId::new("site-new").unwrap();
    c.append(&change("site_added", &id, newcomer.public_key(), None));
    c.sites.push((id, newcomer));
    c.append(&created(1));
    let tip = c.blocks.len() - 1;
    endorsed_by(&mut c, tip, &[0, 1]);
    out.push(case("site_added_raises_quorum", c, Expect::Pending { first: 2 }));

    // Genesis must declare the majority of its sites.
    let mut c = TestConsortium::new(4);
    let genesis = match Payload::parse(Kind::Genesis, &c.blocks[0].payload).unwrap() {
        Payload::Genesis(g) => Genesis { quorum: 2, ..g },
        _ => unreachable!(),
    };
    c.blocks.clear();
    c.writer = writer::ChainWriter::new(key(), None);
    let genesis = Payload::Genesis(Genesis {
        coordinator_key: hex::encode(c.writer.public_key()),
        ..genesis
    });
    c.append(&genesis);
    out.push(case("genesis_quorum_below_majority", c, Expect::Invalid { height: 0 }));

    // Two members with one key would count one site's endorsement twice.
    let mut c = TestConsortium::new(3);
    let (id, shared) = (SiteId::new("site-twin").unwrap(), c.sites[0].1.public_key());
    c.append(&change("site_added", &id, shared, None));
    out.push(case("site_added_with_a_members_key", c, Expect::Invalid { height: 1 }));

    let mut c = TestConsortium::new(3);
    let mut genesis = match Payload::parse(Kind::Genesis, &c.blocks[0].payload).unwrap() {
        Payload::Genesis(g) => g,
        _ => unreachable!(),
    };
    genesis.sites[1].key = genesis.sites[0].key.clone();
    c.blocks.clear();
    c.writer = writer::ChainWriter::new(key(), None);
    genesis.coordinator_key = hex::encode(c.writer.public_key());
    c.append(&Payload::Genesis(genesis));
    out.push(case("genesis_shared_key", c, Expect::Invalid { height: 0 }));

    // Equivocation: a second coordinator-signed block at the tip's height,
    // stored by a site that received it through a relayed endorsement.
    for (name, endorse_tip) in [("equivocation_final_tip", true), ("equivocation_pending_tip", false)] {
        let mut c = TestConsortium::new(3);
        c.job(1, 0);
        c.blocks.pop();
        c.append(&ended(1, "this branch"));
        if !endorse_tip {
            let tip = c.blocks.len() - 1;
            endorsed_by(&mut c, tip, &[0]);
        }
        let other = c.sibling_of_tip(&ended(1, "the other branch"));
        let height = last(&c);
        out.push(Case {
            name,
            conflicts: vec![Conflict {
                height,
                header: other.header,
                signature: other.signature,
            }],
            ..case(name, c, Expect::Invalid { height })
        });
    }

    // Evidence that proves nothing (not the coordinator's signature) is a
    // tampered file, not an equivocation; it is refused all the same.
    let mut c = TestConsortium::new(3);
    c.job(1, 1);
    let other = c.sibling_of_tip(&ended(1, "forged"));
    let forged = sign_block(&c.sites[0].1, &other.hash());
    let height = last(&c);
    out.push(Case {
        name: "evidence_not_signed_by_coordinator",
        conflicts: vec![Conflict {
            height,
            header: other.header,
            signature: forged,
        }],
        ..case("", c, Expect::Invalid { height })
    });

    // An outsider's endorsement.
    let mut c = TestConsortium::new(3);
    c.job(1, 1);
    let outsider = key();
    let hash = c.blocks[3].hash();
    c.blocks[3].endorsements.push(Endorsement {
        site: SiteId::new("outsider").unwrap(),
        signature: endorse(&outsider, &hash),
    });
    out.push(case("endorsement_by_non_member", c, Expect::Invalid { height: 3 }));

    pruned_cases(&mut out);

    // A payload changed after signing.
    let mut c = TestConsortium::new(3);
    c.job(1, 1);
    let byte = c.blocks[2].payload.len() / 2;
    c.blocks[2].payload[byte] ^= 1;
    out.push(case("payload_edited", c, Expect::Invalid { height: 2 }));

    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::equivocation::check_conflicts;
    use crate::ledger::verify::verify_chain;

    /// The Rust verifier's verdict on a case, in the corpus's terms.
    pub fn verdict(case: &Case) -> Expect {
        let report = match verify_chain(&case.blocks, None) {
            Ok(r) => r,
            Err(e) => return Expect::Invalid { height: e.height },
        };
        let hashes: Vec<[u8; 32]> = case.blocks.iter().map(Block::hash).collect();
        let coordinator: [u8; 32] = hex::decode(&report.genesis.coordinator_key)
            .unwrap()
            .try_into()
            .unwrap();
        if let Err(e) = check_conflicts(&hashes, &coordinator, &case.conflicts) {
            return Expect::Invalid { height: e.height };
        }
        match report.first_pending {
            Some((first, _, _)) => Expect::Pending { first },
            None => Expect::Final,
        }
    }

    #[test]
    fn the_rust_verifier_gives_every_corpus_case_its_verdict() {
        let cases = cases();
        assert!(cases.len() >= 15);
        let mut names = std::collections::BTreeSet::new();
        for case in &cases {
            assert!(names.insert(case.name), "two cases named {}", case.name);
            assert_eq!(verdict(case), case.expect, "case {}", case.name);
        }
    }
}
