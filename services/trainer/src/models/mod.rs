//! Model implementations. One decoder covers the supported families; [`load`] builds it from
//! a model directory, optionally with a PEFT adapter.

pub mod decoder;
mod fused;

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::model_dir::ModelDir;
use crate::nf4::{quantizes, Nf4Weight, Quantization};
use crate::{peft, Result};
use decoder::{Decoder, Trainable, Weights};

/// Loads a model directory for training or inference, with frozen weights in `kind`, or the
/// decoder layers' projections in NF4 (quantized one tensor at a time as they are read).
pub fn load(dir: &ModelDir, trainable: &Trainable, quantization: Quantization, kind: Kind, device: Device) -> Result<Decoder> {
    let mut dense = HashMap::new();
    let mut quantized = HashMap::new();
    dir.for_each_tensor(device, kind, |name, tensor| {
        match quantization {
            Quantization::Nf4 { double_quant } if quantizes(&name) && tensor.is_floating_point() && tensor.dim() == 2 => {
                quantized.insert(name, Nf4Weight::quantize(&tensor, double_quant));
            }
            _ => {
                dense.insert(name, tensor);
            }
        }
        Ok(())
    })?;
    let what = dir.weight_files.first().map(|p| p.display().to_string()).unwrap_or_default();
    Decoder::from_weights(&dir.config, Weights { dense, quantized }, trainable, kind, device, &what)
}

/// Loads a model for inference, with the PEFT adapter in `adapter` applied when given.
pub fn load_for_inference(model: &Path, adapter: Option<&Path>, kind: Kind, device: Device) -> Result<Decoder> {
    load_for_inference_as(model, adapter, Quantization::None, kind, device)
}

/// [`load_for_inference`] with the base's projections held as `quantization` says (a QLoRA
/// adapter on the 4-bit base it was trained on).
pub fn load_for_inference_as(
    model: &Path,
    adapter: Option<&Path>,
    quantization: Quantization,
    kind: Kind,
    device: Device,
) -> Result<Decoder> {
    let dir = ModelDir::open(model)?;
    match adapter {
        None => load(&dir, &Trainable::Nothing, quantization, kind, device),
        Some(adapter) => {
            let lora = peft::read_adapter_config(adapter)?;
            let mut decoder = load(&dir, &Trainable::Lora(lora), quantization, kind, device)?;
            peft::load_adapter_weights(adapter, &mut decoder)?;
            Ok(decoder)
        }
    }
}

/// A base model's tensors, read once, that several inference decoders share: each gets
/// shallow clones (the same storage), so only what a decoder builds for itself (the stacked
/// q/k/v and gate/up projections, an adapter's LoRA weights) is held once per decoder.
pub struct SharedBase {
    pub dir: ModelDir,
    tensors: HashMap<String, Tensor>,
    kind: Kind,
    device: Device,
}

impl SharedBase {
    pub fn read(model: &Path, kind: Kind, device: Device) -> Result<SharedBase> {
        let dir = ModelDir::open(model)?;
        let mut tensors = HashMap::new();
        dir.for_each_tensor(device, kind, |name, tensor| {
            tensors.insert(name, tensor);
            Ok(())
        })?;
        Ok(SharedBase { dir, tensors, kind, device })
    }

    /// A decoder over these weights, with the PEFT adapter in `adapter` applied when given.
    pub fn decoder(&self, adapter: Option<&Path>) -> Result<Decoder> {
        let tensors: HashMap<String, Tensor> = self.tensors.iter().map(|(name, t)| (name.clone(), t.shallow_clone())).collect();
        let what = self.dir.weight_files.first().map(|p| p.display().to_string()).unwrap_or_default();
        match adapter {
            None => Decoder::from_weights(&self.dir.config, tensors, &Trainable::Nothing, self.kind, self.device, &what),
            Some(adapter) => {
                let lora = peft::read_adapter_config(adapter)?;
                let mut decoder = Decoder::from_weights(&self.dir.config, tensors, &Trainable::Lora(lora), self.kind, self.device, &what)?;
                peft::load_adapter_weights(adapter, &mut decoder)?;
                Ok(decoder)
            }
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
