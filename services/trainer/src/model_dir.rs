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
        self.for_each_tensor(device, kind, |name, tensor| {
            weights.insert(name, tensor);
            Ok(())
        })?;
        Ok(weights)
    }

    /// Hands every tensor of every shard to `f`, one at a time, on `device` and (if floating)
    /// in `kind`. Only one tensor's bytes are in memory at once, so a caller that shrinks each
    /// tensor (NF4) never holds the whole checkpoint.
    pub fn for_each_tensor(&self, device: Device, kind: Kind, mut f: impl FnMut(String, Tensor) -> Result<()>) -> Result<()> {
        for file in &self.weight_files {
            read_safetensors_streaming(file, &mut |name, tensor| {
                let tensor = if tensor.is_floating_point() { tensor.to_kind(kind) } else { tensor };
                f(name, tensor.to_device(device))?;
                release_freed_heap();
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// Hands the heap's free pages back to the system. Loading allocates each tensor's bytes and
/// temporaries between the long-lived tensors already loaded; glibc keeps the holes they leave
/// resident, and over a 4B model quantized to NF4 that was ~600 MB of peak RSS (docs/qlora.md).
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads a safetensors file tensor by tensor (8-byte header length, JSON header, data), checking
/// every header entry against the file before reading it.
fn read_safetensors_streaming(path: &Path, f: &mut dyn FnMut(String, Tensor) -> Result<()>) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |message: String| TrainerError::file(path, format!("not a valid safetensors file: {message}"));
    let mut file = std::fs::File::open(path).map_err(|e| TrainerError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| TrainerError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!("header length {header_len} does not fit the file ({file_len} bytes)")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| TrainerError::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry = HeaderEntry::parse(&info).map_err(|m| bad(format!("tensor {name}: {m}")))?;
        if data_start + entry.end > file_len {
            return Err(bad(format!("tensor {name} ends at byte {} past the end of the file", data_start + entry.end)));
        }
        entries.push((name, entry));
    }
    // In file order, so the reads go forward.
    entries.sort_by_key(|(_, e)| e.begin);
    for (name, entry) in entries {
        let mut bytes = vec![0u8; (entry.end - entry.begin) as usize];
        file.seek(SeekFrom::Start(data_start + entry.begin)).map_err(|e| TrainerError::io(path, e))?;
        file.read_exact(&mut bytes).map_err(|e| TrainerError::io(path, e))?;
        let tensor = Tensor::f_from_data_size(&bytes, &entry.shape, entry.kind).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        drop(bytes);
        f(name, tensor)?;
    }
    Ok(())
}

struct HeaderEntry {
    kind: Kind,
    shape: Vec<i64>,
    begin: u64,
    end: u64,
}

impl HeaderEntry {
    fn parse(info: &serde_json::Value) -> std::result::Result<Self, String> {
        let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or("no dtype")?;
        let (kind, size) = match dtype {
            "F32" => (Kind::Float, 4),
            "F16" => (Kind::Half, 2),
            "BF16" => (Kind::BFloat16, 2),
            "F64" => (Kind::Double, 8),
            "I64" => (Kind::Int64, 8),
            "I32" => (Kind::Int, 4),
            "I16" => (Kind::Int16, 2),
            "I8" => (Kind::Int8, 1),
            "U8" => (Kind::Uint8, 1),
            "BOOL" => (Kind::Bool, 1),
            other => return Err(format!("dtype {other} is not supported")),
        };
        let shape: Vec<i64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or("no shape")?
            .iter()
            .map(|d| d.as_u64().filter(|&d| d < 1 << 40).map(|d| d as i64).ok_or("shape holds a non-integer"))
            .collect::<std::result::Result<_, _>>()?;
        let offsets = info.get("data_offsets").and_then(|o| o.as_array()).ok_or("no data_offsets")?;
        let (begin, end) = match offsets.as_slice() {
            [b, e] => (b.as_u64().ok_or("bad data_offsets")?, e.as_u64().ok_or("bad data_offsets")?),
            _ => return Err("data_offsets is not [begin, end]".into()),
        };
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).ok_or("shape overflows")?;
        if end < begin || elements.checked_mul(size) != Some(end - begin) {
            return Err(format!("data_offsets [{begin}, {end}] do not hold a {dtype} tensor of shape {shape:?}"));
        }
        Ok(HeaderEntry { kind, shape, begin, end })
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
