//! `lathe jobs compare A B`: two jobs' settings and loss curves side by side, from the API.

use std::collections::BTreeMap;

use serde_json::Value;

use super::client::ApiClient;

/// Settings shown, as (label, path in the job object).
const SETTINGS: [(&str, &[&str]); 12] = [
    ("status", &["status"]),
    ("model", &["model"]),
    ("method", &["method", "type"]),
    ("training_file", &["training_file"]),
    ("n_epochs", &["hyperparameters", "n_epochs"]),
    ("batch_size", &["hyperparameters", "batch_size"]),
    ("learning_rate", &["lathe", "learning_rate"]),
    ("beta", &["hyperparameters", "beta"]),
    ("lora.rank", &["lathe", "lora", "rank"]),
    ("lora.alpha", &["lathe", "lora", "alpha"]),
    ("max_seq_length", &["lathe", "max_seq_length"]),
    ("seed", &["seed"]),
];

const MAX_ROWS: usize = 40;

pub fn compare(client: &ApiClient, ids: [&String; 2], all_steps: bool) -> anyhow::Result<()> {
    let jobs = [client.get(&format!("/fine_tuning/jobs/{}", ids[0]))?, client.get(&format!("/fine_tuning/jobs/{}", ids[1]))?];
    let curves = [curve(client, ids[0])?, curve(client, ids[1])?];
    println!("{:<16}{:<34}{}", "", ids[0], ids[1]);
    for (label, path) in SETTINGS {
        let [a, b] = [field(&jobs[0], path), field(&jobs[1], path)];
        if a == "-" && b == "-" {
            continue;
        }
        let mark = if a != b { "  *" } else { "" };
        println!("{label:<16}{a:<34}{b}{mark}");
    }
    println!();
    let steps: Vec<i64> = curves.iter().flat_map(|c| c.keys().copied()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    if steps.is_empty() {
        println!("no steps reported yet");
        return Ok(());
    }
    println!("{:>6}  {:>12} {:>12}  {:>12} {:>12}", "step", "train A", "train B", "valid A", "valid B");
    for step in shown_steps(&steps, all_steps) {
        let cell =
            |c: &BTreeMap<i64, Value>, key: &str| c.get(&step).and_then(|p| p[key].as_f64()).map_or("".to_string(), |v| format!("{v:.4}"));
        println!(
            "{step:>6}  {:>12} {:>12}  {:>12} {:>12}",
            cell(&curves[0], "train_loss"),
            cell(&curves[1], "train_loss"),
            cell(&curves[0], "valid_loss"),
            cell(&curves[1], "valid_loss")
        );
    }
    Ok(())
}

/// A job's metric points by step.
fn curve(client: &ApiClient, id: &str) -> anyhow::Result<BTreeMap<i64, Value>> {
    let page = client.get(&format!("/fine_tuning/jobs/{id}/metrics"))?;
    Ok(page["data"].as_array().into_iter().flatten().filter_map(|p| Some((p["step"].as_i64()?, p.clone()))).collect())
}

fn field(job: &Value, path: &[&str]) -> String {
    let value = path.iter().fold(job, |v, key| &v[*key]);
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Every step, or at most [`MAX_ROWS`] evenly spaced ones ending with the last.
fn shown_steps(steps: &[i64], all: bool) -> Vec<i64> {
    if all || steps.len() <= MAX_ROWS {
        return steps.to_vec();
    }
    let stride = steps.len().div_ceil(MAX_ROWS);
    let mut shown: Vec<i64> = steps.iter().step_by(stride).copied().collect();
    if shown.last() != steps.last() {
        shown.extend(steps.last());
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_curves_are_thinned_to_evenly_spaced_steps_ending_with_the_last() {
        let steps: Vec<i64> = (1..=100).collect();
        let shown = shown_steps(&steps, false);
        assert!(shown.len() <= MAX_ROWS + 1 && shown[0] == 1 && *shown.last().unwrap() == 100, "{shown:?}");
        assert_eq!(shown_steps(&steps, true).len(), 100);
        assert_eq!(field(&serde_json::json!({"a": {"b": 3}}), &["a", "b"]), "3");
        assert_eq!(field(&serde_json::json!({}), &["a", "b"]), "-");
    }
}
