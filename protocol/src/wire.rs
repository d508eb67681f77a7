//! Conversions between protobuf messages and protocol types, shared by the
//! coordinator and the participant. Everything a peer sends is checked here
//! (key lengths, site ids, share coordinates) before it reaches a machine.

use crate::discovery;
use crate::ids::SiteId;
use crate::ledger::{Block, Endorsement};
use crate::metrics::BinaryMetrics;
use crate::pb;
use crate::secagg::{AdvertisedKeys, EncryptedShare, SurvivorSignature, UnmaskResponse, shamir::Share};

/// A message field that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct WireError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError {
        field,
        reason: reason.into(),
    }
}

fn site(field: &'static str, id: &str) -> Result<SiteId, WireError> {
    SiteId::new(id).map_err(|e| bad(field, e.to_string()))
}

fn key32(field: &'static str, bytes: &[u8]) -> Result<[u8; 32], WireError> {
    bytes
        .try_into()
        .map_err(|_| bad(field, format!("expected 32 bytes, got {}", bytes.len())))
}

fn sites(field: &'static str, ids: &[String]) -> Result<Vec<SiteId>, WireError> {
    ids.iter().map(|id| site(field, id)).collect()
}

pub fn keys_from_pb(k: &pb::AdvertisedKeys) -> Result<AdvertisedKeys, WireError> {
    if k.signature.len() != 64 {
        return Err(bad(
            "keys.signature",
            format!("expected 64 bytes, got {}", k.signature.len()),
        ));
    }
    Ok(AdvertisedKeys {
        site: site("keys.site_id", &k.site_id)?,
        enc_pk: key32("keys.enc_pk", &k.enc_pk)?,
        mask_pk: key32("keys.mask_pk", &k.mask_pk)?,
        self_mask_hash: key32("keys.self_mask_hash", &k.self_mask_hash)?,
        threshold: k.threshold,
        cohort_size: k.cohort_size,
        cohort_sha256: key32("keys.cohort_sha256", &k.cohort_sha256)?,
        signature: k.signature.clone(),
    })
}

pub fn keys_to_pb(k: &AdvertisedKeys) -> pb::AdvertisedKeys {
    pb::AdvertisedKeys {
        site_id: k.site.to_string(),
        enc_pk: k.enc_pk.to_vec(),
        mask_pk: k.mask_pk.to_vec(),
        self_mask_hash: k.self_mask_hash.to_vec(),
        threshold: k.threshold,
        cohort_size: k.cohort_size,
        cohort_sha256: k.cohort_sha256.to_vec(),
        signature: k.signature.clone(),
    }
}

pub fn shares_from_pb(s: &pb::ShareInbox) -> Result<Vec<EncryptedShare>, WireError> {
    s.shares
        .iter()
        .map(|e| {
            Ok(EncryptedShare {
                from: site("shares.from", &e.from)?,
                to: site("shares.to", &e.to)?,
                ciphertext: e.ciphertext.clone(),
            })
        })
        .collect()
}

pub fn shares_to_pb(shares: &[EncryptedShare]) -> pb::ShareInbox {
    pb::ShareInbox {
        shares: shares
            .iter()
            .map(|e| pb::EncryptedShare {
                from: e.from.to_string(),
                to: e.to.to_string(),
                ciphertext: e.ciphertext.clone(),
            })
            .collect(),
    }
}

/// The most discovered columns one proposal may name.
const MAX_PROPOSED_COLUMNS: usize = 64;

/// A relayed category proposal, bounded before anything else reads it:
/// each column once, at most [`discovery::MAX_PROPOSED`] values of at most
/// [`discovery::MAX_VALUE_BYTES`] bytes each, each value once.
pub fn proposal_from_pb(p: &pb::CategoryProposal) -> Result<discovery::SignedProposal, WireError> {
    if p.columns.len() > MAX_PROPOSED_COLUMNS {
        return Err(bad(
            "proposal.columns",
            format!("more than {MAX_PROPOSED_COLUMNS} columns"),
        ));
    }
    let mut proposal = discovery::Proposal::default();
    for c in &p.columns {
        if c.values.len() > discovery::MAX_PROPOSED {
            return Err(bad(
                "proposal.columns.values",
                format!("more than {} values", discovery::MAX_PROPOSED),
            ));
        }
        if c.values.iter().any(|v| v.len() > discovery::MAX_VALUE_BYTES) {
            return Err(bad(
                "proposal.columns.values",
                format!("a value longer than {} bytes", discovery::MAX_VALUE_BYTES),
            ));
        }
        let values: std::collections::BTreeSet<String> = c.values.iter().cloned().collect();
        if values.len() != c.values.len() {
            return Err(bad(
                "proposal.columns.values",
                format!("a value of `{}` twice", c.column),
            ));
        }
        if proposal.columns.insert(c.column.clone(), values).is_some() {
            return Err(bad("proposal.columns", format!("`{}` twice", c.column)));
        }
    }
    Ok(discovery::SignedProposal {
        site: site("proposal.site_id", &p.site_id)?,
        proposal,
        signature: p.signature.clone(),
    })
}

pub fn proposal_to_pb(p: &discovery::SignedProposal) -> pb::CategoryProposal {
    pb::CategoryProposal {
        site_id: p.site.to_string(),
        columns: p
            .proposal
            .columns
            .iter()
            .map(|(column, values)| pb::ProposedColumn {
                column: column.clone(),
                values: values.iter().cloned().collect(),
            })
            .collect(),
        signature: p.signature.clone(),
    }
}

/// A site's clinical metrics as it reports them; every rate must be a
/// probability and every calibration figure finite, so that nothing stored
/// or shown is NaN or out of range.
pub fn binary_from_pb(m: &pb::BinaryMetrics) -> Result<BinaryMetrics, WireError> {
    let rate = |field: &'static str, v: Option<f64>| match v {
        Some(v) if !(0.0..=1.0).contains(&v) => Err(bad(field, format!("must be in [0, 1] or unset, got {v}"))),
        v => Ok(v),
    };
    let real = |field: &'static str, v: Option<f64>| match v {
        Some(v) if !v.is_finite() => Err(bad(field, format!("must be finite or unset, got {v}"))),
        v => Ok(v),
    };
    if !(m.threshold > 0.0 && m.threshold < 1.0) {
        return Err(bad(
            "binary.threshold",
            format!("must be strictly between 0 and 1, got {}", m.threshold),
        ));
    }
    Ok(BinaryMetrics {
        roc_auc: rate("binary.roc_auc", m.roc_auc)?,
        average_precision: rate("binary.average_precision", m.average_precision)?,
        brier: rate("binary.brier", m.brier)?,
        calibration_intercept: real("binary.calibration_intercept", m.calibration_intercept)?,
        calibration_slope: real("binary.calibration_slope", m.calibration_slope)?,
        threshold: m.threshold,
        sensitivity: rate("binary.sensitivity", m.sensitivity)?,
        specificity: rate("binary.specificity", m.specificity)?,
        ppv: rate("binary.ppv", m.ppv)?,
    })
}

pub fn binary_to_pb(m: &BinaryMetrics) -> pb::BinaryMetrics {
    pb::BinaryMetrics {
        roc_auc: m.roc_auc,
        average_precision: m.average_precision,
        brier: m.brier,
        calibration_intercept: m.calibration_intercept,
        calibration_slope: m.calibration_slope,
        threshold: m.threshold,
        sensitivity: m.sensitivity,
        specificity: m.specificity,
        ppv: m.ppv,
    }
}

pub fn survivors_from_pb(r: &pb::SurvivorList) -> Result<Vec<SiteId>, WireError> {
    sites("survivors.sites", &r.sites)
}

pub fn survivors_to_pb(survivors: &[SiteId]) -> pb::SurvivorList {
    pb::SurvivorList {
        sites: survivors.iter().map(|s| s.to_string()).collect(),
    }
}

pub fn survivor_signature_from_pb(s: &pb::SurvivorSignature) -> Result<SurvivorSignature, WireError> {
    if s.signature.len() != 64 {
        return Err(bad(
            "survivors_signature.signature",
            format!("expected 64 bytes, got {}", s.signature.len()),
        ));
    }
    Ok(SurvivorSignature {
        site: site("survivors_signature.site_id", &s.site_id)?,
        signature: s.signature.clone(),
    })
}

pub fn survivor_signature_to_pb(s: &SurvivorSignature) -> pb::SurvivorSignature {
    pb::SurvivorSignature {
        site_id: s.site.to_string(),
        signature: s.signature.clone(),
    }
}

pub fn survivor_signatures_from_pb(s: &pb::SurvivorSignatures) -> Result<Vec<SurvivorSignature>, WireError> {
    s.signatures.iter().map(survivor_signature_from_pb).collect()
}

pub fn survivor_signatures_to_pb(signatures: &[SurvivorSignature]) -> pb::SurvivorSignatures {
    pb::SurvivorSignatures {
        signatures: signatures.iter().map(survivor_signature_to_pb).collect(),
    }
}

fn revealed_from_pb(field: &'static str, shares: &[pb::RevealedShare]) -> Result<Vec<(SiteId, Share)>, WireError> {
    shares
        .iter()
        .map(|r| {
            let x = u8::try_from(r.x)
                .ok()
                .filter(|x| *x != 0)
                .ok_or_else(|| bad(field, format!("share x = {} is not in 1..=255", r.x)))?;
            Ok((
                site(field, &r.owner)?,
                Share {
                    x,
                    y: key32(field, &r.y)?,
                },
            ))
        })
        .collect()
}

fn revealed_to_pb(shares: &[(SiteId, Share)]) -> Vec<pb::RevealedShare> {
    shares
        .iter()
        .map(|(owner, s)| pb::RevealedShare {
            owner: owner.to_string(),
            x: u32::from(s.x),
            y: s.y.to_vec(),
        })
        .collect()
}

pub fn unmask_response_from_pb(r: &pb::UnmaskResponse) -> Result<UnmaskResponse, WireError> {
    Ok(UnmaskResponse {
        self_mask_shares: revealed_from_pb("unmask.self_mask_shares", &r.self_mask_shares)?,
        mask_key_shares: revealed_from_pb("unmask.mask_key_shares", &r.mask_key_shares)?,
    })
}

pub fn unmask_response_to_pb(r: &UnmaskResponse) -> pb::UnmaskResponse {
    pb::UnmaskResponse {
        self_mask_shares: revealed_to_pb(&r.self_mask_shares),
        mask_key_shares: revealed_to_pb(&r.mask_key_shares),
    }
}

/// Little-endian u32 words: the body of a masked input.
/// A ledger block as shipped by `GetBlocks`.
pub fn block_to_pb(height: u64, b: Block) -> pb::LedgerBlock {
    pb::LedgerBlock {
        height,
        header: b.header,
        payload: b.payload,
        signature: b.signature,
        endorsements: b
            .endorsements
            .into_iter()
            .map(|e| pb::LedgerEndorsement {
                site_id: e.site.to_string(),
                signature: e.signature,
                header: Vec::new(),
                coordinator_signature: Vec::new(),
            })
            .collect(),
    }
}

/// A shipped ledger block. An endorsement whose site id is malformed is
/// dropped: it could not be by a member, so it could never count.
pub fn block_from_pb(b: pb::LedgerBlock) -> Block {
    Block {
        header: b.header,
        payload: b.payload,
        signature: b.signature,
        endorsements: b
            .endorsements
            .into_iter()
            .filter_map(|e| {
                Some(Endorsement {
                    site: SiteId::new(&e.site_id).ok()?,
                    signature: e.signature,
                })
            })
            .collect(),
    }
}

pub fn encode_words(words: &[u32]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice(words).to_vec()
    } else {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// Inverse of [`encode_words`].
pub fn decode_words(bytes: &[u8]) -> Result<Vec<u32>, WireError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(bad(
            "masked input",
            format!("{} bytes is not a whole number of words", bytes.len()),
        ));
    }
    if cfg!(target_endian = "little") {
        // One copy (the bytes need not be aligned for u32).
        Ok(bytemuck::pod_collect_to_vec(bytes))
    } else {
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// The longest reason a site may give for a decision on a job or a hold
/// (bytes of UTF-8): a sentence for the ML lead, not a document; a
/// decision's reason enters the ledger. The coordinator refuses longer ones.
pub const MAX_REASON_BYTES: usize = 2048;

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary, ending in
/// `…` when cut, so that a site's long reason is shortened, never refused.
pub fn brief_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn site_metrics_out_of_range_are_refused_by_field() {
        let good = BinaryMetrics {
            roc_auc: Some(0.8),
            brier: Some(0.2),
            calibration_slope: Some(1.3),
            threshold: 0.5,
            ..BinaryMetrics::default()
        };
        assert_eq!(binary_from_pb(&binary_to_pb(&good)), Ok(good));
        let mut bad = binary_to_pb(&good);
        bad.roc_auc = Some(f64::NAN);
        assert_eq!(binary_from_pb(&bad).unwrap_err().field, "binary.roc_auc");
        let mut bad = binary_to_pb(&good);
        bad.ppv = Some(1.5);
        assert_eq!(binary_from_pb(&bad).unwrap_err().field, "binary.ppv");
        let mut bad = binary_to_pb(&good);
        bad.calibration_intercept = Some(f64::INFINITY);
        assert_eq!(binary_from_pb(&bad).unwrap_err().field, "binary.calibration_intercept");
        let mut bad = binary_to_pb(&good);
        bad.threshold = 0.0;
        assert_eq!(binary_from_pb(&bad).unwrap_err().field, "binary.threshold");
    }

    proptest! {
        #[test]
        fn a_brief_reason_fits_and_keeps_its_start(reason in ".{0,1200}") {
            let brief = brief_reason(&reason);
            prop_assert!(brief.len() <= MAX_REASON_BYTES);
            if reason.len() <= MAX_REASON_BYTES {
                prop_assert_eq!(&brief, &reason);
            } else {
                let kept = brief.strip_suffix('…').expect("a cut reason ends in an ellipsis");
                prop_assert!(reason.starts_with(kept));
                prop_assert!(kept.len() > MAX_REASON_BYTES - 8, "cut too short: {}", kept.len());
            }
        }
    }

    #[test]
    fn ledger_blocks_round_trip_and_malformed_endorsers_are_dropped() {
        let block = Block {
            header: vec![1; 83],
            payload: b"{}".to_vec(),
            signature: vec![2; 64],
            endorsements: vec![Endorsement {
                site: SiteId::new("va").unwrap(),
                signature: vec![3; 64],
            }],
        };
        let mut shipped = block_to_pb(7, block.clone());
        assert_eq!(shipped.height, 7);
        assert_eq!(block_from_pb(shipped.clone()), block);
        shipped.endorsements.push(pb::LedgerEndorsement {
            site_id: "Not A Site".into(),
            signature: vec![4; 64],
            ..Default::default()
        });
        assert_eq!(block_from_pb(shipped).endorsements, block.endorsements);
    }

    #[test]
    fn malformed_keys_are_refused_with_the_field() {
        let good = pb::AdvertisedKeys {
            site_id: "a".into(),
            enc_pk: vec![1; 32],
            mask_pk: vec![2; 32],
            self_mask_hash: vec![3; 32],
            signature: vec![4; 64],
            threshold: 3,
            cohort_size: 5,
            cohort_sha256: vec![5; 32],
        };
        assert_eq!(keys_to_pb(&keys_from_pb(&good).unwrap()), good);
        let short = pb::AdvertisedKeys {
            mask_pk: vec![2; 31],
            ..good.clone()
        };
        assert_eq!(keys_from_pb(&short).unwrap_err().field, "keys.mask_pk");
        let bad_site = pb::AdvertisedKeys {
            site_id: "A B".into(),
            ..good.clone()
        };
        assert_eq!(keys_from_pb(&bad_site).unwrap_err().field, "keys.site_id");
        let bad_sig = pb::AdvertisedKeys {
            signature: vec![0; 3],
            ..good
        };
        assert_eq!(keys_from_pb(&bad_sig).unwrap_err().field, "keys.signature");
        let zero_x = pb::UnmaskResponse {
            self_mask_shares: vec![pb::RevealedShare {
                owner: "a".into(),
                x: 0,
                y: vec![0; 32],
            }],
            mask_key_shares: vec![],
        };
        assert_eq!(
            unmask_response_from_pb(&zero_x).unwrap_err().field,
            "unmask.self_mask_shares"
        );
        let short_sig = pb::SurvivorSignature {
            site_id: "a".into(),
            signature: vec![1; 63],
        };
        assert_eq!(
            survivor_signature_from_pb(&short_sig).unwrap_err().field,
            "survivors_signature.signature"
        );
        let list = pb::SurvivorList {
            sites: vec!["a".into(), "Not A Site".into()],
        };
        assert_eq!(survivors_from_pb(&list).unwrap_err().field, "survivors.sites");
    }

    #[test]
    fn malformed_proposals_are_refused_with_the_field() {
        let column = |name: &str, values: &[&str]| pb::ProposedColumn {
            column: name.into(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        };
        let good = pb::CategoryProposal {
            site_id: "a".into(),
            columns: vec![column("diag", &["401", "428"]), column("drug", &[])],
            signature: vec![1; 64],
        };
        assert_eq!(proposal_to_pb(&proposal_from_pb(&good).unwrap()), good);
        for (columns, field) in [
            (
                vec![column("diag", &["401"]), column("diag", &["428"])],
                "proposal.columns",
            ),
            (vec![column("diag", &["401", "401"])], "proposal.columns.values"),
            (vec![column("diag", &[&"x".repeat(257)])], "proposal.columns.values"),
            (
                vec![pb::ProposedColumn {
                    column: "diag".into(),
                    values: (0..1001).map(|i| i.to_string()).collect(),
                }],
                "proposal.columns.values",
            ),
            (
                (0..65).map(|i| column(&i.to_string(), &[])).collect(),
                "proposal.columns",
            ),
        ] {
            let bad = pb::CategoryProposal {
                columns,
                ..good.clone()
            };
            assert_eq!(proposal_from_pb(&bad).unwrap_err().field, field);
        }
        let bad_site = pb::CategoryProposal {
            site_id: "Not A Site".into(),
            ..good
        };
        assert_eq!(proposal_from_pb(&bad_site).unwrap_err().field, "proposal.site_id");
    }

    proptest! {
        /// What decodes encodes back to the same message (values in order).
        #[test]
        fn proposals_round_trip_or_are_refused(
            columns in prop::collection::vec(("[a-c]{0,2}", prop::collection::vec("[0-9]{0,2}", 0..5)), 0..4),
        ) {
            let p = pb::CategoryProposal {
                site_id: "a".into(),
                columns: columns
                    .iter()
                    .map(|(c, v)| pb::ProposedColumn { column: c.clone(), values: v.clone() })
                    .collect(),
                signature: vec![7; 64],
            };
            if let Ok(decoded) = proposal_from_pb(&p) {
                let mut sorted = p.clone();
                sorted.columns.sort_by(|a, b| a.column.cmp(&b.column));
                for c in &mut sorted.columns {
                    c.values.sort();
                }
                prop_assert_eq!(proposal_to_pb(&decoded), sorted);
            }
        }

        #[test]
        fn words_round_trip(words in prop::collection::vec(any::<u32>(), 0..100)) {
            prop_assert_eq!(decode_words(&encode_words(&words)).unwrap(), words);
        }

        /// Little-endian, whatever the buffer's alignment.
        #[test]
        fn words_are_little_endian_at_any_offset(words in prop::collection::vec(any::<u32>(), 0..100), pad in 0usize..4) {
            let bytes = encode_words(&words);
            let expected: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            prop_assert_eq!(&bytes, &expected);
            let mut shifted = vec![0u8; pad];
            shifted.extend_from_slice(&bytes);
            prop_assert_eq!(decode_words(&shifted[pad..]).unwrap(), words);
        }

        #[test]
        fn decoders_never_panic(
            site_id in ".{0,10}", bytes in prop::collection::vec(any::<u8>(), 0..70), x in any::<u32>(),
        ) {
            let _ = keys_from_pb(&pb::AdvertisedKeys {
                site_id: site_id.clone(), enc_pk: bytes.clone(), mask_pk: bytes.clone(),
                self_mask_hash: bytes.clone(), signature: bytes.clone(), threshold: x, cohort_size: x,
                cohort_sha256: bytes.clone(),
            });
            let _ = survivors_from_pb(&pb::SurvivorList { sites: vec![site_id.clone()] });
            let _ = survivor_signatures_from_pb(&pb::SurvivorSignatures {
                signatures: vec![pb::SurvivorSignature { site_id: site_id.clone(), signature: bytes.clone() }],
            });
            let _ = unmask_response_from_pb(&pb::UnmaskResponse {
                self_mask_shares: vec![pb::RevealedShare { owner: site_id, x, y: bytes.clone() }],
                mask_key_shares: vec![],
            });
            let _ = decode_words(&bytes);
        }

        /// Whatever a site reports, the metrics that get through are
        /// probabilities and finite calibration figures: nothing stored or
        /// shown is NaN or out of range.
        #[test]
        fn site_metrics_that_decode_are_in_range(
            values in prop::collection::vec(
                prop::option::of(prop_oneof![any::<f64>(), -0.5f64..1.5, Just(f64::NAN), Just(f64::INFINITY)]),
                8,
            ),
            threshold in prop_oneof![any::<f64>(), 0.0f64..1.0],
        ) {
            let m = pb::BinaryMetrics {
                roc_auc: values[0], average_precision: values[1], brier: values[2],
                calibration_intercept: values[3], calibration_slope: values[4], threshold,
                sensitivity: values[5], specificity: values[6], ppv: values[7],
            };
            if let Ok(b) = binary_from_pb(&m) {
                for rate in [b.roc_auc, b.average_precision, b.brier, b.sensitivity, b.specificity, b.ppv].into_iter().flatten() {
                    prop_assert!((0.0..=1.0).contains(&rate));
                }
                for real in [b.calibration_intercept, b.calibration_slope].into_iter().flatten() {
                    prop_assert!(real.is_finite());
                }
                prop_assert!(b.threshold > 0.0 && b.threshold < 1.0);
                prop_assert_eq!(binary_to_pb(&b), m);
            }
        }
    }
}
