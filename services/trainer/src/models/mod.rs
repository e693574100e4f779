//! Model implementations. One decoder covers the supported families; [`load`] builds it from
//! a model directory, optionally with a PEFT adapter.

pub mod decoder;

use std::path::Path;

use tch::{Device, Kind};

use crate::model_dir::ModelDir;
use crate::{peft, Result};
use decoder::{Decoder, Trainable};

/// Loads a model directory for training or inference, with frozen weights in `kind`.
pub fn load(dir: &ModelDir, trainable: &Trainable, kind: Kind, device: Device) -> Result<Decoder> {
    let weights = dir.load_weights(device, kind)?;
    let what = dir.weight_files.first().map(|p| p.display().to_string()).unwrap_or_default();
    Decoder::from_weights(&dir.config, weights, trainable, kind, device, &what)
}

/// Loads a model for inference, with the PEFT adapter in `adapter` applied when given.
pub fn load_for_inference(model: &Path, adapter: Option<&Path>, kind: Kind, device: Device) -> Result<Decoder> {
    let dir = ModelDir::open(model)?;
    match adapter {
        None => load(&dir, &Trainable::Nothing, kind, device),
        Some(adapter) => {
            let lora = peft::read_adapter_config(adapter)?;
            let mut decoder = load(&dir, &Trainable::Lora(lora), kind, device)?;
            peft::load_adapter_weights(adapter, &mut decoder)?;
            Ok(decoder)
        }
    }
}

/// The dtype a checkpoint stores its weights in, from `torch_dtype` (v4) or `dtype` (v5).
pub fn stored_kind(dir: &ModelDir) -> Kind {
    let raw = &dir.config.raw;
    let name = raw.get("torch_dtype").or_else(|| raw.get("dtype")).and_then(|v| v.as_str()).unwrap_or("float32");
    match name {
        "bfloat16" => Kind::BFloat16,
        "float16" => Kind::Half,
        _ => Kind::Float,
    }
}
