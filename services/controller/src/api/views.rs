//! The JSON objects of the OpenAI API, rendered from store rows. Every field the SDK reads is
//! always present (null when unknown); Lathe's own settings ride along under `lathe`.

use lathe_core::fine_tuned_model_name;
use lathe_store::dispatch::{Checkpoint, Event, MetricPoint};
use lathe_store::evaluations::{Evaluation, EvaluationItem};
use lathe_store::files::StoredFile;
use lathe_store::jobs::Job;
use lathe_store::time::OffsetDateTime;
use lathe_store::Page;
use serde_json::{json, Value};

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// OpenAI's list envelope with cursor fields.
pub fn list<T>(page: Page<T>, id_of: impl Fn(&T) -> String, render: impl Fn(&T) -> Value) -> Value {
    let first_id = page.items.first().map(&id_of);
    let last_id = page.items.last().map(&id_of);
    json!({
        "object": "list",
        "data": page.items.iter().map(render).collect::<Vec<_>>(),
        "has_more": page.has_more,
        "first_id": first_id,
        "last_id": last_id,
    })
}

pub fn job(job: &Job) -> Value {
    job_at(job, None)
}

/// A job with its `estimated_finish` (Unix seconds; known only while it runs).
pub fn job_at(job: &Job, estimated_finish: Option<i64>) -> Value {
    let spec = &job.spec;
    json!({
        "id": job.id.as_str(),
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": job.error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "param": e.param})),
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at.map(unix),
        "hyperparameters": spec.hyperparameters_view(),
        "model": spec.model,
        "organization_id": job.project_id,
        "result_files": job.result_files,
        "status": job.status.as_str(),
        "trained_tokens": job.trained_tokens,
        "training_file": spec.training_file.as_str(),
        "validation_file": spec.validation_file.as_ref().map(|f| f.as_str()),
        "seed": spec.seed,
        "method": spec.method_view(),
        "metadata": if spec.metadata.is_empty() { Value::Null } else { json!(spec.metadata) },
        "estimated_finish": estimated_finish,
        "integrations": spec.integrations,
        "user_provided_suffix": spec.suffix,
        "lathe": job_extensions(job),
    })
}

/// Lathe's own fields of a job, beside OpenAI's.
fn job_extensions(job: &Job) -> Value {
    let spec = &job.spec;
    json!({
        "learning_rate": spec.learning_rate,
        "lora": spec.lora,
        "quantization": spec.quantization,
        "lr_scheduler": spec.lr_scheduler,
        "warmup_ratio": spec.warmup_ratio,
        "max_seq_length": spec.max_seq_length,
        "packing": spec.packing,
        "train_on_inputs": spec.train_on_inputs,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "pool": spec.resources.pool,
        "gpu_memory_gb": spec.resources.gpu_memory_gb,
        "gpus": spec.resources.gpus,
        "nodes": spec.resources.nodes,
        "priority": spec.resources.priority,
        "decontaminate": spec.decontaminate,
        "evaluations": spec.evaluations,
        "attempt": job.attempt,
        "retries": job.retries,
        "pause_requested": job.pause_requested,
        "pending_reason": job.pending_reason,
        // Counted at create with the model's tokenizer: {examples, truncated, dropped}.
        "training_data": job.training_data,
    })
}

/// An evaluation: what ran (model, protocol), where it is (status, progress) and what it
/// scored (`result`: accuracy, 95 % interval, counts, extraction rule, speed).
pub fn evaluation(evaluation: &Evaluation) -> Value {
    json!({
        "id": evaluation.id.as_str(),
        "object": "evaluation",
        "created_at": unix(evaluation.created_at),
        "started_at": evaluation.started_at.map(unix),
        "finished_at": evaluation.finished_at.map(unix),
        "model": evaluation.model,
        "fine_tuning_job": evaluation.job_id,
        "benchmark": evaluation.spec.benchmark,
        "status": evaluation.status.as_str(),
        "protocol": evaluation.spec,
        "progress": {"items_done": evaluation.items_done, "items_total": evaluation.items_total},
        "result": evaluation.result,
        "error": evaluation.error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "param": e.param})),
        "attempt": evaluation.attempt,
        "retries": evaluation.retries,
    })
}

pub fn evaluation_item(item: &EvaluationItem) -> Value {
    json!({
        "object": "evaluation.item",
        "index": item.index,
        "expected": item.expected,
        "extracted": item.extracted,
        "correct": item.correct,
        "output": item.output,
    })
}

pub fn file(file: &StoredFile) -> Value {
    json!({
        "id": file.id.as_str(),
        "object": "file",
        "bytes": file.bytes,
        "created_at": unix(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": null,
    })
}

pub fn event(event: &Event) -> Value {
    json!({
        "id": event.id.as_str(),
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "data": event.data,
        "type": event.kind,
    })
}

pub fn checkpoint(checkpoint: &Checkpoint, job: &Job) -> Value {
    let model = fine_tuned_model_name(job.spec.model.as_str(), job.spec.suffix.as_deref(), &job.id);
    let mut metrics = checkpoint.metrics.clone();
    if let Some(map) = metrics.as_object_mut() {
        map.insert("step".into(), json!(checkpoint.step));
    }
    json!({
        "id": checkpoint.id.as_str(),
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": format!("{model}:ckpt-step-{}", checkpoint.step),
        "fine_tuning_job_id": job.id.as_str(),
        "metrics": metrics,
        "step_number": checkpoint.step,
    })
}

pub fn metric_point(point: &MetricPoint) -> Value {
    serde_json::to_value(point).expect("metric points serialize")
}
