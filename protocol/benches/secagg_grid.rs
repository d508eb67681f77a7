//! Secure-aggregation cost over the grid of issue 3: client masking time,
//! the client's consistency check (signing U3 and verifying the quorum of
//! signatures, issue 9) and coordinator unmasking time for n ∈ {4, 10, 50, 100} sites, d ∈ {10^4,
//! 10^5, 10^6} parameters, 0% and 30% dropouts (after the masked inputs were
//! sent, the costly case), for SecAgg (complete graph) and SecAgg+ (sparse,
//! 14 neighbours). Prints the median of a few runs per cell (single thread).
//!
//! Only the timed step runs at full size: the other sites mask tiny vectors
//! (their shares and keys do not depend on d) and the coordinator is fed
//! placeholder masked vectors of length d, since its unmasking work does not
//! depend on their values.
//!
//!     cargo bench -p tessera-protocol --bench secagg_grid [-- quick]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;
use tessera_protocol::ids::SiteId;
use tessera_protocol::secagg::client::{self, ClientConfig};
use tessera_protocol::secagg::crypto::SigningKey;
use tessera_protocol::secagg::graph::Graph;
use tessera_protocol::secagg::{RoundContext, SecAggParams, server};

const CTX: RoundContext = RoundContext { job_id: 1, round: 1 };

struct Setup {
    sites: Vec<SiteId>,
    keys: BTreeMap<SiteId, Arc<SigningKey>>,
    roster: Arc<BTreeMap<SiteId, [u8; 32]>>,
}

fn setup(n: usize) -> Setup {
    let sites: Vec<SiteId> = (0..n).map(|i| SiteId::new(&format!("s{i:03}")).unwrap()).collect();
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
    Setup { sites, keys, roster }
}

fn params(graph: Graph, n: usize, len: usize) -> SecAggParams {
    SecAggParams {
        graph,
        threshold: graph.default_threshold(n),
        cohort_size: n,
        min_sites: 3,
        vector_len: len,
    }
}

/// Returns (client masking time of site 0, its consistency-check time,
/// coordinator unmasking time), or
/// `None` when the random dropouts left some neighbourhood below t (possible
/// with SecAgg+'s small neighbourhoods: the round would abort).
fn one_run(s: &Setup, graph: Graph, d: usize, dropout: f64, seed: u64) -> Option<(Duration, Duration, Duration)> {
    let n = s.sites.len();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let big = params(graph, n, d);
    let small = params(graph, n, 1);
    let mut srv = server::ExpectKeys::new(CTX, big, s.sites.iter().cloned().collect(), (*s.roster).clone());
    let cohort: Arc<BTreeSet<SiteId>> = Arc::new(s.sites.iter().cloned().collect());
    let mut clients = Vec::new();
    for (i, site) in s.sites.iter().enumerate() {
        let cfg = ClientConfig {
            site: site.clone(),
            ctx: CTX,
            params: if i == 0 { big } else { small },
            signing_key: s.keys[site].clone(),
            roster: s.roster.clone(),
            cohort: cohort.clone(),
            encoding: None,
        };
        let (state, keys) = client::ExpectKeys::new(cfg, &mut rng);
        srv.handle_keys(site, keys).unwrap();
        clients.push((site.clone(), state));
    }
    let (mut srv, list) = srv.close().unwrap();
    let mut sharing = Vec::new();
    for (site, state) in clients {
        let (state, shares) = state.handle_keys(&list, &mut rng).unwrap();
        srv.handle_shares(&site, shares).unwrap();
        sharing.push((site, state));
    }
    let (mut srv, mailbox) = srv.close().unwrap();
    let n_drop = (n as f64 * dropout).round() as usize;
    // A random n_drop of sites 1..n drop after sharing: the coordinator must
    // rebuild their mask keys and remove their pairwise masks.
    let mut others: Vec<SiteId> = s.sites[1..].to_vec();
    others.shuffle(&mut rng);
    let dropped: BTreeSet<SiteId> = others.into_iter().take(n_drop).collect();
    let placeholder = vec![0u32; d];
    let mut client_time = Duration::ZERO;
    let mut masking = Vec::new();
    for (i, (site, state)) in sharing.into_iter().enumerate() {
        let input = if i == 0 { vec![1u32; d] } else { vec![1u32] };
        let start = Instant::now();
        let (state, _masked) = state.handle_shares(&mailbox[&site], &input).unwrap();
        if i == 0 {
            client_time = start.elapsed();
        }
        if !dropped.contains(&site) {
            srv.handle_masked(&site, &placeholder).unwrap();
            masking.push((site, state));
        }
    }
    let (mut srv, survivors) = srv.close().ok()?;
    let mut check_time = Duration::ZERO;
    let mut signing = Vec::new();
    for (site, state) in masking {
        let start = Instant::now();
        let (state, signature) = state.handle_survivors(&survivors).ok()?;
        if site == s.sites[0] {
            check_time += start.elapsed();
        }
        srv.handle_signature(&site, signature).unwrap();
        signing.push((site, state));
    }
    let (mut srv, signatures) = srv.close().ok()?;
    for (site, state) in signing {
        let start = Instant::now();
        let response = state.handle_signatures(&signatures).ok()?;
        if site == s.sites[0] {
            check_time += start.elapsed();
        }
        srv.handle_unmask(&site, response).unwrap();
    }
    let start = Instant::now();
    srv.finish().ok()?;
    Some((client_time, check_time, start.elapsed()))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let ns: &[usize] = if quick { &[4, 10] } else { &[4, 10, 50, 100] };
    let ds: &[usize] = if quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    };
    println!("graph     n        d  drop  client_mask_ms  client_check_ms  server_unmask_ms");
    for graph in [Graph::Complete, Graph::Sparse { neighbours: 14 }] {
        let name = match graph {
            Graph::Complete => "secagg",
            Graph::Sparse { .. } => "secagg+",
        };
        for &n in ns {
            let s = setup(n);
            for &d in ds {
                for dropout in [0.0, 0.3] {
                    let work = n as f64 * d as f64 * (1.0 + dropout * n as f64);
                    let reps = if work > 2e9 { 1 } else { 3 };
                    let mut attempts = 0;
                    let runs: Vec<(Duration, Duration, Duration)> = (0..reps)
                        .map(|r| {
                            (0..50u64)
                                .find_map(|retry| {
                                    attempts += 1;
                                    one_run(&s, graph, d, dropout, r * 1000 + retry)
                                })
                                .expect("some dropout pattern leaves every neighbourhood recoverable")
                        })
                        .collect();
                    let aborted = attempts - reps;
                    let client = median(runs.iter().map(|r| r.0).collect());
                    let check = median(runs.iter().map(|r| r.1).collect());
                    let server = median(runs.iter().map(|r| r.2).collect());
                    println!(
                        "{name:<8} {n:>3} {d:>8}  {:>3.0}%  {:>14.2}  {:>15.2}  {:>16.2}  {}",
                        dropout * 100.0,
                        client.as_secs_f64() * 1e3,
                        check.as_secs_f64() * 1e3,
                        server.as_secs_f64() * 1e3,
                        if aborted > 0 {
                            format!("({aborted} dropout draws aborted: a neighbourhood fell below t)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }
}
