//! What a run reports while it goes. The CLI draws these as a progress bar, the worker streams
//! them to the controller, and every run appends them to `output_dir/events.jsonl`.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Data read and planned; sent once before the first step.
    Started {
        total_steps: u64,
        start_step: u64,
        epochs: u64,
        train_examples: usize,
        train_rows: usize,
        validation_examples: usize,
        truncated_examples: usize,
        dropped_examples: usize,
        trainable_parameters: i64,
        total_parameters: i64,
        device: String,
        dtype: String,
        /// Data-parallel ranks (1 for a one-process run).
        ranks: usize,
        /// The collectives' backend: gloo, nccl, or none for a one-process run.
        dist_backend: String,
    },
    /// One optimizer step finished.
    Step(StepMetrics),
    /// A validation pass finished.
    Eval {
        step: u64,
        valid_loss: f64,
        valid_mean_token_accuracy: f64,
        valid_tokens: u64,
    },
    /// A resumable checkpoint is on disk (renamed into place and fsynced).
    Checkpoint {
        step: u64,
        path: String,
    },
    Log {
        level: String,
        message: String,
    },
    /// Outputs written; the run is over.
    Finished {
        step: u64,
        adapter_dir: Option<String>,
        model_dir: Option<String>,
        results_csv: String,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    /// Mean cross-entropy over the step's trained tokens.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub train_mean_token_accuracy: f64,
    /// Tokens that carried loss in this step.
    pub trained_tokens: u64,
    /// All non-padding tokens processed so far (the run's "tokens seen").
    pub tokens_seen: u64,
    pub tokens_per_second: f64,
    pub peak_memory_bytes: u64,
    pub elapsed_seconds: f64,
    /// Data parallel: each rank's forward + backward time this step (a straggler shows as the
    /// largest); empty for a one-process run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rank_step_seconds: Vec<f64>,
    /// Data parallel: time spent summing gradients over ranks; 0 for a one-process run.
    pub all_reduce_seconds: f64,
    /// DPO runs: the step's rewards and log-probabilities (then `loss` is DPO's mean loss over
    /// the step's pairs and `train_mean_token_accuracy` the fraction of pairs ranked right).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceMetrics>,
}

/// DPO's step metrics, named as TRL logs them (`rewards/chosen` is `rewards_chosen`). A reward
/// is β·(log π(y) − log π_ref(y)) for an answer y; all are means over the step's pairs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PreferenceMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    /// Fraction of pairs whose preferred answer has the larger reward.
    pub rewards_accuracy: f64,
    pub rewards_margin: f64,
    /// The policy's log-probability of each answer, summed over its tokens.
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

impl Event {
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("events serialize")
    }
}
