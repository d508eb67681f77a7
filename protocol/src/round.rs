//! One training round as a pure state machine: which sites are expected, who
//! submitted, who dropped out, and when the round may close.
//!
//! The coordinator's driver loop reads like this (no sockets or clocks here;
//! `now` is milliseconds on any monotonic clock the caller owns):
//!
//! ```text
//! let mut round = RoundCollector::new(params, members, now);
//! loop {
//!     on update    => round.handle_update(now, header, &delta)  // Err -> gRPC status
//!     on heartbeat => round.handle_heartbeat(now, &site)
//!     on timer     => round.handle_tick(now)                    // drops silent sites
//!     if round.is_settled() { break }
//! }
//! let outcome = round.finish()?;  // SecureSum over >= min_sites, or an error
//! ```

use std::collections::BTreeMap;

use crate::aggregate::{SecureSum, SumError, Summation};
use crate::ids::{JobId, SiteId};

/// Fixed facts of a round, known when it opens.
#[derive(Clone, Debug)]
pub struct RoundParams {
    pub job_id: JobId,
    pub round: u32,
    pub n_params: usize,
    pub base_model_hash: String,
    pub min_sites: usize,
    pub round_timeout_ms: u64,
    pub dropout_after_ms: u64,
}

/// The part of an update message the collector checks.
#[derive(Clone, Debug)]
pub struct UpdateHeader {
    pub site: SiteId,
    pub job_id: JobId,
    pub round: u32,
    pub n_samples: u64,
    pub base_model_hash: String,
    pub train_loss: f64,
}

/// SHA-256 of a plaintext update as little-endian f32: what the ledger
/// records as the site's commitment (the site computes the same).
pub fn update_commitment(delta: &[f32]) -> [u8; 32] {
    crate::ids::sha256_le_words(bytemuck::cast_slice(delta))
}

/// Where each selected site stands in the round.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberState {
    Expected {
        last_seen_ms: u64,
    },
    /// `commitment`: SHA-256 of the update as little-endian f32, for the ledger.
    Submitted {
        n_samples: u64,
        train_loss: f64,
        commitment: [u8; 32],
    },
    Dropped {
        reason: DropReason,
    },
}

/// Why a site was dropped from a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// No heartbeat within the job's `dropout_after_s`.
    Silent,
    /// The round's deadline passed before the site submitted.
    Timeout,
    /// The site said it can no longer take part (`ReportProblem`).
    Failed,
}

/// Why an update was refused. The round is unchanged and goes on.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UpdateRejection {
    #[error("site `{0}` is not a member of this round")]
    UnknownSite(SiteId),
    #[error("update is for job {got}, this round belongs to job {expected}")]
    WrongJob { expected: JobId, got: JobId },
    #[error("update is for round {got}, the open round is {expected}")]
    WrongRound { expected: u32, got: u32 },
    #[error("site `{0}` already submitted an update in this round")]
    Duplicate(SiteId),
    #[error("site `{0}` was dropped from this round and cannot rejoin it")]
    Dropped(SiteId),
    #[error("update is relative to model {got}, the round's model is {expected}")]
    WrongBaseModel { expected: String, got: String },
    #[error("update claims zero training samples")]
    NoSamples,
    #[error("train_loss is not finite")]
    BadLoss,
    #[error("update rejected: {0}")]
    Vector(#[from] SumError),
}

/// Why a round ended without a new model.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RoundError {
    #[error("only {got} sites submitted, at least {min} are needed")]
    TooFewSites { got: usize, min: usize },
}

/// What a finished round hands to the strategy and the store.
#[derive(Debug)]
pub struct RoundOutcome {
    pub sum: SecureSum,
    pub members: BTreeMap<SiteId, MemberState>,
}

impl RoundOutcome {
    pub fn dropped(&self) -> Vec<SiteId> {
        dropped_sites(&self.members)
    }

    /// Sample-weighted mean of the sites' reported training losses.
    pub fn mean_train_loss(&self) -> f64 {
        let (mut total, mut weight) = (0.0, 0.0);
        for state in self.members.values() {
            if let MemberState::Submitted {
                n_samples, train_loss, ..
            } = state
            {
                total += *n_samples as f64 * train_loss;
                weight += *n_samples as f64;
            }
        }
        if weight > 0.0 { total / weight } else { f64::NAN }
    }
}

fn dropped_sites(members: &BTreeMap<SiteId, MemberState>) -> Vec<SiteId> {
    members
        .iter()
        .filter(|(_, s)| matches!(s, MemberState::Dropped { .. }))
        .map(|(id, _)| id.clone())
        .collect()
}

/// Collects the updates of one round.
pub struct RoundCollector {
    params: RoundParams,
    opened_at_ms: u64,
    members: BTreeMap<SiteId, MemberState>,
    sum: Summation,
}

impl RoundCollector {
    pub fn new(params: RoundParams, members: impl IntoIterator<Item = SiteId>, now_ms: u64) -> Self {
        let members = members
            .into_iter()
            .map(|s| (s, MemberState::Expected { last_seen_ms: now_ms }))
            .collect();
        let sum = Summation::new(params.n_params);
        Self {
            params,
            opened_at_ms: now_ms,
            members,
            sum,
        }
    }

    pub fn params(&self) -> &RoundParams {
        &self.params
    }

    pub fn members(&self) -> &BTreeMap<SiteId, MemberState> {
        &self.members
    }

    /// Whether `site` still owes an update in this round.
    pub fn is_expected(&self, site: &SiteId) -> bool {
        matches!(self.members.get(site), Some(MemberState::Expected { .. }))
    }

    /// Checks an update and adds it to the sum; on error nothing changes.
    pub fn handle_update(&mut self, now_ms: u64, header: &UpdateHeader, delta: &[f32]) -> Result<(), UpdateRejection> {
        if header.job_id != self.params.job_id {
            return Err(UpdateRejection::WrongJob {
                expected: self.params.job_id,
                got: header.job_id,
            });
        }
        if header.round != self.params.round {
            return Err(UpdateRejection::WrongRound {
                expected: self.params.round,
                got: header.round,
            });
        }
        match self.members.get(&header.site) {
            None => return Err(UpdateRejection::UnknownSite(header.site.clone())),
            Some(MemberState::Submitted { .. }) => return Err(UpdateRejection::Duplicate(header.site.clone())),
            Some(MemberState::Dropped { .. }) => return Err(UpdateRejection::Dropped(header.site.clone())),
            Some(MemberState::Expected { .. }) => {}
        }
        if header.base_model_hash != self.params.base_model_hash {
            return Err(UpdateRejection::WrongBaseModel {
                expected: self.params.base_model_hash.clone(),
                got: header.base_model_hash.clone(),
            });
        }
        if header.n_samples == 0 {
            return Err(UpdateRejection::NoSamples);
        }
        if !header.train_loss.is_finite() {
            return Err(UpdateRejection::BadLoss);
        }
        self.sum.add(header.site.clone(), header.n_samples as f64, delta)?;
        self.members.insert(
            header.site.clone(),
            MemberState::Submitted {
                n_samples: header.n_samples,
                train_loss: header.train_loss,
                commitment: update_commitment(delta),
            },
        );
        let _ = now_ms;
        Ok(())
    }

    /// Records that `site` is alive (heartbeat or any message).
    pub fn handle_heartbeat(&mut self, now_ms: u64, site: &SiteId) {
        if let Some(MemberState::Expected { last_seen_ms }) = self.members.get_mut(site) {
            *last_seen_ms = (*last_seen_ms).max(now_ms);
        }
    }

    /// Drops a site that said it cannot go on, if it still owes its update.
    /// Returns whether it was dropped by this call.
    pub fn handle_failure(&mut self, site: &SiteId) -> bool {
        match self.members.get_mut(site) {
            Some(state @ MemberState::Expected { .. }) => {
                *state = MemberState::Dropped {
                    reason: DropReason::Failed,
                };
                true
            }
            _ => false,
        }
    }

    /// Drops sites that went silent, and everyone still expected once the
    /// round's deadline has passed. Returns the sites dropped by this call.
    pub fn handle_tick(&mut self, now_ms: u64) -> Vec<SiteId> {
        let timed_out = now_ms.saturating_sub(self.opened_at_ms) >= self.params.round_timeout_ms;
        let mut dropped = Vec::new();
        for (site, state) in self.members.iter_mut() {
            if let MemberState::Expected { last_seen_ms } = *state {
                let reason = if timed_out {
                    Some(DropReason::Timeout)
                } else if now_ms.saturating_sub(last_seen_ms) >= self.params.dropout_after_ms {
                    Some(DropReason::Silent)
                } else {
                    None
                };
                if let Some(reason) = reason {
                    *state = MemberState::Dropped { reason };
                    dropped.push(site.clone());
                }
            }
        }
        dropped
    }

    /// No member still owes an update.
    pub fn is_settled(&self) -> bool {
        !self.members.values().any(|s| matches!(s, MemberState::Expected { .. }))
    }

    /// Closes the round. Releases the sum only over at least `min_sites` (and
    /// never fewer than 3) contributors.
    pub fn finish(self) -> Result<RoundOutcome, RoundError> {
        let got = self.sum.n_contributors();
        let min = self.params.min_sites.max(3);
        match self.sum.finish(min) {
            Some(sum) => Ok(RoundOutcome {
                sum,
                members: self.members,
            }),
            None => Err(RoundError::TooFewSites { got, min }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: usize = 4;

    fn site(i: usize) -> SiteId {
        SiteId::new(&format!("site-{i}")).unwrap()
    }

    fn collector(n_sites: usize, min_sites: usize) -> RoundCollector {
        let params = RoundParams {
            job_id: JobId(1),
            round: 2,
            n_params: N,
            base_model_hash: "h".into(),
            min_sites,
            round_timeout_ms: 10_000,
            dropout_after_ms: 1_000,
        };
        RoundCollector::new(params, (0..n_sites).map(site), 0)
    }

    fn header(i: usize) -> UpdateHeader {
        UpdateHeader {
            site: site(i),
            job_id: JobId(1),
            round: 2,
            n_samples: 10 * (i as u64 + 1),
            base_model_hash: "h".into(),
            train_loss: 0.5,
        }
    }

    /// Applies one altered header and expects `rejection`, then checks that a
    /// correct update from the same site is still accepted.
    fn check_rejected(alter: impl Fn(&mut UpdateHeader), delta: &[f32], rejection: UpdateRejection) {
        let mut round = collector(3, 3);
        let mut h = header(0);
        alter(&mut h);
        assert_eq!(round.handle_update(0, &h, delta), Err(rejection));
        assert!(round.is_expected(&site(0)));
        round.handle_update(0, &header(0), &[1.0; N]).unwrap();
    }

    #[test]
    fn bad_updates_are_rejected_precisely_and_change_nothing() {
        check_rejected(
            |h| h.round = 1,
            &[0.0; N],
            UpdateRejection::WrongRound { expected: 2, got: 1 },
        );
        check_rejected(
            |h| h.job_id = JobId(9),
            &[0.0; N],
            UpdateRejection::WrongJob {
                expected: JobId(1),
                got: JobId(9),
            },
        );
        check_rejected(|h| h.site = site(7), &[0.0; N], UpdateRejection::UnknownSite(site(7)));
        check_rejected(
            |h| h.base_model_hash = "old".into(),
            &[0.0; N],
            UpdateRejection::WrongBaseModel {
                expected: "h".into(),
                got: "old".into(),
            },
        );
        check_rejected(|h| h.n_samples = 0, &[0.0; N], UpdateRejection::NoSamples);
        check_rejected(|h| h.train_loss = f64::NAN, &[0.0; N], UpdateRejection::BadLoss);
        check_rejected(
            |_| {},
            &[0.0; 3],
            UpdateRejection::Vector(SumError::WrongLength { expected: N, got: 3 }),
        );
        check_rejected(
            |_| {},
            &[0.0, f32::NAN, 0.0, 0.0],
            UpdateRejection::Vector(SumError::NonFinite { index: 1 }),
        );
        check_rejected(
            |_| {},
            &[0.0, 0.0, f32::INFINITY, 0.0],
            UpdateRejection::Vector(SumError::NonFinite { index: 2 }),
        );
    }

    #[test]
    fn all_sites_submit_gives_weighted_sum() {
        let mut round = collector(4, 3);
        for i in 0..4 {
            round.handle_update(5, &header(i), &[i as f32; N]).unwrap();
        }
        assert!(round.is_settled());
        let outcome = round.finish().unwrap();
        // weights 10, 20, 30, 40 times values 0, 1, 2, 3.
        assert_eq!(outcome.sum.weighted_sum, vec![20.0 + 60.0 + 120.0; N]);
        assert_eq!(outcome.sum.total_weight, 100.0);
        assert!(outcome.dropped().is_empty());
    }

    #[test]
    fn duplicate_and_returning_dropped_sites_are_refused() {
        let mut round = collector(4, 3);
        round.handle_update(0, &header(0), &[1.0; N]).unwrap();
        assert_eq!(
            round.handle_update(0, &header(0), &[1.0; N]),
            Err(UpdateRejection::Duplicate(site(0)))
        );
        // site 1 heartbeats, site 2 and 3 stay silent past dropout_after.
        round.handle_heartbeat(900, &site(1));
        assert_eq!(round.handle_tick(1_500), vec![site(2), site(3)]);
        assert_eq!(
            round.handle_update(1_600, &header(2), &[1.0; N]),
            Err(UpdateRejection::Dropped(site(2)))
        );
        round.handle_update(1_600, &header(1), &[1.0; N]).unwrap();
        assert!(round.is_settled());
        // Two contributors: no aggregate is released.
        assert_eq!(round.finish().unwrap_err(), RoundError::TooFewSites { got: 2, min: 3 });
    }

    /// Dropouts of every size at the two moments a site can vanish (before and
    /// after it submitted): the round completes exactly when ≥ min_sites
    /// submitted, and the sum covers exactly the submitters.
    #[test]
    fn dropouts_of_every_size() {
        let n_sites = 6;
        for n_drop in 0..=n_sites {
            for drop_after_submit in [false, true] {
                let mut round = collector(n_sites, 3);
                let mut expected_weight = 0.0;
                for i in 0..n_sites {
                    let drops = i < n_drop;
                    if !drops || drop_after_submit {
                        round.handle_update(0, &header(i), &[1.0; N]).unwrap();
                        expected_weight += header(i).n_samples as f64;
                    }
                    if !drops {
                        round.handle_heartbeat(5_000, &site(i));
                    }
                }
                round.handle_tick(5_500);
                assert!(round.is_settled());
                let n_submitted = if drop_after_submit { n_sites } else { n_sites - n_drop };
                match round.finish() {
                    Ok(outcome) => {
                        assert!(n_submitted >= 3);
                        assert_eq!(outcome.sum.contributors.len(), n_submitted);
                        assert_eq!(outcome.sum.total_weight, expected_weight);
                        assert_eq!(outcome.sum.weighted_sum, vec![expected_weight; N]);
                    }
                    Err(RoundError::TooFewSites { got, min }) => {
                        assert_eq!((got, min), (n_submitted, 3));
                        assert!(n_submitted < 3);
                    }
                }
            }
        }
    }

    #[test]
    fn deadline_drops_everyone_still_expected() {
        let mut round = collector(3, 3);
        round.handle_update(0, &header(0), &[1.0; N]).unwrap();
        for t in (0..10_000).step_by(500) {
            round.handle_heartbeat(t, &site(1));
            round.handle_heartbeat(t, &site(2));
            assert!(round.handle_tick(t).is_empty());
        }
        assert_eq!(round.handle_tick(10_000), vec![site(1), site(2)]);
        assert_eq!(
            round.members()[&site(1)],
            MemberState::Dropped {
                reason: DropReason::Timeout
            }
        );
        assert!(round.finish().is_err());
    }
}
