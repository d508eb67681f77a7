//! Catching a coordinator that shows different sites different histories.
//!
//! Majority finality (see `verify::majority`) already stops two blocks at one
//! height from both becoming final. This module makes the lie *provable*:
//! every endorsement a site sends names the header it endorsed and the
//! coordinator's signature over it, and the coordinator relays endorsements
//! to the other sites. A site that receives an endorsement of a different
//! header at a height it holds now has two coordinator-signed headers at one
//! height: evidence it stores (`ledger_conflicts`) and any verifier checks
//! offline. A coordinator that withholds such endorsements instead gets no
//! finality for the branch it hid (that branch lacks a majority), so the
//! sites shown it never act on it.

use super::verify::{Problem, VerifyError};
use super::{Header, sha256, verify_block_signature, verify_endorsement};

/// A coordinator-signed header that conflicts with the chain at `height`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub height: u64,
    pub header: Vec<u8>,
    /// The coordinator's signature over SHA-256(header).
    pub signature: Vec<u8>,
}

/// An endorsement as relayed by the coordinator: the site's signature plus,
/// when the endorser sent them, the header it endorsed and the coordinator's
/// signature over that header.
#[derive(Clone, Debug, Default)]
pub struct Relayed<'a> {
    pub signature: &'a [u8],
    pub header: Option<&'a [u8]>,
    pub coordinator_signature: Option<&'a [u8]>,
}

/// What a relayed endorsement tells the site holding block `height`.
#[derive(Debug, PartialEq, Eq)]
pub enum Gossip {
    /// The endorser saw the same block.
    Agrees,
    /// The endorser saw a different block, signed by the coordinator: proof.
    Equivocation(Conflict),
    /// The endorsement does not verify: forged or garbled, by whoever
    /// relayed it. Not counted; not proof of anything.
    Invalid(&'static str),
}

/// Judges one relayed endorsement of block `height` (whose hash this site
/// holds as `own_hash`) by a member whose key is `endorser_key`.
pub fn judge(
    height: u64,
    own_hash: &[u8; 32],
    coordinator_key: &[u8; 32],
    endorser_key: &[u8; 32],
    relayed: &Relayed,
) -> Gossip {
    let Some(header) = relayed.header.filter(|h| sha256(h) != *own_hash) else {
        return if verify_endorsement(endorser_key, own_hash, relayed.signature) {
            Gossip::Agrees
        } else {
            Gossip::Invalid("the signature does not verify over this site's block")
        };
    };
    let hash = sha256(header);
    if Header::decode(header).map(|h| h.height) != Ok(height) {
        return Gossip::Invalid("the endorsed header is not a header at this height");
    }
    if !verify_endorsement(endorser_key, &hash, relayed.signature) {
        return Gossip::Invalid("the signature does not verify over the header it names");
    }
    match relayed.coordinator_signature {
        Some(signature) if verify_block_signature(coordinator_key, &hash, signature) => {
            Gossip::Equivocation(Conflict {
                height,
                header: header.to_vec(),
                signature: signature.to_vec(),
            })
        }
        _ => Gossip::Invalid("the header it names is not signed by the coordinator"),
    }
}

/// Checks stored evidence against a chain whose block hashes are `hashes`:
/// every conflict must be a coordinator-signed header at a height the chain
/// holds, differing from the chain's block there. Valid evidence is an
/// equivocation (an error no option accepts); invalid evidence is an error
/// too, since only a tampered file holds it. The lowest height is named.
pub fn check_conflicts(
    hashes: &[[u8; 32]],
    coordinator_key: &[u8; 32],
    conflicts: &[Conflict],
) -> Result<(), VerifyError> {
    let mut sorted: Vec<&Conflict> = conflicts.iter().collect();
    sorted.sort_by_key(|c| c.height);
    let Some(first) = sorted.first() else {
        return Ok(());
    };
    let height = first.height;
    let problem = match check_one(hashes, coordinator_key, first) {
        Ok(hash) => Problem::Equivocation(format!("block hash {}", hex::encode(hash))),
        Err(reason) => Problem::Evidence(reason),
    };
    Err(VerifyError { height, problem })
}

fn check_one(hashes: &[[u8; 32]], coordinator_key: &[u8; 32], c: &Conflict) -> Result<[u8; 32], String> {
    let own = hashes
        .get(usize::try_from(c.height).unwrap_or(usize::MAX))
        .ok_or("it names a height beyond the chain")?;
    let header = Header::decode(&c.header).map_err(|e| format!("its header does not decode: {e}"))?;
    if header.height != c.height {
        return Err(format!("its header says height {}", header.height));
    }
    let hash = sha256(&c.header);
    if &hash == own {
        return Err("its header is the chain's own block".into());
    }
    if !verify_block_signature(coordinator_key, &hash, &c.signature) {
        return Err("its header is not signed by the coordinator".into());
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::payload::{JobEnded, Member, MembershipChange, Payload};
    use crate::ledger::testkit::TestConsortium;
    use crate::ledger::{endorse, sign_block};

    /// A chain and a second block at its last height, signed by the same
    /// coordinator: what an equivocating coordinator shows another site.
    fn fork() -> (TestConsortium, crate::ledger::Block) {
        let mut c = TestConsortium::new(3);
        c.job(1, 1);
        let other = c.sibling_of_tip(&Payload::JobEnded(JobEnded {
            job_id: 1,
            status: "cancelled".into(),
            reason: "other branch".into(),
            rounds_done: 1,
            final_model_sha256: None,
        }));
        (c, other)
    }

    #[test]
    fn adversarial_equivocated_block_is_proven_by_a_relayed_endorsement() {
        let (c, other) = fork();
        let tip = c.blocks.last().unwrap();
        let height = c.blocks.len() as u64 - 1;
        let (site, key) = &c.sites[1];
        let signature = endorse(key, &other.hash());
        let relayed = Relayed {
            signature: &signature,
            header: Some(&other.header),
            coordinator_signature: Some(&other.signature),
        };
        let coordinator = c.writer.public_key();
        let gossip = judge(height, &tip.hash(), &coordinator, &key.public_key(), &relayed);
        let Gossip::Equivocation(conflict) = gossip else {
            panic!("{site}: {gossip:?}")
        };
        let hashes: Vec<[u8; 32]> = c.blocks.iter().map(|b| b.hash()).collect();
        let err = check_conflicts(&hashes, &coordinator, &[conflict]).unwrap_err();
        assert_eq!(err.height, height);
        assert!(matches!(err.problem, Problem::Equivocation(_)), "{err}");
    }

    proptest::proptest! {
        /// An equivocating coordinator shows branch A to some sites and
        /// branch B to the others; each honest site endorses the one block
        /// it was shown. Whatever the split, at most one branch is final.
        #[test]
        fn adversarial_two_blocks_at_one_height_are_never_both_final(
            n in 1usize..12,
            split in proptest::collection::vec(proptest::bool::ANY, 12),
            revocations in proptest::bool::ANY,
        ) {
            let mut c = TestConsortium::new(n);
            c.job(1, 0);
            // Either two job blocks, or (the harder case: a change's subject
            // does not count) "revoke site 0" against "revoke site 1".
            let (a, b) = if revocations && n >= 2 {
                (c.sibling_of_tip(&revoke(&c, 0)), c.sibling_of_tip(&revoke(&c, 1)))
            } else {
                (c.sibling_of_tip(&ended_with("branch a")), c.sibling_of_tip(&ended_with("branch b")))
            };
            let mut finals = 0;
            for (branch, side) in [(a, true), (b, false)] {
                let mut blocks = c.blocks[..c.blocks.len() - 1].to_vec();
                let hash = branch.hash();
                let mut branch = branch;
                branch.endorsements = c
                    .sites
                    .iter()
                    .zip(&split)
                    .filter(|(_, s)| **s == side)
                    .map(|((id, k), _)| crate::ledger::Endorsement { site: id.clone(), signature: endorse(k, &hash) })
                    .collect();
                blocks.push(branch);
                let report = crate::ledger::verify::verify_chain(&blocks, None).unwrap();
                finals += usize::from(report.pending == 0);
            }
            proptest::prop_assert!(finals <= 1, "{finals} branches final with {n} sites");
        }
    }

    fn revoke(c: &TestConsortium, i: usize) -> Payload {
        let (id, key) = &c.sites[i];
        Payload::MembershipChange(MembershipChange {
            change: "site_revoked".into(),
            site: Member {
                id: id.to_string(),
                key: hex::encode(key.public_key()),
                certificate_sha256: None,
            },
            reason: "equivocation test".into(),
            rotation_signature: None,
        })
    }

    fn ended_with(reason: &str) -> Payload {
        Payload::JobEnded(JobEnded {
            job_id: 1,
            status: "cancelled".into(),
            reason: reason.into(),
            rounds_done: 0,
            final_model_sha256: None,
        })
    }

    #[test]
    fn relayed_endorsements_that_prove_nothing_are_told_apart() {
        let (c, other) = fork();
        let tip = c.blocks.last().unwrap();
        let height = c.blocks.len() as u64 - 1;
        let key = &c.sites[1].1;
        let coordinator = c.writer.public_key();
        let mine = endorse(key, &tip.hash());
        let theirs = endorse(key, &other.hash());
        let judge_with = |signature: &[u8], header: Option<&[u8]>, cs: Option<&[u8]>| {
            let relayed = Relayed {
                signature,
                header,
                coordinator_signature: cs,
            };
            judge(height, &tip.hash(), &coordinator, &key.public_key(), &relayed)
        };
        assert_eq!(judge_with(&mine, None, None), Gossip::Agrees);
        assert_eq!(judge_with(&mine, Some(&tip.header), None), Gossip::Agrees);
        assert!(matches!(judge_with(&theirs, None, None), Gossip::Invalid(_)));
        // A header the coordinator never signed proves nothing against it.
        let forged = sign_block(key, &other.hash());
        assert!(matches!(
            judge_with(&theirs, Some(&other.header), Some(&forged)),
            Gossip::Invalid(_)
        ));
        // Nor does a header at another height.
        let earlier = &c.blocks[1];
        let sig = endorse(key, &earlier.hash());
        assert!(matches!(
            judge_with(&sig, Some(&earlier.header), Some(&earlier.signature)),
            Gossip::Invalid(_)
        ));
    }

    #[test]
    fn stored_evidence_that_is_not_a_conflict_is_refused() {
        let (c, other) = fork();
        let coordinator = c.writer.public_key();
        let hashes: Vec<[u8; 32]> = c.blocks.iter().map(|b| b.hash()).collect();
        let tip = c.blocks.last().unwrap();
        let height = hashes.len() as u64 - 1;
        let cases = [
            // The chain's own block is no conflict.
            Conflict {
                height,
                header: tip.header.clone(),
                signature: tip.signature.clone(),
            },
            // A signature that is not the coordinator's.
            Conflict {
                height,
                header: other.header.clone(),
                signature: vec![0; 64],
            },
            // A height the chain does not hold.
            Conflict {
                height: height + 1,
                header: other.header.clone(),
                signature: other.signature.clone(),
            },
        ];
        for case in cases {
            let err = check_conflicts(&hashes, &coordinator, std::slice::from_ref(&case)).unwrap_err();
            assert!(matches!(err.problem, Problem::Evidence(_)), "{err}");
        }
        assert!(check_conflicts(&hashes, &coordinator, &[]).is_ok());
    }
}
