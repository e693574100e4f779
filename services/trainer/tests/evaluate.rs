//! Evaluation runs of a tiny model on the real CTIBench files (../shared/datasets, read in
//! place): the protocol is recorded, per-item outputs are kept, subsets are stratified, and
//! batched greedy answers are the answers each item gets alone.

use std::path::{Path, PathBuf};

use lathe_eval::Benchmark;
use lathe_trainer::evaluate::{run, EvalRequest, EvalResult, Mode, Protocol};
use lathe_trainer::init::{init_model, Arch, InitOptions, Preset};
use lathe_trainer::models::load_for_inference;
use tch::{Device, Kind};

fn ctibench() -> PathBuf {
    let dir = std::env::var_os("LATHE_SHARED_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets"))
        .join("ctibench");
    assert!(dir.join("cti-mcq.tsv").is_file(), "CTIBench not found at {} (set LATHE_SHARED_DATASETS)", dir.display());
    dir
}

fn protocol(benchmark: Benchmark, mode: Mode, limit: usize) -> Protocol {
    Protocol {
        benchmark,
        mode,
        system_prompt: None,
        shots: 0,
        seed: 1,
        limit: Some(limit),
        max_new_tokens: 12,
        decoding: "greedy",
        rule: benchmark.rule(),
        unparsable_counts_as_wrong: true,
    }
}

fn evaluate(model: &Path, protocol: Protocol, batch_size: usize) -> EvalResult {
    let decoder = load_for_inference(model, None, Kind::Float, Device::Cpu).unwrap();
    let items = lathe_eval::ctibench::load(protocol.benchmark, &ctibench()).unwrap();
    let mut calls = Vec::new();
    let result = run(EvalRequest {
        decoder: &decoder,
        model_dir: model,
        adapter: None,
        items: &items,
        protocol,
        batch_size,
        progress: &mut |done, all| {
            calls.push((done, all));
            true
        },
    })
    .unwrap();
    assert_eq!(calls.last().map(|&(d, a)| d == a), Some(true), "progress ends at all items: {calls:?}");
    result
}

#[test]
fn a_run_keeps_its_protocol_and_every_item_and_batching_changes_no_answer() {
    let dir = tempdir();
    let model = dir.join("tiny");
    init_model(&InitOptions { arch: Arch::Qwen3, preset: Preset::Tiny, seed: 0, out: model.clone() }).unwrap();

    let batched = evaluate(&model, protocol(Benchmark::CtiRcm, Mode::Generate, 12), 5);
    let single = evaluate(&model, protocol(Benchmark::CtiRcm, Mode::Generate, 12), 1);
    let r = &batched.result;
    assert_eq!((r.items, r.predictions.len()), (12, 12));
    assert_eq!(r.rule, "rcm-last-cwe");
    assert!(r.predictions.iter().all(|p| !p.output.is_empty()), "raw outputs are kept");
    let outputs = |e: &EvalResult| e.result.predictions.iter().map(|p| (p.index, p.output.clone())).collect::<Vec<_>>();
    assert_eq!(outputs(&batched), outputs(&single), "left padding changed an answer");
    assert!(batched.protocol.limit == Some(12) && batched.protocol.decoding == "greedy");

    let mcq = evaluate(&model, protocol(Benchmark::CtiMcq, Mode::Likelihood, 20), 8);
    let answers: std::collections::BTreeSet<&str> = mcq.result.predictions.iter().map(|p| p.expected.as_str()).collect();
    assert_eq!(answers.len(), 4, "a stratified subset of 20 covers all four answers");
    assert_eq!(mcq.result.unparsable, 0, "likelihood mode always answers a letter");
    assert_eq!(mcq.result.correct, mcq.result.predictions.iter().filter(|p| p.extracted.as_deref() == Some(p.expected.as_str())).count());
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lathe-eval-run-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
