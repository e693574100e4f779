//! A job's result file (`step_metrics.csv`), written when the job succeeds: OpenAI's columns,
//! one row per optimizer step, from the metric points stored in Postgres.

use lathe_store::dispatch::MetricPoint;

/// The result file of a job: OpenAI's `step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy`.
pub fn results_csv(points: &[MetricPoint]) -> String {
    let mut csv = String::from("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n");
    let cell = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_default();
    for p in points {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            p.step,
            cell(p.train_loss),
            cell(p.train_mean_token_accuracy),
            cell(p.valid_loss),
            cell(p.valid_mean_token_accuracy)
        ));
    }
    csv
}
