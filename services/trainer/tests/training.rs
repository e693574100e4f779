//! End-to-end runs of the trainer on tiny models made by `init`: the loop learns, resumes
//! exactly, masks what it should, and refuses bad input without writing anything.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use lathe_trainer::init::{init_model, Arch, InitOptions, Preset};
use lathe_trainer::train::train_config::QuantizationSetting;
use lathe_trainer::train::{self, Event, Hooks, Method, Outcome, TrainConfig};

fn tiny_model(dir: &Path, arch: Arch) -> PathBuf {
    let out = dir.join(format!("model-{arch}"));
    init_model(&InitOptions { arch, preset: Preset::Tiny, seed: 0, out: out.clone() }).expect("init tiny model");
    out
}

fn chat_file(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("train.jsonl");
    let mut text = String::new();
    for i in 0..n {
        let cwe = [79, 89, 22, 787][i % 4];
        text.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"system\",\"content\":\"You map CVEs to CWEs.\"}},{{\"role\":\"user\",\"content\":\"CVE description {i}: a flaw in component {} allows attackers to do things.\"}},{{\"role\":\"assistant\",\"content\":\"CWE-{cwe}\"}}]}}\n",
            i * 7 % 13
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn config(model: &Path, train_file: &Path, out: &Path) -> TrainConfig {
    let mut c: TrainConfig = toml::from_str(&format!(
        "model = {model:?}\ntrain_file = {train_file:?}\noutput_dir = {out:?}\nseed = 3\n\
         [data]\nmax_seq_length = 64\n[lora]\nrank = 4\nalpha = 8.0\n\
         [optim]\nlearning_rate = 5e-3\nwarmup_steps = 1\nweight_decay = 0.01\n\
         [train]\nbatch_size = 2\ngradient_accumulation_steps = 2\ndtype = \"fp32\"\ndevice = \"cpu\"\nthreads = 1\n"
    ))
    .unwrap();
    c.train.max_steps = Some(8);
    c
}

/// Runs to completion or until `stop_after` steps; returns (step, loss) pairs and the outcome.
fn run_collecting(config: &TrainConfig, resume: Option<&Path>, stop_after: Option<u64>) -> (Vec<(u64, f64)>, Outcome) {
    let losses = RefCell::new(Vec::new());
    let mut on_event = |e: &Event| {
        if let Event::Step(m) = e {
            losses.borrow_mut().push((m.step, m.loss));
        }
    };
    let should_stop = || stop_after.is_some_and(|n| losses.borrow().len() as u64 >= n);
    let outcome = train::run(config, resume, Hooks { on_event: &mut on_event, should_stop: &should_stop, abandon: &|| false })
        .expect("training runs");
    (losses.into_inner(), outcome)
}

#[test]
fn lora_training_lowers_the_loss_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let data = chat_file(dir.path(), 16);
    let out = dir.path().join("run");
    let mut c = config(&model, &data, &out);
    c.train.max_steps = Some(12);
    c.train.epochs = 3;
    let (losses, outcome) = run_collecting(&c, None, None);
    assert_eq!(losses.len(), 12);
    let (first, last) = (losses[0].1, losses[11].1);
    assert!(last < first * 0.8, "loss should fall: first {first}, last {last}");
    let Outcome::Finished { adapter_dir: Some(adapter), results_csv, .. } = outcome else { panic!("expected a finished run") };
    assert!(adapter.join("adapter_config.json").is_file() && adapter.join("adapter_model.safetensors").is_file());
    let csv = std::fs::read_to_string(results_csv).unwrap();
    assert!(csv.starts_with("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n"));
    assert_eq!(csv.lines().count(), 13);
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_losses_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Llama);
    let data = chat_file(dir.path(), 20);
    let mut straight = config(&model, &data, &dir.path().join("straight"));
    straight.lora.dropout = 0.1; // dropout masks must be replayed too
    let (expected, _) = run_collecting(&straight, None, None);

    let mut interrupted = straight.clone();
    interrupted.output_dir = dir.path().join("interrupted");
    let (before, outcome) = run_collecting(&interrupted, None, Some(3));
    let Outcome::Stopped { step: 3, checkpoint: Some(checkpoint) } = outcome else { panic!("expected a stop at step 3, got {outcome:?}") };
    let (after, _) = run_collecting(&interrupted, Some(&checkpoint), None);

    let resumed: Vec<(u64, f64)> = before.into_iter().chain(after).collect();
    assert_eq!(resumed.len(), expected.len());
    for ((step, a), (_, b)) in expected.iter().zip(&resumed) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {step}: uninterrupted {a} vs resumed {b}");
    }
    let csv = std::fs::read_to_string(interrupted.output_dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), expected.len() + 1, "results.csv keeps the steps before the checkpoint");
}

#[test]
fn qlora_lowers_the_loss_differs_from_lora_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let data = chat_file(dir.path(), 16);
    let mut qlora = config(&model, &data, &dir.path().join("qlora"));
    qlora.quantization = Some(QuantizationSetting::Nf4);
    qlora.train.epochs = 2;
    qlora.train.gradient_checkpointing = true; // the recomputed layers go through Nf4Matmul twice
    let (expected, outcome) = run_collecting(&qlora, None, None);
    assert!(expected[7].1 < expected[0].1 * 0.9, "QLoRA loss should fall: {expected:?}");
    assert!(matches!(outcome, Outcome::Finished { adapter_dir: Some(_), .. }));
    let mut lora_config = config(&model, &data, &dir.path().join("lora"));
    lora_config.train.epochs = 2;
    let (lora, _) = run_collecting(&lora_config, None, None);
    let moved = (lora[0].1 - expected[0].1).abs();
    assert!(moved > 1e-6 && moved < 0.05 * lora[0].1, "4-bit base should shift the first loss a little, moved {moved}");

    let mut interrupted = qlora.clone();
    interrupted.output_dir = dir.path().join("interrupted");
    let (before, outcome) = run_collecting(&interrupted, None, Some(3));
    let Outcome::Stopped { checkpoint: Some(checkpoint), .. } = outcome else { panic!("expected a stop, got {outcome:?}") };
    let (after, _) = run_collecting(&interrupted, Some(&checkpoint), None);
    for ((step, a), (_, b)) in expected.iter().zip(before.iter().chain(&after)) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {step}: uninterrupted {a} vs resumed {b}");
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_training() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen2);
    let data = chat_file(dir.path(), 12);
    let plain = config(&model, &data, &dir.path().join("plain"));
    let mut recomputed = config(&model, &data, &dir.path().join("recomputed"));
    recomputed.train.gradient_checkpointing = true;
    let (a, _) = run_collecting(&plain, None, None);
    let (b, _) = run_collecting(&recomputed, None, None);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "step {step}: {x} vs {y}");
    }
}

#[test]
fn full_fine_tuning_with_packing_lowers_the_loss_and_writes_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let data = chat_file(dir.path(), 24);
    let mut c = config(&model, &data, &dir.path().join("full"));
    c.method = Method::Full;
    c.data.packing = true;
    c.data.max_seq_length = 128;
    c.optim.learning_rate = 2e-3;
    c.train.max_steps = Some(10);
    c.train.epochs = 10;
    let (losses, outcome) = run_collecting(&c, None, None);
    assert!(losses.last().unwrap().1 < losses[0].1 * 0.8, "{losses:?}");
    let Outcome::Finished { model_dir: Some(model_out), adapter_dir: None, .. } = outcome else { panic!("{outcome:?}") };
    assert!(model_out.join("model.safetensors").is_file() && model_out.join("config.json").is_file());
}

#[test]
fn continued_pretraining_on_raw_text_trains_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let data = dir.path().join("text.jsonl");
    let lines: String =
        (0..10).map(|i| format!("{{\"text\": \"Advisory {i}: buffer overflow in the parser of product {i}.\"}}\n")).collect();
    std::fs::write(&data, lines).unwrap();
    let mut c = config(&model, &data, &dir.path().join("cpt"));
    c.train.max_steps = Some(3);
    let (losses, _) = run_collecting(&c, None, None);
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
}

fn run_error(config: &TrainConfig) -> String {
    let mut on_event = |_: &Event| {};
    let should_stop = || false;
    match train::run(config, None, Hooks { on_event: &mut on_event, should_stop: &should_stop, abandon: &|| false }) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_bad_jsonl_line_is_reported_by_number_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let data = chat_file(dir.path(), 4);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}\n");
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("run");
    let err = run_error(&config(&model, &data, &out));
    assert!(err.contains("train.jsonl:5"), "{err}");
    assert!(!out.exists(), "output_dir must not be created on bad input");
}

#[test]
fn bad_models_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let data = chat_file(dir.path(), 4);

    let pickle = dir.path().join("pickle");
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::copy(model.join("config.json"), pickle.join("config.json")).unwrap();
    std::fs::write(pickle.join("pytorch_model.bin"), b"not really").unwrap();
    let err = run_error(&config(&pickle, &data, &dir.path().join("a")));
    assert!(err.contains("pytorch_model.bin") && err.contains("safetensors"), "{err}");

    let no_config = dir.path().join("empty");
    std::fs::create_dir_all(&no_config).unwrap();
    let err = run_error(&config(&no_config, &data, &dir.path().join("b")));
    assert!(err.contains("config.json"), "{err}");

    let wrong_shape = dir.path().join("wrong");
    std::fs::create_dir_all(&wrong_shape).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, wrong_shape.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = std::fs::read_to_string(wrong_shape.join("config.json")).unwrap();
    std::fs::write(wrong_shape.join("config.json"), cfg.replace("\"intermediate_size\": 176", "\"intermediate_size\": 180")).unwrap();
    let err = run_error(&config(&wrong_shape, &data, &dir.path().join("c")));
    assert!(err.contains("mlp.gate_proj.weight") && err.contains("shape"), "{err}");
    for out in ["a", "b", "c"] {
        assert!(!dir.path().join(out).exists());
    }
}

#[test]
fn impossible_settings_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let data = chat_file(dir.path(), 4);
    let mut c = config(&model, &data, &dir.path().join("run"));
    c.lora.rank = 0;
    assert!(run_error(&c).contains("lora.rank"));
    let mut c = config(&model, &data, &dir.path().join("run"));
    c.optim.learning_rate = 0.0;
    assert!(run_error(&c).contains("optim.learning_rate"));
    let mut c = config(&model, &data, &dir.path().join("run"));
    c.data.max_seq_length = 0;
    assert!(run_error(&c).contains("data.max_seq_length"));
}

fn preference_file(dir: &Path, name: &str, n: usize) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::new();
    for i in 0..n {
        let cwe = [79, 89, 22, 787][i % 4];
        text.push_str(&format!(
            "{{\"input\":{{\"messages\":[{{\"role\":\"user\",\"content\":\"CVE description {i}: a flaw in component {} allows attackers to do things.\"}}]}},\"preferred_output\":[{{\"role\":\"assistant\",\"content\":\"CWE-{cwe}\"}}],\"non_preferred_output\":[{{\"role\":\"assistant\",\"content\":\"I do not know.\"}}]}}\n",
            i * 7 % 13
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// (step, loss, reward margin) of every step.
fn run_dpo(config: &TrainConfig, resume: Option<&Path>, stop_after: Option<u64>) -> (Vec<(u64, f64, f64)>, Vec<f64>, Outcome) {
    let (steps, evals) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
    let mut on_event = |e: &Event| match e {
        Event::Step(m) => steps.borrow_mut().push((m.step, m.loss, m.preference.expect("a DPO step reports rewards").rewards_margin)),
        Event::Eval { valid_loss, .. } => evals.borrow_mut().push(*valid_loss),
        _ => {}
    };
    let should_stop = || stop_after.is_some_and(|n| steps.borrow().len() as u64 >= n);
    let outcome = train::run(config, resume, Hooks { on_event: &mut on_event, should_stop: &should_stop, abandon: &|| false })
        .expect("training runs");
    (steps.into_inner(), evals.into_inner(), outcome)
}

#[test]
fn full_parameter_dpo_starts_at_ln2_learns_and_resumes_bit_for_bit_against_the_step_0_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let mut straight = config(&model, &preference_file(dir.path(), "pairs.jsonl", 16), &dir.path().join("straight"));
    straight.method = Method::Full;
    straight.dpo = Some(train::DpoSettings { beta: 0.1 });
    straight.validation_file = Some(preference_file(dir.path(), "valid.jsonl", 4));
    straight.optim.learning_rate = 1e-3;
    straight.train.eval_every = 4;
    straight.train.epochs = 2; // 16 pairs, 4 a step: 8 steps
    let (expected, valid_losses, _) = run_dpo(&straight, None, None);
    assert!((expected[0].1 - std::f64::consts::LN_2).abs() < 1e-6, "step 1: policy = reference, loss {}", expected[0].1);
    assert!(expected[7].1 < expected[0].1 && expected[7].2 > 0.0, "DPO did not learn: {expected:?}");
    assert_eq!(valid_losses.len(), 2);
    assert!(valid_losses[1] < std::f64::consts::LN_2, "held-out pairs: {valid_losses:?}");

    // Resumed after 3 steps, the run compares against the weights of step 0 (kept in the
    // checkpoint), not the weights it resumed from.
    let mut interrupted = straight.clone();
    interrupted.output_dir = dir.path().join("interrupted");
    let (before, _, outcome) = run_dpo(&interrupted, None, Some(3));
    let Outcome::Stopped { step: 3, checkpoint: Some(checkpoint) } = outcome else { panic!("expected a stop at step 3, got {outcome:?}") };
    assert!(checkpoint.join("reference_logps.safetensors").is_file());
    let (after, _, _) = run_dpo(&interrupted, Some(&checkpoint), None);
    let resumed: Vec<_> = before.into_iter().chain(after).collect();
    assert_eq!(resumed.len(), expected.len());
    for ((step, a, _), (_, b, _)) in expected.iter().zip(&resumed) {
        assert_eq!(a.to_bits(), b.to_bits(), "step {step}: uninterrupted {a} vs resumed {b}");
    }
}

#[test]
fn a_preference_file_needs_dpo_and_dpo_needs_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let pairs = preference_file(dir.path(), "pairs.jsonl", 12);
    let sft = config(&model, &pairs, &dir.path().join("sft"));
    assert!(run_error(&sft).contains("preference pairs train with method = \"dpo\""), "{}", run_error(&sft));
    let mut dpo = config(&model, &chat_file(dir.path(), 12), &dir.path().join("dpo"));
    dpo.method = Method::Dpo;
    assert!(run_error(&dpo).contains("DPO trains on preference pairs, but the file is in chat"), "{}", run_error(&dpo));
}

#[test]
fn qlora_dpo_compares_against_the_4bit_base_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), Arch::Qwen3);
    let mut c = config(&model, &preference_file(dir.path(), "pairs.jsonl", 16), &dir.path().join("qlora-dpo"));
    c.method = Method::Dpo;
    c.quantization = Some(QuantizationSetting::Nf4);
    c.train.epochs = 2;
    let (steps, _, outcome) = run_dpo(&c, None, None);
    assert!((steps[0].1 - std::f64::consts::LN_2).abs() < 1e-6, "step 1 loss {}", steps[0].1);
    assert!(steps[7].1 < steps[0].1 && steps[7].2 > 0.0, "QLoRA DPO did not learn: {steps:?}");
    assert!(matches!(outcome, Outcome::Finished { adapter_dir: Some(_), .. }));
}
