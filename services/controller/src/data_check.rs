//! The job-create check of a job's data against its model. Every example is validated and
//! encoded with the model's own tokenizer and chat template exactly as the trainer will
//! (`lathe-encode`), so a conversation the template refuses is a 400 naming its line, not a
//! worker failure minutes later, and examples that `max_seq_length` truncates, or truncates
//! to nothing, are counted before any GPU time is spent. The stored file is read back (a file
//! damaged on disk is caught here) one line at a time: memory is one example, not the file.
//!
//! One tenant's large creates must not slow another's ([`DataChecks`]): a file that passed is
//! remembered (by file, model and the options that change the encoding: files never change,
//! and a model replaced on disk has new tokenizer files), at most [`CHECKS_AT_ONCE`] checks run
//! at a time, and a check whose request went away stops at the next example.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lathe_core::training_file::{FileError, LineReader};
use lathe_core::FileSummary;
use lathe_encode::{encode_line, EncodeError, EncodeOptions, Encoder, Tally};

#[derive(Debug, thiserror::Error)]
pub enum DataCheckError {
    /// The file breaks the format rules (a line, too few examples, empty).
    #[error(transparent)]
    File(#[from] FileError),
    /// An example the model cannot take (its template refused it, the tokenizer failed).
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    /// Every example was truncated to nothing.
    #[error("no example has a token to train on with max_seq_length {max_seq_length}: all {examples} lose their answers to truncation")]
    NothingToTrain { examples: usize, max_seq_length: usize },
    /// The server's model or stored file could not be read: the server's fault, not the request's.
    #[error("{0}")]
    Server(String),
    /// The request went away before the check finished.
    #[error("the check was abandoned")]
    Abandoned,
}

/// What the check found in one file.
#[derive(Debug, Clone, Copy)]
pub struct CheckedFile {
    pub summary: FileSummary,
    pub tally: Tally,
}

/// Validates and encodes every example of `file` for the model in `model_dir`. The counts are
/// what the trainer will find. A training file must keep at least one example.
pub fn check_file(model_dir: &Path, file: &Path, options: EncodeOptions, training: bool) -> Result<CheckedFile, DataCheckError> {
    check_file_until(model_dir, file, options, training, &AtomicBool::new(false))
}

/// [`check_file`], stopping with [`DataCheckError::Abandoned`] once `abandoned` is set.
fn check_file_until(
    model_dir: &Path,
    file: &Path,
    options: EncodeOptions,
    training: bool,
    abandoned: &AtomicBool,
) -> Result<CheckedFile, DataCheckError> {
    let encoder = Encoder::from_model_dir(model_dir, options).map_err(|e| DataCheckError::Server(e.to_string()))?;
    let server = |e: std::io::Error| DataCheckError::Server(format!("{}: {e}", file.display()));
    let mut reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(file).map_err(server)?);
    let (mut lines, mut tally, mut line, mut bytes) = (LineReader::default(), Tally::default(), Vec::new(), 0);
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(server)?;
        if read == 0 {
            break;
        }
        if abandoned.load(Ordering::Relaxed) {
            return Err(DataCheckError::Abandoned);
        }
        bytes += read;
        let Some(example) = lines.push(line.strip_suffix(b"\n").unwrap_or(&line))? else { continue };
        let encoded = encode_line(&encoder, &example, lines.lines()).map_err(|e| match e {
            EncodeError::Line { line, message } => DataCheckError::Line { line, message },
            other => DataCheckError::Server(other.to_string()),
        })?;
        tally.count(&encoded);
    }
    let summary = lines.summary(bytes)?;
    let summary = if training { lathe_core::training_file::enough_to_train(summary)? } else { summary };
    if training && tally.kept() == 0 {
        return Err(DataCheckError::NothingToTrain { examples: tally.examples, max_seq_length: options.max_seq_length });
    }
    Ok(CheckedFile { summary, tally })
}

/// Checks run at once; more wait their turn.
pub const CHECKS_AT_ONCE: usize = 2;
/// Passed checks remembered.
const REMEMBERED: usize = 4096;

/// What a passed check depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckKey {
    pub file_id: String,
    pub model: String,
    pub max_seq_length: usize,
    pub train_on_inputs: bool,
    pub training: bool,
    /// When the model's tokenizer files last changed.
    pub model_changed: Option<SystemTime>,
}

impl CheckKey {
    pub fn new(file_id: &str, model: &str, model_dir: &Path, options: EncodeOptions, training: bool) -> CheckKey {
        let changed = |name: &str| std::fs::metadata(model_dir.join(name)).and_then(|m| m.modified()).ok();
        CheckKey {
            file_id: file_id.to_string(),
            model: model.to_string(),
            max_seq_length: options.max_seq_length,
            train_on_inputs: options.train_on_inputs,
            training,
            model_changed: changed("tokenizer.json").max(changed("tokenizer_config.json")),
        }
    }
}

/// The controller's data checks: remembered, bounded in number, abandoned with their request.
pub struct DataChecks {
    passed: Mutex<HashMap<CheckKey, CheckedFile>>,
    turns: tokio::sync::Semaphore,
}

impl Default for DataChecks {
    fn default() -> Self {
        DataChecks { passed: Mutex::default(), turns: tokio::sync::Semaphore::new(CHECKS_AT_ONCE) }
    }
}

/// Sets the flag when the request's future is dropped (the client went away).
struct Abandon(Arc<AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl DataChecks {
    pub async fn check(
        &self,
        key: CheckKey,
        model_dir: PathBuf,
        file: PathBuf,
        options: EncodeOptions,
    ) -> Result<CheckedFile, DataCheckError> {
        if let Some(passed) = self.passed.lock().expect("data checks lock").get(&key) {
            return Ok(*passed);
        }
        let _turn = self.turns.acquire().await.map_err(|_| DataCheckError::Abandoned)?;
        let abandoned = Arc::new(AtomicBool::new(false));
        let _abandon = Abandon(abandoned.clone());
        let training = key.training;
        let checked = tokio::task::spawn_blocking(move || check_file_until(&model_dir, &file, options, training, &abandoned))
            .await
            .map_err(|e| DataCheckError::Server(e.to_string()))??;
        let mut passed = self.passed.lock().expect("data checks lock");
        if passed.len() >= REMEMBERED {
            passed.clear();
        }
        passed.insert(key, checked);
        Ok(checked)
    }
}
