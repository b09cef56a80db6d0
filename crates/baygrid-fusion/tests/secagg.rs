use baygrid_fusion::secagg::{
    run_round, shamir_combine, shamir_split, Advert, Aggregator, Client, Params, SecAggError,
};
use curve25519_dalek::scalar::Scalar;
use proptest::prelude::*;
use rand::rngs::OsRng;

fn plain_sum(updates: &[Vec<f32>], skip: &[usize]) -> Vec<f32> {
    let mut s = vec![0.0f32; updates[0].len()];
    for (i, u) in updates.iter().enumerate() {
        if skip.contains(&(i + 1)) {
            continue;
        }
        for (a, b) in s.iter_mut().zip(u) {
            *a += b;
        }
    }
    s
}

fn close(a: &[f32], b: &[f32], parties: usize) {
    let tol = parties as f32 / 65536.0 + 1e-6;
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{x} vs {y}");
    }
}

#[test]
fn two_parties_are_refused_and_thresholds_checked() {
    assert_eq!(Params::new(2, 2, 4), Err(SecAggError::TooFewParties(2)));
    assert!(matches!(
        Params::new(3, 1, 4),
        Err(SecAggError::Threshold { .. })
    ));
    assert!(matches!(
        Params::new(3, 4, 4),
        Err(SecAggError::Threshold { .. })
    ));
}

#[test]
fn shamir_any_t_shares_recover_the_secret() {
    let secret = Scalar::random(&mut OsRng);
    let shares = shamir_split(&secret, 5, 3, &mut OsRng);
    let pick = |idx: &[usize]| -> Vec<(Scalar, Scalar)> {
        idx.iter()
            .map(|&i| (Scalar::from(i as u64 + 1), shares[i]))
            .collect()
    };
    assert_eq!(shamir_combine(&pick(&[0, 1, 2])), secret);
    assert_eq!(shamir_combine(&pick(&[4, 2, 0])), secret);
    assert_ne!(shamir_combine(&pick(&[0, 1])), secret);
}

#[test]
fn a_dropped_party_does_not_stop_the_round() {
    let params = Params::new(3, 2, 5).unwrap();
    let updates = vec![
        vec![0.5, -1.25, 3.0, 0.0, 7.5],
        vec![-0.5, 2.0, 1.0, 0.125, -3.0],
        vec![1.0, 1.0, 1.0, 1.0, 1.0],
    ];
    let full = run_round(params, &updates, &[], &mut OsRng).unwrap();
    close(&full.sum, &plain_sum(&updates, &[]), 3);
    let dropped = run_round(params, &updates, &[2], &mut OsRng).unwrap();
    assert_eq!(dropped.dropped, vec![2]);
    close(&dropped.sum, &plain_sum(&updates, &[2]), 3);
    let err = run_round(params, &updates, &[1, 3], &mut OsRng).unwrap_err();
    assert_eq!(
        err,
        SecAggError::BelowThreshold {
            survivors: 1,
            threshold: 2
        }
    );
}

/// The aggregator's inputs are masked: one party's masked vector, decoded,
/// is unrelated to its update, and the aggregator cannot strip both masks.
#[test]
fn the_aggregator_sees_only_masked_vectors() {
    let dim = 4096;
    let params = Params::new(3, 2, dim).unwrap();
    let mut clients = Vec::new();
    let mut adverts: Vec<Advert> = Vec::new();
    for i in 1..=3 {
        let (c, a) = Client::new(params, i, &mut OsRng).unwrap();
        clients.push(c);
        adverts.push(a);
    }
    let mut envelopes = Vec::new();
    for c in clients.iter_mut() {
        envelopes.extend(c.share_keys(&adverts, &mut OsRng).unwrap());
    }
    for c in clients.iter_mut() {
        c.receive_shares(&envelopes).unwrap();
    }
    let update: Vec<f32> = (0..dim).map(|i| (i % 17) as f32 * 0.25).collect();
    let masked = clients[0].masked_input(&update).unwrap();
    let seen = params.decode(&masked);
    // Correlation between the update and what the aggregator sees is ~0.
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let (mu, ms) = (mean(&update), mean(&seen));
    let cov: f64 = update
        .iter()
        .zip(&seen)
        .map(|(&a, &b)| (a as f64 - mu) * (b as f64 - ms))
        .sum();
    let var = |v: &[f32], m: f64| v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>();
    let corr = cov / (var(&update, mu) * var(&seen, ms)).sqrt();
    assert!(corr.abs() < 0.1, "correlation {corr}");
    let exact = update
        .iter()
        .zip(&seen)
        .filter(|(a, b)| (*a - *b).abs() < 1e-3)
        .count();
    assert!(exact < 5, "{exact} values visible");
    // Asking for both shares of one party is refused by every survivor.
    for c in &clients {
        assert!(matches!(
            c.unmask(&[1, 2], &[1]),
            Err(SecAggError::BothShares { peer: 1, .. })
        ));
    }
    // A tampered envelope does not open.
    let mut bad = envelopes[0].clone();
    bad.sealed[0] ^= 1;
    let to = bad.to;
    assert!(matches!(
        clients[to - 1].receive_shares(&[bad]),
        Err(SecAggError::BadEnvelope { .. })
    ));
}

#[test]
fn out_of_range_values_are_rejected_with_their_position() {
    let params = Params::new(3, 2, 2).unwrap();
    let err = params.encode(&[0.0, f32::NAN]).unwrap_err();
    assert!(err.to_string().contains("position 1"), "{err}");
    assert!(params.encode(&[1e9, 0.0]).is_err());
    assert!(params.encode(&[0.0]).is_err());
    let mut agg = Aggregator::new(params);
    agg.members([1, 2, 3]).unwrap();
    assert!(agg.masked_input(4, vec![0, 0]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn masked_sum_equals_plain_sum(
        parties in 3usize..7,
        dim in 1usize..40,
        seed in any::<u64>(),
        drop_one in any::<bool>(),
    ) {
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let updates: Vec<Vec<f32>> = (0..parties)
            .map(|_| (0..dim).map(|_| r.gen_range(-100.0f32..100.0)).collect())
            .collect();
        let threshold = parties / 2 + 1;
        let params = Params::new(parties, threshold, dim).unwrap();
        let drop: Vec<usize> = if drop_one { vec![1 + (seed as usize % parties)] } else { vec![] };
        let report = run_round(params, &updates, &drop, &mut OsRng).unwrap();
        let want = plain_sum(&updates, &drop);
        for (x, y) in report.sum.iter().zip(&want) {
            prop_assert!((x - y).abs() <= parties as f32 / 65536.0 + 1e-3, "{} vs {}", x, y);
        }
    }
}
