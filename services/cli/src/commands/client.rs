//! `lathe files …` and `lathe jobs …`: a client of the REST API (the same one the `openai`
//! SDK speaks), with a live progress bar for a running job.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::blocking::{multipart, Client, RequestBuilder};
use serde_json::{json, Value};

#[derive(Args, Clone)]
pub struct Api {
    /// The API's base URL.
    #[arg(long, env = "LATHE_API_URL", default_value = "http://127.0.0.1:8080/v1")]
    api_url: String,
    /// API key (`lathe admin create-key`).
    #[arg(long, env = "LATHE_API_KEY", hide_env_values = true)]
    api_key: String,
}

impl Api {
    pub(crate) fn client(&self) -> anyhow::Result<ApiClient> {
        let http = Client::builder().timeout(Duration::from_secs(300)).build()?;
        Ok(ApiClient { http, base: self.api_url.trim_end_matches('/').to_string(), key: self.api_key.clone() })
    }
}

pub(crate) struct ApiClient {
    http: Client,
    base: String,
    key: String,
}

impl ApiClient {
    pub(crate) fn send(&self, request: RequestBuilder) -> anyhow::Result<reqwest::blocking::Response> {
        let response = request.bearer_auth(&self.key).send().context("calling the Lathe API")?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("(no message)");
        match body["error"]["param"].as_str() {
            Some(param) => bail!("{status}: {message} (param: {param})"),
            None => bail!("{status}: {message}"),
        }
    }

    pub(crate) fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.send(self.http.get(format!("{}{path}", self.base)))?.json()?)
    }

    pub(crate) fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self.send(self.http.post(format!("{}{path}", self.base)).json(body))?.json()?)
    }

    fn upload(&self, path: &Path) -> anyhow::Result<Value> {
        let form = multipart::Form::new()
            .text("purpose", "fine-tune")
            .file("file", path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(self.send(self.http.post(format!("{}/files", self.base)).multipart(form))?.json()?)
    }

    /// A file id as given, or the id of `path` uploaded now.
    pub(crate) fn file_id(&self, file: &str) -> anyhow::Result<String> {
        if file.starts_with("file-") && !Path::new(file).exists() {
            return Ok(file.to_string());
        }
        let uploaded = self.upload(Path::new(file))?;
        let id = uploaded["id"].as_str().context("upload returned no id")?.to_string();
        eprintln!("uploaded {file} as {id}");
        Ok(id)
    }
}

#[derive(Subcommand)]
pub enum FilesCommand {
    /// Upload a JSONL training or validation file.
    Upload {
        path: PathBuf,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Create a fine-tuning job (uploading local files first).
    Create(CreateArgs),
    /// Follow a job with a progress bar until it ends; download its results.
    Watch {
        job_id: String,
        /// Download the adapter and step_metrics.csv here.
        #[arg(long)]
        download: Option<PathBuf>,
        #[command(flatten)]
        api: Api,
    },
    /// List jobs, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        api: Api,
    },
    /// Show a job as JSON.
    Get {
        job_id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Cancel a job.
    Cancel {
        job_id: String,
        #[command(flatten)]
        api: Api,
    },
    /// Two jobs side by side: their settings, then their loss curves step by step.
    Compare {
        first: String,
        second: String,
        /// Print every step (default: at most 40 rows, evenly spaced, always the last).
        #[arg(long)]
        all_steps: bool,
        #[command(flatten)]
        api: Api,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// Base model name (see GET /v1/models).
    #[arg(long)]
    model: String,
    /// A local JSONL path (uploaded) or a file id.
    #[arg(long)]
    training_file: String,
    #[arg(long)]
    validation_file: Option<String>,
    #[arg(long)]
    suffix: Option<String>,
    #[arg(long)]
    n_epochs: Option<u32>,
    #[arg(long)]
    batch_size: Option<u32>,
    /// Absolute peak learning rate.
    #[arg(long)]
    learning_rate: Option<f64>,
    #[arg(long)]
    lora_rank: Option<u32>,
    #[arg(long)]
    max_seq_length: Option<u32>,
    /// Pack several examples into each row.
    #[arg(long)]
    packing: bool,
    #[arg(long)]
    seed: Option<u64>,
    /// More body fields as a JSON object, e.g. '{"lora": {"alpha": 16}}'.
    #[arg(long)]
    extra: Option<String>,
    /// Follow the job with a progress bar until it ends.
    #[arg(long)]
    watch: bool,
    /// With --watch: download the adapter and step_metrics.csv here.
    #[arg(long)]
    download: Option<PathBuf>,
    #[command(flatten)]
    api: Api,
}

pub fn files(command: FilesCommand) -> anyhow::Result<()> {
    match command {
        FilesCommand::Upload { path, api } => {
            let file = api.client()?.upload(&path)?;
            println!("{}", serde_json::to_string_pretty(&file)?);
        }
    }
    Ok(())
}

pub fn jobs(command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::Create(args) => create(args),
        JobsCommand::Watch { job_id, download, api } => watch(&api.client()?, &job_id, download.as_deref()),
        JobsCommand::List { limit, api } => {
            let page = api.client()?.get(&format!("/fine_tuning/jobs?limit={limit}"))?;
            for job in page["data"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}",
                    job["id"].as_str().unwrap_or(""),
                    job["status"].as_str().unwrap_or(""),
                    job["model"].as_str().unwrap_or(""),
                    job["fine_tuned_model"].as_str().unwrap_or("-")
                );
            }
            Ok(())
        }
        JobsCommand::Get { job_id, api } => {
            println!("{}", serde_json::to_string_pretty(&api.client()?.get(&format!("/fine_tuning/jobs/{job_id}"))?)?);
            Ok(())
        }
        JobsCommand::Compare { first, second, all_steps, api } => super::compare::compare(&api.client()?, [&first, &second], all_steps),
        JobsCommand::Cancel { job_id, api } => {
            let job = api.client()?.post(&format!("/fine_tuning/jobs/{job_id}/cancel"), &json!({}))?;
            println!("{} {}", job["id"].as_str().unwrap_or(""), job["status"].as_str().unwrap_or(""));
            Ok(())
        }
    }
}

fn create(args: CreateArgs) -> anyhow::Result<()> {
    let client = args.api.client()?;
    let mut body = json!({"model": args.model, "training_file": client.file_id(&args.training_file)?});
    if let Some(v) = &args.validation_file {
        body["validation_file"] = json!(client.file_id(v)?);
    }
    let mut hyper = serde_json::Map::new();
    if let Some(n) = args.n_epochs {
        hyper.insert("n_epochs".into(), json!(n));
    }
    if let Some(b) = args.batch_size {
        hyper.insert("batch_size".into(), json!(b));
    }
    if !hyper.is_empty() {
        body["hyperparameters"] = Value::Object(hyper);
    }
    for (key, value) in [
        ("suffix", args.suffix.as_ref().map(|s| json!(s))),
        ("learning_rate", args.learning_rate.map(|v| json!(v))),
        ("lora", args.lora_rank.map(|r| json!({"rank": r}))),
        ("max_seq_length", args.max_seq_length.map(|v| json!(v))),
        ("packing", args.packing.then_some(json!(true))),
        ("seed", args.seed.map(|v| json!(v))),
    ] {
        set_present(&mut body, key, value);
    }
    if let Some(extra) = &args.extra {
        let extra: Value = serde_json::from_str(extra).context("--extra must be a JSON object")?;
        let map = extra.as_object().context("--extra must be a JSON object")?;
        for (k, v) in map {
            body[k.as_str()] = v.clone();
        }
    }
    let job = client.post("/fine_tuning/jobs", &body)?;
    let id = job["id"].as_str().context("create returned no id")?.to_string();
    eprintln!("created {id} ({})", job["status"].as_str().unwrap_or(""));
    if let Some(line) = training_data_line(&job["lathe"]["training_data"]) {
        eprintln!("{line}");
    }
    if args.watch {
        watch(&client, &id, args.download.as_deref())
    } else {
        println!("{id}");
        Ok(())
    }
}

/// What the server's create check found in the training data, when truncation costs anything.
fn training_data_line(data: &Value) -> Option<String> {
    let count = |key: &str| data[key].as_u64().unwrap_or(0);
    let (examples, truncated, dropped) = (count("examples"), count("truncated"), count("dropped"));
    (truncated > 0).then(|| {
        format!(
            "warning: {truncated} of {examples} training examples are longer than max_seq_length {} and are truncated; \
             {dropped} of them lose every trained token and are dropped",
            count("max_seq_length")
        )
    })
}

/// Sets `key` in a request body when the flag was given.
pub(crate) fn set_present(body: &mut Value, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        body[key] = value;
    }
}

/// Polls the job and its metric curve once a second and draws them; on success prints the
/// fine-tuned model's name and downloads its result files.
fn watch(client: &ApiClient, job_id: &str, download: Option<&Path>) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:<9} [{bar:30}] {pos}/{len} steps · {msg} · {elapsed_precise}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    // Without a terminal (CI logs, pipes) the bar is hidden: print a line per few steps instead.
    let plain = bar.is_hidden();
    let mut printed = (String::new(), 0u64);
    let job = loop {
        let job = client.get(&format!("/fine_tuning/jobs/{job_id}"))?;
        let status = job["status"].as_str().unwrap_or("").to_string();
        bar.set_prefix(status.clone());
        let metrics = client.get(&format!("/fine_tuning/jobs/{job_id}/metrics"))?;
        if let Some(last) = metrics["data"].as_array().and_then(|d| d.last()) {
            bar.set_length(last["total_steps"].as_u64().unwrap_or(0));
            bar.set_position(last["step"].as_u64().unwrap_or(0));
            let loss = |v: &Value| v.as_f64().map_or("-".to_string(), |l| format!("{l:.4}"));
            let valid = metrics["data"].as_array().and_then(|d| d.iter().rev().find(|p| p["valid_loss"].is_number()));
            let mut message = format!("loss {}", loss(&last["train_loss"]));
            if let Some(v) = valid {
                message.push_str(&format!(" · valid {}", loss(&v["valid_loss"])));
            }
            if let Some(tps) = last["tokens_per_second"].as_f64() {
                message.push_str(&format!(" · {tps:.0} tok/s"));
            }
            let step = last["step"].as_u64().unwrap_or(0);
            if plain && (status != printed.0 || step >= printed.1 + 10) {
                eprintln!("{status} step {step}/{} {message}", last["total_steps"].as_u64().unwrap_or(0));
                printed = (status.clone(), step);
            }
            bar.set_message(message);
        } else if plain && status != printed.0 {
            eprintln!("{status}");
            printed = (status.clone(), 0);
        }
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            break job;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    bar.finish();
    match job["status"].as_str() {
        Some("succeeded") => {
            println!("fine-tuned model: {}", job["fine_tuned_model"].as_str().unwrap_or(""));
            if let Some(dir) = download {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                for id in job["result_files"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                    let meta = client.get(&format!("/files/{id}"))?;
                    let name = meta["filename"].as_str().unwrap_or(id);
                    // The server's filename is a plain name, but never trust it as a path.
                    let name = Path::new(name).file_name().map_or(id.into(), |n| n.to_string_lossy().to_string());
                    let bytes = client.send(client.http.get(format!("{}/files/{id}/content", client.base)))?.bytes()?;
                    std::fs::write(dir.join(&name), &bytes).with_context(|| format!("writing {}", dir.join(&name).display()))?;
                }
                println!("adapter: {}", dir.display());
            }
            Ok(())
        }
        Some(status) => {
            let error = &job["error"];
            bail!("job {job_id} {status}: {}", error["message"].as_str().unwrap_or("(no error message)"))
        }
        None => bail!("job {job_id}: no status"),
    }
}
