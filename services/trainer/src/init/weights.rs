//! The tensors of `model.safetensors`: HF names, PyTorch `[out, in]` shapes and random values.
//!
//! Values come from a small counter-based generator (SplitMix64 + Box-Muller) seeded per
//! tensor from the seed and the tensor's name, so the bytes depend only on (seed, layout) and
//! not on thread scheduling or on libtorch's global RNG, which other code may be using.
//! Linear weights and biases are N(0, 0.02), embeddings and the output head N(0, 1/√hidden); RMSNorm weights are 1 + 0.1·N(0, 1),
//! deliberately not 1, so a norm weight that fails to load changes the logits.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, View};

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

/// `model.safetensors` of a random model, written by [`RandomWeights::write`].
pub(crate) struct RandomWeights {
    pub layout: Vec<TensorLayout>,
    pub dtype: StoredDtype,
    pub seed: u64,
}

impl RandomWeights {
    /// Serialises every tensor with the `{"format": "pt"}` header transformers writes. Each
    /// tensor is filled (on all cores) only when the file reaches it, so memory holds one tensor
    /// and not the model: the 4b preset is 8 GB on disk.
    pub fn write(&self, path: &Path) -> Result<()> {
        let views = self.layout.iter().map(|tensor| (tensor.name.as_str(), LazyTensor { tensor, dtype: self.dtype, seed: self.seed }));
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), path).map_err(|err| TrainerError::file(path, err.to_string()))
    }
}

/// A tensor whose bytes are made when the serialiser asks for them.
struct LazyTensor<'a> {
    tensor: &'a TensorLayout,
    dtype: StoredDtype,
    seed: u64,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            StoredDtype::F32 => Dtype::F32,
            StoredDtype::Bf16 => Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(fill_tensor(self.tensor, self.dtype, self.seed))
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * self.dtype.bytes()
    }
}

/// Elements per chunk of a parallel fill: even, so no chunk starts inside a Box-Muller pair.
const FILL_CHUNK: usize = 1 << 20;

/// The little-endian bytes of one tensor, filled in chunks on all cores. The stream is
/// counter-based, so each chunk starts where a single sequential pass would be and the bytes do
/// not depend on the number of threads.
fn fill_tensor(tensor: &TensorLayout, dtype: StoredDtype, seed: u64) -> Vec<u8> {
    let (mean, std) = match tensor.init {
        Init::Normal => (0.0, INITIALIZER_RANGE),
        Init::Norm => (1.0, NORM_JITTER),
        Init::Embedding { hidden } => (0.0, 1.0 / (hidden as f64).sqrt()),
    };
    let width = dtype.bytes();
    let mut bytes = vec![0u8; tensor.numel() * width];
    let chunks: Vec<(usize, &mut [u8])> = bytes.chunks_mut(FILL_CHUNK * width).enumerate().collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(chunks.len().max(1));
    let next = std::sync::Mutex::new(chunks.into_iter());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let Some((index, out)) = next.lock().expect("no filler panics").next() else { break };
                let mut normals = NormalStream::at(seed, &tensor.name, index * FILL_CHUNK);
                for value in out.chunks_exact_mut(width) {
                    let sample = (mean + std * normals.next()) as f32;
                    match dtype {
                        StoredDtype::F32 => value.copy_from_slice(&sample.to_le_bytes()),
                        StoredDtype::Bf16 => value.copy_from_slice(&half::bf16::from_f32(sample).to_le_bytes()),
                    }
                }
            });
        }
    });
    bytes
}

/// Standard normal samples from SplitMix64 through the Box-Muller transform.
struct NormalStream {
    state: u64,
    spare: Option<f64>,
}

impl NormalStream {
    /// The stream of one tensor, positioned at its `element`-th sample (even: the start of a
    /// pair). FNV-1a of the name gives each tensor its own stream whatever the fill order; every
    /// pair draws two SplitMix64 steps, and a SplitMix64 state advances by a constant per step,
    /// so any position is one multiplication away.
    fn at(seed: u64, tensor_name: &str, element: usize) -> Self {
        debug_assert!(element.is_multiple_of(2), "a chunk starts on a pair");
        let start = seed ^ crate::hash::fnv1a(tensor_name.as_bytes());
        // One step is skipped at the start of the stream, then two per pair before `element`.
        let steps = 1 + element as u64;
        Self { state: start.wrapping_add(steps.wrapping_mul(crate::hash::SPLITMIX64_GAMMA)), spare: None }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_filled_in_chunks_on_all_cores_equals_one_sequential_pass() {
        // Two and a half chunks and an odd tail: every chunk boundary and a lone last sample.
        let tensor =
            TensorLayout { name: "model.layers.0.mlp.up_proj.weight".into(), shape: vec![5 * FILL_CHUNK / 2 + 1], init: Init::Normal };
        let filled = fill_tensor(&tensor, StoredDtype::F32, 7);
        let mut stream = NormalStream::at(7, &tensor.name, 0);
        let sequential: Vec<u8> = (0..tensor.numel()).flat_map(|_| ((INITIALIZER_RANGE * stream.next()) as f32).to_le_bytes()).collect();
        assert!(filled == sequential, "the chunked fill differs from one pass");
    }
}
