//! Loading model directories: sharded safetensors with an index load the same model as one
//! file, and an adapter round-trips through the PEFT layout.

use std::collections::BTreeMap;
use std::path::Path;

use lathe_trainer::init::{init_model, Arch, InitOptions, Preset};
use lathe_trainer::models;
use tch::{Device, Kind, Tensor};

fn logits(model: &Path) -> Tensor {
    let decoder = models::load_for_inference(model, None, Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 17, 99, 3, 250, 8]).view([1, 6]);
    tch::no_grad(|| decoder.forward(&ids, None, None, false))
}

#[test]
fn a_sharded_checkpoint_loads_the_same_model_as_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    init_model(&InitOptions { arch: Arch::Llama, preset: Preset::Tiny, seed: 1, out: single.clone() }).unwrap();

    // Split the tensors over two shards and write the index transformers writes.
    let sharded = dir.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(single.join(f), sharded.join(f)).unwrap();
    }
    let tensors = Tensor::read_safetensors(single.join("model.safetensors")).unwrap();
    let (first, second): (Vec<_>, Vec<_>) = tensors.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let mut weight_map = BTreeMap::new();
    for (name, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let part: Vec<(String, Tensor)> = part.into_iter().map(|(_, t)| t).collect();
        for (tensor, _) in &part {
            weight_map.insert(tensor.clone(), name.to_string());
        }
        Tensor::write_safetensors(&part, sharded.join(name)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let diff = (logits(&single) - logits(&sharded)).abs().max().double_value(&[]);
    assert_eq!(diff, 0.0);

    // A shard the index names but that is missing is reported by name.
    std::fs::remove_file(sharded.join("model-00002-of-00002.safetensors")).unwrap();
    let err = models::load_for_inference(&sharded, None, Kind::Float, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn a_shard_name_that_leaves_the_model_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    init_model(&InitOptions { arch: Arch::Qwen3, preset: Preset::Tiny, seed: 0, out: model.clone() }).unwrap();
    std::fs::rename(model.join("model.safetensors"), dir.path().join("outside.safetensors")).unwrap();
    let index = serde_json::json!({"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}});
    std::fs::write(model.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = models::load_for_inference(&model, None, Kind::Float, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("invalid shard name"), "{err}");
}

#[test]
fn a_truncated_or_lying_safetensors_file_is_refused_naming_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    init_model(&InitOptions { arch: Arch::Qwen3, preset: Preset::Tiny, seed: 0, out: model.clone() }).unwrap();
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();

    // Cut off in the middle of the data: the last tensor ends past the end of the file.
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let err = models::load_for_inference(&model, None, Kind::Float, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("past the end of the file"), "{err}");

    // A header whose offsets do not match the shape it declares.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header).unwrap();
    json["model.norm.weight"]["shape"] = serde_json::json!([3]);
    let mut lying = serde_json::to_string(&json).unwrap().into_bytes();
    lying.resize(header_len, b' ');
    let mut patched = bytes[..8].to_vec();
    patched.extend(lying);
    patched.extend(&bytes[8 + header_len..]);
    std::fs::write(&file, patched).unwrap();
    let err = models::load_for_inference(&model, None, Kind::Float, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("model.norm.weight") && err.contains("data_offsets"), "{err}");
}
