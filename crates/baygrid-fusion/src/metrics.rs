//! Binary-classification figures: AUC, KS and accuracy.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    pub auc: f64,
    pub ks: f64,
    pub accuracy: f64,
    pub rows: usize,
}

/// AUC, KS and accuracy at 0.5 of `scores` (probabilities) against 0/1
/// `labels`. AUC counts tied scores as half (the Mann–Whitney statistic).
pub fn evaluate(scores: &[f32], labels: &[f32]) -> Scores {
    assert_eq!(scores.len(), labels.len(), "one score per label");
    let n = scores.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&y| y > 0.5).count() as f64;
    let negatives = n as f64 - positives;

    // Ranks with ties averaged.
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            if labels[k] > 0.5 {
                rank_sum_pos += avg_rank;
            }
        }
        i = j + 1;
    }
    let auc = if positives == 0.0 || negatives == 0.0 {
        f64::NAN
    } else {
        (rank_sum_pos - positives * (positives + 1.0) / 2.0) / (positives * negatives)
    };

    // KS: largest gap between the cumulative shares of positives and
    // negatives, walking scores from high to low, ties taken together.
    let mut ks: f64 = 0.0;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut i = n;
    while i > 0 {
        let mut j = i - 1;
        while j > 0 && scores[order[j - 1]] == scores[order[i - 1]] {
            j -= 1;
        }
        for &k in &order[j..i] {
            if labels[k] > 0.5 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
        }
        if positives > 0.0 && negatives > 0.0 {
            ks = ks.max((tp / positives - fp / negatives).abs());
        }
        i = j;
    }

    let correct = scores
        .iter()
        .zip(labels)
        .filter(|(&s, &y)| (s >= 0.5) == (y > 0.5))
        .count();
    Scores {
        auc,
        ks,
        accuracy: correct as f64 / n.max(1) as f64,
        rows: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Perfect ranking.
        let s = evaluate(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]);
        assert_eq!((s.auc, s.ks, s.accuracy), (1.0, 1.0, 1.0));
        // One inversion out of four pairs: AUC 0.75.
        let s = evaluate(&[0.1, 0.6, 0.4, 0.9], &[0.0, 0.0, 1.0, 1.0]);
        assert!((s.auc - 0.75).abs() < 1e-12);
        assert!((s.ks - 0.5).abs() < 1e-12);
        assert_eq!(s.accuracy, 0.5);
        // All tied: AUC 0.5, KS 0.
        let s = evaluate(&[0.5; 4], &[0.0, 1.0, 0.0, 1.0]);
        assert_eq!((s.auc, s.ks), (0.5, 0.0));
    }
}
