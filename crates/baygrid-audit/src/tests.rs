//! RFC 6962 test vectors as published by certificate-transparency and transparency-dev
//! (eight leaves, roots of every size, audit paths and consistency proofs), plus properties.

use super::*;
use proptest::prelude::*;

fn h(text: &str) -> Hash {
    hex::decode(text).unwrap().try_into().unwrap()
}

fn leaves() -> Vec<Vec<u8>> {
    [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
    .iter()
    .map(|l| hex::decode(l).unwrap())
    .collect()
}

fn tree(n: usize) -> Tree {
    let mut tree = Tree::new();
    for leaf in &leaves()[..n] {
        tree.push(leaf);
    }
    tree
}

const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

#[test]
fn roots_match_the_vectors_for_every_size() {
    assert_eq!(
        Tree::new().root(),
        h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    let full = tree(8);
    for (i, root) in ROOTS.iter().enumerate() {
        assert_eq!(tree(i + 1).root(), h(root), "size {}", i + 1);
        assert_eq!(
            full.root_at(i as u64 + 1).unwrap(),
            h(root),
            "size {} from the full tree",
            i + 1
        );
    }
}

#[test]
fn inclusion_paths_match_the_vectors() {
    let cases: [(u64, u64, Vec<&str>); 3] = [
        (0, 1, vec![]),
        (
            0,
            8,
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            vec![
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    let full = tree(8);
    for (index, size, expected) in cases {
        let expected: Vec<Hash> = expected.into_iter().map(h).collect();
        assert_eq!(
            full.inclusion_proof(index, size).unwrap(),
            expected,
            "PATH({index}, {size})"
        );
        let leaf = leaf_hash(&leaves()[index as usize]);
        verify_inclusion(&leaf, index, size, &expected, &h(ROOTS[size as usize - 1])).unwrap();
    }
}

#[test]
fn consistency_proofs_match_the_vectors() {
    let cases: [(u64, u64, Vec<&str>); 4] = [
        (1, 1, vec![]),
        (
            1,
            8,
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            vec![
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            vec![
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    let full = tree(8);
    for (from, to, expected) in cases {
        let expected: Vec<Hash> = expected.into_iter().map(h).collect();
        assert_eq!(
            full.consistency_proof(from, to).unwrap(),
            expected,
            "PROOF({from}, {to})"
        );
        verify_consistency(
            from,
            to,
            &expected,
            &h(ROOTS[from as usize - 1]),
            &h(ROOTS[to as usize - 1]),
        )
        .unwrap();
    }
}

#[test]
fn every_small_proof_verifies_and_wrong_roots_fail() {
    let full = tree(8);
    for size in 1..=8u64 {
        let root = full.root_at(size).unwrap();
        for index in 0..size {
            let proof = full.inclusion_proof(index, size).unwrap();
            let leaf = full.leaf(index).unwrap();
            verify_inclusion(&leaf, index, size, &proof, &root).unwrap();
            if size > 1 {
                let smaller_root = full.root_at(size - 1).unwrap();
                assert!(verify_inclusion(&leaf, index, size, &proof, &smaller_root).is_err());
            }
        }
        for from in 1..=size {
            let proof = full.consistency_proof(from, size).unwrap();
            verify_consistency(from, size, &proof, &full.root_at(from).unwrap(), &root).unwrap();
        }
    }
    let proof = full.consistency_proof(3, 7).unwrap();
    assert!(verify_consistency(
        3,
        7,
        &proof,
        &full.root_at(3).unwrap(),
        &full.root_at(6).unwrap()
    )
    .is_err());
}

#[test]
fn bad_arguments_are_errors() {
    let full = tree(8);
    assert!(matches!(
        full.inclusion_proof(8, 8),
        Err(ProofError::IndexOutOfRange { .. })
    ));
    assert!(matches!(
        full.inclusion_proof(0, 9),
        Err(ProofError::SizeOutOfRange { .. })
    ));
    assert!(matches!(
        full.consistency_proof(0, 8),
        Err(ProofError::BadRange { .. })
    ));
    assert!(matches!(
        full.consistency_proof(5, 4),
        Err(ProofError::BadRange { .. })
    ));
}

proptest! {
    /// Any proof with one flipped bit, one hash dropped or one extra hash fails to verify.
    #[test]
    fn tampered_proofs_fail(n in 2u64..300, seed in any::<u64>(), flip in any::<usize>()) {
        let mut t = Tree::new();
        for i in 0..n {
            t.push(&(seed ^ i).to_le_bytes());
        }
        let index = seed % n;
        let size = index + 1 + (seed / 7) % (n - index);
        let root = t.root_at(size).unwrap();
        let leaf = t.leaf(index).unwrap();
        let proof = t.inclusion_proof(index, size).unwrap();
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_ok());
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let at = flip % bad.len();
            bad[at][flip % 32] ^= 1 << (flip % 8);
            prop_assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err());
            prop_assert!(verify_inclusion(&leaf, index, size, &proof[..proof.len() - 1], &root).is_err());
        }
        let mut longer = proof.clone();
        longer.push([7u8; 32]);
        prop_assert!(verify_inclusion(&leaf, index, size, &longer, &root).is_err());

        let from = 1 + (seed / 13) % size;
        let consistency = t.consistency_proof(from, size).unwrap();
        let old = t.root_at(from).unwrap();
        prop_assert!(verify_consistency(from, size, &consistency, &old, &root).is_ok());
        if !consistency.is_empty() {
            let mut bad = consistency.clone();
            let at = flip % bad.len();
            bad[at][flip % 32] ^= 1 << (flip % 8);
            prop_assert!(verify_consistency(from, size, &bad, &old, &root).is_err());
        }
        // a forked history: a different entry at the old size's last index
        let mut fork = Tree::new();
        for i in 0..size {
            let entry = if i == from - 1 { (seed ^ i ^ 0xdead).to_le_bytes() } else { (seed ^ i).to_le_bytes() };
            fork.push(&entry);
        }
        prop_assert!(verify_consistency(from, size, &consistency, &old, &fork.root_at(size).unwrap()).is_err());
    }

    /// The cached tree agrees with a direct evaluation of the RFC's definition.
    #[test]
    fn cached_roots_equal_the_definition(n in 0usize..200) {
        fn mth(leaves: &[Hash]) -> Hash {
            match leaves.len() {
                0 => empty_root(),
                1 => leaves[0],
                n => {
                    let k = split(n as u64) as usize;
                    node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
                }
            }
        }
        let mut t = Tree::new();
        let mut hashes = Vec::new();
        for i in 0..n {
            t.push(&(i as u64).to_be_bytes());
            hashes.push(leaf_hash(&(i as u64).to_be_bytes()));
        }
        for size in 0..=n {
            prop_assert_eq!(t.root_at(size as u64).unwrap(), mth(&hashes[..size]));
        }
    }
}

#[test]
fn hex_round_trips_and_rejects_bad_text() {
    let hash = leaf_hash(b"x");
    assert_eq!(hash_from_hex(&to_hex(&hash)), Some(hash));
    assert_eq!(hash_from_hex("zz"), None);
    assert_eq!(hash_from_hex(&"g".repeat(64)), None);
    assert_eq!(hash_from_hex(&to_hex(&hash)[..62]), None);
}
