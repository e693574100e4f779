//! Step-level checkpoints and atomic directory writes.
//!
//! Every output directory (checkpoint, adapter, merged model) is first written under a hidden
//! temporary name beside its final place, each file fsynced, then renamed into place and the
//! parent fsynced. A crash at any moment leaves either the old state or the new one, never a
//! half-written directory that a resume or a user could pick up.
//!
//! A checkpoint holds what an exact resume needs: the trainable tensors (fp32),
//! the optimizer moments and step, and `state.json` with the step number and the resolved
//! config. Data order and dropout masks are functions of (seed, step), so no RNG state or
//! data cursor beyond the step number is needed.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::{Result, TrainerError};

pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    /// Tokens processed so far (for "tokens seen" after resume).
    pub tokens_seen: u64,
    /// Fingerprint of the training rows; a resume with other data is refused.
    pub data_fingerprint: String,
    pub config: serde_json::Value,
    /// Data-parallel ranks that trained it: a step's rows depend on the count, so a resume at
    /// another count is refused. Absent (1) in checkpoints from before data parallel.
    #[serde(default = "one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
}

/// Writes `final_dir` atomically: `fill` writes into a temporary sibling directory which is
/// then fsynced and renamed over `final_dir` (an existing one is replaced).
pub fn write_dir_atomically(final_dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    // A bare name (`--out merged`) has an empty parent: the current directory.
    let parent = final_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| TrainerError::storage(parent, e))?;
    let name = final_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainerError::storage(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainerError::storage(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| fsync_tree(&tmp));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if final_dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(final_dir, &old).map_err(|e| TrainerError::storage(final_dir, e))?;
        std::fs::rename(&tmp, final_dir).map_err(|e| TrainerError::storage(final_dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, final_dir).map_err(|e| TrainerError::storage(final_dir, e))?;
    }
    fsync_path(parent)
}

fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| TrainerError::io(dir, e))? {
        let path = entry.map_err(|e| TrainerError::io(dir, e))?.path();
        if path.is_dir() {
            fsync_tree(&path)?;
        } else {
            fsync_path(&path)?;
        }
    }
    fsync_path(dir)
}

/// Flushes a file, or a directory's entries, to disk.
pub(crate) fn fsync_path(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| TrainerError::storage(path, e))
}

pub fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&cpu, path).map_err(|e| TrainerError::storage(path, format!("safetensors: {e}")))
}

pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path).map_err(|e| TrainerError::file(path, format!("cannot read safetensors: {e}")))?.into_iter().collect())
}

pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("serializable");
    std::fs::write(path, text + "\n").map_err(|e| TrainerError::storage(path, e))
}

pub fn checkpoint_dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// A checkpoint read back from disk.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub trainable: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn load_checkpoint(dir: &Path) -> Result<LoadedCheckpoint> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(TrainerError::file(dir, "not a checkpoint: state.json is missing"));
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainerError::io(&state_path, e))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| TrainerError::file(&state_path, format!("invalid checkpoint state: {e}")))?;
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        state,
        trainable: read_tensors(&dir.join(TRAINABLE_FILE))?,
        optimizer: read_tensors(&dir.join(OPTIMIZER_FILE))?,
    })
}

/// The newest complete checkpoint under `output_dir/checkpoints`, if any.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    let dir = output_dir.join("checkpoints");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) && p.join(STATE_FILE).is_file())
        .collect();
    steps.sort();
    steps.pop()
}

/// Deletes all but the newest `keep` checkpoints (0 keeps all).
pub fn prune_checkpoints(output_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let dir = output_dir.join("checkpoints");
    let mut steps: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
            .collect(),
        Err(_) => return Ok(()),
    };
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for old in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&old).map_err(|e| TrainerError::io(&old, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("adapter");
        let err = write_dir_atomically(&target, |tmp| {
            std::fs::write(tmp.join("half.txt"), "x").unwrap();
            Err(TrainerError::invalid("test", "boom"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_rewrite_replaces_the_old_directory_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("adapter");
        write_dir_atomically(&target, |tmp| std::fs::write(tmp.join("a"), "1").map_err(|e| TrainerError::io(tmp, e))).unwrap();
        write_dir_atomically(&target, |tmp| std::fs::write(tmp.join("b"), "2").map_err(|e| TrainerError::io(tmp, e))).unwrap();
        assert!(!target.join("a").exists());
        assert_eq!(std::fs::read_to_string(target.join("b")).unwrap(), "2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn latest_checkpoint_ignores_incomplete_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ckpts = dir.path().join("checkpoints");
        std::fs::create_dir_all(ckpts.join("step-000002")).unwrap();
        std::fs::write(ckpts.join("step-000002").join(STATE_FILE), "{}").unwrap();
        std::fs::create_dir_all(ckpts.join("step-000004")).unwrap();
        assert_eq!(latest_checkpoint(dir.path()).unwrap(), ckpts.join("step-000002"));
    }
}
