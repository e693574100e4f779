//! Packing: several short examples share one training row instead of each being padded to
//! the full length, which on chat data (most examples are a few hundred tokens) would spend
//! most of the compute on padding.
//!
//! Packing must not change what the model learns from each example, so each example in a row
//! is a *segment*:
//! - `segment[i]` is the 1-based index of the example within the row (0 is padding, added
//!   later by the batcher); the model builds its attention mask from it so that a token attends
//!   only to earlier tokens of its own segment;
//! - `position_ids` restart at 0 for every segment, so rotary embeddings see the same positions
//!   as if the example were alone;
//! - the first token of a segment is never trained: the token before it belongs to another
//!   example, and within its own segment nothing predicts it.
//!
//! Rows are filled next-fit, in order: an example goes into the current row if it fits, else it
//! starts a new row. Keeping the order keeps the data position of a checkpoint meaningful.

use crate::data::encode::EncodedExample;

/// One training row.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub input_ids: Vec<u32>,
    pub trained: Vec<bool>,
    pub segment: Vec<u32>,
    pub position_ids: Vec<u32>,
}

impl Sequence {
    /// A row holding one example, unpacked.
    pub fn from_example(e: &EncodedExample) -> Sequence {
        let mut row = Sequence::empty();
        row.push(&e.input_ids, &e.trained);
        row
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }

    /// Number of examples in the row.
    pub fn segments(&self) -> u32 {
        self.segment.last().copied().unwrap_or(0)
    }

    fn empty() -> Sequence {
        Sequence { input_ids: Vec::new(), trained: Vec::new(), segment: Vec::new(), position_ids: Vec::new() }
    }

    fn push(&mut self, input_ids: &[u32], trained: &[bool]) {
        if input_ids.is_empty() {
            return;
        }
        let segment = self.segments() + 1;
        self.input_ids.extend_from_slice(input_ids);
        self.trained.push(false);
        self.trained.extend_from_slice(&trained[1..input_ids.len()]);
        self.segment.extend(std::iter::repeat_n(segment, input_ids.len()));
        self.position_ids.extend(0..input_ids.len() as u32);
    }
}

/// Packs examples, in order, greedily into rows of at most `seq_len` tokens (next-fit). Rows are
/// not padded here. An example longer than `seq_len` keeps its first `seq_len` tokens (the
/// encoder already truncates to `max_seq_length`, normally equal); empty examples are skipped.
pub fn pack(examples: &[EncodedExample], seq_len: usize) -> Vec<Sequence> {
    assert!(seq_len > 0, "pack: seq_len must be positive");
    let mut rows = Vec::new();
    let mut row = Sequence::empty();
    for example in examples {
        let len = example.input_ids.len().min(seq_len);
        if len == 0 {
            continue;
        }
        if row.len() + len > seq_len {
            rows.push(std::mem::replace(&mut row, Sequence::empty()));
        }
        row.push(&example.input_ids[..len], &example.trained[..len]);
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An example of `len` tokens with ids `first..first+len`, all trained.
    fn example(first: u32, len: u32) -> EncodedExample {
        EncodedExample { input_ids: (first..first + len).collect(), trained: vec![true; len as usize], truncated: false }
    }

    #[test]
    fn examples_are_packed_next_fit_in_order() {
        // 3 + 4 fit in 8; 5 does not fit after them; 2 fits after 5; 6 starts a new row.
        let examples = [example(10, 3), example(20, 4), example(30, 5), example(40, 2), example(50, 6)];
        let rows = pack(&examples, 8);
        let ids: Vec<Vec<u32>> = rows.iter().map(|r| r.input_ids.clone()).collect();
        assert_eq!(ids, vec![vec![10, 11, 12, 20, 21, 22, 23], vec![30, 31, 32, 33, 34, 40, 41], vec![50, 51, 52, 53, 54, 55]]);
        assert!(rows.iter().all(|r| r.len() <= 8));
    }

    #[test]
    fn segments_and_positions_restart_for_each_example() {
        let rows = pack(&[example(10, 3), example(20, 4)], 8);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].segment, vec![1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(rows[0].position_ids, vec![0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(rows[0].segments(), 2);
    }

    #[test]
    fn the_first_token_of_each_segment_is_never_trained() {
        let rows = pack(&[example(10, 3), example(20, 4)], 8);
        assert_eq!(rows[0].trained, vec![false, true, true, false, true, true, true]);
        assert_eq!(rows[0].trained_tokens(), 5);

        let single = Sequence::from_example(&example(1, 3));
        assert_eq!(single.trained, vec![false, true, true]);
        assert_eq!(single.segment, vec![1, 1, 1]);
        assert_eq!(single.position_ids, vec![0, 1, 2]);
    }

    #[test]
    fn too_long_examples_are_cut_and_empty_ones_skipped() {
        let empty = EncodedExample { input_ids: vec![], trained: vec![], truncated: false };
        let rows = pack(&[empty, example(10, 12), example(30, 2)], 8);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].input_ids, (10..18).collect::<Vec<u32>>());
        assert_eq!(rows[1].input_ids, vec![30, 31]);
    }
}
