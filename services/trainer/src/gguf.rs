//! GGUF export: a model (with its adapter merged) as one file llama.cpp and Ollama load.
//!
//! The layout is GGUF v3: a header, key-value metadata (architecture hyperparameters, the
//! tokenizer's vocabulary, merges and special ids, the chat template), tensor descriptions,
//! then the tensor data, each aligned to 32 bytes. Tensor names and metadata keys are
//! llama.cpp's (`token_embd`, `blk.N.attn_q`, `qwen3.attention.head_count`, …), and dimensions
//! are written innermost first, as ggml counts them.
//!
//! Weights go out as f16, bf16 or q8_0 (blocks of 32 values: an f16 scale and 32 int8, ggml's
//! reference rounding); norms stay f32, and a matrix whose rows are not whole q8_0 blocks is
//! written f16, as llama.cpp's own converter does. Llama's q and k projections are permuted from
//! Hugging Face's half-split rotary layout to ggml's interleaved one; Qwen's use the half-split
//! ("neox") layout in llama.cpp too and are written as they are.

use std::io::Write;
use std::path::Path;

use serde_json::Value;
use tch::{Kind, Tensor};

use crate::chat_template::read_special_tokens;
use crate::export::merged_tensors;
use crate::model_config::{Family, ModelConfig, RopeScaling};
use crate::models::decoder::Decoder;
use crate::{Result, TrainerError};

const ALIGNMENT: usize = 32;
const Q8_BLOCK: usize = 32;

/// How the weight matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F16,
    Bf16,
    Q8_0,
}

impl GgufType {
    pub fn parse(name: &str) -> Result<GgufType> {
        match name {
            "f16" => Ok(GgufType::F16),
            "bf16" => Ok(GgufType::Bf16),
            "q8_0" => Ok(GgufType::Q8_0),
            other => Err(TrainerError::invalid("gguf type", format!("{other:?}: expected f16, bf16 or q8_0"))),
        }
    }
}

/// ggml's tensor type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Bf16 = 30,
}

/// One metadata value.
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
}

impl Meta {
    fn type_id(&self) -> u32 {
        match self {
            Meta::U32(_) => 4,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Strings(_) | Meta::I32s(_) => 9,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend(self.type_id().to_le_bytes());
        match self {
            Meta::U32(v) => out.extend(v.to_le_bytes()),
            Meta::F32(v) => out.extend(v.to_le_bytes()),
            Meta::Bool(v) => out.push(u8::from(*v)),
            Meta::Str(s) => write_string(out, s),
            Meta::Strings(items) => {
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    write_string(out, s);
                }
            }
            Meta::I32s(items) => {
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A tensor ready to write: its GGUF name, ggml dimensions (innermost first) and bytes.
struct Encoded {
    name: String,
    dims: Vec<u64>,
    kind: GgmlType,
    data: Vec<u8>,
}

/// Writes `decoder` (an adapter, if it has one, merged in fp32 first) with the tokenizer and
/// chat template of `model_dir` to `out`, atomically (a temporary file renamed into place).
pub fn write_gguf(out: &Path, model_dir: &Path, decoder: &Decoder, weights: GgufType, name: &str) -> Result<()> {
    let config = &decoder.config;
    let arch = match config.family {
        Family::Qwen3 => "qwen3",
        Family::Qwen2 => "qwen2",
        Family::Llama => "llama",
    };
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.name".into(), Meta::Str(name.into())),
        ("general.alignment".into(), Meta::U32(ALIGNMENT as u32)),
        ("general.file_type".into(), Meta::U32(file_type(weights))),
    ];
    let key = |k: &str| format!("{arch}.{k}");
    meta.extend([
        (key("context_length"), Meta::U32(config.max_position_embeddings as u32)),
        (key("embedding_length"), Meta::U32(config.hidden_size as u32)),
        (key("block_count"), Meta::U32(config.num_hidden_layers as u32)),
        (key("feed_forward_length"), Meta::U32(config.intermediate_size as u32)),
        (key("attention.head_count"), Meta::U32(config.num_attention_heads as u32)),
        (key("attention.head_count_kv"), Meta::U32(config.num_key_value_heads as u32)),
        (key("attention.key_length"), Meta::U32(config.head_dim as u32)),
        (key("attention.value_length"), Meta::U32(config.head_dim as u32)),
        (key("attention.layer_norm_rms_epsilon"), Meta::F32(config.rms_norm_eps as f32)),
        (key("rope.freq_base"), Meta::F32(config.rope_theta as f32)),
        (key("rope.dimension_count"), Meta::U32(config.head_dim as u32)),
        (key("vocab_size"), Meta::U32(config.vocab_size as u32)),
    ]);
    meta.extend(tokenizer_metadata(model_dir, config)?);

    let mut tensors = Vec::new();
    for (hf_name, tensor) in merged_tensors(decoder, Kind::Float) {
        let Some(gguf_name) = gguf_name(&hf_name) else {
            return Err(TrainerError::invalid("gguf", format!("no llama.cpp name for tensor {hf_name}")));
        };
        let tensor = match (config.family, hf_name.rsplit('.').nth(1)) {
            (Family::Llama, Some("q_proj")) => permute_rotary(&tensor, config.num_attention_heads),
            (Family::Llama, Some("k_proj")) => permute_rotary(&tensor, config.num_key_value_heads),
            _ => tensor,
        };
        tensors.push(encode(gguf_name, &tensor, weights)?);
    }
    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = config.rope_scaling {
        let factors = llama3_rope_factors(config, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings);
        tensors.push(encode("rope_freqs.weight".into(), &Tensor::from_slice(&factors), weights)?);
    }

    let mut header = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        write_string(&mut header, k);
        v.write(&mut header);
    }
    let mut offset = 0u64;
    for t in &tensors {
        write_string(&mut header, &t.name);
        header.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend(d.to_le_bytes());
        }
        header.extend((t.kind as u32).to_le_bytes());
        header.extend(offset.to_le_bytes());
        offset += padded(t.data.len()) as u64;
    }
    header.resize(padded(header.len()), 0);

    let tmp = out.with_extension("gguf.partial");
    let write = || -> std::io::Result<()> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        file.write_all(&header)?;
        for t in &tensors {
            file.write_all(&t.data)?;
            file.write_all(&vec![0u8; padded(t.data.len()) - t.data.len()])?;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, out)
    };
    write().map_err(|e| TrainerError::io(out, e))
}

fn padded(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// llama.cpp's `general.file_type` (LLAMA_FTYPE_*): what most weights are.
fn file_type(weights: GgufType) -> u32 {
    match weights {
        GgufType::F16 => 1,
        GgufType::Q8_0 => 7,
        GgufType::Bf16 => 32,
    }
}

/// Hugging Face's tensor name as llama.cpp's.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let (module, suffix) = module.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Hugging Face's rotary layout (each head's first half, then second half) as ggml's
/// (interleaved pairs), for Llama's q and k rows (convert_hf_to_gguf's `permute`).
fn permute_rotary(weight: &Tensor, heads: i64) -> Tensor {
    let size = weight.size();
    let rows = size[0];
    let mut shape = vec![heads, 2, rows / heads / 2];
    shape.extend_from_slice(&size[1..]);
    weight.reshape(shape.as_slice()).swapaxes(1, 2).reshape(size.as_slice())
}

/// Llama 3's per-frequency rotary factors, as llama.cpp reads them from `rope_freqs.weight`.
fn llama3_rope_factors(config: &ModelConfig, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let dim = config.head_dim as f64;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..config.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / config.rope_theta.powf(2.0 * i as f64 / dim);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

fn encode(name: String, tensor: &Tensor, weights: GgufType) -> Result<Encoded> {
    let tensor = tensor.to_kind(Kind::Float).contiguous();
    let dims: Vec<u64> = tensor.size().iter().rev().map(|&d| d as u64).collect();
    let values: Vec<f32> = Vec::try_from(tensor.flatten(0, -1)).map_err(TrainerError::Torch)?;
    // 1-D tensors (norms, biases, rope factors) stay f32, as llama.cpp expects.
    let matrix = dims.len() >= 2;
    let row = dims[0] as usize;
    let (kind, data) = match weights {
        _ if !matrix => (GgmlType::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgufType::Q8_0 if row.is_multiple_of(Q8_BLOCK) => (GgmlType::Q8_0, quantize_q8_0(&values)),
        GgufType::Q8_0 | GgufType::F16 => (GgmlType::F16, values.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect()),
        GgufType::Bf16 => (GgmlType::Bf16, values.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect()),
    };
    Ok(Encoded { name, dims, kind, data })
}

/// ggml's `quantize_row_q8_0_ref`: per 32 values, d = max|x| / 127 (stored f16) and
/// q = round(x / d), rounding half away from zero.
fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_BLOCK * 34);
    for block in values.chunks(Q8_BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f32_to_f16(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

/// IEEE half precision, round to nearest even (what ggml's conversion does).
fn f32_to_f16(value: f32) -> u16 {
    Tensor::from_slice(&[value]).to_kind(Kind::Half).view_dtype(Kind::Int16).int64_value(&[0]) as u16
}

/// bfloat16, round to nearest even.
fn f32_to_bf16(value: f32) -> u16 {
    Tensor::from_slice(&[value]).to_kind(Kind::BFloat16).view_dtype(Kind::Int16).int64_value(&[0]) as u16
}

/// The tokenizer as llama.cpp's BPE ("gpt2") vocabulary: every id's token and type, the merges,
/// the special ids, and the chat template.
fn tokenizer_metadata(model_dir: &Path, config: &ModelConfig) -> Result<Vec<(String, Meta)>> {
    let path = model_dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| TrainerError::file(&path, e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(TrainerError::file(&path, "GGUF export takes byte-level BPE tokenizers (Qwen, Llama 3)"));
    }
    let size = config.vocab_size as usize;
    let mut tokens: Vec<Option<String>> = vec![None; size];
    let mut types = vec![1i32; size]; // NORMAL
    for (token, id) in model["vocab"].as_object().into_iter().flatten() {
        if let Some(slot) = id.as_u64().and_then(|id| tokens.get_mut(id as usize)) {
            *slot = Some(token.clone());
        }
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else { continue };
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(content.to_string());
            types[id as usize] = if added["special"].as_bool() == Some(true) { 3 } else { 4 };
            // CONTROL, USER_DEFINED
        }
    }
    // Rows of the embedding no token uses (vocabularies padded to a round size).
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5; // UNUSED
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(pair) => Some(format!("{} {}", pair.first()?.as_str()?, pair.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let pre = match config.family {
        Family::Qwen3 | Family::Qwen2 => "qwen2",
        Family::Llama => "llama-bpe",
    };
    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Meta::Str(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Meta::Strings(tokens.clone())),
        ("tokenizer.ggml.token_type".to_string(), Meta::I32s(types)),
        ("tokenizer.ggml.merges".to_string(), Meta::Strings(merges)),
    ];
    let config_path = model_dir.join("tokenizer_config.json");
    let special = read_special_tokens(&config_path)?;
    let id_of = |token: &Option<String>| token.as_ref().and_then(|t| tokens.iter().position(|x| x == t)).map(|i| i as u32);
    let eos = id_of(&special.eos).or_else(|| config.eos_token_ids.first().map(|&i| i as u32));
    let bos = id_of(&special.bos).or(config.bos_token_id.map(|i| i as u32));
    if let Some(eos) = eos {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Meta::U32(eos)));
    }
    if let Some(bos) = bos {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Meta::U32(bos)));
    }
    if let Some(pad) = id_of(&special.pad) {
        meta.push(("tokenizer.ggml.padding_token_id".into(), Meta::U32(pad)));
    }
    // Qwen's tokenizer adds no BOS; Llama 3's does (its template writes it too).
    meta.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(config.family == Family::Llama)));
    let tokenizer_config: Value =
        std::fs::read_to_string(&config_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null);
    if let Some(template) = tokenizer_config["chat_template"].as_str() {
        meta.push(("tokenizer.chat_template".into(), Meta::Str(template.into())));
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(), Some("blk.3.attn_q.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.k_proj.bias").as_deref(), Some("blk.0.attn_k.bias"));
        assert_eq!(gguf_name("model.layers.1.mlp.down_proj.weight").as_deref(), Some("blk.1.ffn_down.weight"));
        assert_eq!(gguf_name("model.layers.1.post_attention_layernorm.weight").as_deref(), Some("blk.1.ffn_norm.weight"));
        assert_eq!(gguf_name("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        assert_eq!(gguf_name("model.layers.1.mlp.experts.0.weight"), None);
    }

    #[test]
    fn q8_0_blocks_are_a_half_scale_and_rounded_bytes() {
        let mut values = vec![0.0f32; 32];
        values[0] = 127.0; // the scale is 1
        values[1] = -63.5; // half way: away from zero
        values[2] = 2.5;
        values[3] = 0.4;
        let block = quantize_q8_0(&values);
        assert_eq!(block.len(), 34);
        assert_eq!(u16::from_le_bytes([block[0], block[1]]), 0x3C00);
        assert_eq!([block[2] as i8, block[3] as i8, block[4] as i8, block[5] as i8], [127, -64, 3, 0]);
        assert_eq!(f32_to_f16(1.0), 0x3C00);
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
    }

    #[test]
    fn llama_rotary_rows_are_interleaved_per_head() {
        // One head of 4 rows: HF [a0, a1, b0, b1] (halves) -> ggml [a0, b0, a1, b1] (pairs).
        let w = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]).view([4, 1]);
        let p: Vec<f32> = Vec::try_from(permute_rotary(&w, 1).flatten(0, -1)).unwrap();
        assert_eq!(p, [0.0, 2.0, 1.0, 3.0]);
    }
}
