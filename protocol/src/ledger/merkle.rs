//! The Merkle tree over a round's update commitments, so that one site can
//! prove its contribution was included without showing anyone else's.
//!
//! The tree is RFC 6962's (Certificate Transparency): leaf hash
//! `SHA-256(0x00 || leaf)`, node hash `SHA-256(0x01 || left || right)`, and a
//! list of n > 1 leaves splits at the largest power of two below n. Leaves
//! are `site id length (u16 BE) || site id (UTF-8) || commitment (32 bytes)`,
//! in ascending site-id order.

use super::sha256;
use crate::ids::SiteId;

/// The leaf bytes for one site's commitment.
pub fn leaf(site: &SiteId, commitment: &[u8; 32]) -> Vec<u8> {
    let id = site.as_str().as_bytes();
    let mut out = Vec::with_capacity(2 + id.len() + 32);
    out.extend_from_slice(&(id.len() as u16).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(commitment);
    out
}

fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    sha256(&[&[0u8][..], leaf].concat())
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    sha256(&[&[1u8][..], left, right].concat())
}

fn split(n: usize) -> usize {
    debug_assert!(n > 1);
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root over leaves in the given order; SHA-256 of nothing for none.
pub fn root(leaves: &[Vec<u8>]) -> [u8; 32] {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaf_hash(&leaves[0]),
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index`, from the leaf's sibling up to the root's
/// children.
pub fn proof(leaves: &[Vec<u8>], index: usize) -> Vec<[u8; 32]> {
    assert!(index < leaves.len(), "leaf {index} of {}", leaves.len());
    if leaves.len() == 1 {
        return Vec::new();
    }
    let k = split(leaves.len());
    let (mut path, sibling) = if index < k {
        (proof(&leaves[..k], index), root(&leaves[k..]))
    } else {
        (proof(&leaves[k..], index - k), root(&leaves[..k]))
    };
    path.push(sibling);
    path
}

/// Whether `leaf` is leaf `index` of `size` under `root` (RFC 9162's
/// inclusion-proof verification).
pub fn verify(root_hash: &[u8; 32], leaf: &[u8], index: usize, size: usize, path: &[[u8; 32]]) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = leaf_hash(leaf);
    for p in path {
        if s_n == 0 {
            return false;
        }
        if f_n % 2 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            while f_n % 2 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && &r == root_hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answer_for_three_leaves() {
        let leaves: Vec<Vec<u8>> = vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()];
        // root = H(1 || H(1 || H(0||a) || H(0||b)) || H(0||c)), computed with
        // Python's hashlib.
        assert_eq!(
            hex::encode(root(&leaves)),
            "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1"
        );
    }

    proptest! {
        #[test]
        fn every_leaf_has_a_proof_and_no_other_leaf_fits_it(
            leaves in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 1..40),
            pick: prop::sample::Index,
        ) {
            let r = root(&leaves);
            let i = pick.index(leaves.len());
            let path = proof(&leaves, i);
            prop_assert!(verify(&r, &leaves[i], i, leaves.len(), &path));
            // A different leaf at the same place, or the same leaf claimed
            // at another index, does not verify.
            let mut other = leaves[i].clone();
            other.push(0xff);
            prop_assert!(!verify(&r, &other, i, leaves.len(), &path));
            if leaves.len() > 1 {
                let j = (i + 1) % leaves.len();
                if leaves[j] != leaves[i] {
                    prop_assert!(!verify(&r, &leaves[i], j, leaves.len(), &path));
                }
            }
        }
    }
}
