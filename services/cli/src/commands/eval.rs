//! `lathe eval`: run a model (or base + adapter) on CTIBench, score stored answers, and check
//! training data for contamination.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use lathe_eval::contamination::{check_file, write_filtered, Reason};
use lathe_eval::ctibench::{load, read_tsv};
use lathe_eval::score::score;
use lathe_eval::Benchmark;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Evaluate a model (optionally with a LoRA adapter) on CTIBench benchmarks.
    Run(Box<RunArgs>),
    /// Two result files of `eval run --out` side by side: accuracy, and on the items both
    /// evaluated, how many only one got right (with McNemar's exact test).
    Compare { a: PathBuf, b: PathBuf },
    /// Score stored answers (one per line of a TSV column, row-aligned with the benchmark),
    /// e.g. the CTIBench authors' responses/cti-mcq-responses.tsv.
    Score {
        /// cti-mcq, cti-rcm or cti-rcm-2021.
        #[arg(long)]
        benchmark: String,
        /// The CTIBench data directory (it is CC BY-NC-SA 4.0: Lathe does not ship it).
        #[arg(long)]
        data_dir: PathBuf,
        /// TSV with a header; one answer per row [default: DATA_DIR/responses/BENCHMARK-responses.tsv].
        #[arg(long)]
        responses: Option<PathBuf>,
        /// The column of answers to score.
        #[arg(long)]
        column: String,
        /// Leave unparsable answers out of the denominator instead of counting them wrong.
        #[arg(long)]
        skip_unparsable: bool,
        /// Print the result (with per-item predictions) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a JSONL training file against evaluation sets (same description, same CVE id,
    /// long n-gram overlap) and optionally write it without the overlapping rows.
    Contamination {
        #[arg(long)]
        training_file: PathBuf,
        /// Benchmarks to protect, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "cti-rcm,cti-rcm-2021")]
        benchmarks: Vec<String>,
        #[arg(long)]
        data_dir: PathBuf,
        /// Write the training file without the flagged rows here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Benchmarks, comma-separated: cti-mcq, cti-rcm, cti-rcm-2021, and `file` (the JSONL of --file).
    #[arg(long, value_delimiter = ',', default_value = "cti-mcq,cti-rcm")]
    benchmarks: Vec<String>,
    /// The CTIBench data directory (CC BY-NC-SA 4.0: Lathe does not ship it).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Your own validation set (JSONL, chat or prompt/completion; the last answer is expected)
    /// for the `file` benchmark.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Extraction rule: rcm-last-cwe, mcq-last-line-letter or exact-match [default: the
    /// benchmark's; exact-match for `file`].
    #[arg(long)]
    rule: Option<String>,
    /// Evaluate this many items, stratified by answer (a quick run) [default: all].
    #[arg(long)]
    limit: Option<usize>,
    /// k-shot: this many solved items (outside the evaluated ones) before each question.
    #[arg(long, default_value_t = 0)]
    shots: usize,
    /// Seeds the subset and the shots.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A system prompt before the turns.
    #[arg(long)]
    system: Option<String>,
    /// generate (greedy, then extract) or likelihood (MCQ: best of A-D by next-token probability).
    #[arg(long, default_value = "generate")]
    mode: String,
    /// Answer length limit [default: the benchmark's own budget, recorded in the result's protocol].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Leave unparsable answers out of the denominator instead of counting them wrong.
    #[arg(long)]
    skip_unparsable: bool,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// libtorch CPU threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Write every result (protocol, per-item predictions and raw outputs) here as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn run_model(args: RunArgs) -> anyhow::Result<()> {
    use lathe_trainer::evaluate::{run, EvalRequest, Mode, Protocol};
    let mode = match args.mode.as_str() {
        "generate" => Mode::Generate,
        "likelihood" => Mode::Likelihood,
        other => anyhow::bail!("--mode: {other:?} is neither generate nor likelihood"),
    };
    let benchmarks = args.benchmarks.iter().map(|b| b.parse::<Benchmark>()).collect::<Result<Vec<_>, _>>()?;
    let rule = match &args.rule {
        Some(name) => Some(
            lathe_eval::extract::Rule::parse(name)
                .with_context(|| format!("--rule: unknown rule {name:?}; known: {}", lathe_eval::extract::Rule::names()))?,
        ),
        None => None,
    };
    // Every benchmark's items before the model loads: a bad file fails in a second, not after.
    let mut loaded = Vec::new();
    for &benchmark in &benchmarks {
        let items = if benchmark == Benchmark::File {
            let file = args.file.as_ref().context("--file: the `file` benchmark needs your JSONL validation set")?;
            lathe_eval::chat_file::load(file)?
        } else {
            let dir = args.data_dir.as_ref().context("--data-dir: the CTIBench data directory is needed for the cti-* benchmarks")?;
            anyhow::ensure!(dir.is_dir(), "--data-dir {}: not a directory (the CTIBench data directory)", dir.display());
            load(benchmark, dir)?
        };
        loaded.push((benchmark, items));
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads as i32);
    }
    let dev = lathe_trainer::device::parse_device(&args.device)?;
    let kind = lathe_trainer::device::resolve_dtype(&args.dtype, dev)?;
    let decoder = lathe_trainer::models::load_for_inference(&args.model, args.adapter.as_deref(), kind, dev)?;
    let mut results = Vec::new();
    for (benchmark, items) in loaded {
        let protocol = Protocol {
            benchmark,
            mode,
            system_prompt: args.system.clone(),
            shots: args.shots,
            seed: args.seed,
            limit: args.limit,
            max_new_tokens: args.max_new_tokens.unwrap_or(benchmark.default_max_new_tokens() as usize),
            decoding: if mode == Mode::Generate { "greedy" } else { "likelihood" },
            rule: rule.unwrap_or_else(|| benchmark.rule()),
            unparsable_counts_as_wrong: !args.skip_unparsable,
        };
        let bar = indicatif::ProgressBar::new(0).with_prefix(benchmark.name());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix:<13} [{bar:30}] {pos}/{len} items · {elapsed_precise}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        let mut progress = |done: usize, all: usize| {
            bar.set_length(all as u64);
            bar.set_position(done as u64);
            true
        };
        let result = run(EvalRequest {
            decoder: &decoder,
            model_dir: &args.model,
            adapter: args.adapter.clone(),
            items: &items,
            protocol,
            batch_size: args.batch_size,
            progress: &mut progress,
        })?;
        bar.finish_and_clear();
        let r = &result.result;
        println!(
            "{}: accuracy {:.4} (95% CI {:.4}-{:.4}), {}/{} correct, {} unparsable, {}-shot {}, {:.2} items/s",
            benchmark.name(),
            r.accuracy,
            r.ci95.0,
            r.ci95.1,
            r.correct,
            r.items,
            r.unparsable,
            args.shots,
            result.protocol.decoding,
            result.items_per_second
        );
        results.push(result);
    }
    if let Some(out) = &args.out {
        let tmp = out.with_extension("json.part");
        std::fs::write(&tmp, serde_json::to_string_pretty(&results)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
        println!("results with per-item predictions: {}", out.display());
    }
    Ok(())
}

fn compare(a: &std::path::Path, b: &std::path::Path) -> anyhow::Result<()> {
    let read = |path: &std::path::Path| -> anyhow::Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a result file of `lathe eval run --out`", path.display()))
    };
    let (a_results, b_results) = (read(a)?, read(b)?);
    let name = |r: &serde_json::Value| r["protocol"]["benchmark"].as_str().unwrap_or("?").to_string();
    println!("{:<13} {:>24} {:>24} {:>7}  only A / only B / both (McNemar p)", "benchmark", "A", "B", "B - A");
    for ra in &a_results {
        let Some(rb) = b_results.iter().find(|rb| name(rb) == name(ra)) else { continue };
        let cell = |r: &serde_json::Value| {
            let s = &r["result"];
            format!(
                "{:.4} [{:.3}-{:.3}]",
                s["accuracy"].as_f64().unwrap_or(0.0),
                s["ci95"][0].as_f64().unwrap_or(0.0),
                s["ci95"][1].as_f64().unwrap_or(0.0)
            )
        };
        let correct = |r: &serde_json::Value| -> std::collections::HashMap<u64, bool> {
            r["result"]["predictions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| (p["index"].as_u64().unwrap_or(0), p["correct"].as_bool().unwrap_or(false)))
                .collect()
        };
        let (ca, cb) = (correct(ra), correct(rb));
        let (mut only_a, mut only_b, mut both) = (0u64, 0u64, 0u64);
        for (index, a_right) in &ca {
            let Some(b_right) = cb.get(index) else { continue };
            match (a_right, b_right) {
                (true, false) => only_a += 1,
                (false, true) => only_b += 1,
                (true, true) => both += 1,
                _ => {}
            }
        }
        let delta = rb["result"]["accuracy"].as_f64().unwrap_or(0.0) - ra["result"]["accuracy"].as_f64().unwrap_or(0.0);
        println!(
            "{:<13} {:>24} {:>24} {:>+7.4}  {only_a} / {only_b} / {both} (p = {:.3})",
            name(ra),
            cell(ra),
            cell(rb),
            delta,
            lathe_eval::score::mcnemar_exact(only_a, only_b)
        );
        if ra["protocol"] != rb["protocol"] {
            println!("{:<13} note: the protocols differ ({} vs {})", "", ra["protocol"], rb["protocol"]);
        }
    }
    Ok(())
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Run(args) => run_model(*args)?,
        EvalCommand::Compare { a, b } => compare(&a, &b)?,
        EvalCommand::Score { benchmark, data_dir, responses, column, skip_unparsable, json } => {
            let benchmark: Benchmark = benchmark.parse()?;
            let items = load(benchmark, &data_dir)?;
            let path = responses.unwrap_or_else(|| lathe_eval::ctibench::responses_file(benchmark, &data_dir));
            let (header, rows) = read_tsv(&path)?;
            let index = header
                .iter()
                .position(|h| h == &column)
                .with_context(|| format!("{}: no column {column:?} (columns: {})", path.display(), header.join(", ")))?;
            anyhow::ensure!(rows.len() == items.len(), "{}: {} rows, the benchmark has {}", path.display(), rows.len(), items.len());
            let outputs: Vec<String> = rows.into_iter().map(|(_, cells)| cells[index].clone()).collect();
            let scored = score(benchmark, &items, &outputs, !skip_unparsable);
            if json {
                println!("{}", serde_json::to_string_pretty(&scored)?);
            } else {
                println!(
                    "{} {column}: accuracy {:.4} (95% CI {:.4}-{:.4}), {}/{} correct, {} unparsable ({}), rule {}",
                    benchmark.name(),
                    scored.accuracy,
                    scored.ci95.0,
                    scored.ci95.1,
                    scored.correct,
                    scored.items,
                    scored.unparsable,
                    if scored.unparsable_counts_as_wrong { "counted wrong" } else { "left out" },
                    scored.rule
                );
            }
        }
        EvalCommand::Contamination { training_file, benchmarks, data_dir, out } => {
            let parsed = benchmarks.iter().map(|b| b.parse::<Benchmark>()).collect::<Result<Vec<_>, _>>()?;
            let items = lathe_eval::ctibench::load_all(&parsed, &data_dir)?;
            let report = check_file(&training_file, &items)?;
            println!(
                "{}: {} of {} rows overlap {} (description {}, CVE id {}, {}-gram {}), covering {} of {} items",
                training_file.display(),
                report.overlaps.len(),
                report.training_rows,
                benchmarks.join("+"),
                report.count(Reason::Description),
                report.count(Reason::CveId),
                lathe_eval::contamination::NGRAM,
                report.count(Reason::Ngram),
                report.items_covered,
                report.items
            );
            if let Some(out) = out {
                let kept = write_filtered(&training_file, &report, &out)?;
                println!("wrote {kept} rows to {}", out.display());
            }
        }
    }
    Ok(())
}
