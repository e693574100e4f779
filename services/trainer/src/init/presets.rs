//! The preset sizes and `config.json`, written the way transformers v4 checkpoints write it
//! (keys sorted, the same fields as Qwen3-0.6B, Qwen2.5-0.5B-Instruct and Llama-3.2-1B).

use serde_json::{json, Value};

use super::tokenizer::SpecialIds;
use super::{Arch, Preset};

/// How the weights are stored in `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoredDtype {
    F32,
    Bf16,
}

impl StoredDtype {
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
        }
    }
}

/// Llama writes the context of Llama 3.1, because its rope scaling assumes a context longer
/// than `original_max_position_embeddings` (8192); transformers warns otherwise.
const LLAMA_MAX_POSITION_EMBEDDINGS: usize = 131_072;
const QWEN_MAX_POSITION_EMBEDDINGS: usize = 4096;

/// The sizes of a preset; the same for every architecture.
#[derive(Debug, Clone)]
pub(crate) struct Dimensions {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than the attention heads, so grouped-query attention is always exercised.
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Target size of the whole tokenizer (BPE vocabulary plus added tokens). `vocab_size` in
    /// config.json is the real size rounded up to a multiple of 64: tiny leaves 20 padding rows
    /// that no token uses (as Qwen's 151665 tokens in 151936 rows), small none (as Llama 3).
    pub tokenizer_vocab_target: usize,
    /// Rows of the embedding (and output head) when the model imitates a real checkpoint's
    /// memory: the rows beyond the tokenizer are padding no token uses, as in Qwen's.
    pub embedding_rows: Option<usize>,
    pub dtype: StoredDtype,
}

impl Dimensions {
    pub fn of(preset: Preset) -> Self {
        match preset {
            Preset::Tiny => Self {
                hidden_size: 64,
                intermediate_size: 176,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                tokenizer_vocab_target: 1260,
                embedding_rows: None,
                dtype: StoredDtype::F32,
            },
            Preset::Small => Self {
                hidden_size: 1024,
                intermediate_size: 2816,
                num_hidden_layers: 8,
                num_attention_heads: 16,
                num_key_value_heads: 8,
                head_dim: 64,
                tokenizer_vocab_target: 8192,
                embedding_rows: None,
                dtype: StoredDtype::Bf16,
            },
            // Qwen3-4B's shapes, embedding included (151,936 rows, tied): the model size QLoRA is
            // for, to measure memory where the weights and not the libraries dominate.
            Preset::FourB => Self {
                hidden_size: 2560,
                intermediate_size: 9728,
                num_hidden_layers: 36,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                head_dim: 128,
                tokenizer_vocab_target: 8192,
                embedding_rows: Some(151_936),
                dtype: StoredDtype::Bf16,
            },
        }
    }
}

/// `max_position_embeddings` of config.json, also the tokenizer's `model_max_length`.
pub(crate) fn max_position_embeddings(arch: Arch) -> usize {
    match arch {
        Arch::Llama => LLAMA_MAX_POSITION_EMBEDDINGS,
        Arch::Qwen3 | Arch::Qwen2 => QWEN_MAX_POSITION_EMBEDDINGS,
    }
}

pub(crate) fn config_json(arch: Arch, dims: &Dimensions, vocab_size: usize, ids: &SpecialIds) -> Value {
    let mut config = json!({
        "attention_dropout": 0.0,
        "bos_token_id": ids.bos,
        "eos_token_id": one_or_many(&ids.eos),
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "hidden_size": dims.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": dims.intermediate_size,
        "max_position_embeddings": max_position_embeddings(arch),
        "num_attention_heads": dims.num_attention_heads,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_key_value_heads": dims.num_key_value_heads,
        "torch_dtype": dims.dtype.torch_name(),
        "use_cache": true,
        "vocab_size": vocab_size,
    });
    let family = match arch {
        Arch::Qwen3 => json!({
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": false,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "rope_scaling": null,
            "tie_word_embeddings": true,
            "use_sliding_window": false,
            "sliding_window": null,
            "max_window_layers": dims.num_hidden_layers,
        }),
        // Qwen2 has no `attention_bias` field: q/k/v always carry a bias.
        Arch::Qwen2 => json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "rope_scaling": null,
            "tie_word_embeddings": true,
            "use_sliding_window": false,
            "sliding_window": null,
            "max_window_layers": dims.num_hidden_layers,
        }),
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": false,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500_000.0,
            "rope_scaling": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            // Untied, unlike the Qwen presets, so both paths of the loader are tested.
            "tie_word_embeddings": false,
        }),
    };
    let (Value::Object(config_map), Value::Object(family_map)) = (&mut config, family) else { unreachable!("both are json objects") };
    config_map.extend(family_map);
    config
}

/// Real configs write a single id as a number and several as a list.
pub(crate) fn one_or_many(ids: &[u32]) -> Value {
    match ids {
        [one] => json!(one),
        many => json!(many),
    }
}
