//! The one decoder behind Qwen3, Qwen2/2.5 and Llama 3, driven by [`ModelConfig`]:
//! RMSNorm → attention (GQA, optional q/k/v bias, optional per-head q/k RMSNorm, rotary with
//! optional Llama 3 scaling) → RMSNorm → SwiGLU MLP, repeated; final norm; output head tied
//! to the embedding or not. Numerics follow `transformers` step for step (norms in fp32,
//! rotary tables in fp32 then cast), so fp32 logits agree to ~1e-5.
//!
//! Weight names mirror the checkpoint (`model.layers.{i}.self_attn.q_proj.weight`), so
//! loading, PEFT export and merging all speak the same names.

use std::collections::HashMap;

use lathe_torch_ext::fused as kernels;
use tch::{Device, Kind, Tensor};

use super::fused::FusedBase;
use crate::lora::{BaseWeight, Linear, LoraConfig, LoraPair};
use crate::model_config::{ModelConfig, RopeScaling};
use crate::nf4::Nf4Weight;
use crate::{Result, TrainerError};

/// What is trained: nothing (inference), LoRA pairs on a frozen base, or every weight.
#[derive(Debug, Clone, PartialEq)]
pub enum Trainable {
    Nothing,
    Lora(LoraConfig),
    Everything,
}

#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    /// On the CPU one pass each way (`lathe_torch_ext::fused`); elsewhere as transformers
    /// writes it, which the CPU kernel reproduces.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if x.device() == Device::Cpu {
            return kernels::rms_norm(x, &self.weight, self.eps);
        }
        let kind = x.kind();
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x32 * (variance + self.eps).rsqrt();
        self.weight.to_kind(kind) * normed.to_kind(kind)
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// q/k/v stacked (frozen dense weights only): one matmul for the three.
    qkv: Option<FusedBase>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// gate/up stacked (frozen dense weights only).
    gate_up: Option<FusedBase>,
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

/// Rotary tables for one batch: (B, 1, T, D) each, in the activations' dtype.
pub struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Everything a layer needs besides its input: rotary tables and the attention mask.
pub struct LayerContext {
    pub rotary: Rotary,
    /// (B, 1, T, T) boolean, true where attention is allowed; None means plain causal.
    pub mask: Option<Tensor>,
    pub train: bool,
}

#[derive(Debug)]
pub struct Decoder {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// None when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    inv_freq: Tensor,
    /// The dtype activations are computed in (fp32 or bf16).
    pub compute_kind: Kind,
    pub device: Device,
}

/// A checkpoint's tensors by name: as read, or (QLoRA) quantized to NF4.
#[derive(Default)]
pub struct Weights {
    pub dense: HashMap<String, Tensor>,
    pub quantized: HashMap<String, Nf4Weight>,
}

impl From<HashMap<String, Tensor>> for Weights {
    fn from(dense: HashMap<String, Tensor>) -> Self {
        Weights { dense, quantized: HashMap::new() }
    }
}

/// Takes tensors out of a checkpoint's map, checking names and shapes.
struct WeightSource<'a> {
    weights: &'a mut Weights,
    what: &'a str,
}

impl WeightSource<'_> {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let tensor = self.weights.dense.remove(name).ok_or_else(|| TrainerError::file(self.what, format!("missing tensor {name}")))?;
        self.check_shape(name, &tensor.size(), shape)?;
        Ok(tensor)
    }

    /// A linear layer's weight, dense or NF4.
    fn take_linear(&mut self, name: &str, shape: &[i64]) -> Result<BaseWeight> {
        match self.weights.quantized.remove(name) {
            Some(w) => {
                self.check_shape(name, &w.size(), shape)?;
                Ok(BaseWeight::Nf4(w))
            }
            None => self.take(name, shape).map(BaseWeight::Dense),
        }
    }

    fn check_shape(&self, name: &str, got: &[i64], shape: &[i64]) -> Result<()> {
        if got != shape {
            return Err(TrainerError::file(self.what, format!("tensor {name} has shape {got:?}, config.json implies {shape:?}")));
        }
        Ok(())
    }
}

impl Decoder {
    /// Builds the decoder from checkpoint tensors (already in the compute dtype and on the
    /// device). Frozen weights stay in the compute dtype; trainable ones become fp32 leaves.
    pub fn from_weights(
        config: &ModelConfig,
        weights: impl Into<Weights>,
        trainable: &Trainable,
        compute_kind: Kind,
        device: Device,
        what: &str,
    ) -> Result<Self> {
        let mut weights = weights.into();
        if matches!(trainable, Trainable::Everything) && !weights.quantized.is_empty() {
            return Err(TrainerError::invalid("quantization", "nf4 freezes the base weights; full fine-tuning trains them"));
        }
        let c = config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let q_out = c.num_attention_heads * c.head_dim;
        let kv_out = c.num_key_value_heads * c.head_dim;
        let mut src = WeightSource { weights: &mut weights, what };
        let full = matches!(trainable, Trainable::Everything);
        let param = |t: Tensor| -> Tensor {
            if full {
                t.to_kind(Kind::Float).detach().set_requires_grad(true)
            } else {
                t.detach()
            }
        };
        let norm = |src: &mut WeightSource, name: &str, dim: i64| -> Result<RmsNorm> {
            Ok(RmsNorm { weight: param(src.take(name, &[dim])?), eps: c.rms_norm_eps })
        };
        let linear = |src: &mut WeightSource, prefix: &str, module: &str, out: i64, inp: i64, bias: bool| -> Result<Linear> {
            let weight = match src.take_linear(&format!("{prefix}.{module}.weight"), &[out, inp])? {
                BaseWeight::Dense(w) => BaseWeight::Dense(param(w)),
                nf4 => nf4,
            };
            let bias = if bias { Some(param(src.take(&format!("{prefix}.{module}.bias"), &[out])?)) } else { None };
            let lora = match trainable {
                Trainable::Lora(lora) if lora.targets(module) => Some(LoraPair::new(inp, out, lora, device, &format!("{prefix}.{module}"))),
                _ => None,
            };
            Ok(Linear { weight, bias, lora })
        };

        let embed_tokens = param(src.take("model.embed_tokens.weight", &[c.vocab_size, h])?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let mut self_attn = Attention {
                q_proj: linear(&mut src, &attn, "q_proj", q_out, h, c.qkv_bias)?,
                k_proj: linear(&mut src, &attn, "k_proj", kv_out, h, c.qkv_bias)?,
                v_proj: linear(&mut src, &attn, "v_proj", kv_out, h, c.qkv_bias)?,
                o_proj: linear(&mut src, &attn, "o_proj", h, q_out, c.o_bias)?,
                q_norm: if c.qk_norm { Some(norm(&mut src, &format!("{attn}.q_norm.weight"), c.head_dim)?) } else { None },
                k_norm: if c.qk_norm { Some(norm(&mut src, &format!("{attn}.k_norm.weight"), c.head_dim)?) } else { None },
                qkv: None,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            };
            self_attn.qkv = FusedBase::stack(&mut [&mut self_attn.q_proj, &mut self_attn.k_proj, &mut self_attn.v_proj]);
            let mut mlp = Mlp {
                gate_proj: linear(&mut src, &mlp, "gate_proj", inter, h, c.mlp_bias)?,
                up_proj: linear(&mut src, &mlp, "up_proj", inter, h, c.mlp_bias)?,
                down_proj: linear(&mut src, &mlp, "down_proj", h, inter, c.mlp_bias)?,
                gate_up: None,
            };
            mlp.gate_up = FusedBase::stack(&mut [&mut mlp.gate_proj, &mut mlp.up_proj]);
            layers.push(DecoderLayer {
                input_layernorm: norm(&mut src, &format!("{p}.input_layernorm.weight"), h)?,
                self_attn,
                post_attention_layernorm: norm(&mut src, &format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp,
            });
        }
        let final_norm = norm(&mut src, "model.norm.weight", h)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the head; it is the same tensor.
            src.weights.dense.remove("lm_head.weight");
            None
        } else {
            Some(param(src.take("lm_head.weight", &[c.vocab_size, h])?))
        };
        // Rotary buffers some exporters include are recomputed here, not read.
        weights.dense.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        if let Some(extra) = weights.dense.keys().chain(weights.quantized.keys()).min() {
            return Err(TrainerError::file(what, format!("unexpected tensor {extra} for model_type in config.json")));
        }
        Ok(Decoder {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            inv_freq: inverse_frequencies(config, device),
            compute_kind,
            device,
        })
    }

    /// Logits (B, T, V) in fp32 for token ids (B, T); `position_ids` and `segments` (B, T)
    /// default to 0..T and a single document per row.
    pub fn forward(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, segments: Option<&Tensor>, train: bool) -> Tensor {
        self.logits(&self.hidden_states(input_ids, position_ids, segments, train))
    }

    /// The last layer's output (B, T, hidden), before the final norm: what [`Decoder::logits`]
    /// and [`Decoder::loss_sum_and_correct`] take.
    pub fn hidden_states(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, segments: Option<&Tensor>, train: bool) -> Tensor {
        let ctx = self.context(input_ids, position_ids, segments, train);
        let mut hidden = self.embed(input_ids);
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &ctx);
        }
        hidden
    }

    /// Inference over new tokens `input_ids` (B, T) at `position_ids` (B, T), attending to
    /// everything in `cache` plus themselves as `mask` (B, 1, T, past + T) allows; appends
    /// their keys and values to `cache`. Logits (B, T, V) in fp32.
    pub fn forward_cached(&self, input_ids: &Tensor, position_ids: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Tensor {
        self.logits(&self.hidden_cached(input_ids, position_ids, mask, cache))
    }

    /// [`Decoder::forward_cached`] up to the last layer's output (B, T, hidden): a prefill
    /// takes the logits of each row's last position only, not of the whole prompt.
    pub fn hidden_cached(&self, input_ids: &Tensor, position_ids: &Tensor, mask: &Tensor, cache: &mut KvCache) -> Tensor {
        let ctx = LayerContext { rotary: self.rotary(position_ids), mask: Some(mask.shallow_clone()), train: false };
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let mut hidden = self.embed(input_ids);
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let attended = layer.self_attn.forward_cached(&layer.input_layernorm.forward(&hidden), &ctx, slot);
            let h = &hidden + attended;
            let normed = layer.post_attention_layernorm.forward(&h);
            hidden = &h + layer.mlp.forward(&normed, false);
        }
        hidden
    }

    pub fn context(&self, input_ids: &Tensor, position_ids: Option<&Tensor>, segments: Option<&Tensor>, train: bool) -> LayerContext {
        let (batch, seq) = input_ids.size2().expect("input_ids must be (batch, seq)");
        let default_positions;
        let positions = match position_ids {
            Some(p) => p,
            None => {
                default_positions = Tensor::arange(seq, (Kind::Int64, self.device)).unsqueeze(0).expand([batch, seq], false);
                &default_positions
            }
        };
        LayerContext { rotary: self.rotary(positions), mask: segments.map(segment_mask), train }
    }

    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false).to_kind(self.compute_kind)
    }

    /// Final norm and output head; logits in fp32 (the loss is taken in fp32, as in HF).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let hidden = self.norm.forward(hidden);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        hidden.linear::<Tensor>(&head.to_kind(hidden.kind()), None).to_kind(Kind::Float)
    }

    /// Final norm, output head and cross-entropy against `targets` (B, T), summed over the
    /// positions whose target is not `ignore_index`, with the number of those the argmax
    /// predicts. Same numbers as the loss of [`Decoder::logits`], without ever holding the
    /// (tokens × vocabulary) logits (`lathe_torch_ext::loss`).
    pub fn loss_sum_and_correct(&self, hidden: &Tensor, targets: &Tensor, ignore_index: i64) -> (Tensor, Tensor) {
        let hidden = self.norm.forward(hidden);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        lathe_torch_ext::loss::linear_cross_entropy(&hidden, &head.to_kind(hidden.kind()), targets, ignore_index, None)
    }

    fn rotary(&self, position_ids: &Tensor) -> Rotary {
        // (B, T, 1) x (1, 1, D/2) -> (B, T, D/2) -> (B, T, D), then a head axis: (B, 1, T, D)
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        Rotary { cos: emb.cos().to_kind(self.compute_kind).unsqueeze(1), sin: emb.sin().to_kind(self.compute_kind).unsqueeze(1) }
    }

    /// Every trainable tensor with its checkpoint-style name (LoRA pairs as `...q_proj.lora_A`).
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit_tensors(false, &mut |name, tensor| {
            if tensor.requires_grad() {
                out.push((name.to_string(), tensor.shallow_clone()));
            }
        });
        out
    }

    /// Every tensor of the model (base weights and LoRA pairs) with its name; NF4 weights
    /// dequantized to fp32 one at a time.
    pub fn visit_parameters(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        self.visit_tensors(true, f)
    }

    /// The tensors of the model, NF4 base weights dequantized or skipped (`dequantize`): what
    /// reads only LoRA pairs or trainable weights need not pay for dequantizing.
    pub fn visit_tensors(&self, dequantize: bool, f: &mut dyn FnMut(&str, &Tensor)) {
        f("model.embed_tokens.weight", &self.embed_tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            f(&format!("{p}.input_layernorm.weight"), &layer.input_layernorm.weight);
            f(&format!("{p}.post_attention_layernorm.weight"), &layer.post_attention_layernorm.weight);
            let a = &layer.self_attn;
            if let Some(n) = &a.q_norm {
                f(&format!("{p}.self_attn.q_norm.weight"), &n.weight);
            }
            if let Some(n) = &a.k_norm {
                f(&format!("{p}.self_attn.k_norm.weight"), &n.weight);
            }
            for (module, linear) in layer.linears() {
                let prefix = linear_path(i, module);
                match &linear.weight {
                    BaseWeight::Dense(w) => f(&format!("{prefix}.weight"), w),
                    BaseWeight::Nf4(w) if dequantize => f(&format!("{prefix}.weight"), &w.dequantize(Kind::Float)),
                    BaseWeight::Nf4(_) => {}
                }
                if let Some(b) = &linear.bias {
                    f(&format!("{prefix}.bias"), b);
                }
                if let Some(lora) = &linear.lora {
                    f(&format!("{prefix}.lora_A"), &lora.a);
                    f(&format!("{prefix}.lora_B"), &lora.b);
                }
            }
        }
        f("model.norm.weight", &self.norm.weight);
        if let Some(head) = &self.lm_head {
            f("lm_head.weight", head);
        }
    }
}

impl DecoderLayer {
    pub fn forward(&self, x: &Tensor, ctx: &LayerContext) -> Tensor {
        let h = x + self.self_attn.forward(&self.input_layernorm.forward(x), ctx);
        let normed = self.post_attention_layernorm.forward(&h);
        &h + self.mlp.forward(&normed, ctx.train)
    }

    /// The seven projections by module name, in PEFT's order.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
            ("gate_proj", &m.gate_proj),
            ("up_proj", &m.up_proj),
            ("down_proj", &m.down_proj),
        ]
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("q_proj", &mut a.q_proj),
            ("k_proj", &mut a.k_proj),
            ("v_proj", &mut a.v_proj),
            ("o_proj", &mut a.o_proj),
            ("gate_proj", &mut m.gate_proj),
            ("up_proj", &mut m.up_proj),
            ("down_proj", &mut m.down_proj),
        ]
    }
}

/// Keys and values of the tokens seen so far, per layer: (B, kv heads, T, head dim) each.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Keeps only the rows `keep` (1-D indices) of every cached tensor: a batch drops the
    /// sequences that finished.
    pub fn select_rows(&mut self, keep: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, keep);
            *v = v.index_select(0, keep);
        }
    }

    /// Cached positions per row (the T of every tensor); 0 when empty.
    pub fn len(&self) -> i64 {
        self.layers.iter().flatten().next().map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prepends `n` zero positions to every row (left padding), so that a batch with shorter
    /// rows can be joined with a longer one; the caller masks them out.
    pub fn left_pad(&mut self, n: i64) {
        if n == 0 {
            return;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let pad = |t: &Tensor| {
                let mut shape = t.size();
                shape[2] = n;
                Tensor::cat(&[&Tensor::zeros(shape.as_slice(), (t.kind(), t.device())), t], 2)
            };
            *k = pad(k);
            *v = pad(v);
        }
    }

    /// Drops the first `n` positions of every row (padding no row attends to any more).
    pub fn drop_front(&mut self, n: i64) {
        if n == 0 {
            return;
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let len = k.size()[2];
            *k = k.narrow(2, n, len - n);
            *v = v.narrow(2, n, len - n);
        }
    }

    /// Appends the rows of `other` (same length: pad the shorter first) below these.
    pub fn append_rows(&mut self, other: KvCache) {
        if self.layers.is_empty() {
            *self = other;
            return;
        }
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            match (mine.as_mut(), theirs) {
                (Some((k, v)), Some((k2, v2))) => {
                    *k = Tensor::cat(&[&*k, &k2], 0);
                    *v = Tensor::cat(&[&*v, &v2], 0);
                }
                (None, theirs) => *mine = theirs,
                (Some(_), None) => {}
            }
        }
    }
}

impl Attention {
    /// Queries, keys and values of `x` (B, T, hidden) as (B, heads, T, D): projected, per-head
    /// normed (Qwen3), rotated.
    fn project(&self, x: &Tensor, ctx: &LayerContext) -> (Tensor, Tensor, Tensor) {
        let (b, t, _) = x.size3().expect("hidden states must be (batch, seq, hidden)");
        let [q, k, v]: [Tensor; 3] = match &self.qkv {
            Some(fused) => {
                fused.split(&fused.forward(&[&self.q_proj, &self.k_proj, &self.v_proj], x, ctx.train)).try_into().expect("q, k, v")
            }
            None => [&self.q_proj, &self.k_proj, &self.v_proj].map(|proj| proj.forward(x, ctx.train)),
        };
        let heads = |y: Tensor, n: i64, norm: &Option<RmsNorm>| {
            let y = y.view([b, t, n, self.head_dim]);
            let y = match norm {
                Some(norm) => norm.forward(&y),
                None => y,
            };
            y.transpose(1, 2)
        };
        let q = apply_rotary(&heads(q, self.num_heads, &self.q_norm), &ctx.rotary);
        let k = apply_rotary(&heads(k, self.num_kv_heads, &self.k_norm), &ctx.rotary);
        let v = heads(v, self.num_kv_heads, &None);
        (q, k, v)
    }

    fn forward_cached(&self, x: &Tensor, ctx: &LayerContext, cache: &mut Option<(Tensor, Tensor)>) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states must be (batch, seq, hidden)");
        let (q, k, v) = self.project(x, ctx);
        let (k, v) = match cache.take() {
            Some((past_k, past_v)) => (Tensor::cat(&[&past_k, &k], 2), Tensor::cat(&[&past_v, &v], 2)),
            None => (k, v),
        };
        let gqa = self.num_heads != self.num_kv_heads;
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, ctx.mask.as_ref(), 0.0, false, None, gqa);
        *cache = Some((k, v));
        let out = out.transpose(1, 2).contiguous().view([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(&out, false)
    }

    fn forward(&self, x: &Tensor, ctx: &LayerContext) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states must be (batch, seq, hidden)");
        let (q, k, v) = self.project(x, ctx);
        // SDPA shares each kv head across its query group itself (enable_gqa), which saves
        // materialising repeated keys and values in the forward and their gradients in the backward.
        let gqa = self.num_heads != self.num_kv_heads;
        let out = match &ctx.mask {
            None => Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, gqa),
            Some(mask) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, gqa),
        };
        // (B, H, T, D) -> (B, T, H*D)
        let out = out.transpose(1, 2).contiguous().view([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(&out, ctx.train)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let hidden = match &self.gate_up {
            Some(fused) => kernels::swiglu(&fused.forward(&[&self.gate_proj, &self.up_proj], x, train)),
            None => self.gate_proj.forward(x, train).silu() * self.up_proj.forward(x, train),
        };
        self.down_proj.forward(&hidden, train)
    }
}

/// The checkpoint path of a decoder layer's projection: `model.layers.{i}.mlp.up_proj` or
/// `model.layers.{i}.self_attn.q_proj`.
pub fn linear_path(layer: usize, module: &str) -> String {
    let group = if ["gate_proj", "up_proj", "down_proj"].contains(&module) { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{module}")
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&(-x2), &x1], -1)
}

/// `x·cos + rotate_half(x)·sin`: on the CPU one pass each way (`lathe_torch_ext::fused`, the
/// same bits); elsewhere, and in fp16, as transformers writes it.
fn apply_rotary(x: &Tensor, rotary: &Rotary) -> Tensor {
    if x.device() == Device::Cpu && matches!(x.kind(), Kind::BFloat16 | Kind::Float) {
        return kernels::rotary(x, &rotary.cos, &rotary.sin);
    }
    x * &rotary.cos + rotate_half(x) * &rotary.sin
}

/// Causal attention that never crosses documents: segments (B, T) -> (B, 1, T, T) booleans.
/// Padding has segment 0 and attends only to padding, so no row is ever empty.
pub fn segment_mask(segments: &Tensor) -> Tensor {
    let t = segments.size()[1];
    let same = segments.unsqueeze(2).eq_tensor(&segments.unsqueeze(1));
    let causal = Tensor::ones([t, t], (Kind::Bool, segments.device())).tril(0);
    same.logical_and(&causal).unsqueeze(1)
}

/// `1 / theta^(2i/D)`, computed in fp32 as transformers does, with Llama 3 frequency scaling.
fn inverse_frequencies(config: &ModelConfig, device: Device) -> Tensor {
    let dim = config.head_dim;
    let exponents = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / dim as f64;
    let inv_freq = Tensor::from(config.rope_theta as f32).pow(&exponents).reciprocal();
    let inv_freq = match config.rope_scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            // Long wavelengths are slowed by `factor`, short ones kept, the middle band blended.
            let scaled = inv_freq.where_self(&wavelen.le(low_freq_wavelen), &(&inv_freq / factor));
            let smooth = (wavelen.reciprocal() * old - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let smoothed: Tensor = (1.0 - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.ge(high_freq_wavelen).logical_and(&wavelen.le(low_freq_wavelen));
            smoothed.where_self(&medium, &scaled)
        }
    };
    inv_freq.to_device(device)
}
