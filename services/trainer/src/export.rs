//! Writes a full model in the Hugging Face layout: the base with LoRA merged in
//! (`W + scaling·B·A`), or the weights of a full fine-tune. config.json, tokenizer and
//! generation files are copied from the base, so transformers and vLLM load it as the base.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::checkpoint::{write_dir_atomically, write_tensors};
use crate::models::decoder::{linear_path, Decoder};
use crate::{Result, TrainerError};

/// Files copied unchanged from the base model directory when present.
const COPIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// The model's weights with every LoRA pair merged, in `kind`, under checkpoint names.
pub fn merged_tensors(decoder: &Decoder, kind: Kind) -> Vec<(String, Tensor)> {
    let _guard = tch::no_grad_guard();
    let mut out = Vec::new();
    let mut deltas = std::collections::HashMap::new();
    for (i, layer) in decoder.layers.iter().enumerate() {
        for (module, linear) in layer.linears() {
            if let Some(lora) = &linear.lora {
                deltas.insert(format!("{}.weight", linear_path(i, module)), lora.delta_weight());
            }
        }
    }
    decoder.visit_parameters(&mut |name, tensor| {
        if name.ends_with(".lora_A") || name.ends_with(".lora_B") {
            return;
        }
        let merged = match deltas.get(name) {
            // Merge in fp32, then round once to the stored dtype.
            Some(delta) => tensor.detach().to_kind(Kind::Float) + delta,
            None => tensor.detach(),
        };
        out.push((name.to_string(), merged.to_kind(kind)));
    });
    out
}

/// Writes `out_dir` atomically: merged weights in `kind` plus the base's config and tokenizer.
pub fn write_merged_model(out_dir: &Path, base_dir: &Path, decoder: &Decoder, kind: Kind) -> Result<()> {
    let tensors = merged_tensors(decoder, kind);
    write_dir_atomically(out_dir, |tmp| {
        for name in COPIED_FILES {
            let src = base_dir.join(name);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(name)).map_err(|e| TrainerError::io(&src, e))?;
            }
        }
        write_tensors(&tmp.join("model.safetensors"), &tensors)
    })
}
