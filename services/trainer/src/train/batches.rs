//! From encoded rows to tensors: the order of rows in each epoch, which rows form each
//! optimizer step and micro-batch, and the (input, target) tensors of a micro-batch.
//!
//! The order is a pure function of (seed, epoch), so a resumed run needs only the step number
//! to continue with exactly the rows an uninterrupted run would have used.

use tch::{Device, Tensor};

use crate::data::packing::Sequence;
use crate::hash::splitmix64;

/// Right-padded tensors of one micro-batch, each (B, T).
pub struct MicroBatch {
    pub input_ids: Tensor,
    /// The token predicted at each position (already shifted); -100 where no loss is taken.
    pub targets: Tensor,
    pub position_ids: Tensor,
    /// Example index within the row (0 = padding); None when rows hold one example each
    /// (right padding then needs only the causal mask).
    pub segments: Option<Tensor>,
    /// 1 for real tokens, 0 for padding (what transformers calls attention_mask).
    pub attention_mask: Tensor,
    pub trained_tokens: u64,
    pub real_tokens: u64,
}

pub const IGNORE_INDEX: i64 = -100;

/// Steps per epoch: every row is used once per epoch, the last step may be smaller.
pub fn steps_per_epoch(rows: usize, rows_per_step: usize) -> u64 {
    rows.div_ceil(rows_per_step) as u64
}

/// Row order of one epoch: Fisher–Yates with a splitmix64 stream seeded by (seed, epoch).
pub fn epoch_order(rows: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows).collect();
    if shuffle {
        let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        for i in (1..rows).rev() {
            let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// The rows of optimizer step `step_in_epoch` (0-based), split into micro-batches.
pub fn step_rows(order: &[usize], step_in_epoch: u64, batch_size: usize, accumulation: usize) -> Vec<Vec<usize>> {
    rank_rows(order, step_in_epoch, batch_size, accumulation, 0, 1)
}

/// The rows rank `rank` of `world` trains in optimizer step `step_in_epoch`, split into
/// micro-batches. A step takes `batch_size * accumulation * world` rows of the epoch order and
/// rank r the r-th contiguous share of them, so `world` ranks with batch b train exactly the
/// rows one process with batch `world * b` would. A pure function of the arguments: no rank
/// needs to ask another which rows it has. The last step of an epoch may leave a rank nothing.
pub fn rank_rows(
    order: &[usize],
    step_in_epoch: u64,
    batch_size: usize,
    accumulation: usize,
    rank: usize,
    world: usize,
) -> Vec<Vec<usize>> {
    let share = batch_size * accumulation;
    let step_start = step_in_epoch as usize * share * world;
    let start = (step_start + rank * share).min(order.len());
    let end = (start + share).min(order.len());
    order[start..end].chunks(batch_size).map(|c| c.to_vec()).collect()
}

/// Number of loss-carrying positions in a row (targets that are trained and in the same example).
pub fn row_trained_tokens(row: &Sequence) -> u64 {
    (1..row.input_ids.len()).filter(|&t| row.trained[t] && row.segment[t] == row.segment[t - 1]).count() as u64
}

pub fn make_micro_batch(rows: &[&Sequence], packed: bool, pad_id: i64, device: Device) -> MicroBatch {
    let b = rows.len();
    let t = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(1).max(1);
    let mut input_ids = vec![pad_id; b * t];
    let mut targets = vec![IGNORE_INDEX; b * t];
    let mut positions = vec![0i64; b * t];
    let mut segments = vec![0i64; b * t];
    let mut mask = vec![0i64; b * t];
    let (mut trained_tokens, mut real_tokens) = (0u64, 0u64);
    for (r, row) in rows.iter().enumerate() {
        let base = r * t;
        let n = row.input_ids.len();
        real_tokens += n as u64;
        for i in 0..n {
            input_ids[base + i] = row.input_ids[i] as i64;
            positions[base + i] = row.position_ids[i] as i64;
            segments[base + i] = row.segment[i] as i64;
            mask[base + i] = 1;
            // Position i predicts token i+1 when that token is trained and in the same example.
            if i + 1 < n && row.trained[i + 1] && row.segment[i + 1] == row.segment[i] {
                targets[base + i] = row.input_ids[i + 1] as i64;
                trained_tokens += 1;
            }
        }
        // Padding continues the positions so rotary tables stay in range.
        for i in n..t {
            positions[base + i] = i as i64;
        }
    }
    let tensor = |v: Vec<i64>| Tensor::from_slice(&v).view([b as i64, t as i64]).to_device(device);
    MicroBatch {
        input_ids: tensor(input_ids),
        targets: tensor(targets),
        position_ids: tensor(positions),
        segments: if packed { Some(tensor(segments)) } else { None },
        attention_mask: tensor(mask),
        trained_tokens,
        real_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ids: &[u32], trained: &[bool], segment: &[u32], positions: &[u32]) -> Sequence {
        Sequence { input_ids: ids.to_vec(), trained: trained.to_vec(), segment: segment.to_vec(), position_ids: positions.to_vec() }
    }

    #[test]
    fn epoch_order_is_a_permutation_fixed_by_seed_and_epoch() {
        let a = epoch_order(100, 7, 0, true);
        assert_eq!(a, epoch_order(100, 7, 0, true));
        assert_ne!(a, epoch_order(100, 7, 1, true));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(epoch_order(5, 7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn the_last_step_of_an_epoch_takes_the_remaining_rows() {
        let order: Vec<usize> = (0..10).collect();
        assert_eq!(steps_per_epoch(10, 4), 3);
        assert_eq!(step_rows(&order, 0, 2, 2), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(step_rows(&order, 2, 2, 2), vec![vec![8, 9]]);
    }

    #[test]
    fn ranks_share_a_step_as_one_process_with_the_whole_batch_would() {
        let order: Vec<usize> = (0..20).rev().collect();
        for step in 0..3 {
            let whole: Vec<usize> = step_rows(&order, step, 8, 1).concat();
            let shared: Vec<usize> = (0..2).flat_map(|r| rank_rows(&order, step, 4, 1, r, 2).concat()).collect();
            assert_eq!(shared, whole, "step {step}");
        }
        // 20 rows, 8 per step: the third step has 4, all on rank 0.
        assert_eq!(rank_rows(&order, 2, 4, 1, 0, 2), vec![vec![3, 2, 1, 0]]);
        assert!(rank_rows(&order, 2, 4, 1, 1, 2).is_empty());
        assert_eq!(rank_rows(&order, 0, 2, 2, 1, 2), vec![vec![15, 14], vec![13, 12]]);
    }

    #[test]
    fn targets_are_shifted_and_never_cross_examples_or_padding() {
        // Two packed examples [5 6 7] [8 9]; the first token of each is untrained.
        let packed = row(&[5, 6, 7, 8, 9], &[false, true, true, false, true], &[1, 1, 1, 2, 2], &[0, 1, 2, 0, 1]);
        let short = row(&[3, 4], &[false, true], &[1, 1], &[0, 1]);
        let batch = make_micro_batch(&[&packed, &short], true, 0, Device::Cpu);
        let targets: Vec<i64> = Vec::try_from(batch.targets.view([-1])).unwrap();
        assert_eq!(targets, vec![6, 7, -100, 9, -100, 4, -100, -100, -100, -100]);
        assert_eq!(batch.trained_tokens, 4);
        assert_eq!(batch.real_tokens, 7);
        let mask: Vec<i64> = Vec::try_from(batch.attention_mask.view([-1])).unwrap();
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(row_trained_tokens(&packed), 3);
    }
}
