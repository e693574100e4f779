//! `lathe model init`: writes a random model in the real Hugging Face layout, so that tests,
//! the demo and the benchmarks run on a checkpoint the project made itself (no download).
//!
//! The directory looks like a real Qwen3, Qwen2.5 or Llama 3 checkpoint and loads unchanged in
//! `transformers`:
//! - `config.json` as those checkpoints write it ([`presets`]),
//! - `model.safetensors` with the exact HF tensor names and `[out, in]` shapes ([`weights`]),
//! - `tokenizer.json`, a byte-level BPE trained here on an embedded corpus, plus
//!   `tokenizer_config.json` with the family's chat template and `generation_config.json`
//!   ([`tokenizer`]).
//!
//! Everything is a pure function of the options: the same seed gives the same bytes. The
//! directory appears atomically: files are written into a temp directory beside `out`,
//! fsynced, and the directory is renamed into place, so a crash or an error leaves nothing at
//! `out`.

mod presets;
mod tokenizer;
mod weights;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::checkpoint::fsync_path;
use crate::{Result, TrainerError};

/// The decoder family to imitate. Each one exercises a different path of the model code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// q/k RMSNorm, no biases, tied embeddings.
    Qwen3,
    /// Bias on q/k/v, tied embeddings.
    Qwen2,
    /// llama3 rope scaling, untied `lm_head`.
    Llama,
}

impl FromStr for Arch {
    type Err = TrainerError;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "qwen3" => Ok(Self::Qwen3),
            "qwen2" => Ok(Self::Qwen2),
            "llama" => Ok(Self::Llama),
            _ => Err(TrainerError::invalid("arch", format!("`{name}` is not one of qwen3, qwen2, llama"))),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Qwen3 => "qwen3",
            Self::Qwen2 => "qwen2",
            Self::Llama => "llama",
        })
    }
}

/// How big the model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// ~0.2M parameters in float32, for tests: initialises in well under a second.
    Tiny,
    /// ~100M parameters in bfloat16, for benchmarks.
    Small,
    /// ~4B parameters in bfloat16 (8 GB), Qwen3-4B's shapes: for memory benchmarks at the size
    /// people fine-tune with QLoRA.
    FourB,
}

impl FromStr for Preset {
    type Err = TrainerError;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            "4b" => Ok(Self::FourB),
            _ => Err(TrainerError::invalid("preset", format!("`{name}` is not one of tiny, small, 4b"))),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tiny => "tiny",
            Self::Small => "small",
            Self::FourB => "4b",
        })
    }
}

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub arch: Arch,
    pub preset: Preset,
    /// Seeds the weights. The tokenizer does not depend on it (it is trained deterministically).
    pub seed: u64,
    /// The model directory to create: must not exist, or be an empty directory.
    pub out: PathBuf,
}

#[derive(Debug, Clone)]
pub struct InitSummary {
    /// Number of weights in `model.safetensors` (the tied `lm_head` counted once).
    pub parameters: usize,
    /// `vocab_size` of `config.json` (the tokenizer's size rounded up to a multiple of 64).
    pub vocab_size: usize,
    /// The files written, inside `out`.
    pub files: Vec<PathBuf>,
}

/// Writes a random model in the real Hugging Face layout into `out`: config.json,
/// model.safetensors, tokenizer.json, tokenizer_config.json (with chat template),
/// generation_config.json. Deterministic for a seed (same bytes twice). Refuses an `out` that
/// exists and is not empty. Atomic: writes into a temp dir beside `out`, fsyncs, renames; on
/// error nothing is left at `out`.
pub fn init_model(opts: &InitOptions) -> Result<InitSummary> {
    ensure_out_is_free(&opts.out)?;
    let files = build_model_files(opts)?;
    let written = write_dir_atomically(&opts.out, &files)?;
    Ok(InitSummary { parameters: files.parameters, vocab_size: files.vocab_size, files: written })
}

/// The directory to write: the small files in memory, the weights made as they are written.
struct ModelFiles {
    parameters: usize,
    vocab_size: usize,
    /// (file name, bytes) in the order they are written, before the weights.
    contents: Vec<(&'static str, Vec<u8>)>,
    weights: weights::RandomWeights,
}

const WEIGHTS_FILE: &str = "model.safetensors";

fn build_model_files(opts: &InitOptions) -> Result<ModelFiles> {
    let dims = presets::Dimensions::of(opts.preset);
    let trained = tokenizer::train(opts.arch, dims.tokenizer_vocab_target)?;
    let vocab_size = trained.len().next_multiple_of(64).max(dims.embedding_rows.unwrap_or(0));
    let ids = trained.special_ids;

    let config_json = presets::config_json(opts.arch, &dims, vocab_size, &ids);
    let layout = weights::tensor_layout(opts.arch, &dims, vocab_size);
    let parameters = layout.iter().map(|tensor| tensor.numel()).sum();

    let generation_config = tokenizer::generation_config_json(opts.arch, &ids);
    let max_length = presets::max_position_embeddings(opts.arch);
    let tokenizer_config = tokenizer::tokenizer_config_json(opts.arch, &ids, max_length);
    let contents = vec![
        ("config.json", to_pretty_json(&config_json)),
        ("generation_config.json", to_pretty_json(&generation_config)),
        ("tokenizer.json", trained.tokenizer_json.into_bytes()),
        ("tokenizer_config.json", to_pretty_json(&tokenizer_config)),
    ];
    let weights = weights::RandomWeights { layout, dtype: dims.dtype, seed: opts.seed };
    Ok(ModelFiles { parameters, vocab_size, contents, weights })
}

fn to_pretty_json(value: &serde_json::Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("a serde_json::Value always serialises");
    bytes.push(b'\n');
    bytes
}

fn ensure_out_is_free(out: &Path) -> Result<()> {
    match fs::symlink_metadata(out) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(TrainerError::io(out, err)),
        Ok(meta) if !meta.is_dir() => Err(TrainerError::file(out, "exists and is not a directory")),
        Ok(_) => {
            let mut entries = fs::read_dir(out).map_err(|err| TrainerError::io(out, err))?;
            match entries.next() {
                None => Ok(()),
                Some(_) => Err(TrainerError::file(out, "exists and is not empty; refusing to overwrite it")),
            }
        }
    }
}

/// Writes `files` into a fresh temp directory beside `out`, fsyncs every file and the
/// directory, then renames it to `out` (replacing `out` only if it is an empty directory).
/// On error the temp directory is removed and `out` is untouched.
fn write_dir_atomically(out: &Path, files: &ModelFiles) -> Result<Vec<PathBuf>> {
    let name = out.file_name().ok_or_else(|| TrainerError::file(out, "is not a directory name"))?.to_string_lossy().into_owned();
    let parent = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|err| TrainerError::io(&parent, err))?;
    static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    let temp = parent.join(format!(".{name}.init-{}-{unique}", std::process::id()));
    if temp.exists() {
        fs::remove_dir_all(&temp).map_err(|err| TrainerError::io(&temp, err))?;
    }
    fs::create_dir(&temp).map_err(|err| TrainerError::io(&temp, err))?;

    let result = fill_and_rename(&temp, out, &parent, files);
    if result.is_err() {
        let _ = fs::remove_dir_all(&temp);
    }
    result?;
    Ok(files.contents.iter().map(|(file, _)| *file).chain([WEIGHTS_FILE]).map(|file| out.join(file)).collect())
}

fn fill_and_rename(temp: &Path, out: &Path, parent: &Path, files: &ModelFiles) -> Result<()> {
    for (file, bytes) in &files.contents {
        write_synced(&temp.join(file), bytes)?;
    }
    let weights = temp.join(WEIGHTS_FILE);
    files.weights.write(&weights)?;
    fsync_path(&weights)?;
    fsync_path(temp)?;
    // rename(2) replaces an empty directory and fails on a non-empty one, so a directory that
    // filled up since `ensure_out_is_free` is still not overwritten.
    fs::rename(temp, out).map_err(|err| TrainerError::io(out, err))?;
    fsync_path(parent)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = fs::File::create(path).map_err(|err| TrainerError::io(path, err))?;
    file.write_all(bytes).map_err(|err| TrainerError::io(path, err))?;
    file.sync_all().map_err(|err| TrainerError::io(path, err))
}

#[cfg(test)]
mod tests;
