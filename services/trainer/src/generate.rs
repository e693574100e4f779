//! Text generation with a KV cache: a batch of prompts (token ids) is left-padded and run once
//! through the model (prefill), then one token per sequence per step, each step attending to
//! the cached keys and values. Greedy by default (what evaluation uses); temperature and top-p
//! sampling on request. A sequence stops at one of `stop_ids` (EOS, end-of-turn) or after
//! `max_new_tokens`, and leaves the batch, so long and short answers do not cost each other.

use tch::{Kind, Tensor};

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

/// The new tokens of each prompt, in order.
pub fn generate(decoder: &Decoder, prompts: &[Vec<i64>], options: &GenerateOptions) -> Result<Vec<Vec<i64>>> {
    let vocab = decoder.config.vocab_size;
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(TrainerError::invalid("prompt", format!("prompt {i} is empty")));
        }
        if let Some(bad) = prompt.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(TrainerError::invalid("prompt", format!("prompt {i} has token {bad}, outside the vocabulary [0, {vocab})")));
        }
    }
    if !(options.temperature >= 0.0 && options.top_p > 0.0 && options.top_p <= 1.0) {
        return Err(TrainerError::invalid("temperature/top_p", "temperature must be >= 0 and top_p in (0, 1]"));
    }
    let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); prompts.len()];
    if prompts.is_empty() || options.max_new_tokens == 0 {
        return Ok(outputs);
    }
    if options.temperature > 0.0 {
        tch::manual_seed(options.seed as i64);
    }
    let _no_grad = tch::no_grad_guard();

    let device = decoder.device;
    let mut cache = KvCache::default();
    let (mut next_logits, mut key_valid, mut last_position) = prefill(decoder, prompts, &mut cache);
    let mut active: Vec<usize> = (0..prompts.len()).collect();

    // ---- decode ----
    for step in 0..options.max_new_tokens {
        let tokens = choose(&next_logits, options);
        let chosen: Vec<i64> = Vec::<i64>::try_from(&tokens.to_device(tch::Device::Cpu)).map_err(TrainerError::Torch)?;
        let mut keep = Vec::with_capacity(active.len());
        for (row, (&sequence, &token)) in active.iter().zip(&chosen).enumerate() {
            outputs[sequence].push(token);
            if !options.stop_ids.contains(&token) {
                keep.push(row as i64);
            }
        }
        if keep.is_empty() || step + 1 == options.max_new_tokens {
            break;
        }
        let mut tokens = tokens;
        if keep.len() < active.len() {
            let rows = Tensor::from_slice(&keep).to_device(device);
            cache.select_rows(&rows);
            key_valid = key_valid.index_select(0, &rows);
            last_position = last_position.index_select(0, &rows);
            tokens = tokens.index_select(0, &rows);
            active = keep.iter().map(|&r| active[r as usize]).collect();
        }
        let rows = active.len() as i64;
        last_position += 1;
        key_valid = Tensor::cat(&[&key_valid, &Tensor::ones([rows, 1], (Kind::Bool, device))], 1);
        let mask = key_valid.unsqueeze(1).unsqueeze(1);
        let logits = decoder.forward_cached(&tokens.view([rows, 1]), &last_position.view([rows, 1]), &mask, &mut cache);
        next_logits = logits.select(1, 0);
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
    let logits = decoder.forward_cached(&input, &positions, &mask, cache);
    (logits.select(1, len - 1), key_valid, positions.select(1, len - 1))
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

/// The next token of every row: argmax, or a sample from the tempered, nucleus-cut softmax.
fn choose(logits: &Tensor, options: &GenerateOptions) -> Tensor {
    if options.temperature == 0.0 {
        return logits.argmax(-1, false);
    }
    let probs = (logits / options.temperature).softmax(-1, Kind::Float);
    let probs = if options.top_p < 1.0 {
        let (sorted, order) = probs.sort(-1, true);
        // Keep the smallest prefix whose mass reaches top_p (the first token always).
        let before = sorted.cumsum(-1, Kind::Float) - &sorted;
        let kept = sorted.where_self(&before.lt(options.top_p), &Tensor::zeros_like(&sorted));
        Tensor::zeros_like(&probs).scatter(-1, &order, &kept)
    } else {
        probs
    };
    probs.multinomial(1, false).squeeze_dim(-1)
}
