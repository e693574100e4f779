//! The tensors of `model.safetensors`: HF names, PyTorch `[out, in]` shapes and random values.
//!
//! Values come from a small counter-based generator (SplitMix64 + Box-Muller) seeded per
//! tensor from the seed and the tensor's name, so the bytes depend only on (seed, layout) and
//! not on thread scheduling or on libtorch's global RNG, which other code may be using.
//! Linear weights and biases are N(0, 0.02), embeddings and the output head N(0, 1/√hidden); RMSNorm weights are 1 + 0.1·N(0, 1),
//! deliberately not 1, so a norm weight that fails to load changes the logits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::presets::{Dimensions, StoredDtype};
use super::Arch;
use crate::{Result, TrainerError};

const INITIALIZER_RANGE: f64 = 0.02;
const NORM_JITTER: f64 = 0.1;

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// N(0, 0.02): linear weights, biases, embeddings.
    Normal,
    /// 1 + 0.1·N(0, 1): RMSNorm weights.
    Norm,
    /// N(0, 1/√hidden): token embeddings and the output head. Rows of unit norm give logits of
    /// useful size after the final RMSNorm; with 0.02 a small model's logits stay near zero
    /// and a LoRA run on it cannot move the loss far from ln(vocab).
    Embedding { hidden: usize },
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorLayout {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of the checkpoint, in model order, as transformers names them.
pub(crate) fn tensor_layout(arch: Arch, dims: &Dimensions, vocab_size: usize) -> Vec<TensorLayout> {
    let hidden = dims.hidden_size;
    let q_out = dims.num_attention_heads * dims.head_dim;
    let kv_out = dims.num_key_value_heads * dims.head_dim;
    let mut layout = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init| layout.push(TensorLayout { name, shape, init });

    push("model.embed_tokens.weight".into(), vec![vocab_size, hidden], Init::Embedding { hidden });
    for i in 0..dims.num_hidden_layers {
        let layer = format!("model.layers.{i}");
        push(format!("{layer}.input_layernorm.weight"), vec![hidden], Init::Norm);
        for (proj, out) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
            push(format!("{layer}.self_attn.{proj}.weight"), vec![out, hidden], Init::Normal);
            if arch == Arch::Qwen2 {
                push(format!("{layer}.self_attn.{proj}.bias"), vec![out], Init::Normal);
            }
        }
        push(format!("{layer}.self_attn.o_proj.weight"), vec![hidden, q_out], Init::Normal);
        if arch == Arch::Qwen3 {
            push(format!("{layer}.self_attn.q_norm.weight"), vec![dims.head_dim], Init::Norm);
            push(format!("{layer}.self_attn.k_norm.weight"), vec![dims.head_dim], Init::Norm);
        }
        push(format!("{layer}.post_attention_layernorm.weight"), vec![hidden], Init::Norm);
        push(format!("{layer}.mlp.gate_proj.weight"), vec![dims.intermediate_size, hidden], Init::Normal);
        push(format!("{layer}.mlp.up_proj.weight"), vec![dims.intermediate_size, hidden], Init::Normal);
        push(format!("{layer}.mlp.down_proj.weight"), vec![hidden, dims.intermediate_size], Init::Normal);
    }
    push("model.norm.weight".into(), vec![hidden], Init::Norm);
    if arch == Arch::Llama {
        // Qwen presets tie lm_head to the embedding and store no lm_head tensor, as HF does.
        push("lm_head.weight".into(), vec![vocab_size, hidden], Init::Embedding { hidden });
    }
    layout
}

/// Fills every tensor of `layout` and serialises them as a safetensors file with the
/// `{"format": "pt"}` header transformers writes. Tensors are filled on all cores.
pub(crate) fn random_safetensors(layout: &[TensorLayout], dtype: StoredDtype, seed: u64) -> Result<Vec<u8>> {
    let filled = fill_all(layout, dtype, seed);
    let safetensors_dtype = match dtype {
        StoredDtype::F32 => Dtype::F32,
        StoredDtype::Bf16 => Dtype::BF16,
    };
    let views = layout
        .iter()
        .zip(&filled)
        .map(|(tensor, bytes)| {
            let view = TensorView::new(safetensors_dtype, tensor.shape.clone(), bytes)
                .map_err(|err| TrainerError::invalid(&tensor.name, err.to_string()))?;
            Ok((tensor.name.as_str(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|err| TrainerError::invalid("model.safetensors", err.to_string()))
}

/// The little-endian bytes of every tensor, in layout order.
fn fill_all(layout: &[TensorLayout], dtype: StoredDtype, seed: u64) -> Vec<Vec<u8>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(layout.len().max(1));
    let next = AtomicUsize::new(0);
    let mut filled: Vec<Vec<u8>> = vec![Vec::new(); layout.len()];
    let per_thread: Vec<Vec<(usize, Vec<u8>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(tensor) = layout.get(index) else { break done };
                        done.push((index, fill_tensor(tensor, dtype, seed)));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|worker| worker.join().expect("tensor filling does not panic")).collect()
    });
    for (index, bytes) in per_thread.into_iter().flatten() {
        filled[index] = bytes;
    }
    filled
}

fn fill_tensor(tensor: &TensorLayout, dtype: StoredDtype, seed: u64) -> Vec<u8> {
    let mut normals = NormalStream::new(seed, &tensor.name);
    let (mean, std) = match tensor.init {
        Init::Normal => (0.0, INITIALIZER_RANGE),
        Init::Norm => (1.0, NORM_JITTER),
        Init::Embedding { hidden } => (0.0, 1.0 / (hidden as f64).sqrt()),
    };
    let numel = tensor.numel();
    match dtype {
        StoredDtype::F32 => {
            let mut bytes = Vec::with_capacity(numel * 4);
            for _ in 0..numel {
                bytes.extend_from_slice(&((mean + std * normals.next()) as f32).to_le_bytes());
            }
            bytes
        }
        StoredDtype::Bf16 => {
            let mut bytes = Vec::with_capacity(numel * 2);
            for _ in 0..numel {
                let value = half::bf16::from_f32((mean + std * normals.next()) as f32);
                bytes.extend_from_slice(&value.to_le_bytes());
            }
            bytes
        }
    }
}

/// Standard normal samples from SplitMix64 through the Box-Muller transform.
struct NormalStream {
    state: u64,
    spare: Option<f64>,
}

impl NormalStream {
    fn new(seed: u64, tensor_name: &str) -> Self {
        // FNV-1a of the name, so each tensor has its own stream whatever the fill order.
        let mut stream = Self { state: seed ^ crate::hash::fnv1a(tensor_name.as_bytes()), spare: None };
        stream.next_u64();
        stream
    }

    fn next_u64(&mut self) -> u64 {
        crate::hash::splitmix64(&mut self.state)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_unit(&mut self) -> f64 {
        crate::hash::unit_f64(&mut self.state)
    }

    fn next(&mut self) -> f64 {
        if let Some(spare) = self.spare.take() {
            return spare;
        }
        let radius_uniform = 1.0 - self.next_unit(); // (0, 1], so ln() is finite
        let angle = std::f64::consts::TAU * self.next_unit();
        let radius = (-2.0 * radius_uniform.ln()).sqrt();
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}
