//! One secure summation as the coordinator drives it: the protocol's server
//! machine plus the messages each site is waiting for, and the conversions
//! from wire messages. The driver advances it stage by stage; the RPC
//! handlers feed it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use prost::Message;

use tessera_protocol::ids::SiteId;
use tessera_protocol::pb;
use tessera_protocol::secagg::server::{self, Abort, Misbehaviour, Transcript};
use tessera_protocol::secagg::{RoundContext, SecAggParams};
use tessera_protocol::wire;

use crate::malicious::{self, Attack};
use crate::rpc::RpcError;

/// A secure summation in progress.
pub struct SecureSession {
    pub ctx: RoundContext,
    pub members: Vec<SiteId>,
    pub vector_len: usize,
    stage: Stage,
    /// Whether the open stage is stored (`snapshot`): until it is, no site
    /// is given its step, so a coordinator that crashes meanwhile resumes
    /// from the stage before, whose steps every site can still answer
    /// (with the very answer it gave, `tessera-participant`'s `answers`).
    durable: bool,
    /// Read back from a previous process's snapshot.
    restored: bool,
    /// Test builds only: the survivor-set signatures a malicious
    /// coordinator collects without checking them.
    stolen: Vec<pb::SurvivorSignature>,
}

/// The split-views attack: each site is shown U3 without the site after it.
fn split_view(survivors: &pb::SurvivorList, site: &SiteId) -> pb::SurvivorList {
    let sites = &survivors.sites;
    let i = sites.iter().position(|s| s == site.as_str()).unwrap_or(0);
    let hidden = &sites[(i + 1) % sites.len()];
    pb::SurvivorList {
        sites: sites.iter().filter(|s| *s != hidden).cloned().collect(),
    }
}

enum Stage {
    Keys(server::ExpectKeys),
    Shares(server::ExpectShares, pb::KeyList),
    Masked(server::ExpectMaskedInputs, BTreeMap<SiteId, pb::ShareInbox>),
    Consistency(server::ExpectConsistency, pb::SurvivorList),
    Unmask(server::ExpectUnmasking, pb::SurvivorSignatures),
    /// Test builds only (`--malicious split-views`): every site was shown a
    /// different survivor set; all signatures, unchecked, go to every site,
    /// and whatever a site reveals is counted.
    Forged {
        survivors: BTreeSet<SiteId>,
        signatures: pb::SurvivorSignatures,
        revealed: BTreeSet<SiteId>,
    },
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
            durable: false,
            restored: false,
            stolen: Vec::new(),
        }
    }

    /// The session as its open stage began, for the coordinator's database
    /// (bincode 2): taken right after the stage opened, before any site
    /// was given its step. `None` once done (nothing left to resume).
    pub fn snapshot(&self) -> Option<Vec<u8>> {
        let stage = match &self.stage {
            Stage::Keys(m) => StageRef::Keys(m),
            Stage::Shares(m, list) => StageRef::Shares(m, list.encode_to_vec()),
            Stage::Masked(m, mailbox) => StageRef::Masked(
                m,
                mailbox
                    .iter()
                    .map(|(s, inbox)| (s.clone(), inbox.encode_to_vec()))
                    .collect(),
            ),
            Stage::Consistency(m, list) => StageRef::Consistency(m, list.encode_to_vec()),
            Stage::Unmask(m, signatures) => StageRef::Unmask(m, signatures.encode_to_vec()),
            Stage::Forged { .. } | Stage::Done(_) | Stage::Moving => return None,
        };
        let snapshot = SnapshotRef {
            ctx: self.ctx,
            members: &self.members,
            vector_len: self.vector_len,
            stage,
        };
        Some(bincode::serde::encode_to_vec(&snapshot, bincode::config::standard()).expect("a session always encodes"))
    }

    /// The session a [`SecureSession::snapshot`] was taken of, at the start
    /// of the stage it was in. It is stored already, so its steps are
    /// handed out at once.
    pub fn restore(bytes: &[u8]) -> anyhow::Result<Self> {
        let (snapshot, _): (Snapshot, _) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())
            .context("a stored secure summation does not decode")?;
        let stage = match snapshot.stage {
            StageOwned::Keys(m) => Stage::Keys(m),
            StageOwned::Shares(m, list) => Stage::Shares(m, pb::KeyList::decode(list.as_slice())?),
            StageOwned::Masked(m, mailbox) => Stage::Masked(
                m,
                mailbox
                    .into_iter()
                    .map(|(s, inbox)| Ok((s, pb::ShareInbox::decode(inbox.as_slice())?)))
                    .collect::<Result<_, prost::DecodeError>>()?,
            ),
            StageOwned::Consistency(m, list) => Stage::Consistency(m, pb::SurvivorList::decode(list.as_slice())?),
            StageOwned::Unmask(m, signatures) => {
                Stage::Unmask(m, pb::SurvivorSignatures::decode(signatures.as_slice())?)
            }
        };
        Ok(Self {
            ctx: snapshot.ctx,
            members: snapshot.members,
            vector_len: snapshot.vector_len,
            stage,
            durable: true,
            restored: true,
            stolen: Vec::new(),
        })
    }

    /// Whether this session was read back from a previous process's
    /// snapshot.
    pub fn is_restored(&self) -> bool {
        self.restored
    }

    /// Records that the open stage is stored: its steps may go out.
    pub fn mark_durable(&mut self) {
        self.durable = true;
    }

    /// Sites the current stage is still waiting for.
    pub fn pending(&self) -> BTreeSet<SiteId> {
        match &self.stage {
            Stage::Keys(m) => m.pending(),
            Stage::Shares(m, _) => m.pending(),
            Stage::Masked(m, _) => m.pending(),
            Stage::Consistency(m, _) if malicious::attack() == Some(Attack::SplitViews) => {
                let signed: BTreeSet<&str> = self.stolen.iter().map(|s| s.site_id.as_str()).collect();
                m.pending()
                    .into_iter()
                    .filter(|s| !signed.contains(s.as_str()))
                    .collect()
            }
            Stage::Consistency(m, _) => m.pending(),
            Stage::Unmask(m, _) => m.pending(),
            Stage::Forged {
                survivors, revealed, ..
            } => survivors.difference(revealed).cloned().collect(),
            Stage::Done(_) | Stage::Moving => BTreeSet::new(),
        }
    }

    /// The open stage, named as the log's `stage` names it.
    pub fn stage(&self) -> &'static str {
        match &self.stage {
            Stage::Keys(_) => "advertise keys",
            Stage::Shares(..) => "share keys",
            Stage::Masked(..) => "masked input",
            Stage::Consistency(..) => "consistency check",
            Stage::Unmask(..) | Stage::Forged { .. } => "unmask",
            Stage::Done(_) | Stage::Moving => "done",
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

    /// Whether `site` is one of the sites this summation started with.
    pub fn is_member(&self, site: &SiteId) -> bool {
        self.members.contains(site)
    }

    /// Whether `site` still has to advertise its keys.
    pub fn awaits_keys_from(&self, site: &SiteId) -> bool {
        matches!(&self.stage, Stage::Keys(m) if m.pending().contains(site))
    }

    /// The step `site` should take next, if the current stage waits for it.
    pub fn task_for(&self, site: &SiteId) -> Option<pb::SecAggStep> {
        if !self.durable || !self.pending().contains(site) {
            return None;
        }
        let kind = match &self.stage {
            Stage::Keys(_) => pb::sec_agg_step::Kind::Advertise(pb::Advertise {
                members: self.members.iter().map(|s| s.to_string()).collect(),
                vector_len: self.vector_len as u64,
            }),
            Stage::Shares(_, list) => pb::sec_agg_step::Kind::Keys(list.clone()),
            Stage::Masked(_, mailbox) => pb::sec_agg_step::Kind::Shares(mailbox.get(site)?.clone()),
            Stage::Consistency(_, survivors) if malicious::attack() == Some(Attack::SplitViews) => {
                pb::sec_agg_step::Kind::Survivors(split_view(survivors, site))
            }
            Stage::Consistency(_, survivors) => pb::sec_agg_step::Kind::Survivors(survivors.clone()),
            Stage::Forged { signatures, .. } => pb::sec_agg_step::Kind::Signatures(signatures.clone()),
            Stage::Unmask(_, signatures) => pb::sec_agg_step::Kind::Signatures(signatures.clone()),
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
                    Ok((next, survivors)) => Stage::Consistency(next, wire::survivors_to_pb(&survivors)),
                    Err(e) => Stage::Done(Err(e)),
                },
            ),
            Stage::Consistency(m, list) if malicious::attack() == Some(Attack::SplitViews) => {
                let _ = m;
                (
                    "consistency check",
                    Stage::Forged {
                        survivors: list.sites.iter().filter_map(|s| SiteId::new(s).ok()).collect(),
                        signatures: pb::SurvivorSignatures {
                            signatures: std::mem::take(&mut self.stolen),
                        },
                        revealed: BTreeSet::new(),
                    },
                )
            }
            Stage::Forged { revealed, .. } => {
                tracing::warn!(
                    round = self.ctx.round,
                    "malicious coordinator: {} unmask responses received after the split",
                    revealed.len()
                );
                (
                    "unmask",
                    Stage::Done(Err(Abort::TooFewSites {
                        phase: tessera_protocol::secagg::Phase::Unmask,
                        got: revealed.len(),
                        needed: 1,
                    })),
                )
            }
            Stage::Consistency(m, _) => (
                "consistency check",
                match m.close() {
                    Ok((next, signatures)) => Stage::Unmask(next, wire::survivor_signatures_to_pb(&signatures)),
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
        // A stage with nothing to resume (test builds' forged one) is
        // handed out at once.
        self.durable = matches!(self.stage, Stage::Forged { .. } | Stage::Done(_));
        closed
    }

    /// Feeds a `SubmitSecAgg` message from `site`.
    pub fn handle_message(&mut self, site: &SiteId, message: &pb::sec_agg_message::Kind) -> Result<(), RpcError> {
        use pb::sec_agg_message::Kind;
        let result = match (&mut self.stage, message) {
            (Stage::Keys(m), Kind::Keys(k)) => m.handle_keys(site, wire::keys_from_pb(k).map_err(invalid)?),
            (Stage::Shares(m, _), Kind::Shares(s)) => m.handle_shares(site, wire::shares_from_pb(s).map_err(invalid)?),
            (Stage::Consistency(..), Kind::SurvivorsSignature(s))
                if malicious::attack() == Some(Attack::SplitViews) =>
            {
                self.stolen.push(s.clone());
                Ok(())
            }
            (Stage::Forged { revealed, .. }, Kind::Unmask(_)) => {
                tracing::error!(%site, "malicious coordinator: a site revealed shares after the split");
                revealed.insert(site.clone());
                Ok(())
            }
            (Stage::Consistency(m, _), Kind::SurvivorsSignature(s)) => {
                m.handle_signature(site, wire::survivor_signature_from_pb(s).map_err(invalid)?)
            }
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

/// What [`SecureSession::snapshot`] stores: the server machine of the open
/// stage, and the step it hands out (protobuf bytes).
#[derive(serde::Serialize)]
struct SnapshotRef<'a> {
    ctx: RoundContext,
    members: &'a [SiteId],
    vector_len: usize,
    stage: StageRef<'a>,
}

#[derive(serde::Serialize)]
enum StageRef<'a> {
    Keys(&'a server::ExpectKeys),
    Shares(&'a server::ExpectShares, Vec<u8>),
    Masked(&'a server::ExpectMaskedInputs, BTreeMap<SiteId, Vec<u8>>),
    Consistency(&'a server::ExpectConsistency, Vec<u8>),
    Unmask(&'a server::ExpectUnmasking, Vec<u8>),
}

/// [`SnapshotRef`] read back (same fields, same order, owned).
#[derive(serde::Deserialize)]
struct Snapshot {
    ctx: RoundContext,
    members: Vec<SiteId>,
    vector_len: usize,
    stage: StageOwned,
}

#[derive(serde::Deserialize)]
enum StageOwned {
    Keys(server::ExpectKeys),
    Shares(server::ExpectShares, Vec<u8>),
    Masked(server::ExpectMaskedInputs, BTreeMap<SiteId, Vec<u8>>),
    Consistency(server::ExpectConsistency, Vec<u8>),
    Unmask(server::ExpectUnmasking, Vec<u8>),
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Keys(_) => "advertise keys",
            Stage::Shares(..) => "share keys",
            Stage::Masked(..) => "masked input",
            Stage::Consistency(..) => "consistency check",
            Stage::Unmask(..) | Stage::Forged { .. } => "unmask",
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
            | Misbehaviour::WrongThreshold { .. }
            | Misbehaviour::WrongCohortSize { .. }
            | Misbehaviour::BadSurvivorSignature(_)
            | Misbehaviour::WrongShareSet(_)
            | Misbehaviour::WrongLength { .. }
            | Misbehaviour::WrongUnmaskSet(_) => RpcError::InvalidArgument(message),
        }
    }
}
