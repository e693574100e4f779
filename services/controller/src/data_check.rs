//! The job-create check of a job's data against its model. Every example is validated and
//! encoded with the model's own tokenizer and chat template exactly as the trainer will
//! (`lathe-encode`), so a conversation the template refuses is a 400 naming its line, not a
//! worker failure minutes later, and examples that `max_seq_length` truncates, or truncates
//! to nothing, are counted before any GPU time is spent. The stored file is read back (a file
//! damaged on disk is caught here) one line at a time: memory is one example, not the file.

use std::io::BufRead;
use std::path::Path;

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
