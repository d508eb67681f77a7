//! Simulated secure rounds: N sites and a coordinator in one thread, with
//! dropouts at any phase and a hook to tamper with what the coordinator sends.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::client::{self, ClientConfig, ClientError};
use super::crypto::SigningKey;
use super::graph::Graph;
use super::quantize::Quantizer;
use super::server::{self, Abort, Misbehaviour};
use super::*;

pub(super) struct Consortium {
    pub sites: Vec<SiteId>,
    pub keys: BTreeMap<SiteId, Arc<SigningKey>>,
    pub roster: Arc<BTreeMap<SiteId, [u8; 32]>>,
}

impl Consortium {
    /// The client configuration of `site`: every site of the consortium
    /// accepted the job.
    pub fn cfg(&self, site: &SiteId, ctx: RoundContext, params: SecAggParams) -> ClientConfig {
        ClientConfig {
            site: site.clone(),
            ctx,
            params,
            signing_key: self.keys[site].clone(),
            roster: self.roster.clone(),
            cohort: Arc::new(self.sites.iter().cloned().collect()),
            encoding: None,
        }
    }
}

pub(super) fn consortium(n: usize) -> Consortium {
    let sites: Vec<SiteId> = (0..n).map(|i| SiteId::new(&format!("site-{i:03}")).unwrap()).collect();
    let keys: BTreeMap<SiteId, Arc<SigningKey>> = sites
        .iter()
        .map(|s| {
            (
                s.clone(),
                Arc::new(SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap()),
            )
        })
        .collect();
    let roster = Arc::new(keys.iter().map(|(s, k)| (s.clone(), k.public_key())).collect());
    Consortium { sites, keys, roster }
}

pub(super) const CTX: RoundContext = RoundContext { job_id: 7, round: 3 };

/// Runs one secure round; `drop_at[site]` is the phase at which the site
/// stops sending (it sends nothing from that phase on). Returns the sum, the
/// transcript and the expected plain sum over the sites that masked.
fn run(
    c: &Consortium,
    params: SecAggParams,
    inputs: &BTreeMap<SiteId, Vec<u32>>,
    drop_at: &BTreeMap<SiteId, Phase>,
    seed: u64,
) -> Result<(Vec<u32>, server::Transcript, Vec<u32>), Abort> {
    run_resumed(c, params, inputs, drop_at, seed, false)
}

/// The server machine written to bytes and read back (bincode 2), as a
/// coordinator restarted after a crash reads the stage it stored.
fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(machine: T) -> T {
    let bytes = bincode::serde::encode_to_vec(&machine, bincode::config::standard()).unwrap();
    let (back, read) = bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    assert_eq!(read, bytes.len());
    back
}

/// [`run`], where with `resume` the server is written out and read back
/// at the start of every phase (a coordinator restarted at each one).
fn run_resumed(
    c: &Consortium,
    params: SecAggParams,
    inputs: &BTreeMap<SiteId, Vec<u32>>,
    drop_at: &BTreeMap<SiteId, Phase>,
    seed: u64,
    resume: bool,
) -> Result<(Vec<u32>, server::Transcript, Vec<u32>), Abort> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let alive = |s: &SiteId, phase: Phase| drop_at.get(s).is_none_or(|p| *p > phase);
    let members: BTreeSet<SiteId> = c.sites.iter().cloned().collect();
    let server = server::ExpectKeys::new(CTX, params, members, (*c.roster).clone());
    let mut server = if resume { roundtrip(server) } else { server };
    let mut clients = BTreeMap::new();
    for site in &c.sites {
        let cfg = c.cfg(site, CTX, params);
        let (state, keys) = client::ExpectKeys::new(cfg, &mut rng);
        if alive(site, Phase::AdvertiseKeys) {
            server.handle_keys(site, keys).unwrap();
            clients.insert(site.clone(), state);
        }
    }
    let (server, list) = server.close()?;
    let mut server = if resume { roundtrip(server) } else { server };
    let mut sharing = BTreeMap::new();
    for (site, state) in clients {
        let (state, shares) = state.handle_keys(&list, &mut rng).unwrap();
        if alive(&site, Phase::ShareKeys) {
            server.handle_shares(&site, shares).unwrap();
            sharing.insert(site, state);
        }
    }
    let (server, mailbox) = server.close()?;
    let mut server = if resume { roundtrip(server) } else { server };
    let mut masking = BTreeMap::new();
    let mut expected = vec![0u32; params.vector_len];
    for (site, state) in sharing {
        let (state, masked) = state.handle_shares(&mailbox[&site], &inputs[&site]).unwrap();
        if alive(&site, Phase::MaskedInput) {
            server.handle_masked(&site, &masked).unwrap();
            for (e, x) in expected.iter_mut().zip(&inputs[&site]) {
                *e = e.wrapping_add(*x);
            }
            masking.insert(site, state);
        }
    }
    let (server, survivors) = server.close()?;
    let mut server = if resume { roundtrip(server) } else { server };
    let mut signing = BTreeMap::new();
    for (site, state) in masking {
        let (state, signature) = state.handle_survivors(&survivors).unwrap();
        if alive(&site, Phase::Consistency) {
            server.handle_signature(&site, signature).unwrap();
            signing.insert(site, state);
        }
    }
    let (server, signatures) = server.close()?;
    let mut server = if resume { roundtrip(server) } else { server };
    for (site, state) in signing {
        let response = state.handle_signatures(&signatures).unwrap();
        if alive(&site, Phase::Unmask) {
            server.handle_unmask(&site, response).unwrap();
        }
    }
    let (sum, transcript) = server.finish()?;
    Ok((sum, transcript, expected))
}

fn random_inputs(c: &Consortium, len: usize, seed: u64) -> BTreeMap<SiteId, Vec<u32>> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    c.sites
        .iter()
        .map(|s| (s.clone(), (0..len).map(|_| rng.next_u32() >> 8).collect()))
        .collect()
}

pub(super) fn params(graph: Graph, n: usize, len: usize) -> SecAggParams {
    SecAggParams {
        graph,
        threshold: graph.default_threshold(n),
        cohort_size: n,
        min_sites: 3,
        vector_len: len,
    }
}

const PHASES: [Phase; 5] = [
    Phase::AdvertiseKeys,
    Phase::ShareKeys,
    Phase::MaskedInput,
    Phase::Consistency,
    Phase::Unmask,
];

/// A server read back from its bytes at the start of every phase (a
/// coordinator restarted each time) ends with the very sum and transcript
/// of one never interrupted, with dropouts at every phase, on both graphs.
#[test]
fn a_server_restored_at_every_phase_ends_as_one_never_stopped() {
    let n = 6;
    let c = consortium(n);
    let inputs = random_inputs(&c, 9, 5);
    for graph in [Graph::Complete, Graph::Sparse { neighbours: 2 }] {
        let p = params(graph, n, 9);
        for phase in PHASES {
            let drop_at = BTreeMap::from([(c.sites[1].clone(), phase)]);
            let straight = run(&c, p, &inputs, &drop_at, 4).unwrap();
            let resumed = run_resumed(&c, p, &inputs, &drop_at, 4, true).unwrap();
            assert_eq!(resumed.0, straight.0, "{graph:?}, dropout at {phase:?}");
            assert_eq!(resumed.0, straight.2, "the sum is the plain sum");
            assert_eq!(resumed.1, straight.1);
        }
    }
}

/// Every phase × {0, 1, n−t} dropouts gives the exact sum over the sites that
/// masked; n−t+1 dropouts aborts with no sum.
#[test]
fn dropouts_at_every_phase_complete_graph() {
    for n in [4usize, 10, 50] {
        let c = consortium(n);
        let p = params(Graph::Complete, n, 8);
        let t = p.threshold;
        let inputs = random_inputs(&c, 8, n as u64);
        for phase in PHASES {
            for n_drop in [0, 1, n - t, n - t + 1] {
                // Drop the highest-numbered sites (any choice would do).
                let drop_at: BTreeMap<SiteId, Phase> =
                    c.sites.iter().rev().take(n_drop).map(|s| (s.clone(), phase)).collect();
                let result = run(&c, p, &inputs, &drop_at, 1);
                if n_drop <= n - t {
                    let (sum, transcript, expected) =
                        result.unwrap_or_else(|e| panic!("n={n} {phase:?} drop {n_drop}: {e}"));
                    assert_eq!(sum, expected, "n={n} {phase:?} drop {n_drop}");
                    let expected_masked = if phase >= Phase::Consistency { n } else { n - n_drop };
                    assert_eq!(transcript.masked.len(), expected_masked);
                    assert_eq!(transcript.dropped.len(), n_drop);
                    assert!(transcript.dropped.iter().all(|(_, p)| *p == phase));
                    if phase == Phase::MaskedInput {
                        assert_eq!(transcript.mask_keys_recovered.len(), n_drop);
                    }
                } else {
                    let err = result.expect_err("too many dropouts must abort");
                    match phase {
                        Phase::Unmask => assert!(matches!(err, Abort::Unrecoverable { .. }), "{err}"),
                        Phase::Consistency => assert_eq!(
                            err,
                            Abort::TooFewSites {
                                phase,
                                got: t - 1,
                                needed: p.consistency_quorum()
                            }
                        ),
                        _ => assert_eq!(
                            err,
                            Abort::TooFewSites {
                                phase,
                                got: t - 1,
                                needed: t
                            }
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn secagg_plus_sparse_graph_with_dropouts() {
    let n = 100;
    let c = consortium(n);
    let p = params(Graph::Sparse { neighbours: 14 }, n, 8);
    assert_eq!(p.threshold, 8);
    let inputs = random_inputs(&c, 8, 5);
    for phase in PHASES {
        for n_drop in [0usize, 1, 5] {
            // Spread dropouts around the ring: every neighbourhood keeps ≥ t.
            let drop_at: BTreeMap<SiteId, Phase> = c
                .sites
                .iter()
                .step_by(17)
                .take(n_drop)
                .map(|s| (s.clone(), phase))
                .collect();
            let (sum, _, expected) = run(&c, p, &inputs, &drop_at, 2).unwrap();
            assert_eq!(sum, expected, "{phase:?} drop {n_drop}");
        }
    }
    // 60 of 100 sites failing to answer the unmask request leaves some
    // neighbourhood with fewer than t = 8 responders: the round aborts.
    let many: BTreeMap<SiteId, Phase> = c.sites.iter().take(60).map(|s| (s.clone(), Phase::Unmask)).collect();
    assert!(matches!(
        run(&c, p, &inputs, &many, 2),
        Err(Abort::Unrecoverable { needed: 8, .. })
    ));
    // In the sparse graph the consistency check still needs a majority of
    // the cohort: 50 signatures of 100 are not enough.
    let half: BTreeMap<SiteId, Phase> = c
        .sites
        .iter()
        .take(50)
        .map(|s| (s.clone(), Phase::Consistency))
        .collect();
    assert_eq!(
        run(&c, p, &inputs, &half, 2).unwrap_err(),
        Abort::TooFewSites {
            phase: Phase::Consistency,
            got: 50,
            needed: 51
        }
    );
}

#[test]
fn adversarial_forged_substituted_or_replayed_keys_are_refused() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 4);
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let cfg = |i: usize| c.cfg(&c.sites[i], CTX, p);
    let mut states = Vec::new();
    let mut list = Vec::new();
    for i in 0..5 {
        let (s, k) = client::ExpectKeys::new(cfg(i), &mut rng);
        states.push(s);
        list.push(k);
    }
    // The coordinator substitutes site 1's mask key with one it controls.
    let mut forged = list.clone();
    forged[1].mask_pk = [9u8; 32];
    let err = states.remove(0).handle_keys(&forged, &mut rng).err().unwrap();
    assert_eq!(err, ClientError::BadSignature(c.sites[1].clone()));
    // It signs the substitute with a key outside the roster: still refused.
    let outsider = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap();
    forged[1].signature = outsider.sign(&forged[1].signed_bytes(&CTX));
    assert_eq!(
        states.remove(0).handle_keys(&forged, &mut rng).err().unwrap(),
        ClientError::BadSignature(c.sites[1].clone())
    );
    // Keys signed for another round are refused (no replay across rounds).
    let mut replayed = list.clone();
    let other = RoundContext { round: 4, ..CTX };
    replayed[2].signature = c.keys[&c.sites[2]].sign(&replayed[2].signed_bytes(&other));
    assert_eq!(
        states.remove(0).handle_keys(&replayed, &mut rng).err().unwrap(),
        ClientError::BadSignature(c.sites[2].clone())
    );
    // A signed threshold cannot be edited either.
    let mut lowered = list.clone();
    lowered[3].threshold = 2;
    assert_eq!(
        states.remove(0).handle_keys(&lowered, &mut rng).err().unwrap(),
        ClientError::BadSignature(c.sites[3].clone())
    );
    // The coordinator drops this site's own keys from the list.
    let without_me: Vec<AdvertisedKeys> = list[..3].to_vec();
    assert_eq!(
        states.remove(0).handle_keys(&without_me, &mut rng).err().unwrap(),
        ClientError::OwnKeysMissing
    );
    // The server refuses a forged advertisement before any site sees it.
    let mut server = server::ExpectKeys::new(CTX, p, c.sites.iter().cloned().collect(), (*c.roster).clone());
    let mut bad = list[0].clone();
    bad.enc_pk[0] ^= 1;
    assert_eq!(
        server.handle_keys(&c.sites[0], bad),
        Err(Misbehaviour::BadSignature(c.sites[0].clone()))
    );
    assert_eq!(
        server.handle_keys(&c.sites[1], list[0].clone()),
        Err(Misbehaviour::Impersonation {
            sender: c.sites[1].clone(),
            claimed: c.sites[0].clone()
        })
    );
    server.handle_keys(&c.sites[0], list[0].clone()).unwrap();
    assert_eq!(
        server.handle_keys(&c.sites[0], list[0].clone()),
        Err(Misbehaviour::NotExpected(c.sites[0].clone()))
    );
    let stranger = SiteId::new("mallory").unwrap();
    assert_eq!(
        server.handle_keys(&stranger, list[0].clone()),
        Err(Misbehaviour::NotMember(stranger))
    );
}

/// Drives the clients of `c` (with `inputs`) and an honest server until the
/// server holds every masked input; returns the server awaiting signatures,
/// the clients awaiting the survivor set, and that set (U3).
pub(super) fn drive_to_consistency(
    c: &Consortium,
    p: SecAggParams,
    inputs: &BTreeMap<SiteId, Vec<u32>>,
    seed: u64,
) -> (
    server::ExpectConsistency,
    BTreeMap<SiteId, client::ExpectSurvivors>,
    Vec<SiteId>,
) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut server = server::ExpectKeys::new(CTX, p, c.sites.iter().cloned().collect(), (*c.roster).clone());
    let mut states = BTreeMap::new();
    for site in &c.sites {
        let cfg = c.cfg(site, CTX, p);
        let (s, k) = client::ExpectKeys::new(cfg, &mut rng);
        server.handle_keys(site, k).unwrap();
        states.insert(site.clone(), s);
    }
    let (mut server, list) = server.close().unwrap();
    let mut sharing = BTreeMap::new();
    for (site, s) in states {
        let (s, shares) = s.handle_keys(&list, &mut rng).unwrap();
        server.handle_shares(&site, shares).unwrap();
        sharing.insert(site, s);
    }
    let (mut server, mailbox) = server.close().unwrap();
    let mut masking = BTreeMap::new();
    for (site, s) in sharing {
        let (s, y) = s.handle_shares(&mailbox[&site], &inputs[&site]).unwrap();
        server.handle_masked(&site, &y).unwrap();
        masking.insert(site, s);
    }
    let (server, survivors) = server.close().unwrap();
    (server, masking, survivors)
}

/// [`drive_to_consistency`] with every input all ones; without the server.
pub(super) fn to_consistency(
    c: &Consortium,
    p: SecAggParams,
    seed: u64,
) -> (BTreeMap<SiteId, client::ExpectSurvivors>, Vec<SiteId>) {
    let inputs = c.sites.iter().map(|s| (s.clone(), vec![1; p.vector_len])).collect();
    let (_, clients, survivors) = drive_to_consistency(c, p, &inputs, seed);
    (clients, survivors)
}

#[test]
fn malformed_survivor_sets_are_refused() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 4);
    let check = |alter: &dyn Fn(&mut Vec<SiteId>), expected: &dyn Fn(&ClientError) -> bool| {
        let (mut clients, survivors) = to_consistency(&c, p, 3);
        let mut survivors = survivors.clone();
        alter(&mut survivors);
        match clients.remove(&c.sites[1]).unwrap().handle_survivors(&survivors) {
            Err(e) => assert!(expected(&e), "unexpected refusal {e}"),
            Ok(_) => panic!("{survivors:?} must be refused"),
        }
    };
    let reason = |text: &'static str| move |e: &ClientError| matches!(e, ClientError::InconsistentSurvivors(m) if m.contains(text));
    let me = c.sites[1].clone();
    check(&|u| u.push(u[0].clone()), &reason("listed twice"));
    check(&|u| u.retain(|s| *s != me), &reason("this site is not listed"));
    check(
        &|u| u.push(SiteId::new("stranger").unwrap()),
        &reason("never advertised"),
    );
    check(&|u| u.truncate(2), &|e| {
        *e == ClientError::TooFewSites {
            phase: "consistency check",
            got: 2,
            needed: 3,
        }
    });
    // The honest set is signed, and the signature verifies on exactly it.
    let (mut clients, survivors) = to_consistency(&c, p, 3);
    let (_, signature) = clients.remove(&me).unwrap().handle_survivors(&survivors).unwrap();
    let u3: BTreeSet<SiteId> = survivors.iter().cloned().collect();
    assert!(crypto::verify(
        &c.roster[&me],
        &survivors_signed_bytes(&CTX, &u3),
        &signature.signature
    ));
    let fewer: BTreeSet<SiteId> = survivors[1..].iter().cloned().collect();
    assert!(!crypto::verify(
        &c.roster[&me],
        &survivors_signed_bytes(&CTX, &fewer),
        &signature.signature
    ));
}

#[test]
fn shares_replayed_from_another_round_do_not_decrypt() {
    let c = consortium(3);
    let p = params(Graph::Complete, 3, 2);
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let round = |ctx: RoundContext, rng: &mut ChaCha20Rng| {
        let mut states = Vec::new();
        let mut list = Vec::new();
        for site in &c.sites {
            let cfg = c.cfg(site, ctx, p);
            let (s, k) = client::ExpectKeys::new(cfg, rng);
            states.push(s);
            list.push(k);
        }
        let mut all_shares = Vec::new();
        let mut next = Vec::new();
        for s in states {
            let (s, shares) = s.handle_keys(&list, rng).unwrap();
            all_shares.extend(shares);
            next.push(s);
        }
        (next, all_shares)
    };
    let (_, old_shares) = round(CTX, &mut rng);
    let (mut states, _) = round(RoundContext { round: 4, ..CTX }, &mut rng);
    let me = c.sites[0].clone();
    let replay: Vec<EncryptedShare> = old_shares.into_iter().filter(|s| s.to == me).collect();
    let err = states.remove(0).handle_shares(&replay, &[0, 0]).err().unwrap();
    assert!(matches!(err, ClientError::UndecryptableShare(_)), "{err}");
}

#[test]
fn server_refuses_out_of_phase_and_wrong_shape_messages() {
    let c = consortium(4);
    let p = params(Graph::Complete, 4, 3);
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let mut server = server::ExpectKeys::new(CTX, p, c.sites.iter().cloned().collect(), (*c.roster).clone());
    let mut states = BTreeMap::new();
    for site in &c.sites[..3] {
        let cfg = c.cfg(site, CTX, p);
        let (s, k) = client::ExpectKeys::new(cfg, &mut rng);
        server.handle_keys(site, k).unwrap();
        states.insert(site.clone(), s);
    }
    assert_eq!(server.pending(), BTreeSet::from([c.sites[3].clone()]));
    let (mut server, list) = server.close().unwrap();
    let late = &c.sites[3];
    assert_eq!(
        server.handle_shares(late, vec![]),
        Err(Misbehaviour::NotExpected(late.clone()))
    );
    let mut sharing = BTreeMap::new();
    for (site, s) in states {
        let (s, mut shares) = s.handle_keys(&list, &mut rng).unwrap();
        let dropped_one = shares[..shares.len() - 1].to_vec();
        assert_eq!(
            server.handle_shares(&site, dropped_one),
            Err(Misbehaviour::WrongShareSet(site.clone()))
        );
        shares[0].from = late.clone();
        let mut shares_fixed = shares.clone();
        shares_fixed[0].from = site.clone();
        assert!(matches!(
            server.handle_shares(&site, shares),
            Err(Misbehaviour::Impersonation { .. })
        ));
        server.handle_shares(&site, shares_fixed.clone()).unwrap();
        assert_eq!(
            server.handle_shares(&site, shares_fixed),
            Err(Misbehaviour::NotExpected(site.clone()))
        );
        sharing.insert(site, s);
    }
    let (mut server, mailbox) = server.close().unwrap();
    for (site, s) in sharing {
        let (_, y) = s.handle_shares(&mailbox[&site], &[1, 2, 3]).unwrap();
        assert!(matches!(
            server.handle_masked(&site, &y[..2]),
            Err(Misbehaviour::WrongLength { .. })
        ));
        server.handle_masked(&site, &y).unwrap();
        assert_eq!(
            server.handle_masked(&site, &y),
            Err(Misbehaviour::NotExpected(site.clone()))
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Secure weighted FedAvg equals plaintext weighted FedAvg within the
    /// quantisation bound, for random updates, weights and dropouts.
    #[test]
    fn secure_fedavg_matches_plaintext_within_bound(
        n in 3usize..8,
        d in 1usize..12,
        seed in any::<u64>(),
        drop_one in any::<bool>(),
        drop_phase in 0usize..5,
    ) {
        let c = consortium(n);
        let clip = 2.0;
        let q = Quantizer::for_sites(n, clip);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut deltas = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        for site in &c.sites {
            // Within the clip bound so clipping does not change the value.
            let delta: Vec<f32> = (0..d).map(|_| ((rng.next_u32() % 2000) as f32 / 1000.0 - 1.0) / (d as f32).sqrt()).collect();
            let weight = f64::from(1 + rng.next_u32() % 200) / 200.0;
            let (x, factor) = q.encode_update(&delta, weight, &mut rng).unwrap();
            prop_assert_eq!(factor, 1.0);
            deltas.insert(site.clone(), (delta, weight));
            inputs.insert(site.clone(), x);
        }
        let p = params(Graph::Complete, n, d);
        let mut drop_at = BTreeMap::new();
        if drop_one && n > p.min_contributors() {
            drop_at.insert(c.sites[n - 1].clone(), PHASES[drop_phase]);
        }
        let (sum, transcript, _) = run(&c, p, &inputs, &drop_at, seed).unwrap();
        let m = transcript.masked.len();
        let weighted = q.decode_update_sum(&sum, m);
        let contributors: Vec<&SiteId> = transcript.masked.iter().map(|(s, _)| s).collect();
        // The weights are public (declared), so the total is exact.
        let total_weight: f64 = contributors.iter().map(|s| deltas[*s].1).sum();
        for (j, decoded) in weighted.iter().enumerate() {
            let truth: f64 = contributors.iter().map(|s| f64::from(deltas[*s].0[j]) * deltas[*s].1).sum();
            prop_assert!((decoded - truth).abs() <= q.sum_error_bound(m, clip), "{decoded} vs {truth}");
            let mean_bound = q.sum_error_bound(m, clip) / total_weight;
            prop_assert!((decoded / total_weight - truth / total_weight).abs() <= mean_bound + 1e-12);
        }
    }
}
