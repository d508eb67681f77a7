//! One secure summation as the coordinator drives it: the protocol's server
//! machine plus the messages each site is waiting for, and the conversions
//! from wire messages. The driver advances it stage by stage; the RPC
//! handlers feed it.

use std::collections::{BTreeMap, BTreeSet};

use tessera_protocol::ids::SiteId;
use tessera_protocol::pb;
use tessera_protocol::secagg::server::{self, Abort, Misbehaviour, Transcript};
use tessera_protocol::secagg::{RoundContext, SecAggParams};
use tessera_protocol::wire;

use crate::rpc::RpcError;

/// A secure summation in progress.
pub struct SecureSession {
    pub ctx: RoundContext,
    pub members: Vec<SiteId>,
    pub vector_len: usize,
    stage: Stage,
}

enum Stage {
    Keys(server::ExpectKeys),
    Shares(server::ExpectShares, pb::KeyList),
    Masked(server::ExpectMaskedInputs, BTreeMap<SiteId, pb::ShareInbox>),
    Unmask(server::ExpectUnmasking, BTreeMap<SiteId, pb::UnmaskRequest>),
    Done(Result<(Vec<u32>, Transcript), Abort>),
    /// Only while a stage is being replaced.
    Moving,
}

impl SecureSession {
    pub fn new(
        ctx: RoundContext,
        params: SecAggParams,
        members: BTreeSet<SiteId>,
        roster: BTreeMap<SiteId, [u8; 32]>,
    ) -> Self {
        Self {
            ctx,
            vector_len: params.vector_len,
            members: members.iter().cloned().collect(),
            stage: Stage::Keys(server::ExpectKeys::new(ctx, params, members, roster)),
        }
    }

    /// Sites the current stage is still waiting for.
    pub fn pending(&self) -> BTreeSet<SiteId> {
        match &self.stage {
            Stage::Keys(m) => m.pending(),
            Stage::Shares(m, _) => m.pending(),
            Stage::Masked(m, _) => m.pending(),
            Stage::Unmask(m, _) => m.pending(),
            Stage::Done(_) | Stage::Moving => BTreeSet::new(),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done(_))
    }

    /// Takes the result once done.
    pub fn take_result(&mut self) -> Option<Result<(Vec<u32>, Transcript), Abort>> {
        match std::mem::replace(&mut self.stage, Stage::Moving) {
            Stage::Done(result) => Some(result),
            other => {
                self.stage = other;
                None
            }
        }
    }

    /// Whether `site` still has to advertise its keys.
    pub fn awaits_keys_from(&self, site: &SiteId) -> bool {
        matches!(&self.stage, Stage::Keys(m) if m.pending().contains(site))
    }

    /// The step `site` should take next, if the current stage waits for it.
    pub fn task_for(&self, site: &SiteId) -> Option<pb::SecAggStep> {
        if !self.pending().contains(site) {
            return None;
        }
        let kind = match &self.stage {
            Stage::Keys(_) => pb::sec_agg_step::Kind::Advertise(pb::Advertise {
                members: self.members.iter().map(|s| s.to_string()).collect(),
                vector_len: self.vector_len as u64,
            }),
            Stage::Shares(_, list) => pb::sec_agg_step::Kind::Keys(list.clone()),
            Stage::Masked(_, mailbox) => pb::sec_agg_step::Kind::Shares(mailbox.get(site)?.clone()),
            Stage::Unmask(_, requests) => pb::sec_agg_step::Kind::Unmask(requests.get(site)?.clone()),
            Stage::Done(_) | Stage::Moving => return None,
        };
        Some(pb::SecAggStep {
            job_id: self.ctx.job_id,
            round: self.ctx.round,
            kind: Some(kind),
        })
    }

    /// Closes the current stage (whoever has not answered has dropped) and
    /// opens the next. Returns the name of the stage that was closed.
    pub fn advance(&mut self) -> &'static str {
        let (closed, next) = match std::mem::replace(&mut self.stage, Stage::Moving) {
            Stage::Keys(m) => (
                "advertise keys",
                match m.close() {
                    Ok((next, list)) => Stage::Shares(
                        next,
                        pb::KeyList {
                            keys: list.iter().map(wire::keys_to_pb).collect(),
                        },
                    ),
                    Err(e) => Stage::Done(Err(e)),
                },
            ),
            Stage::Shares(m, _) => (
                "share keys",
                match m.close() {
                    Ok((next, mailbox)) => Stage::Masked(
                        next,
                        mailbox
                            .into_iter()
                            .map(|(site, shares)| (site, wire::shares_to_pb(&shares)))
                            .collect(),
                    ),
                    Err(e) => Stage::Done(Err(e)),
                },
            ),
            Stage::Masked(m, _) => (
                "masked input",
                match m.close() {
                    Ok((next, requests)) => Stage::Unmask(
                        next,
                        requests
                            .into_iter()
                            .map(|(site, r)| (site, wire::unmask_request_to_pb(&r)))
                            .collect(),
                    ),
                    Err(e) => Stage::Done(Err(e)),
                },
            ),
            Stage::Unmask(m, _) => ("unmask", Stage::Done(m.finish())),
            done @ Stage::Done(_) => ("done", done),
            Stage::Moving => (
                "done",
                Stage::Done(Err(Abort::TooFewSites {
                    phase: tessera_protocol::secagg::Phase::Unmask,
                    got: 0,
                    needed: 1,
                })),
            ),
        };
        self.stage = next;
        closed
    }

    /// Feeds a `SubmitSecAgg` message from `site`.
    pub fn handle_message(&mut self, site: &SiteId, message: &pb::sec_agg_message::Kind) -> Result<(), RpcError> {
        use pb::sec_agg_message::Kind;
        let result = match (&mut self.stage, message) {
            (Stage::Keys(m), Kind::Keys(k)) => m.handle_keys(site, wire::keys_from_pb(k).map_err(invalid)?),
            (Stage::Shares(m, _), Kind::Shares(s)) => m.handle_shares(site, wire::shares_from_pb(s).map_err(invalid)?),
            (Stage::Unmask(m, _), Kind::Unmask(r)) => {
                m.handle_unmask(site, wire::unmask_response_from_pb(r).map_err(invalid)?)
            }
            (stage, _) => {
                return Err(RpcError::FailedPrecondition(format!(
                    "out of phase: round {} is in the {} phase",
                    self.ctx.round,
                    stage.name()
                )));
            }
        };
        result.map_err(RpcError::from)
    }

    /// Feeds a masked input from `site`.
    pub fn handle_masked(&mut self, site: &SiteId, masked: &[u32]) -> Result<(), RpcError> {
        match &mut self.stage {
            Stage::Masked(m, _) => m.handle_masked(site, masked).map_err(RpcError::from),
            stage => Err(RpcError::FailedPrecondition(format!(
                "out of phase: round {} is in the {} phase",
                self.ctx.round,
                stage.name()
            ))),
        }
    }

    /// Whether a masked input of `site` is expected now.
    pub fn awaits_masked_from(&self, site: &SiteId) -> bool {
        matches!(&self.stage, Stage::Masked(m, _) if m.pending().contains(site))
    }
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Keys(_) => "advertise keys",
            Stage::Shares(..) => "share keys",
            Stage::Masked(..) => "masked input",
            Stage::Unmask(..) => "unmask",
            Stage::Done(_) | Stage::Moving => "finished",
        }
    }
}

fn invalid(e: wire::WireError) -> RpcError {
    RpcError::InvalidArgument(e.to_string())
}

impl From<Misbehaviour> for RpcError {
    fn from(m: Misbehaviour) -> Self {
        let message = m.to_string();
        match m {
            Misbehaviour::NotMember(_) | Misbehaviour::Impersonation { .. } => RpcError::PermissionDenied(message),
            Misbehaviour::NotExpected(_) => RpcError::FailedPrecondition(message),
            Misbehaviour::BadSignature(_)
            | Misbehaviour::WrongShareSet(_)
            | Misbehaviour::WrongLength { .. }
            | Misbehaviour::WrongUnmaskSet(_) => RpcError::InvalidArgument(message),
        }
    }
}
