//! Who masks with whom. SecAgg (Bonawitz et al. 2017) uses the complete
//! graph; SecAgg+ (Bell et al. 2020) a sparse graph where each site has
//! `k = O(log n)` neighbours, cutting client work from O(n·d) to O(k·d).
//!
//! Neighbourhoods include the site itself (it keeps a share of its own
//! secrets) and are symmetric. The sparse graph is a ring over a permutation
//! of the sites seeded by the advertised keys, so no one can choose their
//! neighbours before the keys are fixed.

use std::collections::{BTreeMap, BTreeSet};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use crate::ids::SiteId;

/// The masking graph of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Graph {
    /// SecAgg: every site masks with every other.
    Complete,
    /// SecAgg+: each site masks with `neighbours` others (rounded up to even).
    Sparse { neighbours: usize },
}

impl Graph {
    /// Size of a neighbourhood (self included) among `n` sites.
    pub fn neighbourhood_size(&self, n: usize) -> usize {
        match *self {
            Graph::Complete => n,
            Graph::Sparse { neighbours } => (neighbours.div_ceil(2) * 2 + 1).min(n),
        }
    }

    /// Default Shamir threshold among `n` selected sites: a strict majority
    /// of a neighbourhood. A majority is what makes the unmasking safe: each
    /// site answers one unmask request and reveals, per peer, either the
    /// self-mask share or the mask-key share, never both; two disjoint groups
    /// of `t > m/2` sites cannot exist in a neighbourhood of `m`.
    pub fn default_threshold(&self, n: usize) -> usize {
        self.neighbourhood_size(n) / 2 + 1
    }

    /// Neighbourhood of every site in `sites`, from a public `seed`.
    pub fn neighbourhoods(&self, sites: &BTreeSet<SiteId>, seed: [u8; 32]) -> BTreeMap<SiteId, BTreeSet<SiteId>> {
        let n = sites.len();
        let size = self.neighbourhood_size(n);
        if size >= n {
            return sites.iter().map(|s| (s.clone(), sites.clone())).collect();
        }
        let mut ring: Vec<&SiteId> = sites.iter().collect();
        ring.shuffle(&mut ChaCha20Rng::from_seed(seed));
        let half = size / 2;
        let mut out = BTreeMap::new();
        for (i, site) in ring.iter().enumerate() {
            let mut hood = BTreeSet::new();
            for offset in 0..=half {
                hood.insert(ring[(i + offset) % n].clone());
                hood.insert(ring[(i + n - offset) % n].clone());
            }
            out.insert((*site).clone(), hood);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(n: usize) -> BTreeSet<SiteId> {
        (0..n).map(|i| SiteId::new(&format!("s{i:03}")).unwrap()).collect()
    }

    #[test]
    fn complete_graph_is_everyone() {
        let s = sites(5);
        let hoods = Graph::Complete.neighbourhoods(&s, [0; 32]);
        assert!(hoods.values().all(|h| *h == s));
        assert_eq!(Graph::Complete.default_threshold(4), 3);
        assert_eq!(Graph::Complete.default_threshold(5), 3);
        assert_eq!(Graph::Complete.default_threshold(100), 51);
    }

    #[test]
    fn sparse_graph_is_symmetric_regular_and_seeded() {
        let s = sites(100);
        let graph = Graph::Sparse { neighbours: 14 };
        let hoods = graph.neighbourhoods(&s, [1; 32]);
        for (site, hood) in &hoods {
            assert_eq!(hood.len(), 15);
            assert!(hood.contains(site));
            for other in hood {
                assert!(hoods[other].contains(site), "not symmetric");
            }
        }
        assert_ne!(hoods, graph.neighbourhoods(&s, [2; 32]));
        assert_eq!(graph.default_threshold(100), 8);
        // Few sites: the sparse graph degenerates to the complete one.
        assert!(
            graph
                .neighbourhoods(&sites(10), [1; 32])
                .values()
                .all(|h| h.len() == 10)
        );
    }
}
