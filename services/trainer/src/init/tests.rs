use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::presets::Dimensions;
use super::*;

fn tiny(arch: Arch, seed: u64, out: &Path) -> InitSummary {
    init_model(&InitOptions { arch, preset: Preset::Tiny, seed, out: out.to_path_buf() }).expect("tiny init succeeds")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// name -> (dtype, shape) of every tensor in the model's safetensors file.
fn stored_tensors(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>)> {
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors().into_iter().map(|(name, view)| (name, (view.dtype(), view.shape().to_vec()))).collect()
}

fn f32_values(dir: &Path, name: &str) -> Vec<f32> {
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let view = file.tensor(name).unwrap();
    view.data().chunks_exact(4).map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap())).collect()
}

fn load_tokenizer(dir: &Path) -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
}

#[test]
fn arch_and_preset_names_round_trip() {
    for arch in [Arch::Qwen3, Arch::Qwen2, Arch::Llama] {
        assert_eq!(arch.to_string().parse::<Arch>().unwrap(), arch);
    }
    for preset in [Preset::Tiny, Preset::Small, Preset::FourB] {
        assert_eq!(preset.to_string().parse::<Preset>().unwrap(), preset);
    }
    let err = "gpt2".parse::<Arch>().unwrap_err().to_string();
    assert!(err.contains("gpt2") && err.contains("qwen3"), "{err}");
    assert!("huge".parse::<Preset>().is_err());
}

#[test]
fn the_same_seed_writes_the_same_bytes_and_another_seed_other_weights() {
    let root = tempfile::tempdir().unwrap();
    let (first, second, other) = (root.path().join("a"), root.path().join("b"), root.path().join("c"));
    let summary = tiny(Arch::Qwen3, 7, &first);
    tiny(Arch::Qwen3, 7, &second);
    tiny(Arch::Qwen3, 8, &other);

    let names: Vec<_> = summary.files.iter().map(|path| path.file_name().unwrap().to_owned()).collect();
    assert_eq!(names.len(), 5);
    for name in &names {
        assert_eq!(fs::read(first.join(name)).unwrap(), fs::read(second.join(name)).unwrap(), "{name:?} differs");
    }
    assert_ne!(fs::read(first.join("model.safetensors")).unwrap(), fs::read(other.join("model.safetensors")).unwrap());
    // The tokenizer does not depend on the seed.
    assert_eq!(fs::read(first.join("tokenizer.json")).unwrap(), fs::read(other.join("tokenizer.json")).unwrap());
}

fn expected_layer_tensors(arch: Arch, dims: &Dimensions, layer: usize) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv, ff, d) = (
        dims.hidden_size,
        dims.num_attention_heads * dims.head_dim,
        dims.num_key_value_heads * dims.head_dim,
        dims.intermediate_size,
        dims.head_dim,
    );
    let p = format!("model.layers.{layer}");
    let mut tensors = vec![
        (format!("{p}.input_layernorm.weight"), vec![h]),
        (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
        (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
        (format!("{p}.mlp.gate_proj.weight"), vec![ff, h]),
        (format!("{p}.mlp.up_proj.weight"), vec![ff, h]),
        (format!("{p}.mlp.down_proj.weight"), vec![h, ff]),
    ];
    match arch {
        Arch::Qwen3 => {
            tensors.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
            tensors.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        }
        Arch::Qwen2 => {
            tensors.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            tensors.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            tensors.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        Arch::Llama => {}
    }
    tensors
}

#[test]
fn each_arch_stores_the_tensor_names_and_shapes_transformers_expects() {
    let root = tempfile::tempdir().unwrap();
    let dims = Dimensions::of(Preset::Tiny);
    for arch in [Arch::Qwen3, Arch::Qwen2, Arch::Llama] {
        let dir = root.path().join(arch.to_string());
        let summary = tiny(arch, 0, &dir);
        let vocab = summary.vocab_size;

        let mut expected: BTreeMap<String, (Dtype, Vec<usize>)> = BTreeMap::new();
        let mut add = |name: String, shape: Vec<usize>| expected.insert(name, (Dtype::F32, shape));
        add("model.embed_tokens.weight".into(), vec![vocab, dims.hidden_size]);
        add("model.norm.weight".into(), vec![dims.hidden_size]);
        if arch == Arch::Llama {
            add("lm_head.weight".into(), vec![vocab, dims.hidden_size]);
        }
        for layer in 0..dims.num_hidden_layers {
            for (name, shape) in expected_layer_tensors(arch, &dims, layer) {
                add(name, shape);
            }
        }
        let stored = stored_tensors(&dir);
        assert_eq!(stored, expected, "{arch}");
        let numel: usize = stored.values().map(|(_, shape)| shape.iter().product::<usize>()).sum();
        assert_eq!(summary.parameters, numel, "{arch}");

        let config = read_json(&dir.join("config.json"));
        assert_eq!(config["vocab_size"], vocab, "{arch}");
        assert_eq!(config["tie_word_embeddings"], arch != Arch::Llama, "{arch}");
        assert_eq!(config["head_dim"], dims.head_dim, "{arch}");
        assert_eq!(config["num_key_value_heads"], dims.num_key_value_heads, "{arch}");
    }
}

#[test]
fn config_json_names_the_family_as_hugging_face_does() {
    let root = tempfile::tempdir().unwrap();
    let cases = [
        (Arch::Qwen3, "Qwen3ForCausalLM", "qwen3", 1e-6, 1_000_000.0),
        (Arch::Qwen2, "Qwen2ForCausalLM", "qwen2", 1e-6, 1_000_000.0),
        (Arch::Llama, "LlamaForCausalLM", "llama", 1e-5, 500_000.0),
    ];
    for (arch, class, model_type, eps, theta) in cases {
        let dir = root.path().join(model_type);
        tiny(arch, 1, &dir);
        let config = read_json(&dir.join("config.json"));
        assert_eq!(config["architectures"], serde_json::json!([class]));
        assert_eq!(config["model_type"], model_type);
        assert_eq!(config["rms_norm_eps"], eps);
        assert_eq!(config["rope_theta"], theta);
        assert_eq!(config["torch_dtype"], "float32");
        assert_eq!(config["hidden_act"], "silu");
        match arch {
            Arch::Qwen3 => assert_eq!(config["attention_bias"], false),
            Arch::Qwen2 => assert!(config.get("attention_bias").is_none(), "qwen2 has no attention_bias field"),
            Arch::Llama => {
                assert_eq!(config["rope_scaling"]["rope_type"], "llama3");
                assert_eq!(config["rope_scaling"]["factor"], 8.0);
                assert_eq!(config["mlp_bias"], false);
            }
        }
        if arch != Arch::Llama {
            assert!(config["rope_scaling"].is_null());
            assert_eq!(config["use_sliding_window"], false);
        }
    }
}

#[test]
fn norm_weights_are_near_one_but_not_one_and_embeddings_have_unit_rows() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    tiny(Arch::Qwen3, 3, &dir);
    for name in ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.k_norm.weight"] {
        let values = f32_values(&dir, name);
        assert!(values.iter().all(|v| (0.4..1.6).contains(v)), "{name}");
        assert!(values.iter().filter(|v| **v != 1.0).count() == values.len(), "{name} has weights of exactly 1");
    }
    let embed = f32_values(&dir, "model.embed_tokens.weight");
    let mean = embed.iter().map(|v| f64::from(*v)).sum::<f64>() / embed.len() as f64;
    let std = (embed.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / embed.len() as f64).sqrt();
    assert!(mean.abs() < 0.001, "mean {mean}");
    // N(0, 1/sqrt(hidden)) with hidden 64: rows of about unit norm.
    assert!((std - 0.125).abs() < 0.002, "std {std}");
    let linear = f32_values(&dir, "model.layers.0.mlp.up_proj.weight");
    let linear_std = (linear.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / linear.len() as f64).sqrt();
    assert!((linear_std - 0.02).abs() < 0.001, "linear std {linear_std}");
}

#[test]
fn the_tokenizer_round_trips_text_and_keeps_special_tokens_whole() {
    let root = tempfile::tempdir().unwrap();
    for arch in [Arch::Qwen3, Arch::Qwen2, Arch::Llama] {
        let dir = root.path().join(arch.to_string());
        let summary = tiny(arch, 0, &dir);
        let tokenizer = load_tokenizer(&dir);
        let size = tokenizer.get_vocab_size(true);
        assert!((1000..=2000).contains(&size), "{arch}: {size} ids");
        assert_eq!((size, summary.vocab_size), (1260, 1280), "{arch}: tiny keeps 20 padding rows");

        let text = "CVE-2021-44228: Apache Log4j2 <=2.14.1 allows RCE.\n\n  Ünïcödé, 日本語 and emoji 🦀\ttabs";
        let encoding = tokenizer.encode(text, false).unwrap();
        assert!(encoding.get_ids().len() < text.len(), "{arch}: BPE merged nothing");
        assert_eq!(tokenizer.decode(encoding.get_ids(), false).unwrap(), text, "{arch}");

        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"));
        let decoder = tokenizer_config["added_tokens_decoder"].as_object().unwrap();
        let marker = if arch == Arch::Llama { "<|start_header_id|>" } else { "<|im_start|>" };
        let marker_id = tokenizer.token_to_id(marker).unwrap();
        assert_eq!(decoder[&marker_id.to_string()]["content"], marker);
        assert!(marker_id as usize >= size - 5, "special tokens come after the BPE vocabulary");
        let with_marker = tokenizer.encode(format!("{marker}user\nhi"), false).unwrap();
        assert_eq!(with_marker.get_ids()[0], marker_id, "{arch}");
        assert_eq!(with_marker.get_tokens()[0], marker, "{arch}");
    }
}

#[test]
fn llama_prepends_begin_of_text_and_qwen_prepends_nothing() {
    let root = tempfile::tempdir().unwrap();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let dir = root.path().join(arch.to_string());
        tiny(arch, 0, &dir);
        let tokenizer = load_tokenizer(&dir);
        let plain = tokenizer.encode("hello world", false).unwrap();
        let with_specials = tokenizer.encode("hello world", true).unwrap();
        if arch == Arch::Llama {
            let bos = tokenizer.token_to_id("<|begin_of_text|>").unwrap();
            assert_eq!(with_specials.get_ids()[0], bos);
            assert_eq!(&with_specials.get_ids()[1..], plain.get_ids());
            let config = read_json(&dir.join("config.json"));
            assert_eq!(config["bos_token_id"], bos);
        } else {
            assert_eq!(with_specials.get_ids(), plain.get_ids());
        }
    }
}

#[test]
fn the_config_files_point_at_the_right_special_tokens() {
    let root = tempfile::tempdir().unwrap();
    for arch in [Arch::Qwen3, Arch::Llama] {
        let dir = root.path().join(arch.to_string());
        tiny(arch, 0, &dir);
        let tokenizer = load_tokenizer(&dir);
        let id = |token: &str| tokenizer.token_to_id(token).unwrap();
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"));
        let generation = read_json(&dir.join("generation_config.json"));
        let config = read_json(&dir.join("config.json"));
        assert_eq!(generation["do_sample"], false);
        match arch {
            Arch::Llama => {
                assert_eq!(tokenizer_config["bos_token"], "<|begin_of_text|>");
                assert_eq!(tokenizer_config["eos_token"], "<|eot_id|>");
                assert_eq!(config["eos_token_id"], serde_json::json!([id("<|end_of_text|>"), id("<|eot_id|>")]));
            }
            _ => {
                assert!(tokenizer_config["bos_token"].is_null());
                assert_eq!(tokenizer_config["eos_token"], "<|im_end|>");
                assert_eq!(tokenizer_config["pad_token"], "<|endoftext|>");
                assert_eq!(config["eos_token_id"], id("<|im_end|>"));
                assert_eq!(generation["eos_token_id"], serde_json::json!([id("<|im_end|>"), id("<|endoftext|>")]));
                let think = &tokenizer_config["added_tokens_decoder"][id("<think>").to_string()];
                assert_eq!(think["special"], false);
            }
        }
    }
}

/// The expected strings are what `transformers` 5.23 `apply_chat_template` renders from the
/// same files (checked by hand when the templates were written).
#[test]
fn each_chat_template_renders_as_transformers_does_and_encodes_whole_special_tokens() {
    let root = tempfile::tempdir().unwrap();
    let cases = [
        (
            Arch::Qwen2,
            "<|im_start|>",
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nMap CVE-2020-1 to a CWE.<|im_end|>\n<|im_start|>assistant\n",
        ),
        (Arch::Qwen3, "<|im_start|>", "<|im_start|>user\nMap CVE-2020-1 to a CWE.<|im_end|>\n<|im_start|>assistant\n"),
        (
            Arch::Llama,
            "<|start_header_id|>",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nMap CVE-2020-1 to a CWE.<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    ];
    for (arch, turn_marker, expected) in cases {
        let dir = root.path().join(arch.to_string());
        tiny(arch, 0, &dir);
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"));
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template("chat", tokenizer_config["chat_template"].as_str().unwrap()).unwrap();
        let messages = serde_json::json!([{"role": "user", "content": "Map CVE-2020-1 to a CWE."}]);
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => tokenizer_config["bos_token"].as_str(),
        };
        let rendered = env.get_template("chat").unwrap().render(context).unwrap();
        assert_eq!(rendered, expected, "{arch}");

        let tokenizer = load_tokenizer(&dir);
        let ids = tokenizer.encode(rendered, false).unwrap().get_ids().to_vec();
        let marker = tokenizer.token_to_id(turn_marker).unwrap();
        let expected_turns = if arch == Arch::Qwen2 { 3 } else { 2 };
        assert_eq!(ids.iter().filter(|id| **id == marker).count(), expected_turns, "{arch}");
    }
}

#[test]
fn an_existing_non_empty_directory_is_refused_and_left_alone() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = init_model(&InitOptions { arch: Arch::Qwen3, preset: Preset::Tiny, seed: 0, out: out.clone() }).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    let entries: Vec<_> = fs::read_dir(&out).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("notes.txt")]);
    assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1, "no temp directory left beside out");
}

#[test]
fn an_existing_empty_directory_is_filled() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("model");
    fs::create_dir(&out).unwrap();
    let summary = tiny(Arch::Llama, 0, &out);
    for file in &summary.files {
        assert!(file.starts_with(&out) && file.is_file(), "{}", file.display());
    }
}

#[test]
fn a_failed_write_leaves_nothing_at_out_and_no_temp_directory() {
    let root = tempfile::tempdir().unwrap();
    // A directory that fills up after the emptiness check: the final rename must fail.
    let out = root.path().join("model");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("late.txt"), "raced").unwrap();
    let files = ModelFiles {
        parameters: 0,
        vocab_size: 0,
        contents: vec![("config.json", b"{}".to_vec())],
        weights: weights::RandomWeights { layout: Vec::new(), dtype: presets::StoredDtype::F32, seed: 0 },
    };
    assert!(write_dir_atomically(&out, &files).is_err());
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
    assert!(!out.join("config.json").exists());
    assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1, "temp directory removed");

    // An `out` below a regular file cannot be created at all.
    let blocker = root.path().join("file");
    fs::write(&blocker, "x").unwrap();
    let below_file = blocker.join("model");
    let err = init_model(&InitOptions { arch: Arch::Qwen2, preset: Preset::Tiny, seed: 0, out: below_file.clone() });
    assert!(err.is_err());
    assert!(!below_file.exists());
}

#[test]
fn the_small_preset_has_about_a_hundred_million_parameters() {
    let dims = Dimensions::of(Preset::Small);
    let counts: Vec<usize> = [Arch::Qwen3, Arch::Qwen2, Arch::Llama]
        .into_iter()
        .map(|arch| weights::tensor_layout(arch, &dims, 8192).iter().map(|t| t.numel()).sum())
        .collect();
    assert_eq!(counts, vec![102_778_880, 102_794_240, 111_166_464]);
    for count in counts {
        assert!((100_000_000..=250_000_000).contains(&count));
    }
}

#[test]
fn the_4b_preset_has_qwen3_4b_s_shapes_and_parameter_count() {
    let dims = Dimensions::of(Preset::FourB);
    // Qwen3-4B: 4,022,468,096 parameters with the tied embedding counted once.
    let vocab = dims.embedding_rows.unwrap();
    let count: usize = weights::tensor_layout(Arch::Qwen3, &dims, vocab).iter().map(|t| t.numel()).sum();
    assert_eq!((vocab, count), (151_936, 4_022_468_096));
}

#[test]
fn the_small_tokenizer_fills_its_whole_vocabulary() {
    let trained = tokenizer::train(Arch::Qwen3, Dimensions::of(Preset::Small).tokenizer_vocab_target).unwrap();
    assert_eq!(trained.len(), 8192, "the corpus ran out of merges");
}
