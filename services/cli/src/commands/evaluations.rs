//! `lathe evaluations …` (alias `evals`): evaluations on a Lathe server (`/v1/evaluations`) — create one and follow
//! it with a progress bar, list them per model or job, show one, save its per-item predictions,
//! cancel. `lathe eval run` does the same on this machine without a server.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::client::{set_present, Api, ApiClient};

#[derive(Subcommand)]
pub enum EvalsCommand {
    /// Evaluate a base or fine-tuned model on a benchmark on the server.
    Create(CreateArgs),
    /// Follow an evaluation until it ends and print its score.
    Watch {
        evaluation_id: String,
        #[command(flatten)]
        api: Api,
    },
    /// List evaluations, newest first.
    List {
        /// Only this model's (a base model or ft:…).
        #[arg(long)]
        model: Option<String>,
        /// Only those of this fine-tuning job's model.
        #[arg(long)]
        job: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        api: Api,
    },
    /// Show an evaluation as JSON (protocol, progress, score).
    Get {
        evaluation_id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Write every item's prediction and raw output as JSONL (to stdout without --out).
    Items {
        evaluation_id: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        api: Api,
    },
    /// Two evaluations side by side (two models, or two protocols): accuracy with intervals, and
    /// on the items both evaluated, how many only one got right (McNemar's exact test).
    Compare {
        a: String,
        b: String,
        #[command(flatten)]
        api: Api,
    },
    /// Cancel a queued or running evaluation.
    Cancel {
        evaluation_id: String,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// A base model (GET /v1/models) or a fine-tuned ft:… model.
    #[arg(long)]
    model: String,
    /// cti-mcq, cti-rcm, cti-rcm-2021, or file (your own JSONL validation set, see --file).
    #[arg(long)]
    benchmark: String,
    /// For `--benchmark file`: a local JSONL path (uploaded) or a file id.
    #[arg(long)]
    file: Option<String>,
    /// Evaluate this many items, stratified by answer [default: all].
    #[arg(long)]
    limit: Option<u32>,
    /// k-shot: solved items from outside the evaluated ones before each question.
    #[arg(long)]
    shots: Option<u32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    system: Option<String>,
    /// generate, or likelihood (cti-mcq: the best of A-D by next-token probability).
    #[arg(long)]
    mode: Option<String>,
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// rcm-last-cwe, mcq-last-line-letter or exact-match [default: the benchmark's].
    #[arg(long)]
    extraction: Option<String>,
    /// Leave unparsable answers out of the denominator instead of counting them wrong.
    #[arg(long)]
    skip_unparsable: bool,
    /// Follow it until it ends and print the score.
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    api: Api,
}

pub fn run(command: EvalsCommand) -> anyhow::Result<()> {
    match command {
        EvalsCommand::Create(args) => create(args),
        EvalsCommand::Watch { evaluation_id, api } => watch(&api.client()?, &evaluation_id),
        EvalsCommand::List { model, job, limit, api } => {
            let mut path = format!("/evaluations?limit={limit}");
            for (key, value) in [("model", model), ("fine_tuning_job", job)] {
                if let Some(value) = value {
                    path.push_str(&format!("&{key}={}", encode(&value)));
                }
            }
            let page = api.client()?.get(&path)?;
            for e in page["data"].as_array().into_iter().flatten() {
                let score = e["result"]["accuracy"].as_f64().map_or("-".to_string(), |a| format!("{a:.4}"));
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    e["id"].as_str().unwrap_or(""),
                    e["status"].as_str().unwrap_or(""),
                    e["benchmark"].as_str().unwrap_or(""),
                    e["model"].as_str().unwrap_or(""),
                    score
                );
            }
            Ok(())
        }
        EvalsCommand::Get { evaluation_id, api } => {
            println!("{}", serde_json::to_string_pretty(&api.client()?.get(&format!("/evaluations/{evaluation_id}"))?)?);
            Ok(())
        }
        EvalsCommand::Compare { a, b, api } => compare(&api.client()?, &a, &b),
        EvalsCommand::Items { evaluation_id, out, api } => {
            let client = api.client()?;
            let mut sink: Box<dyn Write> = match &out {
                Some(path) => Box::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?),
                None => Box::new(std::io::stdout().lock()),
            };
            let items = all_items(&client, &evaluation_id)?;
            for item in &items {
                writeln!(sink, "{item}")?;
            }
            let count = items.len();
            if let Some(path) = out {
                eprintln!("{count} items written to {}", path.display());
            }
            Ok(())
        }
        EvalsCommand::Cancel { evaluation_id, api } => {
            let e = api.client()?.post(&format!("/evaluations/{evaluation_id}/cancel"), &json!({}))?;
            println!("{} {}", e["id"].as_str().unwrap_or(""), e["status"].as_str().unwrap_or(""));
            Ok(())
        }
    }
}

/// Every item of an evaluation, following the pages.
fn all_items(client: &ApiClient, id: &str) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let page = client.get(&format!("/evaluations/{id}/items?limit=100{cursor}"))?;
        items.extend(page["data"].as_array().into_iter().flatten().cloned());
        if page["has_more"].as_bool() != Some(true) {
            return Ok(items);
        }
        after = page["last_id"].as_str().map(String::from);
    }
}

fn compare(client: &ApiClient, a: &str, b: &str) -> anyhow::Result<()> {
    let (ea, eb) = (client.get(&format!("/evaluations/{a}"))?, client.get(&format!("/evaluations/{b}"))?);
    for e in [&ea, &eb] {
        anyhow::ensure!(
            e["status"] == "succeeded",
            "{} is {}, not succeeded",
            e["id"].as_str().unwrap_or(""),
            e["status"].as_str().unwrap_or("?")
        );
    }
    let correct = |id: &str| -> anyhow::Result<std::collections::HashMap<u64, bool>> {
        Ok(all_items(client, id)?.iter().map(|i| (i["index"].as_u64().unwrap_or(0), i["correct"].as_bool().unwrap_or(false))).collect())
    };
    let (ca, cb) = (correct(a)?, correct(b)?);
    let (mut only_a, mut only_b, mut both, mut shared) = (0u64, 0u64, 0u64, 0u64);
    for (index, a_right) in &ca {
        let Some(b_right) = cb.get(index) else { continue };
        shared += 1;
        match (a_right, b_right) {
            (true, false) => only_a += 1,
            (false, true) => only_b += 1,
            (true, true) => both += 1,
            _ => {}
        }
    }
    let cell = |e: &Value| {
        let r = &e["result"];
        format!(
            "{:.4} [{:.3}-{:.3}]",
            r["accuracy"].as_f64().unwrap_or(0.0),
            r["ci95"][0].as_f64().unwrap_or(0.0),
            r["ci95"][1].as_f64().unwrap_or(0.0)
        )
    };
    for (label, e) in [("A", &ea), ("B", &eb)] {
        println!(
            "{label}: {} {} on {} — {}",
            e["id"].as_str().unwrap_or(""),
            e["model"].as_str().unwrap_or(""),
            e["benchmark"].as_str().unwrap_or(""),
            cell(e)
        );
    }
    let delta = eb["result"]["accuracy"].as_f64().unwrap_or(0.0) - ea["result"]["accuracy"].as_f64().unwrap_or(0.0);
    println!(
        "B - A: {delta:+.4}; on the {shared} items both evaluated: only A right {only_a}, only B right {only_b}, both {both} (McNemar exact p = {:.3})",
        lathe_eval::score::mcnemar_exact(only_a, only_b)
    );
    if ea["protocol"] != eb["protocol"] {
        println!("note: the protocols differ:\n  A {}\n  B {}", ea["protocol"], eb["protocol"]);
    }
    if ea["benchmark"] != eb["benchmark"] {
        println!("note: different benchmarks; the item-level comparison is meaningless");
    }
    Ok(())
}

/// Query-string escaping for model names (`ft:base:suffix:id`, `Org/Model`).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn create(args: CreateArgs) -> anyhow::Result<()> {
    let client = args.api.client()?;
    let mut body = json!({"model": args.model, "benchmark": args.benchmark});
    if let Some(file) = &args.file {
        body["file"] = json!(client.file_id(file)?);
    }
    for (key, value) in [
        ("limit", args.limit.map(|v| json!(v))),
        ("shots", args.shots.map(|v| json!(v))),
        ("seed", args.seed.map(|v| json!(v))),
        ("system_prompt", args.system.as_ref().map(|v| json!(v))),
        ("mode", args.mode.as_ref().map(|v| json!(v))),
        ("max_new_tokens", args.max_new_tokens.map(|v| json!(v))),
        ("extraction", args.extraction.as_ref().map(|v| json!(v))),
        ("unparsable_counts_as_wrong", args.skip_unparsable.then_some(json!(false))),
    ] {
        set_present(&mut body, key, value);
    }
    let evaluation = client.post("/evaluations", &body)?;
    let id = evaluation["id"].as_str().context("create returned no id")?.to_string();
    eprintln!("created {id} ({})", evaluation["status"].as_str().unwrap_or(""));
    if args.watch {
        watch(&client, &id)
    } else {
        println!("{id}");
        Ok(())
    }
}

fn watch(client: &ApiClient, id: &str) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:<9} [{bar:30}] {pos}/{len} items · {elapsed_precise}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let plain = bar.is_hidden();
    let mut printed = String::new();
    let evaluation = loop {
        let e = client.get(&format!("/evaluations/{id}"))?;
        let status = e["status"].as_str().unwrap_or("").to_string();
        bar.set_prefix(status.clone());
        bar.set_length(e["progress"]["items_total"].as_u64().unwrap_or(0));
        bar.set_position(e["progress"]["items_done"].as_u64().unwrap_or(0));
        if plain && status != printed {
            eprintln!("{status}");
            printed = status.clone();
        }
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            break e;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    bar.finish_and_clear();
    match evaluation["status"].as_str() {
        Some("succeeded") => {
            let r = &evaluation["result"];
            println!(
                "{} on {}: accuracy {:.4} (95% CI {:.4}-{:.4}), {}/{} correct, {} unparsable, rule {}",
                evaluation["model"].as_str().unwrap_or(""),
                evaluation["benchmark"].as_str().unwrap_or(""),
                r["accuracy"].as_f64().unwrap_or(0.0),
                r["ci95"][0].as_f64().unwrap_or(0.0),
                r["ci95"][1].as_f64().unwrap_or(0.0),
                r["correct"],
                r["items"],
                r["unparsable"],
                r["rule"].as_str().unwrap_or("")
            );
            Ok(())
        }
        Some(status) => bail!("evaluation {id} {status}: {}", evaluation["error"]["message"].as_str().unwrap_or("(no error message)")),
        None => bail!("evaluation {id}: no status"),
    }
}
