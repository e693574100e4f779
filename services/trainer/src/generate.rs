//! Text generation with a KV cache, for many sequences at once.
//!
//! A [`Batch`] holds the sequences being generated on one model. New ones are admitted at any
//! step (continuous batching): their prompts run through the model together (prefill,
//! left-padded), and their cache joins the batch's, padded on the left to a common length. Each
//! [`Batch::step`] picks one token per sequence and runs the batch once over those tokens. A
//! sequence leaves at one of its `stop_ids` (EOS, end-of-turn) or after `max_new_tokens`, so long
//! and short answers do not cost each other, and the padding no remaining row needs is dropped.
//!
//! Every sequence carries its own sampling: greedy (what evaluation uses), or temperature and
//! top-p drawn from its own seeded generator, so a seeded request gives the same text whatever
//! else shares its batch. [`generate`] runs a fixed set of prompts to the end (evaluation,
//! `lathe model generate`); the worker's inference server drives a [`Batch`] itself.

use tch::{Kind, Tensor};

use crate::hash::unit_f64;
use crate::models::decoder::{Decoder, KvCache};
use crate::{Result, TrainerError};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (only with a temperature); 1 = off.
    pub top_p: f64,
    /// Seeds libtorch's generator when sampling.
    pub seed: u64,
    /// Generation of a sequence ends after one of these (it is included in the output).
    pub stop_ids: Vec<i64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 256, temperature: 0.0, top_p: 1.0, seed: 0, stop_ids: Vec::new() }
    }
}

/// How one sequence chooses its tokens and when it ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling mass (only with a temperature); 1 = off.
    pub top_p: f64,
    /// Seeds this sequence's own generator.
    pub seed: u64,
    /// Generation ends after one of these (it is included in the output).
    pub stop_ids: Vec<i64>,
    /// Report each token's log-probability and this many most likely alternatives; None = off.
    pub logprobs: Option<usize>,
}

impl Sampling {
    fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(TrainerError::invalid("temperature/top_p", "temperature must be >= 0 and top_p in (0, 1]"));
        }
        if self.max_new_tokens == 0 {
            return Err(TrainerError::invalid("max_new_tokens", "must be at least 1"));
        }
        Ok(())
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It produced one of its stop ids.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

/// One token chosen for the sequence `key`.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub key: u64,
    pub token: i64,
    /// Its log-probability under the model (before temperature), when asked for.
    pub logprob: Option<f64>,
    /// The most likely tokens at this position with their log-probabilities, best first.
    pub top_logprobs: Vec<(i64, f64)>,
    /// Set on the sequence's last token.
    pub finish: Option<Finish>,
}

struct Row {
    key: u64,
    sampling: Sampling,
    /// This sequence's own stream (SplitMix64 state).
    rng: u64,
    generated: usize,
}

/// Sequences being generated together on one model (see the module documentation).
#[derive(Default)]
pub struct Batch {
    rows: Vec<Row>,
    cache: KvCache,
    /// (B, L): which cached positions of each row are real (not left padding).
    key_valid: Option<Tensor>,
    /// (B): the position of each row's last token.
    last_position: Option<Tensor>,
    /// (B, V): each row's logits for its next token.
    next_logits: Option<Tensor>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Cached positions per row (the longest prompt plus what was generated since, less
    /// dropped padding): what each step attends over.
    pub fn context_len(&self) -> i64 {
        self.cache.len()
    }

    /// Runs the prompts of `sequences` through the model and adds them to the batch; their
    /// first tokens come with the next [`Batch::step`]. `key`s must be unique in the batch.
    pub fn admit(&mut self, decoder: &Decoder, sequences: Vec<(u64, Vec<i64>, Sampling)>) -> Result<()> {
        if sequences.is_empty() {
            return Ok(());
        }
        let vocab = decoder.config.vocab_size;
        for (key, prompt, sampling) in &sequences {
            sampling.check()?;
            if prompt.is_empty() {
                return Err(TrainerError::invalid("prompt", format!("prompt {key} is empty")));
            }
            if let Some(bad) = prompt.iter().find(|&&t| t < 0 || t >= vocab) {
                return Err(TrainerError::invalid("prompt", format!("prompt {key} has token {bad}, outside the vocabulary [0, {vocab})")));
            }
        }
        let _no_grad = tch::no_grad_guard();
        let prompts: Vec<Vec<i64>> = sequences.iter().map(|(_, prompt, _)| prompt.clone()).collect();
        let mut cache = KvCache::default();
        let (logits, mut valid, last) = prefill(decoder, &prompts, &mut cache);
        let new_rows = sequences.into_iter().map(|(key, _, sampling)| Row { key, rng: sampling.seed, sampling, generated: 0 });
        match (self.key_valid.take(), self.last_position.take(), self.next_logits.take()) {
            (Some(mut key_valid), Some(last_position), Some(next_logits)) if !self.rows.is_empty() => {
                let (mine, theirs) = (self.cache.len(), cache.len());
                if mine < theirs {
                    self.cache.left_pad(theirs - mine);
                    key_valid = left_pad_mask(&key_valid, theirs - mine);
                } else {
                    cache.left_pad(mine - theirs);
                    valid = left_pad_mask(&valid, mine - theirs);
                }
                self.cache.append_rows(cache);
                self.key_valid = Some(Tensor::cat(&[key_valid, valid], 0));
                self.last_position = Some(Tensor::cat(&[last_position, last], 0));
                self.next_logits = Some(Tensor::cat(&[next_logits, logits], 0));
            }
            _ => {
                self.cache = cache;
                self.key_valid = Some(valid);
                self.last_position = Some(last);
                self.next_logits = Some(logits);
                self.rows.clear();
            }
        }
        self.rows.extend(new_rows);
        Ok(())
    }

    /// Chooses every sequence's next token, lets the finished ones leave, and runs the rest
    /// through the model once.
    pub fn step(&mut self, decoder: &Decoder) -> Result<Vec<Token>> {
        let Some(logits) = self.next_logits.take() else { return Ok(Vec::new()) };
        if self.rows.is_empty() {
            return Ok(Vec::new());
        }
        let _no_grad = tch::no_grad_guard();
        let chosen = choose(&logits, &mut self.rows)?;
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut tokens = Vec::with_capacity(self.rows.len());
        for (index, (row, mut token)) in self.rows.iter_mut().zip(chosen).enumerate() {
            row.generated += 1;
            token.finish = if row.sampling.stop_ids.contains(&token.token) {
                Some(Finish::Stop)
            } else if row.generated >= row.sampling.max_new_tokens {
                Some(Finish::Length)
            } else {
                keep.push(index as i64);
                None
            };
            tokens.push(token);
        }
        let chosen_ids = Tensor::from_slice(&tokens.iter().map(|t| t.token).collect::<Vec<_>>()).to_device(decoder.device);
        let next = self.keep_rows(&keep, chosen_ids, decoder.device);
        if let Some(next) = next {
            let rows = self.rows.len() as i64;
            let device = decoder.device;
            let last_position = self.last_position.take().expect("set with rows") + 1;
            let key_valid = Tensor::cat(&[self.key_valid.take().expect("set with rows"), Tensor::ones([rows, 1], (Kind::Bool, device))], 1);
            let mask = key_valid.unsqueeze(1).unsqueeze(1);
            let logits = decoder.forward_cached(&next.view([rows, 1]), &last_position.view([rows, 1]), &mask, &mut self.cache);
            self.next_logits = Some(logits.select(1, 0));
            self.last_position = Some(last_position);
            self.key_valid = Some(key_valid);
        }
        Ok(tokens)
    }

    /// Drops the sequences whose keys are in `keys` (a client went away).
    pub fn remove(&mut self, keys: &[u64]) {
        let keep: Vec<i64> = self.rows.iter().enumerate().filter(|(_, row)| !keys.contains(&row.key)).map(|(i, _)| i as i64).collect();
        if keep.len() == self.rows.len() {
            return;
        }
        let device = self.next_logits.as_ref().map_or(tch::Device::Cpu, Tensor::device);
        if let Some(logits) = self.next_logits.take() {
            let rows = Tensor::from_slice(&keep).to_device(device);
            self.next_logits = Some(logits.index_select(0, &rows));
        }
        let placeholder = Tensor::zeros([self.rows.len() as i64], (Kind::Int64, device));
        self.keep_rows(&keep, placeholder, device);
    }

    /// Keeps the rows at `keep` (indices into the current rows) of everything the batch holds,
    /// and drops the left padding none of them needs; returns `values` for the kept rows, or
    /// None when no row is left.
    fn keep_rows(&mut self, keep: &[i64], values: Tensor, device: tch::Device) -> Option<Tensor> {
        if keep.is_empty() {
            *self = Batch::default();
            return None;
        }
        if keep.len() == self.rows.len() {
            return Some(values);
        }
        let index = Tensor::from_slice(keep).to_device(device);
        self.cache.select_rows(&index);
        let key_valid = self.key_valid.take().expect("set with rows").index_select(0, &index);
        self.last_position = self.last_position.take().map(|t| t.index_select(0, &index));
        let mut kept = keep.iter();
        let mut position = 0;
        self.rows.retain(|_| {
            let retained = kept.as_slice().first() == Some(&position);
            if retained {
                kept.next();
            }
            position += 1;
            retained
        });
        // Columns that are padding in every remaining row are never attended to again.
        let used: Vec<bool> = Vec::try_from(key_valid.any_dim(0, false).to_device(tch::Device::Cpu)).unwrap_or_default();
        let unused = used.iter().take_while(|&&u| !u).count() as i64;
        self.cache.drop_front(unused);
        let len = key_valid.size()[1];
        self.key_valid = Some(key_valid.narrow(1, unused, len - unused));
        Some(values.index_select(0, &index))
    }
}

fn left_pad_mask(valid: &Tensor, n: i64) -> Tensor {
    let rows = valid.size()[0];
    Tensor::cat(&[Tensor::zeros([rows, n], (Kind::Bool, valid.device())), valid.shallow_clone()], 1)
}

/// The new tokens of each prompt, in order, all with the same options (prompt `i` samples
/// with seed `seed + i`).
pub fn generate(decoder: &Decoder, prompts: &[Vec<i64>], options: &GenerateOptions) -> Result<Vec<Vec<i64>>> {
    let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || options.max_new_tokens == 0 {
        return Ok(outputs);
    }
    let sequences = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let sampling = Sampling {
                max_new_tokens: options.max_new_tokens,
                temperature: options.temperature,
                top_p: options.top_p,
                seed: options.seed.wrapping_add(i as u64),
                stop_ids: options.stop_ids.clone(),
                logprobs: None,
            };
            (i as u64, prompt.clone(), sampling)
        })
        .collect();
    let mut batch = Batch::default();
    batch.admit(decoder, sequences)?;
    while !batch.is_empty() {
        for token in batch.step(decoder)? {
            outputs[token.key as usize].push(token.token);
        }
    }
    Ok(outputs)
}

/// Runs left-padded `prompts` through the model, filling `cache`: the logits of each prompt's
/// next token (B, V), which key positions are real (B, L), and each prompt's last position (B).
fn prefill(decoder: &Decoder, prompts: &[Vec<i64>], cache: &mut KvCache) -> (Tensor, Tensor, Tensor) {
    let device = decoder.device;
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let mut ids = Vec::with_capacity(prompts.len() * len as usize);
    let mut valid = Vec::with_capacity(ids.capacity());
    for prompt in prompts {
        let pad = len as usize - prompt.len();
        ids.extend(std::iter::repeat_n(0i64, pad).chain(prompt.iter().copied()));
        valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, prompt.len())));
    }
    let batch = prompts.len() as i64;
    let input = Tensor::from_slice(&ids).view([batch, len]).to_device(device);
    let key_valid = Tensor::from_slice(&valid).view([batch, len]).to_device(device);
    let positions = (key_valid.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let causal = Tensor::ones([len, len], (Kind::Bool, device)).tril(0);
    // A padding position attends to itself alone, so that no attention row is empty (NaN).
    let eye = Tensor::eye(len, (Kind::Bool, device));
    let mask = causal.unsqueeze(0).logical_and(&key_valid.unsqueeze(1)).logical_or(&eye.unsqueeze(0)).unsqueeze(1);
    // Only the last position's logits are needed (rows are left-padded: it is every row's).
    let hidden = decoder.hidden_cached(&input, &positions, &mask, cache);
    let logits = decoder.logits(&hidden.narrow(1, len - 1, 1)).select(1, 0);
    (logits, key_valid, positions.select(1, len - 1))
}

/// Log-probabilities of `candidates` as the next token after each prompt (B × candidates):
/// MCQ's likelihood mode compares A/B/C/D without generating.
pub fn next_token_log_probs(decoder: &Decoder, prompts: &[Vec<i64>], candidates: &[i64]) -> Result<Vec<Vec<f64>>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let _no_grad = tch::no_grad_guard();
    let (logits, _, _) = prefill(decoder, prompts, &mut KvCache::default());
    let index = Tensor::from_slice(candidates).to_device(decoder.device);
    let chosen = logits.log_softmax(-1, Kind::Float).index_select(1, &index).to_device(tch::Device::Cpu);
    Vec::<Vec<f64>>::try_from(&chosen.to_kind(Kind::Double)).map_err(TrainerError::Torch)
}

/// The next token of every row: argmax, or a draw from the tempered, nucleus-cut softmax with
/// the row's own generator; with log-probabilities where a row asks for them.
fn choose(logits: &Tensor, rows: &mut [Row]) -> Result<Vec<Token>> {
    let cpu = tch::Device::Cpu;
    let greedy: Vec<i64> = Vec::try_from(logits.argmax(-1, false).to_device(cpu)).map_err(TrainerError::Torch)?;
    let sampled: Vec<i64> = rows.iter().enumerate().filter(|(_, r)| r.sampling.temperature > 0.0).map(|(i, _)| i as i64).collect();
    let mut chosen = greedy;
    if !sampled.is_empty() {
        let index = Tensor::from_slice(&sampled).to_device(logits.device());
        let temperatures: Vec<f64> = sampled.iter().map(|&i| rows[i as usize].sampling.temperature).collect();
        let temperatures = Tensor::from_slice(&temperatures).to_device(logits.device()).to_kind(Kind::Float).unsqueeze(1);
        let probs = (logits.index_select(0, &index).to_kind(Kind::Float) / temperatures).softmax(-1, Kind::Float);
        let probs: Vec<Vec<f32>> = Vec::try_from(probs.to_device(cpu)).map_err(TrainerError::Torch)?;
        for (&i, p) in sampled.iter().zip(probs) {
            let row = &mut rows[i as usize];
            chosen[i as usize] = sample_top_p(&p, row.sampling.top_p, unit_f64(&mut row.rng));
        }
    }
    let wanted: Vec<i64> = rows.iter().enumerate().filter(|(_, r)| r.sampling.logprobs.is_some()).map(|(i, _)| i as i64).collect();
    // Per row: the chosen token's log-probability and the top alternatives.
    type Reported = (Option<f64>, Vec<(i64, f64)>);
    let mut reported: Vec<Reported> = vec![(None, Vec::new()); rows.len()];
    if !wanted.is_empty() {
        let index = Tensor::from_slice(&wanted).to_device(logits.device());
        let log_probs = logits.index_select(0, &index).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let k = wanted.iter().map(|&i| rows[i as usize].sampling.logprobs.unwrap_or(0)).max().unwrap_or(0).max(1) as i64;
        let (top_values, top_ids) = log_probs.topk(k.min(log_probs.size()[1]), -1, true, true);
        let picked: Vec<i64> = wanted.iter().map(|&i| chosen[i as usize]).collect();
        let picked_values = log_probs.gather(1, &Tensor::from_slice(&picked).to_device(logits.device()).unsqueeze(1), false);
        let picked_values: Vec<f64> =
            Vec::try_from(picked_values.squeeze_dim(1).to_kind(Kind::Double).to_device(cpu)).map_err(TrainerError::Torch)?;
        let top_values: Vec<Vec<f64>> = Vec::try_from(top_values.to_kind(Kind::Double).to_device(cpu)).map_err(TrainerError::Torch)?;
        let top_ids: Vec<Vec<i64>> = Vec::try_from(top_ids.to_device(cpu)).map_err(TrainerError::Torch)?;
        for (n, &i) in wanted.iter().enumerate() {
            let count = rows[i as usize].sampling.logprobs.unwrap_or(0);
            let top = top_ids[n].iter().copied().zip(top_values[n].iter().copied()).take(count).collect();
            reported[i as usize] = (Some(picked_values[n]), top);
        }
    }
    Ok(rows
        .iter()
        .zip(chosen)
        .zip(reported)
        .map(|((row, token), (logprob, top_logprobs))| Token { key: row.key, token, logprob, top_logprobs, finish: None })
        .collect())
}

/// Draws from `probs` cut to the smallest set of most likely tokens whose mass reaches
/// `top_p` (the most likely token always stays); `uniform` is in [0, 1).
fn sample_top_p(probs: &[f32], top_p: f64, uniform: f64) -> i64 {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_unstable_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut kept = 0;
    let mut mass = 0.0f64;
    for &i in &order {
        if kept > 0 && mass >= top_p {
            break;
        }
        mass += f64::from(probs[i]);
        kept += 1;
    }
    let mut target = uniform * mass;
    for &i in &order[..kept] {
        target -= f64::from(probs[i]);
        if target < 0.0 {
            return i as i64;
        }
    }
    order[kept - 1] as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_smallest_head_reaching_the_mass() {
        let probs = [0.1f32, 0.5, 0.3, 0.1];
        // top_p 0.5: only token 1 (mass 0.5) is kept, whatever the draw.
        for u in [0.0, 0.3, 0.99] {
            assert_eq!(sample_top_p(&probs, 0.5, u), 1);
        }
        // top_p 0.8: tokens 1 and 2 (mass 0.8); a draw past 0.5/0.8 of it picks token 2.
        assert_eq!(sample_top_p(&probs, 0.8, 0.6), 1);
        assert_eq!(sample_top_p(&probs, 0.8, 0.7), 2);
        // top_p 1: every token; the last quantile lands on the least likely, index order.
        assert_eq!(sample_top_p(&probs, 1.0, 0.95), 3);
    }
}
