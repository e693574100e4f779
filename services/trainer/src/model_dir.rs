//! A Hugging Face model directory: finds its files, refuses pickle weights, and loads the
//! safetensors shards (single file or `model.safetensors.index.json`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::model_config::ModelConfig;
use crate::{Result, TrainerError};

/// Weight formats that execute code when loaded; never read.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl"];

#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub config: ModelConfig,
    pub weight_files: Vec<PathBuf>,
}

impl ModelDir {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(TrainerError::file(&root, "model directory does not exist"));
        }
        let config_path = root.join("config.json");
        if !config_path.is_file() {
            return Err(TrainerError::file(&config_path, "missing: a Hugging Face model directory needs config.json"));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let weight_files = find_weight_files(&root)?;
        Ok(ModelDir { root, config, weight_files })
    }

    pub fn tokenizer_json(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }

    pub fn tokenizer_config(&self) -> PathBuf {
        self.root.join("tokenizer_config.json")
    }

    /// Reads every tensor of every shard onto `device`, floating tensors converted to `kind`.
    pub fn load_weights(&self, device: Device, kind: Kind) -> Result<HashMap<String, Tensor>> {
        let mut weights = HashMap::new();
        for file in &self.weight_files {
            let tensors = Tensor::read_safetensors(file).map_err(|e| TrainerError::file(file, format!("cannot read safetensors: {e}")))?;
            for (name, tensor) in tensors {
                let tensor = if tensor.is_floating_point() { tensor.to_kind(kind) } else { tensor };
                weights.insert(name, tensor.to_device(device));
            }
        }
        Ok(weights)
    }
}

fn find_weight_files(root: &Path) -> Result<Vec<PathBuf>> {
    let index = root.join("model.safetensors.index.json");
    if index.is_file() {
        return shards_from_index(root, &index);
    }
    let single = root.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let pickles: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| TrainerError::io(root, e))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| PICKLE_EXTENSIONS.contains(&e)))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if !pickles.is_empty() {
        return Err(TrainerError::file(
            root,
            format!(
                "only pickle weights found ({}); pickle can run arbitrary code and is refused — \
                 convert the checkpoint to safetensors (model.save_pretrained(dir, safe_serialization=True))",
                pickles.join(", ")
            ),
        ));
    }
    Err(TrainerError::file(root, "no model.safetensors or model.safetensors.index.json"))
}

fn shards_from_index(root: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| TrainerError::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainerError::file(index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| TrainerError::config_field(index, "weight_map", "missing or not an object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| TrainerError::config_field(index, format!("weight_map.{tensor}"), "not a file name"))?;
        // Shard names come from a file we did not write: keep them inside the model directory.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') || !file.ends_with(".safetensors") {
            return Err(TrainerError::config_field(index, format!("weight_map.{tensor}"), format!("invalid shard name {file:?}")));
        }
        shards.insert(file.to_string());
    }
    shards
        .into_iter()
        .map(|name| {
            let path = root.join(&name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(TrainerError::file(&path, "shard listed in model.safetensors.index.json is missing"))
            }
        })
        .collect()
}
