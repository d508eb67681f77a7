//! A malicious coordinator, sans-IO: it drives honest site machines
//! ([`client`]) and may show each site a different key list, withhold or
//! forge shares, split the survivor set, forge, replay or withhold
//! signatures. Every test here is named `adversarial_<attack>` and checks,
//! with [`Loot::recover`], that no honest site's input can be computed from
//! everything the coordinator received, or that the honest sites refuse
//! with a named error before they reveal anything.
//!
//! [`Loot::recover`] is the attacker's best effort: it rebuilds any secret
//! for which it holds enough shares (trying every threshold, so a site that
//! was tricked into a low threshold is caught) and strips the masks off a
//! site's masked input wherever the pairwise keys are known. Where an attack
//! has teeth against a weaker rule, the test also shows the recovery working
//! there, so a recovery that silently never works cannot pass for safety.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::client::{self, ClientConfig, ClientError};
use super::crypto::{DhKeyPair, SigningKey};
use super::graph::Graph;
use super::mask::{Sign, apply_mask};
use super::server::{self, Abort};
use super::shamir::{self, Share};
use super::sim::{CTX, Consortium, consortium, drive_to_consistency, params, to_consistency};
use super::*;

/// Everything the coordinator has collected in one round.
#[derive(Default)]
struct Loot {
    keys: BTreeMap<SiteId, AdvertisedKeys>,
    masked: BTreeMap<SiteId, Vec<u32>>,
    /// The peers whose shares the coordinator delivered to each site: the
    /// peers that site masked its input with.
    masked_with: BTreeMap<SiteId, BTreeSet<SiteId>>,
    b_shares: BTreeMap<SiteId, Vec<Share>>,
    s_shares: BTreeMap<SiteId, Vec<Share>>,
}

impl Loot {
    fn absorb(&mut self, response: &UnmaskResponse) {
        for (owner, share) in &response.self_mask_shares {
            self.b_shares.entry(owner.clone()).or_default().push(share.clone());
        }
        for (owner, share) in &response.mask_key_shares {
            self.s_shares.entry(owner.clone()).or_default().push(share.clone());
        }
    }

    /// A secret rebuilt from any number of the shares that matches `check`.
    fn secret(shares: Option<&Vec<Share>>, check: impl Fn(&[u8; 32]) -> bool) -> Option<[u8; 32]> {
        let shares = shares?;
        (1..=shares.len()).find_map(|t| shamir::combine(shares, t).ok().filter(|s| check(s)))
    }

    fn self_mask_seed(&self, site: &SiteId) -> Option<[u8; 32]> {
        let commitment = self.keys.get(site)?.self_mask_hash;
        Self::secret(self.b_shares.get(site), |s| client::sha256(s) == commitment)
    }

    fn mask_key(&self, site: &SiteId) -> Option<DhKeyPair> {
        let public = self.keys.get(site)?.mask_pk;
        Self::secret(self.s_shares.get(site), |s| DhKeyPair::from_secret(*s).public == public)
            .map(DhKeyPair::from_secret)
    }

    /// `site`'s input, if the coordinator can strip every mask off it.
    fn recover(&self, site: &SiteId) -> Option<Vec<u32>> {
        let mut y = self.masked.get(site)?.clone();
        apply_mask(&mut y, &self.self_mask_seed(site)?, Sign::Minus);
        for peer in self.masked_with.get(site)?.iter().filter(|p| *p != site) {
            let seed = match (self.mask_key(site), self.mask_key(peer)) {
                (Some(own), _) => pair_seed(&own, &self.keys[peer].mask_pk, &CTX, site, peer)?,
                (None, Some(theirs)) => pair_seed(&theirs, &self.keys[site].mask_pk, &CTX, site, peer)?,
                (None, None) => return None,
            };
            let undo = match pair_sign(site, peer) {
                Sign::Plus => Sign::Minus,
                Sign::Minus => Sign::Plus,
            };
            apply_mask(&mut y, &seed, undo);
        }
        Some(y)
    }

    /// Asserts that no site's input can be recovered.
    fn assert_nothing_recovered(&self, inputs: &BTreeMap<SiteId, Vec<u32>>) {
        for (site, x) in inputs {
            assert_ne!(self.recover(site).as_ref(), Some(x), "{site}'s input was recovered");
        }
    }
}

/// The honest sites of one round, as the attacker sees them.
struct Sites<'a> {
    c: &'a Consortium,
    rng: ChaCha20Rng,
    inputs: BTreeMap<SiteId, Vec<u32>>,
}

impl<'a> Sites<'a> {
    fn new(c: &'a Consortium, len: usize, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let inputs = c
            .sites
            .iter()
            .map(|s| (s.clone(), (0..len).map(|_| rng.random::<u32>() >> 8).collect()))
            .collect();
        Self { c, rng, inputs }
    }

    /// Every site advertises keys with its own configuration.
    fn advertise(
        &mut self,
        cfg: impl Fn(&SiteId) -> ClientConfig,
        loot: &mut Loot,
    ) -> BTreeMap<SiteId, client::ExpectKeys> {
        let mut out = BTreeMap::new();
        for site in &self.c.sites {
            let (state, keys) = client::ExpectKeys::new(cfg(site), &mut self.rng);
            loot.keys.insert(site.clone(), keys);
            out.insert(site.clone(), state);
        }
        out
    }

    /// Hands each site the key list `list(site)`; returns who shared, and
    /// every share sent.
    fn share(
        &mut self,
        states: BTreeMap<SiteId, client::ExpectKeys>,
        list: impl Fn(&SiteId) -> Vec<AdvertisedKeys>,
    ) -> (BTreeMap<SiteId, client::ExpectShares>, Vec<EncryptedShare>) {
        let mut sharing = BTreeMap::new();
        let mut all = Vec::new();
        for (site, state) in states {
            let (state, shares) = state.handle_keys(&list(&site), &mut self.rng).unwrap();
            all.extend(shares);
            sharing.insert(site, state);
        }
        (sharing, all)
    }

    /// Delivers to each site the shares of the senders `from(site)` picks;
    /// collects the masked inputs.
    fn mask(
        &mut self,
        states: BTreeMap<SiteId, client::ExpectShares>,
        shares: &[EncryptedShare],
        from: impl Fn(&SiteId) -> BTreeSet<SiteId>,
        loot: &mut Loot,
    ) -> BTreeMap<SiteId, Result<client::ExpectSurvivors, ClientError>> {
        let mut out = BTreeMap::new();
        for (site, state) in states {
            let senders = from(&site);
            let inbox: Vec<EncryptedShare> = shares
                .iter()
                .filter(|s| s.to == site && senders.contains(&s.from))
                .cloned()
                .collect();
            let result = state.handle_shares(&inbox, &self.inputs[&site]).map(|(state, y)| {
                loot.masked.insert(site.clone(), y);
                loot.masked_with.insert(site.clone(), senders.clone());
                state
            });
            out.insert(site, result);
        }
        out
    }
}

/// Runs the consistency check with a survivor set per site (`view`); every
/// signature is forwarded to every site (the attacker's best move); returns
/// how each site answered.
fn split_views(
    states: BTreeMap<SiteId, client::ExpectSurvivors>,
    view: impl Fn(&SiteId) -> Vec<SiteId>,
    loot: &mut Loot,
) -> BTreeMap<SiteId, Result<(), ClientError>> {
    let mut signing = BTreeMap::new();
    let mut signatures = Vec::new();
    let mut outcome = BTreeMap::new();
    for (site, state) in states {
        match state.handle_survivors(&view(&site)) {
            Ok((state, signature)) => {
                signatures.push(signature);
                signing.insert(site, state);
            }
            Err(e) => {
                outcome.insert(site, Err(e));
            }
        }
    }
    for (site, state) in signing {
        let result = state
            .handle_signatures(&signatures)
            .map(|response| loot.absorb(&response));
        outcome.insert(site, result);
    }
    outcome
}

fn set(sites: &[&SiteId]) -> BTreeSet<SiteId> {
    sites.iter().map(|s| (*s).clone()).collect()
}

/// Attack 1 (Bonawitz §4, the view split): sites u, A, B, C, D (t = 3).
/// The coordinator tells A "B dropped", B "A dropped", C and D "A and B
/// dropped", everyone "u survived": without a consistency check, A, C, D
/// reveal B's mask key, B, C, D reveal A's, everyone reveals u's self mask,
/// and withholding C's and D's shares from u made u mask only with A and B,
/// so u's input comes out in the clear. With the check, each view lacks a
/// quorum of signatures on it: nobody reveals anything.
#[test]
fn adversarial_view_split_reveals_no_input() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 6);
    let [u, a, b, cc, d] = [0, 1, 2, 3, 4].map(|i| c.sites[i].clone());
    let mut loot = Loot::default();
    let mut sites = Sites::new(&c, p.vector_len, 1);
    let states = sites.advertise(|s| c.cfg(s, CTX, p), &mut loot);
    let list: Vec<AdvertisedKeys> = loot.keys.values().cloned().collect();
    let (states, shares) = sites.share(states, |_| list.clone());
    let everyone = set(&[&u, &a, &b, &cc, &d]);
    let only_ab = set(&[&u, &a, &b]);
    let states = sites.mask(
        states,
        &shares,
        |s| if *s == u { only_ab.clone() } else { everyone.clone() },
        &mut loot,
    );
    let states: BTreeMap<_, _> = states.into_iter().map(|(s, r)| (s, r.unwrap())).collect();
    let views = |s: &SiteId| -> Vec<SiteId> {
        let drop: Vec<&SiteId> = if *s == a {
            vec![&b]
        } else if *s == b {
            vec![&a]
        } else if *s == u {
            vec![]
        } else {
            vec![&a, &b]
        };
        everyone.iter().filter(|x| !drop.contains(x)).cloned().collect()
    };
    let outcome = split_views(states, views, &mut loot);
    loot.assert_nothing_recovered(&sites.inputs);
    // Every site saw its view fail the quorum and revealed nothing; u
    // refused outright: C and D never shared with it.
    assert!(matches!(&outcome[&u], Err(ClientError::InconsistentSurvivors(m)) if m.contains("never shared")));
    for s in [&a, &b, &cc, &d] {
        assert!(
            matches!(outcome[s], Err(ClientError::ConsistencyFailed { needed: 3, .. })),
            "{s}: {:?}",
            outcome[s]
        );
    }
    assert!(loot.b_shares.is_empty() && loot.s_shares.is_empty());
}

/// The same view split against sites that trust the coordinator's unmask
/// instructions (no consistency check): the recovery above does work, so
/// the previous test's "nothing recovered" is not vacuous.
#[test]
fn adversarial_view_split_works_without_the_consistency_check() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 6);
    let [u, a, b, cc, d] = [0, 1, 2, 3, 4].map(|i| c.sites[i].clone());
    let mut loot = Loot::default();
    let mut sites = Sites::new(&c, p.vector_len, 2);
    let states = sites.advertise(|s| c.cfg(s, CTX, p), &mut loot);
    let list: Vec<AdvertisedKeys> = loot.keys.values().cloned().collect();
    let (states, shares) = sites.share(states, |_| list.clone());
    let everyone = set(&[&u, &a, &b, &cc, &d]);
    let only_ab = set(&[&u, &a, &b]);
    let _ = sites.mask(
        states,
        &shares,
        |s| if *s == u { only_ab.clone() } else { everyone.clone() },
        &mut loot,
    );
    // What A, B, C, D reveal when each obeys the story it was told (the
    // old, coordinator-directed unmask), replayed from the same seed.
    let holders = obedient_reveals(
        &c,
        p,
        2,
        &[(&a, &[&b][..]), (&b, &[&a]), (&cc, &[&a, &b]), (&d, &[&a, &b])],
    );
    for r in &holders {
        loot.absorb(r);
    }
    assert_eq!(loot.recover(&u).as_ref(), Some(&sites.inputs[&u]));
}

/// Replays the deterministic round of [`adversarial_view_split_works_without_the_consistency_check`]
/// (same seed, so the same secrets) and returns what each listed site would
/// reveal if it revealed the self-mask share of everyone but `dropped` and
/// the mask-key share of `dropped`: the old, coordinator-directed unmask.
fn obedient_reveals(
    c: &Consortium,
    p: SecAggParams,
    seed: u64,
    stories: &[(&SiteId, &[&SiteId])],
) -> Vec<UnmaskResponse> {
    let mut loot = Loot::default();
    let mut sites = Sites::new(c, p.vector_len, seed);
    let states = sites.advertise(|s| c.cfg(s, CTX, p), &mut loot);
    let list: Vec<AdvertisedKeys> = loot.keys.values().cloned().collect();
    let (states, shares) = sites.share(states, |_| list.clone());
    let everyone: BTreeSet<SiteId> = c.sites.iter().cloned().collect();
    let states = sites.mask(states, &shares, |_| everyone.clone(), &mut Loot::default());
    let mut out = Vec::new();
    for (site, dropped) in stories {
        let state = states.get(*site).unwrap().as_ref().unwrap();
        out.push(state.reveal_as_told_for_tests(dropped));
    }
    out
}

/// Attack 1, generalised: random survivor-set views for every site, random
/// share withholding and random dropouts, 20 to 50 sites: no input is ever
/// recovered, and whenever sites do reveal, they all revealed for one and
/// the same survivor set.
#[test]
fn adversarial_random_view_splits_never_reveal_an_input() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(6));
    runner
        .run(&(20usize..=50, any::<u64>(), 1usize..4), |(n, seed, n_views)| {
            let c = consortium(n);
            let p = params(Graph::Complete, n, 3);
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut loot = Loot::default();
            let mut sites = Sites::new(&c, p.vector_len, seed);
            let states = sites.advertise(|s| c.cfg(s, CTX, p), &mut loot);
            let list: Vec<AdvertisedKeys> = loot.keys.values().cloned().collect();
            let (states, shares) = sites.share(states, |_| list.clone());
            // Some sites get a random majority of the shares only.
            let everyone: BTreeSet<SiteId> = c.sites.iter().cloned().collect();
            let withheld: BTreeMap<SiteId, BTreeSet<SiteId>> = c
                .sites
                .iter()
                .map(|s| {
                    let mut peers: Vec<SiteId> = c.sites.iter().filter(|x| *x != s).cloned().collect();
                    peers.shuffle(&mut rng);
                    let keep = if rng.random_bool(0.3) {
                        p.threshold + rng.random_range(0..n / 4)
                    } else {
                        n - 1
                    };
                    let mut kept: BTreeSet<SiteId> = peers.into_iter().take(keep.min(n - 1)).collect();
                    kept.insert(s.clone());
                    (s.clone(), kept)
                })
                .collect();
            let states = sites.mask(states, &shares, |s| withheld[s].clone(), &mut loot);
            // Random dropouts before the consistency check.
            let states: BTreeMap<SiteId, client::ExpectSurvivors> = states
                .into_iter()
                .filter_map(|(s, r)| r.ok().map(|st| (s, st)))
                .filter(|_| !rng.random_bool(0.1))
                .collect();
            // `n_views` random survivor sets, each site shown one of them.
            let candidate_views: Vec<Vec<SiteId>> = (0..n_views)
                .map(|_| everyone.iter().filter(|_| rng.random_bool(0.7)).cloned().collect())
                .collect();
            let assignment: BTreeMap<SiteId, Vec<SiteId>> = c
                .sites
                .iter()
                .map(|s| {
                    let mut v = candidate_views[rng.random_range(0..n_views)].clone();
                    if !v.contains(s) {
                        v.push(s.clone());
                        v.sort();
                    }
                    (s.clone(), v)
                })
                .collect();
            let outcome = split_views(states, |s| assignment[s].clone(), &mut loot);
            let revealed_views: BTreeSet<&Vec<SiteId>> = outcome
                .iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(s, _)| &assignment[s])
                .collect();
            prop_assert!(
                revealed_views.len() <= 1,
                "sites revealed for {} survivor sets",
                revealed_views.len()
            );
            for (site, x) in &sites.inputs {
                let recovered = loot.recover(site);
                prop_assert_ne!(recovered.as_ref(), Some(x), "{}'s input recovered", site);
            }
            Ok(())
        })
        .unwrap();
}

/// Attack 2: a short key list for one site. Its threshold comes from the
/// cohort (5 sites: t = 3), not from the three-site list it is shown, and is
/// signed into its advertisement. u masks with A and B only; the
/// coordinator then tells A "B dropped" and B "A dropped" (to get both mask
/// keys) and C, D "A and B dropped": with t = 2 that recovered u's input
/// from four honest sites. Now every view fails the quorum; and a site that
/// had derived t = 2 from the list would be refused by all the others.
#[test]
fn adversarial_short_key_list_cannot_lower_the_threshold() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 4);
    assert_eq!(p.threshold, 3);
    let [u, a, b, cc, d] = [0, 1, 2, 3, 4].map(|i| c.sites[i].clone());
    let group = set(&[&u, &a, &b]);
    let mut loot = Loot::default();
    let mut sites = Sites::new(&c, p.vector_len, 3);
    let states = sites.advertise(|s| c.cfg(s, CTX, p), &mut loot);
    let full: Vec<AdvertisedKeys> = loot.keys.values().cloned().collect();
    let short: Vec<AdvertisedKeys> = full.iter().filter(|k| group.contains(&k.site)).cloned().collect();
    let (states, shares) = sites.share(states, |s| if *s == u { short.clone() } else { full.clone() });
    assert!(loot.keys.values().all(|k| k.threshold == 3));
    let everyone = set(&[&u, &a, &b, &cc, &d]);
    let states = sites.mask(
        states,
        &shares,
        |s| if *s == u { group.clone() } else { everyone.clone() },
        &mut loot,
    );
    let states: BTreeMap<_, _> = states.into_iter().map(|(s, r)| (s, r.unwrap())).collect();
    let view = |drop: &[&SiteId]| -> Vec<SiteId> { everyone.iter().filter(|x| !drop.contains(x)).cloned().collect() };
    let outcome = split_views(
        states,
        |s| {
            if *s == a {
                view(&[&b])
            } else if *s == b {
                view(&[&a])
            } else if *s == u {
                group.iter().cloned().collect()
            } else {
                view(&[&a, &b])
            }
        },
        &mut loot,
    );
    loot.assert_nothing_recovered(&sites.inputs);
    assert!(outcome.values().all(|r| r.is_err()), "{outcome:?}");
    // A threshold taken from the three-site list (t = 2) is visible in the
    // signed advertisement, and the rest of the cohort refuses it.
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let (_, low) = client::ExpectKeys::new(c.cfg(&u, CTX, params(Graph::Complete, 3, 4)), &mut rng);
    assert_eq!(low.threshold, 2);
    let mut mixed = full.clone();
    mixed[0] = low;
    let mut sites = Sites::new(&c, p.vector_len, 3);
    let mut again = sites.advertise(|s| c.cfg(s, CTX, p), &mut Loot::default());
    let a_state = again.remove(&a).unwrap();
    assert_eq!(
        a_state.handle_keys(&mixed, &mut rng).err().unwrap(),
        ClientError::ThresholdMismatch {
            site: u.clone(),
            theirs: 2,
            ours: 3
        }
    );
}

/// Attack 2, the list itself: every site in it must be in this site's
/// cohort (accepted the job on its ledger) and the roster, and advertise the
/// same threshold; the server refuses a different threshold too.
#[test]
fn adversarial_key_list_outside_cohort_or_with_other_threshold_is_refused() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 4);
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let outsider = c.sites[4].clone();
    // Site 4 is in the roster but never accepted this job.
    let cfg = |s: &SiteId| ClientConfig {
        cohort: Arc::new(c.sites[..4].iter().cloned().collect()),
        ..c.cfg(s, CTX, params(Graph::Complete, 4, 4))
    };
    let mut states = Vec::new();
    let mut list = Vec::new();
    for site in &c.sites {
        let (s, k) = client::ExpectKeys::new(cfg(site), &mut rng);
        states.push(s);
        list.push(k);
    }
    let first = states.remove(0);
    assert_eq!(
        first.handle_keys(&list, &mut rng).err().unwrap(),
        ClientError::NotInCohort(outsider.clone())
    );
    // A site whose cohort (on its own ledger) has 5 sites signs t = 3;
    // sites of a 4-site cohort also derive 3: equal. A 7-site cohort would
    // derive 4: refused by everyone else.
    let (_, seven) = client::ExpectKeys::new(
        ClientConfig {
            params: params(Graph::Complete, 7, 4),
            ..c.cfg(&c.sites[1], CTX, p)
        },
        &mut rng,
    );
    let mut mixed = list[..4].to_vec();
    mixed[1] = seven.clone();
    assert_eq!(
        states.remove(0).handle_keys(&mixed, &mut rng).err().unwrap(),
        ClientError::ThresholdMismatch {
            site: c.sites[1].clone(),
            theirs: 4,
            ours: 3
        }
    );
    let mut server = server::ExpectKeys::new(CTX, p, c.sites.iter().cloned().collect(), (*c.roster).clone());
    assert_eq!(
        server.handle_keys(&c.sites[1], seven),
        Err(server::Misbehaviour::WrongThreshold {
            site: c.sites[1].clone(),
            expected: 3,
            got: 4
        })
    );
    // A site outside the roster altogether.
    let stranger_key = Arc::new(SigningKey::from_pkcs8(&SigningKey::generate_pkcs8()).unwrap());
    let stranger = SiteId::new("mallory").unwrap();
    let (_, fake) = client::ExpectKeys::new(
        ClientConfig {
            site: stranger.clone(),
            signing_key: stranger_key,
            ..cfg(&c.sites[0])
        },
        &mut rng,
    );
    let mut with_stranger = list[..4].to_vec();
    with_stranger.push(fake);
    assert_eq!(
        states.remove(0).handle_keys(&with_stranger, &mut rng).err().unwrap(),
        ClientError::NotInRoster(stranger)
    );
}

/// Attack 4: `min_sites` is enforced by each site at every phase, from its
/// own policy (here 4, above the job's 3), whatever the coordinator sends.
/// Partition by cohort: the coordinator shows two sites two cohorts of the
/// same size but different members (as a forked or truncated ledger would),
/// hoping each accepts the other's keys because sizes and thresholds agree.
/// Each site signs the digest of the cohort it read from its own ledger
/// into its advertisement, so the two refuse each other by name. (The
/// ledger already prevents two final seals for one job: this is the
/// cross-check between sites that needs no ledger at all.)
#[test]
fn adversarial_cohorts_of_one_size_but_other_members_do_not_share() {
    let c = consortium(6);
    let p = params(Graph::Complete, 4, 3);
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let members =
        |idx: &[usize]| -> Arc<BTreeSet<SiteId>> { Arc::new(idx.iter().map(|&i| c.sites[i].clone()).collect()) };
    // Site 0 is shown {0, 1, 2, 3}; site 1 is shown {0, 1, 2, 4}; site 2 the first.
    let views = [members(&[0, 1, 2, 3]), members(&[0, 1, 2, 4]), members(&[0, 1, 2, 3])];
    let mut states = Vec::new();
    let mut list = Vec::new();
    for (i, cohort) in views.iter().enumerate() {
        let cfg = ClientConfig {
            cohort: cohort.clone(),
            ..c.cfg(&c.sites[i], CTX, p)
        };
        let (state, keys) = client::ExpectKeys::new(cfg, &mut rng);
        assert_eq!(keys.cohort_size, 4);
        states.push(state);
        list.push(keys);
    }
    assert_ne!(list[0].cohort_sha256, list[1].cohort_sha256);
    assert_eq!(list[0].cohort_sha256, list[2].cohort_sha256);
    // Every site refuses before it sends a single share.
    for (i, state) in states.into_iter().enumerate() {
        let refused = match state.handle_keys(&list, &mut rng) {
            Ok(_) => panic!("site {i} shared its secrets with a site of another cohort"),
            Err(e) => e,
        };
        let other = if i == 1 { &c.sites[0] } else { &c.sites[1] };
        assert_eq!(refused, ClientError::CohortMismatch(other.clone()), "site {i}");
    }
    // Same cohort, another encoding of discovered categories (a
    // coordinator relayed other category proposals to site 1): refused
    // alike, by name; the same encoding is shared with.
    let with = |site: usize, encoding: u8| {
        client::ExpectKeys::new(
            ClientConfig {
                cohort: views[0].clone(),
                encoding: Some([encoding; 32]),
                ..c.cfg(&c.sites[site], CTX, p)
            },
            &mut ChaCha20Rng::seed_from_u64(site as u64),
        )
    };
    let (state, own) = with(2, 7);
    let (_, other_encoding) = with(1, 8);
    let (_, first) = with(0, 7);
    assert_eq!(
        state
            .handle_keys(&[first.clone(), other_encoding, own.clone()], &mut rng)
            .err(),
        Some(ClientError::CohortMismatch(c.sites[1].clone()))
    );
    let (state, _) = with(2, 7);
    let (_, same_encoding) = with(1, 7);
    assert!(state.handle_keys(&[first, same_encoding, own], &mut rng).is_ok());
    // The digest is the signed cohort: altering it breaks the signature.
    let mut forged = list[1].clone();
    forged.cohort_sha256 = list[0].cohort_sha256;
    let (state, own) = client::ExpectKeys::new(
        ClientConfig {
            cohort: views[0].clone(),
            ..c.cfg(&c.sites[2], CTX, p)
        },
        &mut rng,
    );
    assert_eq!(
        state.handle_keys(&[list[0].clone(), forged, own], &mut rng).err(),
        Some(ClientError::BadSignature(c.sites[1].clone()))
    );
}

#[test]
fn adversarial_aggregates_below_min_sites_are_refused_at_every_phase() {
    let c = consortium(6);
    let p = SecAggParams {
        min_sites: 4,
        ..params(Graph::Complete, 6, 4)
    };
    assert_eq!(p.min_contributors(), 4);
    let me = c.sites[0].clone();
    // Keys: a list of three.
    let mut loot = Loot::default();
    let mut sites = Sites::new(&c, 4, 5);
    let mut states = sites.advertise(|s| c.cfg(s, CTX, p), &mut loot);
    let three: Vec<AdvertisedKeys> = loot.keys.values().take(3).cloned().collect();
    assert_eq!(
        states
            .remove(&me)
            .unwrap()
            .handle_keys(&three, &mut sites.rng)
            .err()
            .unwrap(),
        ClientError::TooFewSites {
            phase: "advertise keys",
            got: 3,
            needed: 4
        }
    );
    // Shares: only three sharers delivered (complete graph).
    let list: Vec<AdvertisedKeys> = loot.keys.values().cloned().collect();
    let mut sites = Sites::new(&c, 4, 5);
    let states = sites.advertise(|s| c.cfg(s, CTX, p), &mut Loot::default());
    let (states, shares) = sites.share(states, |_| list.clone());
    let three_sharers = set(&[&c.sites[0], &c.sites[1], &c.sites[2]]);
    let everyone: BTreeSet<SiteId> = c.sites.iter().cloned().collect();
    let mut out = sites.mask(
        states,
        &shares,
        |s| {
            if *s == me {
                three_sharers.clone()
            } else {
                everyone.clone()
            }
        },
        &mut Loot::default(),
    );
    assert_eq!(
        out.remove(&me).unwrap().err().unwrap(),
        ClientError::TooFewSites {
            phase: "share keys",
            got: 3,
            needed: 4
        }
    );
    // Consistency: a survivor set of three.
    let (mut states, survivors) = to_consistency(&c, p, 6);
    assert_eq!(
        states
            .remove(&me)
            .unwrap()
            .handle_survivors(&survivors[..3])
            .err()
            .unwrap(),
        ClientError::TooFewSites {
            phase: "consistency check",
            got: 3,
            needed: 4
        }
    );
    // Unmask: the server itself needs the quorum (and min_sites) of
    // signatures before it can ask anyone to reveal.
    let server_side = SecAggParams {
        min_sites: 4,
        ..params(Graph::Complete, 6, 1)
    };
    let inputs: BTreeMap<SiteId, Vec<u32>> = c.sites.iter().map(|s| (s.clone(), vec![1])).collect();
    let (mut server, clients, u3) = drive_to_consistency(&c, server_side, &inputs, 7);
    for (s, st) in clients.into_iter().take(3) {
        let (_, sig) = st.handle_survivors(&u3).unwrap();
        server.handle_signature(&s, sig).unwrap();
    }
    assert_eq!(
        server.close().err().unwrap(),
        Abort::TooFewSites {
            phase: Phase::Consistency,
            got: 3,
            needed: 4
        }
    );
}

/// Signatures the coordinator forges, replays from another round or
/// another survivor set, or takes from sites outside U3 or the cohort do
/// not count towards the quorum; repeating one signature counts once.
#[test]
fn adversarial_forged_or_replayed_survivor_signatures_do_not_count() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 4);
    let (states, survivors) = to_consistency(&c, p, 8);
    let u3: BTreeSet<SiteId> = survivors.iter().cloned().collect();
    let mut signed = BTreeMap::new();
    let mut real = Vec::new();
    for (s, st) in states {
        let (st, sig) = st.handle_survivors(&survivors).unwrap();
        real.push(sig);
        signed.insert(s, st);
    }
    let sign = |site: usize, ctx: &RoundContext, set: &BTreeSet<SiteId>| SurvivorSignature {
        site: c.sites[site].clone(),
        signature: c.keys[&c.sites[site]].sign(&survivors_signed_bytes(ctx, set)),
    };
    let other_round = RoundContext { round: 4, ..CTX };
    let smaller: BTreeSet<SiteId> = u3.iter().skip(1).cloned().collect();
    let forged = vec![
        real[0].clone(),
        real[0].clone(),
        real[0].clone(),
        SurvivorSignature {
            site: c.sites[1].clone(),
            signature: vec![7; 64],
        },
        SurvivorSignature {
            site: c.sites[2].clone(),
            signature: real[3].signature.clone(),
        },
        sign(3, &other_round, &u3),
        sign(4, &CTX, &smaller),
    ];
    let me = c.sites[0].clone();
    assert_eq!(
        signed.remove(&me).unwrap().handle_signatures(&forged).err().unwrap(),
        ClientError::ConsistencyFailed { valid: 1, needed: 3 }
    );
    // Two real signatures and the forgeries: still short of three.
    let mut two = forged.clone();
    two.push(real[1].clone());
    let second = c.sites[1].clone();
    assert_eq!(
        signed.remove(&second).unwrap().handle_signatures(&two).err().unwrap(),
        ClientError::ConsistencyFailed { valid: 2, needed: 3 }
    );
    // The real signatures suffice.
    let third = c.sites[2].clone();
    assert!(signed.remove(&third).unwrap().handle_signatures(&real).is_ok());
}

/// A site outside the cohort signs survivor sets with a valid roster key:
/// its signature does not count (only the job's cohort forms the quorum).
#[test]
fn adversarial_signatures_from_outside_the_cohort_do_not_count() {
    let c = consortium(6);
    let p = params(Graph::Complete, 5, 2);
    let cohort: BTreeSet<SiteId> = c.sites[..5].iter().cloned().collect();
    let cfg = |s: &SiteId| ClientConfig {
        cohort: Arc::new(cohort.clone()),
        ..c.cfg(s, CTX, p)
    };
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let mut states = BTreeMap::new();
    let mut list = Vec::new();
    for s in &c.sites[..5] {
        let (st, k) = client::ExpectKeys::new(cfg(s), &mut rng);
        states.insert(s.clone(), st);
        list.push(k);
    }
    let mut shares = Vec::new();
    let mut next = BTreeMap::new();
    for (s, st) in states {
        let (st, sh) = st.handle_keys(&list, &mut rng).unwrap();
        shares.extend(sh);
        next.insert(s, st);
    }
    let mut masked = BTreeMap::new();
    for (s, st) in next {
        let inbox: Vec<EncryptedShare> = shares.iter().filter(|x| x.to == s).cloned().collect();
        let (st, _) = st.handle_shares(&inbox, &[1, 2]).unwrap();
        masked.insert(s, st);
    }
    let u3: Vec<SiteId> = c.sites[..5].to_vec();
    let u3_set: BTreeSet<SiteId> = u3.iter().cloned().collect();
    let me = c.sites[0].clone();
    let (state, mine) = masked.remove(&me).unwrap().handle_survivors(&u3).unwrap();
    let outsider = SurvivorSignature {
        site: c.sites[5].clone(),
        signature: c.keys[&c.sites[5]].sign(&survivors_signed_bytes(&CTX, &u3_set)),
    };
    let second = {
        let (_, s) = masked.remove(&c.sites[1]).unwrap().handle_survivors(&u3).unwrap();
        s
    };
    assert_eq!(
        state.handle_signatures(&[mine, second, outsider]).err().unwrap(),
        ClientError::ConsistencyFailed { valid: 2, needed: 3 }
    );
}

/// In the sparse graph the threshold is a majority of a neighbourhood, far
/// below half the cohort; two disjoint survivor sets of 20 among 40 sites
/// would each pass a threshold-sized quorum. The cohort-majority quorum
/// stops both.
#[test]
fn adversarial_sparse_graph_split_needs_a_cohort_majority() {
    let n = 40;
    let c = consortium(n);
    let p = params(Graph::Sparse { neighbours: 6 }, n, 2);
    assert_eq!((p.threshold, p.consistency_quorum()), (4, 21));
    let (states, _) = to_consistency(&c, p, 10);
    let first: Vec<SiteId> = c.sites[..20].to_vec();
    let second: Vec<SiteId> = c.sites[20..].to_vec();
    let mut loot = Loot::default();
    let outcome = split_views(
        states,
        |s| {
            if first.contains(s) {
                first.clone()
            } else {
                second.clone()
            }
        },
        &mut loot,
    );
    let mut quorum_failures = 0;
    for (site, result) in &outcome {
        match result {
            Err(ClientError::ConsistencyFailed { needed: 21, .. }) => quorum_failures += 1,
            // Sites whose neighbours are mostly in the other half refuse
            // the set outright.
            Err(ClientError::InconsistentSurvivors(_)) | Err(ClientError::TooFewSites { .. }) => {}
            other => panic!("{site}: {other:?}"),
        }
    }
    // Most sites signed their half (it passed every other check) and were
    // stopped by the cohort-majority quorum alone.
    assert!(
        quorum_failures > n / 2,
        "only {quorum_failures} sites reached the quorum check"
    );
    assert!(loot.b_shares.is_empty() && loot.s_shares.is_empty());
}

/// Attack 10: one site reveals a garbage share. The coordinator skips it
/// (naming the sender in the transcript) and still releases the exact sum,
/// instead of aborting the whole round.
#[test]
fn adversarial_malformed_share_is_skipped_and_named() {
    let c = consortium(5);
    let p = params(Graph::Complete, 5, 3);
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let inputs: BTreeMap<SiteId, Vec<u32>> = c
        .sites
        .iter()
        .map(|s| (s.clone(), (0..3).map(|_| rng.random::<u32>() >> 8).collect()))
        .collect();
    let (mut server, clients, u3) = drive_to_consistency(&c, p, &inputs, 11);
    let mut next3 = BTreeMap::new();
    for (s, st) in clients {
        let (st, sig) = st.handle_survivors(&u3).unwrap();
        server.handle_signature(&s, sig).unwrap();
        next3.insert(s, st);
    }
    let (mut server, signatures) = server.close().unwrap();
    let liar = c.sites[2].clone();
    for (s, st) in next3 {
        let mut response = st.handle_signatures(&signatures).unwrap();
        if s == liar {
            response.self_mask_shares[0].1.y[0] ^= 0x5a;
        }
        server.handle_unmask(&s, response).unwrap();
    }
    let (sum, transcript) = server.finish().unwrap();
    let mut expected = vec![0u32; 3];
    for x in inputs.values() {
        for (e, v) in expected.iter_mut().zip(x) {
            *e = e.wrapping_add(*v);
        }
    }
    assert_eq!(sum, expected);
    assert_eq!(transcript.bad_shares, vec![liar]);
    assert_eq!(transcript.consistency_signers.len(), 5);
}
