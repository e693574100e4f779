//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, with the
//! names `peft` itself writes (`base_model.model.<module>.lora_A.weight`), so that
//! `PeftModel.from_pretrained` and vLLM load what Lathe trains, and Lathe loads theirs.

use std::path::Path;

use serde_json::json;
use tch::{Kind, Tensor};

use crate::checkpoint::{read_tensors, write_dir_atomically, write_json, write_tensors};
use crate::lora::{LoraConfig, TargetModules, LINEAR_MODULES};
use crate::models::decoder::{linear_path, Decoder};
use crate::{Result, TrainerError};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The adapter's tensors under PEFT names (fp32).
pub fn adapter_tensors(decoder: &Decoder) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    decoder.visit_tensors(false, &mut |name, tensor| {
        if let Some(module) = name.strip_suffix(".lora_A") {
            out.push((format!("{PREFIX}{module}.lora_A.weight"), tensor.detach().to_kind(Kind::Float)));
        } else if let Some(module) = name.strip_suffix(".lora_B") {
            out.push((format!("{PREFIX}{module}.lora_B.weight"), tensor.detach().to_kind(Kind::Float)));
        }
    });
    out
}

pub fn adapter_config_json(lora: &LoraConfig, base_model: &str) -> serde_json::Value {
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": lora.target_module_names(),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": lora.use_rslora,
    })
}

/// Writes a PEFT adapter directory atomically.
pub fn write_adapter(dir: &Path, decoder: &Decoder, lora: &LoraConfig, base_model: &str) -> Result<()> {
    let tensors = adapter_tensors(decoder);
    if tensors.is_empty() {
        return Err(TrainerError::invalid("method", "the model has no LoRA layers to export"));
    }
    write_dir_atomically(dir, |tmp| {
        write_json(&tmp.join(ADAPTER_CONFIG), &adapter_config_json(lora, base_model))?;
        write_tensors(&tmp.join(ADAPTER_WEIGHTS), &tensors)
    })
}

/// Reads `adapter_config.json` into a LoRA configuration (LoRA only; DoRA and others refused).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TrainerError::file(&path, format!("not valid JSON: {e}")))?;
    let field = |name: &str| v.get(name).filter(|x| !x.is_null());
    if field("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
        return Err(TrainerError::config_field(&path, "peft_type", "only LORA adapters are supported"));
    }
    if field("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        return Err(TrainerError::config_field(&path, "use_dora", "DoRA adapters are not supported"));
    }
    let rank = field("r").and_then(|x| x.as_i64()).ok_or_else(|| TrainerError::config_field(&path, "r", "missing or not an integer"))?;
    let alpha = field("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0);
    let target_modules = match field("target_modules") {
        Some(serde_json::Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
        Some(serde_json::Value::Array(items)) => {
            let names: Vec<String> = items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect();
            if let Some(bad) = names.iter().find(|n| !LINEAR_MODULES.contains(&n.as_str())) {
                return Err(TrainerError::config_field(&path, "target_modules", format!("unsupported module {bad:?}")));
            }
            TargetModules::Named(names)
        }
        _ => return Err(TrainerError::config_field(&path, "target_modules", "missing")),
    };
    let config = LoraConfig {
        rank,
        alpha,
        dropout: field("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0),
        target_modules,
        use_rslora: field("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
        init_seed: 0,
    };
    config.validate().map_err(|e| TrainerError::file(&path, e.to_string()))?;
    Ok(config)
}

/// Copies adapter weights from `dir` into a decoder built with the same LoRA configuration.
pub fn load_adapter_weights(dir: &Path, decoder: &mut Decoder) -> Result<()> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let mut saved = read_tensors(&path)?;
    let _guard = tch::no_grad_guard();
    for (i, layer) in decoder.layers.iter_mut().enumerate() {
        for (module, linear) in layer.linears_mut() {
            let Some(lora) = linear.lora.as_mut() else { continue };
            for (suffix, target) in [("lora_A", &mut lora.a), ("lora_B", &mut lora.b)] {
                let name = format!("{PREFIX}{}.{suffix}.weight", linear_path(i, module));
                let tensor = saved.remove(&name).ok_or_else(|| TrainerError::file(&path, format!("missing tensor {name}")))?;
                if tensor.size() != target.size() {
                    return Err(TrainerError::file(
                        &path,
                        format!("tensor {name} has shape {:?}, expected {:?}", tensor.size(), target.size()),
                    ));
                }
                target.copy_(&tensor.to_kind(Kind::Float).to_device(target.device()));
            }
        }
    }
    if let Some(extra) = saved.keys().min() {
        return Err(TrainerError::file(&path, format!("unexpected tensor {extra} (not a LoRA layer of this model)")));
    }
    Ok(())
}
