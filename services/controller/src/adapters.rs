//! A fine-tuned model's PEFT adapter on shared storage: the files a worker links into a
//! directory to load it, for an evaluation or for inference.

use lathe_proto::v1::ResultFile;
use lathe_store::files::get_file;
use lathe_store::jobs::Job;
use lathe_store::StoreError;

use crate::AppState;

/// The files a PEFT adapter directory needs.
pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// The adapter `model` names: the job's result adapter for its `ft:` model, or the adapter
/// inside a kept checkpoint for `ft:…:ckpt-step-N` (docs/architecture.md §9). `None` when the
/// files are gone (deleted results, a checkpoint pruned or never written).
pub async fn model_adapter(state: &AppState, project_id: &str, job: &Job, model: &str) -> Result<Option<Vec<ResultFile>>, StoreError> {
    let Some(step) = lathe_core::split_checkpoint_model_name(model).1 else {
        return adapter_files(state, project_id, job).await;
    };
    let keep = i64::from(job.spec.keep_checkpoints);
    let Some(checkpoint) = lathe_store::progress::kept_checkpoint(&state.pool, job.id.as_str(), step, keep).await? else {
        return Ok(None);
    };
    // The trainer writes a PEFT adapter into every checkpoint of a LoRA run.
    let dir = std::path::Path::new(&checkpoint.path).join("adapter");
    let files: Vec<ResultFile> = ADAPTER_FILES
        .iter()
        .map(|name| ResultFile { filename: name.to_string(), path: dir.join(name).display().to_string() })
        .filter(|f| std::path::Path::new(&f.path).is_file())
        .collect();
    Ok((files.len() == ADAPTER_FILES.len()).then_some(files))
}

/// The adapter files among `job`'s results (stored in `project_id`), or `None` when one of
/// them was deleted.
pub async fn adapter_files(state: &AppState, project_id: &str, job: &Job) -> Result<Option<Vec<ResultFile>>, StoreError> {
    let mut adapter = Vec::new();
    for id in &job.result_files {
        let Ok(file_id) = lathe_core::FileId::parse(id) else { continue };
        let file = match get_file(&state.pool, project_id, &file_id).await {
            Ok(file) => file,
            Err(StoreError::NotFound) => continue,
            Err(other) => return Err(other),
        };
        if ADAPTER_FILES.contains(&file.filename.as_str()) {
            adapter.push(ResultFile { filename: file.filename.clone(), path: state.storage.file_path(id).display().to_string() });
        }
    }
    Ok((adapter.len() == ADAPTER_FILES.len()).then_some(adapter))
}
