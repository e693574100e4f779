//! Reads, validates and encodes the training and validation files into rows.

use std::path::Path;

use lathe_core::training_file::DataFormat;
use lathe_encode::{encode_examples, EncodeError, Encoder};

use crate::data::jsonl::read_examples;
use crate::data::packing::{pack, Sequence};
use crate::{Result, TrainerError};

pub struct PreparedData {
    /// One per example; for preference pairs two per pair, the preferred answer's first.
    pub rows: Vec<Sequence>,
    pub examples: usize,
    pub truncated: usize,
    /// Examples with no loss-carrying token left (after truncation); not trained on.
    pub dropped: usize,
    /// The rows come in preference pairs.
    pub pairs: bool,
}

impl PreparedData {
    /// What an epoch goes through once: rows, or pairs of rows.
    pub fn units(&self) -> usize {
        if self.pairs {
            self.rows.len() / 2
        } else {
            self.rows.len()
        }
    }
}

/// Reads `path` for a run that trains on preference pairs (`pairs`) or on examples.
pub fn prepare(path: &Path, encoder: &Encoder, packing: bool, max_seq_length: usize, pairs: bool) -> Result<PreparedData> {
    let (examples, lines) = read_examples(path)?;
    let format = examples.first().map(|e| e.format());
    if pairs != (format == Some(DataFormat::Preference)) {
        let described = format.map_or("no", DataFormat::describe);
        let message = if pairs {
            format!("DPO trains on preference pairs, but the file is in {described} format")
        } else {
            format!("the file is in {described} format; preference pairs train with method = \"dpo\"")
        };
        return Err(TrainerError::file(path, message));
    }
    let encoded = encode_examples(encoder, &examples, &lines).map_err(|e| match e {
        // Template and tokenizer problems are about a line of this file.
        EncodeError::Line { line, message } => TrainerError::data_line(path, line, message),
        other => other.into(),
    })?;
    if encoded.kept.is_empty() {
        return Err(TrainerError::file(path, "no example has a token to train on (all empty or truncated away)"));
    }
    let rows = if packing { pack(&encoded.kept, max_seq_length) } else { encoded.kept.iter().map(Sequence::from_example).collect() };
    let tally = encoded.tally;
    Ok(PreparedData { rows, examples: tally.examples, truncated: tally.truncated, dropped: tally.dropped, pairs })
}

/// FNV-1a over every row's tokens and loss mask: a resume with different data is refused.
pub fn fingerprint(rows: &[Sequence]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |x: u64| {
        for byte in x.to_le_bytes() {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for row in rows {
        feed(row.input_ids.len() as u64);
        for (i, &id) in row.input_ids.iter().enumerate() {
            feed(((id as u64) << 2) | ((row.trained[i] as u64) << 1) | (row.segment[i] as u64 & 1));
        }
    }
    format!("{hash:016x}")
}
