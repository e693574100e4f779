//! Accuracy with its 95 % interval, and the protocol it was measured under.

use serde::Serialize;

use crate::ctibench::{Benchmark, Item};
use crate::extract::{Extract, Rule};

/// One item's outcome, kept with the result (per-item predictions and raw outputs).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub index: usize,
    pub expected: String,
    pub extracted: Option<String>,
    pub correct: bool,
    pub output: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    pub benchmark: Benchmark,
    pub rule: &'static str,
    pub unparsable_counts_as_wrong: bool,
    pub items: usize,
    pub correct: usize,
    pub unparsable: usize,
    pub accuracy: f64,
    /// Wilson score interval at 95 %.
    pub ci95: (f64, f64),
    pub predictions: Vec<Prediction>,
}

/// Scores `outputs` (one per item, same order). Unparsable outputs count as wrong unless
/// `unparsable_counts_as_wrong` is false, in which case they leave the denominator.
pub fn score(benchmark: Benchmark, items: &[Item], outputs: &[String], unparsable_counts_as_wrong: bool) -> Scored {
    score_with(benchmark, benchmark.rule(), items, outputs, unparsable_counts_as_wrong)
}

/// [`score`] under an explicit extraction rule. The expected answer goes through the same rule
/// (`cwe-079` and `CWE-79` are one answer), falling back to itself when the rule finds nothing.
pub fn score_with(benchmark: Benchmark, rule: Rule, items: &[Item], outputs: &[String], unparsable_counts_as_wrong: bool) -> Scored {
    assert_eq!(items.len(), outputs.len(), "one output per item");
    let predictions: Vec<Prediction> = items
        .iter()
        .zip(outputs)
        .map(|(item, output)| {
            let extracted = rule.extract(output);
            let expected = rule.extract(&item.answer).unwrap_or_else(|| item.answer.clone());
            let correct = extracted.as_deref() == Some(expected.as_str());
            Prediction { index: item.index, expected: item.answer.clone(), extracted, correct, output: output.clone() }
        })
        .collect();
    let correct = predictions.iter().filter(|p| p.correct).count();
    let unparsable = predictions.iter().filter(|p| p.extracted.is_none()).count();
    let n = if unparsable_counts_as_wrong { predictions.len() } else { predictions.len() - unparsable };
    let accuracy = if n == 0 { 0.0 } else { correct as f64 / n as f64 };
    Scored {
        benchmark,
        rule: rule.name(),
        unparsable_counts_as_wrong,
        items: n,
        correct,
        unparsable,
        accuracy,
        ci95: wilson(correct, n),
        predictions,
    }
}

/// Wilson score interval for `k` successes in `n` trials at 95 % (z = 1.96).
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n, z) = (k as f64, n as f64, 1.959_963_984_540_054);
    let p = k / n;
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Two-sided exact McNemar test of two models on the same items: `only_a` items only the
/// first got right, `only_b` only the second; the discordant pairs against Binomial(n, 1/2).
pub fn mcnemar_exact(only_a: u64, only_b: u64) -> f64 {
    let n = only_a + only_b;
    if n == 0 {
        return 1.0;
    }
    let k = only_a.min(only_b);
    // P(X <= k) for X ~ Bin(n, 1/2), in log space to stay finite for large n.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_exact_matches_the_binomial_tail() {
        assert!((mcnemar_exact(0, 10) - 2.0 * 0.5f64.powi(10)).abs() < 1e-12);
        assert!((mcnemar_exact(2, 8) - 0.109375).abs() < 1e-9, "{}", mcnemar_exact(2, 8));
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert!(mcnemar_exact(400, 600) < 1e-9 && mcnemar_exact(400, 600) > 0.0);
    }

    #[test]
    fn wilson_matches_the_textbook_values() {
        let (lo, hi) = wilson(710, 1000);
        assert!((lo - 0.6810).abs() < 5e-4 && (hi - 0.7373).abs() < 5e-4, "{lo} {hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        let (lo, hi) = wilson(10, 10);
        assert!((hi - 1.0).abs() < 1e-12 && (lo - 0.7225).abs() < 5e-4, "{lo} {hi}");
    }
}
