//! Federated category discovery: the categories of a column marked
//! `discover = true` are not listed in the consortium's schema but formed
//! per job from what the sites propose, so that no site must send its codes
//! to a person who types them into a file.
//!
//! The coordinator is an adversary here too. A category in the union becomes
//! a one-hot feature whose pooled mean (the secure statistics) is the pooled
//! count of that value: were the coordinator free to add values, it could
//! ask "how many patients have this rare code?" for any code. So:
//!
//! - a site proposes only values that have at least `min_rows` rows in its
//!   own data (its policy's `discovery_min_rows`), at most the column's
//!   `top_k` most frequent of them, and signs its proposal with its roster
//!   key, bound to the job (its id and the hash of its file);
//! - the coordinator relays the members' signed proposals with the
//!   statistics task, and every site forms the union itself ([`union`]): a
//!   proposal from a site whose acceptance of the job is not final in the
//!   site's ledger, a forged or replayed signature, a column the schema does
//!   not discover, more values than `top_k`, or this site's own proposal
//!   missing or altered, and the site takes no part in the job.
//!
//! The coordinator can leave a member's proposal out. That only takes
//! categories away (their rows stay in the other bucket), and the member
//! itself, which always counts its own proposal, then encodes otherwise
//! than the rest and is left out of the job for it, as it could be anyway.
//! The cohort is sealed after the encodings agree, so the sealed cohort
//! cannot be the reference here: the final acceptances are.
//!
//! What a proposal reveals (to the coordinator and to the cohort's sites):
//! that the site has at least `min_rows` rows with each value it proposes,
//! and with `top_k`, that these are among its most frequent. Nothing about
//! the values it does not propose, and no count.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::SiteId;
use crate::roster::Roster;
use crate::secagg::crypto::{SigningKey, verify as verify_signature};

/// The most values one site may propose for one column, whatever the
/// schema's `top_k`: bounds what a proposal costs to send and to check.
pub const MAX_PROPOSED: usize = 1000;

/// The longest value a proposal may carry, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;

const DOMAIN: &[u8] = b"tessera category proposal v1\0";

/// A column whose categories are discovered, as the consortium's schema
/// declares it (every site of a job has the same schema).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    pub column: String,
    /// The values declared in the schema: always categories, never proposed.
    pub declared: Vec<String>,
    /// At most this many values per site.
    pub top_k: usize,
}

/// The values one site proposes, per discovered column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Proposal {
    pub columns: BTreeMap<String, BTreeSet<String>>,
}

/// A proposal as the site signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedProposal {
    pub site: SiteId,
    pub proposal: Proposal,
    pub signature: Vec<u8>,
}

/// The job a proposal is bound to: a signature for one job is worthless
/// for another.
#[derive(Clone, Copy, Debug)]
pub struct JobRef<'a> {
    pub job_id: u64,
    pub job_sha256: &'a [u8; 32],
}

/// Why a site refuses the proposals a coordinator relayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoveryError {
    #[error("a category proposal from `{0}`, whose acceptance of the job is not final on this site's ledger")]
    NotAccepted(SiteId),
    #[error("two category proposals from `{0}`")]
    Duplicate(SiteId),
    #[error("the category proposal of `{0}` is not signed by its roster key for this job")]
    BadSignature(SiteId),
    #[error("this site's own category proposal is missing or altered")]
    OwnAltered,
    #[error("`{site}` proposes categories for `{column}`, which the schema does not discover")]
    UnknownColumn { site: SiteId, column: String },
    #[error("`{site}` proposes {count} values for `{column}`, more than its top_k of {top_k}")]
    TooMany {
        site: SiteId,
        column: String,
        count: usize,
        top_k: usize,
    },
    #[error(
        "`{site}` proposes for `{column}` a value that is empty, longer than {MAX_VALUE_BYTES} bytes, declared, \
         not finite or parenthesised"
    )]
    BadValue { site: SiteId, column: String },
}

/// The values this site proposes: per discovered column, those with at
/// least `min_rows` rows (`counts`: value → rows, after the column's `map`),
/// not declared, at most `top_k` of them, the most frequent first (ties by
/// value, so the choice is deterministic).
pub fn propose(columns: &[Discovered], counts: &BTreeMap<String, BTreeMap<String, u64>>, min_rows: u64) -> Proposal {
    let min_rows = min_rows.max(1);
    let mut proposal = Proposal::default();
    for column in columns {
        let mut candidates: Vec<(&String, u64)> = counts
            .get(&column.column)
            .into_iter()
            .flatten()
            .filter(|&(value, &n)| n >= min_rows && acceptable(column, value))
            .map(|(value, &n)| (value, n))
            .collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let values = candidates
            .into_iter()
            .take(column.top_k.min(MAX_PROPOSED))
            .map(|(value, _)| value.clone())
            .collect();
        proposal.columns.insert(column.column.clone(), values);
    }
    proposal
}

/// Whether a value may be a discovered category: not empty, not too long,
/// not declared, not a number that is no number (`NaN`, `inf`: categories
/// match numbers by value), and not parenthesised like the names Tessera
/// gives its own features (`(other)`, `(missing)`).
fn acceptable(column: &Discovered, value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_VALUE_BYTES
        && !column.declared.iter().any(|d| d == value)
        && value.parse::<f64>().map_or(true, f64::is_finite)
        && !(value.starts_with('(') && value.ends_with(')'))
}

/// The bytes a site signs: the domain, the job, the site id, then each
/// column (ascending) with its values (ascending), every string preceded
/// by its length (u32 BE), every list by its count.
pub fn message(job: JobRef<'_>, site: &SiteId, proposal: &Proposal) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(DOMAIN);
    out.extend_from_slice(&job.job_id.to_be_bytes());
    out.extend_from_slice(job.job_sha256);
    put(&mut out, site.as_str());
    out.extend_from_slice(&(proposal.columns.len() as u32).to_be_bytes());
    for (column, values) in &proposal.columns {
        put(&mut out, column);
        out.extend_from_slice(&(values.len() as u32).to_be_bytes());
        for value in values {
            put(&mut out, value);
        }
    }
    out
}

fn put(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Signs this site's proposal for a job.
pub fn sign(key: &SigningKey, job: JobRef<'_>, site: &SiteId, proposal: Proposal) -> SignedProposal {
    let signature = key.sign(&message(job, site, &proposal));
    SignedProposal {
        site: site.clone(),
        proposal,
        signature,
    }
}

/// Whether `proposal` is signed by `key` for this job (the roster key of
/// the site it names).
pub fn verify(key: &[u8; 32], job: JobRef<'_>, proposal: &SignedProposal) -> bool {
    verify_signature(
        key,
        &message(job, &proposal.site, &proposal.proposal),
        &proposal.signature,
    )
}

/// The categories of each discovered column for this job, formed by this
/// site from the members' signed proposals: the declared values, then the
/// union of the proposed ones in ascending order. Every check that makes
/// the union the accepting sites' own (and nothing a coordinator chose) is
/// here; see the module's documentation. `accepted`: the sites whose
/// acceptance of the job is final in this site's ledger.
pub fn union(
    job: JobRef<'_>,
    roster: &Roster,
    accepted: &BTreeSet<SiteId>,
    columns: &[Discovered],
    own: &SignedProposal,
    relayed: &[SignedProposal],
) -> Result<BTreeMap<String, Vec<String>>, DiscoveryError> {
    let mut seen = BTreeSet::new();
    let mut proposed: BTreeMap<&str, BTreeSet<&String>> = BTreeMap::new();
    for p in relayed {
        if !accepted.contains(&p.site) {
            return Err(DiscoveryError::NotAccepted(p.site.clone()));
        }
        if !seen.insert(&p.site) {
            return Err(DiscoveryError::Duplicate(p.site.clone()));
        }
        if p.site == own.site && p != own {
            return Err(DiscoveryError::OwnAltered);
        }
        let signed = roster.get(&p.site).is_some_and(|key| verify(key, job, p));
        if !signed {
            return Err(DiscoveryError::BadSignature(p.site.clone()));
        }
        for (column, values) in &p.proposal.columns {
            let Some(spec) = columns.iter().find(|c| &c.column == column) else {
                return Err(DiscoveryError::UnknownColumn {
                    site: p.site.clone(),
                    column: column.clone(),
                });
            };
            let top_k = spec.top_k.min(MAX_PROPOSED);
            if values.len() > top_k {
                return Err(DiscoveryError::TooMany {
                    site: p.site.clone(),
                    column: column.clone(),
                    count: values.len(),
                    top_k,
                });
            }
            if values.iter().any(|v| !acceptable(spec, v)) {
                return Err(DiscoveryError::BadValue {
                    site: p.site.clone(),
                    column: column.clone(),
                });
            }
            proposed.entry(column).or_default().extend(values);
        }
    }
    if !seen.contains(&own.site) {
        return Err(DiscoveryError::OwnAltered);
    }
    Ok(columns
        .iter()
        .map(|c| {
            let mut categories = c.declared.clone();
            categories.extend(
                proposed
                    .get(c.column.as_str())
                    .into_iter()
                    .flatten()
                    .map(|v| (*v).clone()),
            );
            (c.column.clone(), categories)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: [u8; 32] = [7; 32];
    const JOB: JobRef<'static> = JobRef {
        job_id: 4,
        job_sha256: &HASH,
    };

    fn site(name: &str) -> SiteId {
        SiteId::new(name).unwrap()
    }

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap()
    }

    fn diag(top_k: usize) -> Vec<Discovered> {
        vec![Discovered {
            column: "diag".into(),
            declared: vec!["250".into()],
            top_k,
        }]
    }

    fn values(list: &[&str]) -> Proposal {
        Proposal {
            columns: [("diag".to_owned(), list.iter().map(|v| (*v).to_owned()).collect())].into(),
        }
    }

    /// Three sites with their keys, the roster and each one's signed proposal.
    struct Consortium {
        keys: BTreeMap<SiteId, SigningKey>,
        roster: Roster,
        accepted: BTreeSet<SiteId>,
        signed: Vec<SignedProposal>,
    }

    fn consortium(proposals: &[(&str, &[&str])]) -> Consortium {
        let keys: BTreeMap<SiteId, SigningKey> = proposals.iter().map(|(name, _)| (site(name), key())).collect();
        let roster = keys.iter().map(|(s, k)| (s.clone(), k.public_key())).collect();
        let signed = proposals
            .iter()
            .map(|(name, list)| sign(&keys[&site(name)], JOB, &site(name), values(list)))
            .collect();
        Consortium {
            accepted: keys.keys().cloned().collect(),
            keys,
            roster,
            signed,
        }
    }

    impl Consortium {
        fn union_at(
            &self,
            at: usize,
            relayed: &[SignedProposal],
        ) -> Result<BTreeMap<String, Vec<String>>, DiscoveryError> {
            union(JOB, &self.roster, &self.accepted, &diag(3), &self.signed[at], relayed)
        }
    }

    #[test]
    fn a_site_proposes_its_most_frequent_values_with_enough_rows() {
        let counts: BTreeMap<String, BTreeMap<String, u64>> = [(
            "diag".to_owned(),
            [
                ("428", 40),
                ("401", 12),
                ("250", 99),
                ("V45", 9),
                ("786", 12),
                ("414", 30),
                ("", 50),
            ]
            .into_iter()
            .map(|(v, n)| (v.to_owned(), n))
            .collect(),
        )]
        .into();
        // 250 is declared, V45 has too few rows, the empty value is none:
        // 428 (40), 414 (30), then 401 and 786 tie at 12 (by value).
        assert_eq!(propose(&diag(3), &counts, 10), values(&["428", "414", "401"]));
        assert_eq!(propose(&diag(10), &counts, 10), values(&["428", "414", "401", "786"]));
        assert_eq!(propose(&diag(10), &counts, 41), values(&[]));
        // No counts for the column: an empty proposal, still one per column.
        assert_eq!(propose(&diag(3), &BTreeMap::new(), 10), values(&[]));
    }

    #[test]
    fn the_union_is_the_declared_values_then_every_proposal_in_order() {
        let c = consortium(&[("a", &["428", "401"]), ("b", &["414", "401"]), ("c", &[])]);
        let union = c.union_at(0, &c.signed).unwrap();
        assert_eq!(union["diag"], ["250", "401", "414", "428"]);
        // The same at every site, whatever order the coordinator relays in.
        let mut reversed = c.signed.clone();
        reversed.reverse();
        assert_eq!(c.union_at(2, &reversed).unwrap(), union);
    }

    #[test]
    fn adversarial_a_coordinator_cannot_add_a_category_or_drop_this_sites() {
        let c = consortium(&[("a", &["428"]), ("b", &["414"]), ("c", &["401"])]);
        // A value added to another site's proposal: its signature fails.
        let mut added = c.signed.clone();
        added[1]
            .proposal
            .columns
            .get_mut("diag")
            .unwrap()
            .insert("V62.84".into());
        assert_eq!(c.union_at(0, &added), Err(DiscoveryError::BadSignature(site("b"))));
        // This site's own proposal altered (a value dropped).
        let mut dropped = c.signed.clone();
        dropped[0].proposal = values(&[]);
        assert_eq!(c.union_at(0, &dropped), Err(DiscoveryError::OwnAltered));
        // This site's own proposal left out.
        assert_eq!(c.union_at(0, &c.signed[1..]), Err(DiscoveryError::OwnAltered));
        // Another member's left out: only categories go (see the module).
        assert_eq!(c.union_at(0, &c.signed[..2]).unwrap()["diag"], ["250", "414", "428"]);
        // The same proposal twice.
        let mut twice = c.signed.clone();
        twice.push(c.signed[1].clone());
        assert_eq!(c.union_at(0, &twice), Err(DiscoveryError::Duplicate(site("b"))));
    }

    #[test]
    fn adversarial_a_proposal_signed_by_an_outsider_or_for_another_job_is_refused() {
        let c = consortium(&[("a", &["428"]), ("b", &["414"])]);
        // Signed by a key the coordinator holds, in a member's name.
        let mut forged = c.signed.clone();
        forged[1] = sign(&key(), JOB, &site("b"), values(&["V62.84"]));
        assert_eq!(c.union_at(0, &forged), Err(DiscoveryError::BadSignature(site("b"))));
        // A member's genuine proposal for another job (replayed): another
        // id, another file, or both.
        let other_hash = [8; 32];
        for other in [
            JobRef {
                job_id: 5,
                job_sha256: &other_hash,
            },
            JobRef {
                job_id: 5,
                job_sha256: &HASH,
            },
            JobRef {
                job_id: 4,
                job_sha256: &other_hash,
            },
        ] {
            let mut replayed = c.signed.clone();
            replayed[1] = sign(&c.keys[&site("b")], other, &site("b"), values(&["V62.84"]));
            assert_eq!(c.union_at(0, &replayed), Err(DiscoveryError::BadSignature(site("b"))));
        }
        // A site whose acceptance is not final here, even one on the roster.
        let mut roster = c.roster.clone();
        let outsider_key = key();
        roster.insert(site("z"), outsider_key.public_key());
        let mut outside = c.signed.clone();
        outside.push(sign(&outsider_key, JOB, &site("z"), values(&["V62.84"])));
        assert_eq!(
            union(JOB, &roster, &c.accepted, &diag(3), &c.signed[0], &outside),
            Err(DiscoveryError::NotAccepted(site("z")))
        );
    }

    #[test]
    fn adversarial_a_proposal_outside_the_schema_is_refused_though_signed() {
        // A dishonest site (or a coordinator with a site's key) cannot
        // widen the union beyond what the schema allows every site.
        for (list, want) in [
            (
                vec!["1", "2", "3", "4"],
                DiscoveryError::TooMany {
                    site: site("b"),
                    column: "diag".into(),
                    count: 4,
                    top_k: 3,
                },
            ),
            (
                vec!["250"],
                DiscoveryError::BadValue {
                    site: site("b"),
                    column: "diag".into(),
                },
            ),
            (
                vec![""],
                DiscoveryError::BadValue {
                    site: site("b"),
                    column: "diag".into(),
                },
            ),
            (
                vec!["(other)"],
                DiscoveryError::BadValue {
                    site: site("b"),
                    column: "diag".into(),
                },
            ),
            (
                vec!["NaN"],
                DiscoveryError::BadValue {
                    site: site("b"),
                    column: "diag".into(),
                },
            ),
        ] {
            let c = consortium(&[("a", &["428"]), ("b", &list)]);
            assert_eq!(c.union_at(0, &c.signed), Err(want));
        }
        let mut c = consortium(&[("a", &["428"]), ("b", &["414"])]);
        let mut other_column = values(&["x"]);
        other_column.columns = [("age".to_owned(), ["x".to_owned()].into())].into();
        c.signed[1] = sign(&c.keys[&site("b")], JOB, &site("b"), other_column);
        assert_eq!(
            c.union_at(0, &c.signed),
            Err(DiscoveryError::UnknownColumn {
                site: site("b"),
                column: "age".into()
            })
        );
    }

    proptest! {
        /// The signed bytes decide the proposal: two different proposals
        /// (or sites) never sign the same message, however the values are
        /// split (the length prefixes).
        #[test]
        fn different_proposals_sign_different_messages(
            a in prop::collection::btree_set("[a-c]{0,3}", 0..4),
            b in prop::collection::btree_set("[a-c]{0,3}", 0..4),
            site_a in "[a-c]{1,3}",
            site_b in "[a-c]{1,3}",
        ) {
            let proposal = |set: &BTreeSet<String>| Proposal { columns: [("diag".to_owned(), set.clone())].into() };
            let same = a == b && site_a == site_b;
            let ma = message(JOB, &site(&site_a), &proposal(&a));
            let mb = message(JOB, &site(&site_b), &proposal(&b));
            prop_assert_eq!(ma == mb, same);
        }
    }
}
