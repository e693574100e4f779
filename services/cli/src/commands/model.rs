//! `lathe model ...`: make a random model, run a forward pass, merge an adapter, export GGUF,
//! quantize to NF4.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use lathe_trainer::init::{init_model, Arch, InitOptions, Preset};
use lathe_trainer::nf4::{self, Nf4Weight, Quantization};
use lathe_trainer::{checkpoint, device, export, model_dir::ModelDir, models};
use tch::{Device, Kind, Tensor};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a randomly initialised model in the Hugging Face layout (tests, demos, benchmarks).
    Init(InitArgs),
    /// Compute logits for token ids (safetensors in, safetensors out); used by parity tests.
    Forward(ForwardArgs),
    /// Merge a PEFT LoRA adapter into its base model and write a full model directory.
    Merge(MergeArgs),
    /// Write a model (with a fine-tuned adapter merged in) as one GGUF file for llama.cpp and
    /// Ollama: f16, bf16 or q8_0 weights, the tokenizer and the chat template.
    Export(ExportArgs),
    /// Generate from token ids (greedy by default, KV cache); prints the new tokens as JSON.
    Generate(GenerateArgs),
    /// Quantize the decoder's projections to NF4 as a QLoRA run does; writes the 4-bit tensors
    /// under bitsandbytes' names and prints how far the weights moved.
    Quantize(QuantizeArgs),
}

#[derive(Args)]
pub struct QuantizeArgs {
    #[arg(long)]
    model: PathBuf,
    /// safetensors file for the 4-bit tensors: `<weight>` (packed codes), `<weight>.absmax`,
    /// `<weight>.quant_map`, and with double quantization `<weight>.nested_absmax`,
    /// `<weight>.nested_quant_map`, `<weight>.nested_offset`.
    #[arg(long)]
    out: PathBuf,
    /// Keep the per-block scales in fp32 (bitsandbytes' `bnb_4bit_use_double_quant=False`).
    #[arg(long)]
    no_double_quant: bool,
    /// Also write every quantized weight dequantized again, in the checkpoint's dtype.
    #[arg(long)]
    dequantized_out: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The base model directory.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory to merge in (a job's adapter_config.json and
    /// adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The file format; gguf is the one llama.cpp, llama-cpp-python and Ollama read.
    #[arg(long, value_parser = ["gguf"], default_value = "gguf")]
    format: String,
    /// How weight matrices are stored: f16, bf16, or q8_0 (8-bit blocks, ~half of f16's size).
    /// Norms stay f32.
    #[arg(long = "type", value_parser = ["f16", "bf16", "q8_0"], default_value = "f16")]
    weight_type: String,
    /// The model's name inside the file [default: the output file's stem].
    #[arg(long)]
    name: Option<String>,
    /// The .gguf file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// One prompt as comma-separated token ids; repeat for a batch.
    #[arg(long = "input-ids", required = true)]
    input_ids: Vec<String>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Token ids that end a sequence, comma-separated.
    #[arg(long, value_delimiter = ',')]
    stop_ids: Vec<i64>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "fp32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Generate two tokens first, untimed (benchmarks: libtorch initialises kernels on first use).
    #[arg(long)]
    warmup: bool,
}

#[derive(Args)]
pub struct InitArgs {
    /// qwen3, qwen2 or llama
    #[arg(long, default_value = "qwen3")]
    arch: String,
    /// tiny (~0.2M parameters, tests), small (~100M, benchmarks) or 4b (Qwen3-4B's shapes, 8 GB:
    /// memory benchmarks)
    #[arg(long, default_value = "tiny")]
    preset: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct ForwardArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// safetensors file with `input_ids` (int64, batch × seq).
    #[arg(long)]
    input: PathBuf,
    /// safetensors file to write `logits` (float32, batch × seq × vocab) to.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "fp32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `nf4`: hold the decoder's projections in 4-bit NormalFloat, as a QLoRA run trains them.
    #[arg(long, value_parser = ["none", "nf4"], default_value = "none")]
    quantization: String,
    /// With `--quantization nf4`, keep the block scales in fp32.
    #[arg(long)]
    no_double_quant: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Init(args) => init(args),
        ModelCommand::Forward(args) => forward(args),
        ModelCommand::Merge(args) => merge(args),
        ModelCommand::Export(args) => export_file(args),
        ModelCommand::Generate(args) => generate(args),
        ModelCommand::Quantize(args) => quantize(args),
    }
}

fn quantize(args: QuantizeArgs) -> anyhow::Result<()> {
    let dir = ModelDir::open(&args.model)?;
    let kind = models::stored_kind(&dir);
    let double_quant = !args.no_double_quant;
    let (mut packed, mut dequantized) = (Vec::new(), Vec::new());
    let (mut dense_bytes, mut nf4_bytes, mut worst) = (0i64, 0i64, (0.0f64, String::new()));
    // One pass over the checkpoint: each projection quantized as the trainer does at load.
    dir.for_each_tensor(Device::Cpu, kind, |name, before| {
        if !nf4::quantizes(&name) || before.dim() != 2 {
            return Ok(());
        }
        let w = Nf4Weight::quantize(&before, double_quant);
        let back = w.dequantize(kind);
        let rms = |t: &Tensor| t.to_kind(Kind::Float).square().mean(Kind::Float).sqrt();
        let error = (rms(&(&back - &before)) / rms(&before)).double_value(&[]);
        if error > worst.0 {
            worst = (error, name.clone());
        }
        dense_bytes += before.numel() as i64 * before.kind().elt_size_in_bytes() as i64;
        nf4_bytes += w.stored_bytes();
        packed.push((name.clone(), w.packed.view([-1, 1])));
        packed.push((format!("{name}.absmax"), w.absmax.shallow_clone()));
        packed.push((format!("{name}.quant_map"), Tensor::from_slice(&nf4::NF4_LEVELS)));
        if let Some(d) = &w.double {
            packed.push((format!("{name}.nested_absmax"), d.scale.shallow_clone()));
            packed.push((format!("{name}.nested_quant_map"), d.code.shallow_clone()));
            packed.push((format!("{name}.nested_offset"), Tensor::from_slice(&[d.offset])));
        }
        dequantized.push((name, back));
        Ok(())
    })?;
    anyhow::ensure!(!dequantized.is_empty(), "{}: no decoder projections to quantize", args.model.display());
    checkpoint::write_tensors(&args.out, &packed)?;
    if let Some(path) = &args.dequantized_out {
        checkpoint::write_tensors(path, &dequantized)?;
    }
    println!(
        "quantized {} weights to NF4{}: {:.1} MB -> {:.1} MB; relative RMS error worst {:.4} ({})",
        dequantized.len(),
        if double_quant { " with double quantization" } else { "" },
        dense_bytes as f64 / 1e6,
        nf4_bytes as f64 / 1e6,
        worst.0,
        worst.1,
    );
    Ok(())
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let kind = device::parse_dtype(&args.dtype)?;
    let dev = device::parse_device(&args.device)?;
    let decoder = models::load_for_inference(&args.model, args.adapter.as_deref(), kind, dev)?;
    let prompts = args
        .input_ids
        .iter()
        .map(|text| {
            text.split(',')
                .map(|t| t.trim().parse::<i64>().with_context(|| format!("--input-ids: {t:?} is not a token id")))
                .collect::<anyhow::Result<Vec<i64>>>()
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = lathe_trainer::generate::GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: args.stop_ids,
    };
    if args.warmup {
        let warmup = lathe_trainer::generate::GenerateOptions { max_new_tokens: 2, ..options.clone() };
        lathe_trainer::generate::generate(&decoder, &prompts[..1], &warmup)?;
    }
    let started = std::time::Instant::now();
    let tokens = lathe_trainer::generate::generate(&decoder, &prompts, &options)?;
    let seconds = started.elapsed().as_secs_f64();
    let new_tokens: usize = tokens.iter().map(Vec::len).sum();
    // `seconds` excludes loading the model: what a benchmark compares.
    println!("{}", serde_json::json!({ "tokens": tokens, "new_tokens": new_tokens, "seconds": seconds }));
    Ok(())
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    let arch: Arch = args.arch.parse()?;
    let preset: Preset = args.preset.parse()?;
    let summary = init_model(&InitOptions { arch, preset, seed: args.seed, out: args.out.clone() })?;
    println!(
        "wrote {arch} {preset} model ({} parameters, vocabulary {}) to {}",
        summary.parameters,
        summary.vocab_size,
        args.out.display()
    );
    Ok(())
}

fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let kind = device::parse_dtype(&args.dtype)?;
    let dev = device::parse_device(&args.device)?;
    let quantization = match args.quantization.as_str() {
        "nf4" => Quantization::Nf4 { double_quant: !args.no_double_quant },
        _ => Quantization::None,
    };
    let decoder = models::load_for_inference_as(&args.model, args.adapter.as_deref(), quantization, kind, dev)?;
    let mut inputs = checkpoint::read_tensors(&args.input)?;
    let input_ids = inputs.remove("input_ids").with_context(|| format!("{}: no tensor named input_ids", args.input.display()))?;
    anyhow::ensure!(input_ids.dim() == 2, "{}: input_ids must be 2-D (batch, seq)", args.input.display());
    let vocab = decoder.config.vocab_size;
    let (min, max) = (input_ids.min().int64_value(&[]), input_ids.max().int64_value(&[]));
    anyhow::ensure!(min >= 0 && max < vocab, "input_ids out of range [0, {vocab}): min {min}, max {max}");
    let logits = tch::no_grad(|| decoder.forward(&input_ids.to_kind(Kind::Int64).to_device(dev), None, None, false));
    checkpoint::write_tensors(&args.out, &[("logits".to_string(), logits.to_device(Device::Cpu).to_kind(Kind::Float))])?;
    Ok(())
}

fn export_file(args: ExportArgs) -> anyhow::Result<()> {
    let weights = lathe_trainer::gguf::GgufType::parse(&args.weight_type)?;
    let decoder = models::load_for_inference(&args.model, args.adapter.as_deref(), Kind::Float, Device::Cpu)?;
    let name = args.name.clone().unwrap_or_else(|| args.out.file_stem().unwrap_or_default().to_string_lossy().into_owned());
    lathe_trainer::gguf::write_gguf(&args.out, &args.model, &decoder, weights, &name)?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({}, {:.1} MB)", args.out.display(), args.weight_type, bytes as f64 / 1e6);
    Ok(())
}

fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let dir = ModelDir::open(&args.model)?;
    let decoder = models::load_for_inference(&args.model, Some(&args.adapter), Kind::Float, Device::Cpu)?;
    export::write_merged_model(&args.out, &args.model, &decoder, models::stored_kind(&dir))?;
    println!("wrote merged model to {}", args.out.display());
    Ok(())
}
