//! A file's examples through the [`Encoder`], counting what truncation costs: the trainer trains
//! on what is kept, and the controller reports the counts when the job is created.

use lathe_core::training_file::Example;

use crate::encoder::{EncodedExample, Encoder};
use crate::{EncodeError, Result};

/// What encoding a file's examples found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub examples: usize,
    /// Examples longer than `max_seq_length` that lost their end (kept or dropped).
    pub truncated: usize,
    /// Examples with no loss-carrying token left after truncation: not trained on.
    pub dropped: usize,
}

impl Tally {
    /// Counts one example from its encoded sequences (two for a preference pair); true when
    /// every sequence has a token to train on (it is kept).
    pub fn count(&mut self, encoded: &[EncodedExample]) -> bool {
        self.examples += 1;
        self.truncated += encoded.iter().any(|e| e.truncated) as usize;
        let kept = encoded.iter().all(|e| e.trained.iter().skip(1).any(|&t| t));
        self.dropped += !kept as usize;
        kept
    }

    pub fn kept(&self) -> usize {
        self.examples - self.dropped
    }
}

/// The encoded examples of one file.
#[derive(Debug)]
pub struct EncodedExamples {
    /// Examples with at least one token to train on, in file order. A preference pair is two
    /// consecutive entries, the preferred answer's conversation first.
    pub kept: Vec<EncodedExample>,
    pub tally: Tally,
}

/// Encodes one example of a file into its sequences (one, or two for a preference pair); a
/// template or tokenizer error names its 1-based `line`.
pub fn encode_line(encoder: &Encoder, example: &Example, line: usize) -> Result<Vec<EncodedExample>> {
    let encoded = match example.preference_conversations() {
        Some([preferred, non_preferred]) => {
            encoder.encode_chat_example(&preferred).and_then(|p| Ok(vec![p, encoder.encode_chat_example(&non_preferred)?]))
        }
        None => encoder.encode(example).map(|e| vec![e]),
    };
    encoded.map_err(|e| match e {
        e @ (EncodeError::ChatTemplate(_) | EncodeError::Tokenizer(_)) => EncodeError::Line { line, message: e.to_string() },
        other => other,
    })
}

/// Encodes every example; `lines[i]` is example i's 1-based line, named by any error about it.
pub fn encode_examples(encoder: &Encoder, examples: &[Example], lines: &[usize]) -> Result<EncodedExamples> {
    let mut kept = Vec::with_capacity(examples.len());
    let mut tally = Tally::default();
    for (i, example) in examples.iter().enumerate() {
        let encoded = encode_line(encoder, example, lines.get(i).copied().unwrap_or(i + 1))?;
        if tally.count(&encoded) {
            kept.extend(encoded);
        }
    }
    Ok(EncodedExamples { kept, tally })
}
