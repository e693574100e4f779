//! `config.json` of a Hugging Face checkpoint, read into one [`ModelConfig`] that drives the
//! decoder. Qwen3 (q/k norm), Qwen2/2.5 (q/k/v bias) and Llama 3 (rope scaling) differ only in
//! the fields below; anything else the decoder cannot honour is rejected here, naming the field.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{Result, TrainerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Qwen3,
    Qwen2,
    Llama,
}

/// Rotary embedding frequency scaling (Llama 3.1+ `rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always on for Qwen2, `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias` puts it on all four).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm of queries and keys before rotary (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// The file as read, kept so exports write back exactly what came in.
    pub raw: Value,
}

/// The subset of `config.json` fields we read; everything optional so that the error for a
/// missing field can name it.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    max_position_embeddings: Option<i64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5 writes `rope_theta` and scaling under one `rope_parameters` object.
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).map_err(|e| TrainerError::file(path, format!("not valid JSON: {e}")))?;
        let c: RawConfig =
            serde_json::from_value(raw.clone()).map_err(|e| TrainerError::file(path, format!("unexpected field type: {e}")))?;
        let field_error = |field: &str, message: &str| TrainerError::config_field(path, field, message);
        let required = |value: Option<i64>, field: &str| -> Result<i64> {
            match value {
                None => Err(field_error(field, "missing")),
                Some(v) if v <= 0 => Err(field_error(field, &format!("must be positive, got {v}"))),
                Some(v) => Ok(v),
            }
        };

        let model_type = c.model_type.clone().unwrap_or_default();
        let family = match model_type.as_str() {
            "qwen3" => Family::Qwen3,
            "qwen2" => Family::Qwen2,
            "llama" => Family::Llama,
            "" => return Err(field_error("model_type", "missing")),
            other => {
                return Err(field_error("model_type", &format!("unsupported architecture {other:?} (supported: qwen3, qwen2, llama)")))
            }
        };
        if let Some(archs) = &c.architectures {
            let expected = match family {
                Family::Qwen3 => "Qwen3ForCausalLM",
                Family::Qwen2 => "Qwen2ForCausalLM",
                Family::Llama => "LlamaForCausalLM",
            };
            if !archs.iter().any(|a| a == expected) {
                return Err(field_error("architectures", &format!("expected {expected} for model_type {model_type}, got {archs:?}")));
            }
        }
        if let Some(act) = &c.hidden_act {
            if act != "silu" {
                return Err(field_error("hidden_act", &format!("only \"silu\" is supported, got {act:?}")));
            }
        }
        if c.use_sliding_window == Some(true) {
            return Err(field_error("use_sliding_window", "sliding-window attention is not supported"));
        }

        let hidden_size = required(c.hidden_size, "hidden_size")?;
        let num_attention_heads = required(c.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = match c.num_key_value_heads {
            None => num_attention_heads,
            v => required(v, "num_key_value_heads")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(field_error(
                "num_key_value_heads",
                &format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match c.head_dim {
            Some(v) => required(Some(v), "head_dim")?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => return Err(field_error("head_dim", "missing and hidden_size is not a multiple of num_attention_heads")),
        };
        if head_dim % 2 != 0 {
            return Err(field_error("head_dim", &format!("must be even for rotary embeddings, got {head_dim}")));
        }

        let (rope_theta, rope_scaling) = read_rope(&c, path)?;
        let attention_bias = c.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            Family::Qwen3 | Family::Llama => (attention_bias, attention_bias),
        };
        let rms_norm_eps = c.rms_norm_eps.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(field_error("rms_norm_eps", "must be positive"));
        }

        Ok(ModelConfig {
            family,
            vocab_size: required(c.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: required(c.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(c.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: family == Family::Llama && c.mlp_bias.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            bos_token_id: c.bos_token_id.as_ref().and_then(Value::as_i64),
            eos_token_ids: token_ids(c.eos_token_id.as_ref()),
            raw,
        })
    }

    /// Parameter count of the full model.
    pub fn num_parameters(&self) -> i64 {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.qk_norm {
            layer += 2 * self.head_dim;
        }
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

fn token_ids(value: Option<&Value>) -> Vec<i64> {
    match value {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

fn read_rope(c: &RawConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    // v4 layout: `rope_theta` + `rope_scaling`; v5 layout: `rope_parameters` holding both.
    let (scaling, scaling_field) = match (&c.rope_parameters, &c.rope_scaling) {
        (Some(p), _) => (Some(p), "rope_parameters"),
        (None, Some(s)) => (Some(s), "rope_scaling"),
        _ => (None, "rope_scaling"),
    };
    let theta = c.rope_theta.or_else(|| scaling.and_then(|s| s.get("rope_theta")).and_then(Value::as_f64)).unwrap_or(10000.0);
    if theta <= 0.0 {
        return Err(TrainerError::config_field(path, "rope_theta", "must be positive"));
    }
    let Some(scaling) = scaling.filter(|s| !s.is_null()) else {
        return Ok((theta, RopeScaling::None));
    };
    let rope_type = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("default");
    let number = |key: &str| -> Result<f64> {
        scaling
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| TrainerError::config_field(path, format!("{scaling_field}.{key}"), "missing or not a number"))
    };
    match rope_type {
        "default" => Ok((theta, RopeScaling::None)),
        "llama3" => Ok((
            theta,
            RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            },
        )),
        other => Err(TrainerError::config_field(
            path,
            format!("{scaling_field}.rope_type"),
            format!("unsupported rope scaling {other:?} (supported: default, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, Path::new("config.json"))
    }

    const QWEN3: &str = r#"{"model_type":"qwen3","architectures":["Qwen3ForCausalLM"],"vocab_size":1024,
        "hidden_size":64,"intermediate_size":176,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"head_dim":16,"rope_theta":1000000.0,"rms_norm_eps":1e-6,
        "tie_word_embeddings":true,"attention_bias":false,"hidden_act":"silu","eos_token_id":5}"#;

    #[test]
    fn qwen3_config_has_qk_norm_and_no_bias() {
        let c = parse(QWEN3).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert!(c.qk_norm && !c.qkv_bias && c.tie_word_embeddings);
        assert_eq!((c.head_dim, c.num_key_value_heads, c.rope_theta), (16, 2, 1e6));
        assert_eq!(c.eos_token_ids, vec![5]);
    }

    #[test]
    fn qwen2_always_has_qkv_bias_but_no_output_bias() {
        let c = parse(&QWEN3.replace("qwen3", "qwen2").replace("Qwen3", "Qwen2")).unwrap();
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);
    }

    #[test]
    fn llama3_rope_scaling_is_read_from_either_layout() {
        let base = QWEN3.replace("qwen3", "llama").replace("Qwen3ForCausalLM", "LlamaForCausalLM");
        let v4 = base.replace(r#""rope_theta":1000000.0"#, r#""rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#);
        let v5 = base.replace(r#""rope_theta":1000000.0"#, r#""rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#);
        for json in [v4, v5] {
            let c = parse(&json).unwrap();
            assert_eq!(c.rope_theta, 500000.0);
            assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        }
    }

    #[test]
    fn an_unknown_architecture_is_rejected_naming_the_field() {
        let err = parse(&QWEN3.replace(r#""model_type":"qwen3""#, r#""model_type":"gpt2""#)).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("model_type") && message.contains("gpt2"), "{message}");
    }

    #[test]
    fn a_zero_layer_count_is_rejected_naming_the_field() {
        let err = parse(&QWEN3.replace(r#""num_hidden_layers":2"#, r#""num_hidden_layers":0"#)).unwrap_err();
        assert!(err.to_string().contains("num_hidden_layers"), "{err}");
    }

    #[test]
    fn kv_heads_must_divide_attention_heads() {
        let err = parse(&QWEN3.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#)).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn parameter_count_matches_a_hand_count() {
        let c = parse(QWEN3).unwrap();
        // embed 1024*64; per layer: q 64*64, k,v 64*32 each, o 64*64, mlp 3*64*176, 2 norms 64, q/k norm 16 each
        let layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 176 + 2 * 64 + 2 * 16;
        assert_eq!(c.num_parameters(), 1024 * 64 + 2 * layer + 64);
    }
}
