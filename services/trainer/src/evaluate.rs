//! Running a model on a CTIBench benchmark: the protocol (chat template, optional system
//! prompt, k-shot turns from a disjoint, seeded pool, greedy decoding or MCQ likelihood), then
//! `lathe_eval` extraction and scoring. Every result carries its protocol.

use std::path::{Path, PathBuf};

use std::time::Instant;

use lathe_core::training_file::ChatMessage;
use lathe_eval::ctibench::Item;
use lathe_eval::extract::Rule;
use lathe_eval::score::{score_with, Scored};
use lathe_eval::Benchmark;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::chat_template::{read_special_tokens, ChatTemplate};
use crate::generate::{generate, next_token_log_probs, GenerateOptions};
use crate::hash::splitmix64;

/// A stable pseudo-random key for ordering by seed.
fn shuffle_key(seed: u64, index: usize) -> u64 {
    let mut state = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    splitmix64(&mut state)
}
use crate::models::decoder::Decoder;
use crate::{Result, TrainerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Generate an answer and extract it.
    Generate,
    /// MCQ only: the option letter with the highest next-token probability.
    Likelihood,
}

#[derive(Debug, Clone, Serialize)]
pub struct Protocol {
    pub benchmark: Benchmark,
    pub mode: Mode,
    pub system_prompt: Option<String>,
    pub shots: usize,
    pub seed: u64,
    /// How many items, chosen stratified by answer with `seed`; None = all.
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
    pub decoding: &'static str,
    /// How an answer is read out of the output (`lathe_eval::extract`).
    pub rule: Rule,
    pub unparsable_counts_as_wrong: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub model: String,
    pub adapter: Option<String>,
    pub protocol: Protocol,
    pub items_per_second: f64,
    pub generated_tokens: usize,
    pub result: Scored,
}

pub struct EvalRequest<'a> {
    pub decoder: &'a Decoder,
    pub model_dir: &'a Path,
    pub adapter: Option<PathBuf>,
    /// Every item of the benchmark (`lathe_eval::ctibench::load` or `chat_file::load`): the
    /// protocol's subset is chosen from them and the shots from the rest.
    pub items: &'a [Item],
    pub protocol: Protocol,
    pub batch_size: usize,
    /// Called after each batch with (items done, items in all); returning false stops the run
    /// with [`TrainerError::Stopped`] (a cancelled evaluation).
    pub progress: &'a mut dyn FnMut(usize, usize) -> bool,
}

/// The items to evaluate: all, or `limit` of them stratified by answer (round-robin over the
/// answers, each shuffled with `seed`), in file order.
pub fn select_items(items: &[Item], limit: Option<usize>, seed: u64) -> Vec<Item> {
    let Some(limit) = limit.filter(|&l| l < items.len()) else { return items.to_vec() };
    let mut by_answer: std::collections::BTreeMap<&str, Vec<&Item>> = Default::default();
    for item in items {
        by_answer.entry(&item.answer).or_default().push(item);
    }
    let mut groups: Vec<Vec<&Item>> = by_answer
        .into_values()
        .map(|mut group| {
            group.sort_by_key(|item| shuffle_key(seed, item.index));
            group
        })
        .collect();
    let mut chosen = Vec::with_capacity(limit);
    let mut round = 0;
    while chosen.len() < limit {
        for group in groups.iter_mut() {
            if let Some(item) = group.get(round) {
                if chosen.len() < limit {
                    chosen.push((*item).clone());
                }
            }
        }
        round += 1;
    }
    chosen.sort_by_key(|item| item.index);
    chosen
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into(), weight: None, extra: Default::default() }
}

/// Shots for `item`: `k` items outside the evaluated set, the same for every item (seeded).
fn shot_pool(all: &[Item], evaluated: &[Item], k: usize, seed: u64) -> Vec<Item> {
    let taken: std::collections::HashSet<usize> = evaluated.iter().map(|i| i.index).collect();
    let mut pool: Vec<&Item> = all.iter().filter(|i| !taken.contains(&i.index)).collect();
    pool.sort_by_key(|item| shuffle_key(seed.wrapping_add(0x5eed), item.index));
    pool.into_iter().take(k).cloned().collect()
}

pub fn run(request: EvalRequest<'_>) -> Result<EvalResult> {
    let protocol = request.protocol.clone();
    let benchmark = protocol.benchmark;
    let all = request.items;
    let items = select_items(all, protocol.limit, protocol.seed);
    let shots = shot_pool(all, &items, protocol.shots, protocol.seed);
    if shots.len() < protocol.shots {
        return Err(TrainerError::invalid("shots", format!("only {} items are left outside the evaluated set for shots", shots.len())));
    }
    if protocol.mode == Mode::Likelihood && !benchmark.is_mcq() {
        return Err(TrainerError::invalid("mode", "likelihood scoring applies to multiple-choice benchmarks (cti-mcq) only"));
    }

    let tokenizer_path = request.model_dir.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| TrainerError::file(&tokenizer_path, e.to_string()))?;
    let config_path = request.model_dir.join("tokenizer_config.json");
    let template = ChatTemplate::from_tokenizer_config(&config_path)?
        .ok_or_else(|| TrainerError::file(&config_path, "the model has no chat template; evaluation prompts are chat turns"))?;
    let stop_ids = crate::inference::stop_token_ids(&tokenizer, &read_special_tokens(&config_path)?);

    let encode = |item: &Item| -> Result<Vec<i64>> {
        // An own file's example may bring its system prompt: it takes the protocol's place.
        let (own_system, turns): (Vec<_>, Vec<_>) = item.turns.iter().partition(|(role, _)| role == "system");
        let mut messages = Vec::new();
        if own_system.is_empty() {
            messages.extend(protocol.system_prompt.iter().map(|system| message("system", system)));
        }
        messages.extend(own_system.into_iter().map(|(role, content)| message(role, content)));
        for shot in &shots {
            messages.push(message("user", &shot.prompt));
            messages.push(message("assistant", &shot.answer));
        }
        messages.extend(turns.into_iter().map(|(role, content)| message(role, content)));
        messages.push(message("user", &item.prompt));
        let text = template.render(&messages, true)?;
        let encoding = tokenizer.encode(text, false).map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    };

    let started = Instant::now();
    let mut outputs = vec![String::new(); items.len()];
    let mut generated_tokens = 0;
    // Similar lengths together: less padding in each batch.
    let mut order: Vec<(usize, Vec<i64>)> = items.iter().enumerate().map(|(i, item)| Ok((i, encode(item)?))).collect::<Result<_>>()?;
    order.sort_by_key(|(_, ids)| ids.len());
    let letters: Vec<i64> = ["A", "B", "C", "D"]
        .iter()
        .map(|l| {
            let ids = tokenizer.encode(*l, false).map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
            match ids.get_ids() {
                [id] => Ok(*id as i64),
                _ => Err(TrainerError::Tokenizer(format!("{l:?} is not a single token; likelihood mode needs one"))),
            }
        })
        .collect::<Result<_>>()
        .or_else(|e| if protocol.mode == Mode::Likelihood { Err(e) } else { Ok(Vec::new()) })?;
    let mut done = 0;
    for batch in order.chunks(request.batch_size.max(1)) {
        let prompts: Vec<Vec<i64>> = batch.iter().map(|(_, ids)| ids.clone()).collect();
        match protocol.mode {
            Mode::Generate => {
                let options = GenerateOptions { max_new_tokens: protocol.max_new_tokens, stop_ids: stop_ids.clone(), ..Default::default() };
                let new_tokens = generate(request.decoder, &prompts, &options)?;
                for ((i, _), tokens) in batch.iter().zip(new_tokens) {
                    generated_tokens += tokens.len();
                    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
                    outputs[*i] = tokenizer.decode(&ids, true).map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
                }
            }
            Mode::Likelihood => {
                let scores = next_token_log_probs(request.decoder, &prompts, &letters)?;
                for ((i, _), row) in batch.iter().zip(scores) {
                    let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(k, _)| k);
                    outputs[*i] = ["A", "B", "C", "D"][best].to_string();
                }
            }
        }
        done += batch.len();
        if !(request.progress)(done, items.len()) {
            return Err(TrainerError::Stopped(format!("stopped after {done} of {} items", items.len())));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(EvalResult {
        model: request.model_dir.display().to_string(),
        adapter: request.adapter.map(|a| a.display().to_string()),
        items_per_second: items.len() as f64 / seconds.max(1e-9),
        generated_tokens,
        result: score_with(benchmark, protocol.rule, &items, &outputs, protocol.unparsable_counts_as_wrong),
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(index: usize, answer: &str) -> Item {
        Item { index, url: String::new(), prompt: format!("q{index}"), answer: answer.into(), description: None, turns: Vec::new() }
    }

    #[test]
    fn a_limited_subset_is_stratified_by_answer_and_reproducible() {
        let items: Vec<Item> = (0..100).map(|i| item(i, ["A", "B", "C", "D"][if i < 70 { 0 } else { 1 + i % 3 }])).collect();
        let chosen = select_items(&items, Some(8), 3);
        assert_eq!(chosen.len(), 8);
        let count = |a: &str| chosen.iter().filter(|i| i.answer == a).count();
        assert_eq!((count("A"), count("B"), count("C"), count("D")), (2, 2, 2, 2));
        assert_eq!(select_items(&items, Some(8), 3), chosen, "same seed, same subset");
        assert_ne!(select_items(&items, Some(8), 4), chosen, "another seed, another subset");
        let shots = shot_pool(&items, &chosen, 3, 3);
        assert!(shots.iter().all(|s| !chosen.iter().any(|c| c.index == s.index)), "shots overlap the evaluated items");
    }
}
