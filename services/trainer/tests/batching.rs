//! Continuous batching ([`lathe_trainer::generate::Batch`]) on a tiny random model: a sequence
//! that joins a running batch, waits behind others, or shares it with sampled and cancelled
//! ones gets the same tokens as alone; a seed fixes a sampled sequence whatever its company.

use std::path::PathBuf;

use lathe_trainer::generate::{generate, Batch, Finish, GenerateOptions, Sampling};
use lathe_trainer::init::{init_model, Arch, InitOptions, Preset};
use lathe_trainer::models::{load_for_inference, SharedBase};
use tch::{Device, Kind};

/// Greedy, with each token's log-probability: it depends on the whole context through
/// attention, so a sequence attending to a wrong or misaligned cache shows even where a tiny
/// random model repeats the same token.
fn greedy(max_new_tokens: usize) -> Sampling {
    Sampling { max_new_tokens, temperature: 0.0, top_p: 1.0, seed: 0, stop_ids: Vec::new(), logprobs: Some(0) }
}

type Out = std::collections::HashMap<u64, Vec<(i64, f64)>>;

fn collect(tokens: Vec<lathe_trainer::generate::Token>, out: &mut Out) {
    for token in tokens {
        out.entry(token.key).or_default().push((token.token, token.logprob.unwrap_or(f64::NAN)));
    }
}

fn assert_same(got: &[(i64, f64)], alone: &[(i64, f64)], what: &str) {
    assert_eq!(got.iter().map(|t| t.0).collect::<Vec<_>>(), alone.iter().map(|t| t.0).collect::<Vec<_>>(), "{what}");
    for (g, a) in got.iter().zip(alone) {
        assert!((g.1 - a.1).abs() < 1e-4, "{what}: log-probability {} alone, {} in the batch", a.1, g.1);
    }
}

/// Runs `batch` to the end, collecting every key's tokens.
fn drain(batch: &mut Batch, decoder: &lathe_trainer::models::decoder::Decoder, out: &mut Out) {
    while !batch.is_empty() {
        collect(batch.step(decoder).unwrap(), out);
    }
}

#[test]
fn sequences_joining_a_running_batch_get_the_tokens_they_get_alone() {
    let dir = std::env::temp_dir().join(format!("lathe-batching-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model: PathBuf = dir.join("tiny");
    init_model(&InitOptions { arch: Arch::Qwen3, preset: Preset::Tiny, seed: 3, out: model.clone() }).unwrap();
    let decoder = load_for_inference(&model, None, Kind::Float, Device::Cpu).unwrap();
    // A decoder built over a shared base gives the same logits as one loaded on its own.
    let shared = SharedBase::read(&model, Kind::Float, Device::Cpu).unwrap().decoder(None).unwrap();

    let prompts: Vec<Vec<i64>> = vec![vec![5, 9, 13, 2, 40, 41], vec![7, 8], vec![100, 3, 3, 3, 3, 3, 3, 3, 3, 9], vec![11]];
    let lengths = [12usize, 5, 9, 7];
    let alone: Vec<Vec<(i64, f64)>> = prompts
        .iter()
        .zip(lengths)
        .map(|(p, n)| {
            let mut lone = Batch::default();
            let mut out = Out::new();
            lone.admit(&decoder, vec![(0, p.clone(), greedy(n))]).unwrap();
            drain(&mut lone, &decoder, &mut out);
            out.remove(&0).unwrap()
        })
        .collect();
    // generate() is the same loop: evaluation and `lathe model generate` see these tokens.
    let generated = generate(&decoder, &prompts[..1], &GenerateOptions { max_new_tokens: lengths[0], ..Default::default() }).unwrap();
    assert_eq!(generated[0], alone[0].iter().map(|t| t.0).collect::<Vec<_>>());

    let mut batch = Batch::default();
    let mut out = Out::new();
    batch.admit(&shared, vec![(0, prompts[0].clone(), greedy(lengths[0])), (1, prompts[1].clone(), greedy(lengths[1]))]).unwrap();
    // Two steps in, a longer prompt joins (the running rows' cache is padded on the left).
    for _ in 0..2 {
        collect(batch.step(&shared).unwrap(), &mut out);
    }
    batch.admit(&shared, vec![(2, prompts[2].clone(), greedy(lengths[2]))]).unwrap();
    for _ in 0..4 {
        collect(batch.step(&shared).unwrap(), &mut out);
    }
    // Sequence 1 (5 tokens) has left; a short one joins (its own cache is padded), with a
    // sampled one that is cancelled after a step.
    let sampled = Sampling { temperature: 0.8, top_p: 0.9, seed: 42, logprobs: None, ..greedy(30) };
    batch.admit(&shared, vec![(3, prompts[3].clone(), greedy(lengths[3])), (9, prompts[1].clone(), sampled.clone())]).unwrap();
    collect(batch.step(&shared).unwrap(), &mut out);
    batch.remove(&[9]);
    drain(&mut batch, &shared, &mut out);
    assert_eq!(out[&9].len(), 1, "a removed sequence makes no more tokens");
    for (key, expected) in alone.iter().enumerate() {
        assert_same(&out[&(key as u64)], expected, &format!("sequence {key}"));
    }

    // A seeded sampled sequence draws the same tokens alone and in company.
    let mut lone = Batch::default();
    let mut lone_out = Out::new();
    lone.admit(&decoder, vec![(0, prompts[1].clone(), sampled.clone())]).unwrap();
    drain(&mut lone, &decoder, &mut lone_out);
    let mut crowd = Batch::default();
    let mut crowd_out = Out::new();
    crowd
        .admit(&decoder, vec![(1, prompts[0].clone(), greedy(3)), (0, prompts[1].clone(), sampled), (2, prompts[2].clone(), greedy(20))])
        .unwrap();
    drain(&mut crowd, &decoder, &mut crowd_out);
    let tokens = |out: &Out| out[&0].iter().map(|t| t.0).collect::<Vec<_>>();
    assert_eq!(tokens(&lone_out), tokens(&crowd_out));
    assert_eq!(lone_out[&0].len(), 30);

    // A stop id ends a sequence with its reason; logprobs come with the most likely first.
    let stop = alone[2][3].0;
    let mut batch = Batch::default();
    batch.admit(&decoder, vec![(0, prompts[2].clone(), Sampling { stop_ids: vec![stop], logprobs: Some(3), ..greedy(12) })]).unwrap();
    let mut last = None;
    while !batch.is_empty() {
        for token in batch.step(&decoder).unwrap() {
            assert_eq!(token.top_logprobs.len(), 3);
            assert_eq!(token.top_logprobs[0].0, token.token, "greedy takes the most likely token");
            assert!((token.logprob.unwrap() - token.top_logprobs[0].1).abs() < 1e-9);
            last = Some(token);
        }
    }
    let last = last.unwrap();
    assert_eq!((last.token, last.finish), (stop, Some(Finish::Stop)));
    std::fs::remove_dir_all(dir).unwrap();
}
