use serde_json::json;

use super::*;
use crate::ids::FileId;

fn training_file() -> String {
    FileId::from_random([1; 18]).to_string()
}

/// A request body as the SDK sends it, with `extra` merged in at the top level.
fn body(extra: Value) -> Value {
    let mut body = json!({ "model": "tiny-qwen3", "training_file": training_file() });
    for (key, value) in extra.as_object().expect("object") {
        body[key] = value.clone();
    }
    body
}

fn spec(extra: Value) -> Result<JobSpec, SpecError> {
    JobSpec::try_from(CreateJobRequest::from_value(body(extra))?)
}

fn spec_of(extra: Value) -> JobSpec {
    spec(extra).unwrap()
}

fn rejection(extra: Value) -> SpecError {
    spec(extra).expect_err("expected a rejection")
}

#[test]
fn a_minimal_request_resolves_to_the_documented_defaults() {
    let spec = spec(json!({})).unwrap();
    assert_eq!(spec.method, Method::Supervised);
    assert_eq!(spec.hyperparameters, Hyperparameters { n_epochs: 3, batch_size: 4, learning_rate_multiplier: 1.0, beta: None });
    assert_eq!(spec.learning_rate, 1e-4);
    let lora = spec.lora.as_ref().unwrap();
    assert_eq!((lora.rank, lora.alpha, lora.dropout, lora.use_rslora), (16, 32.0, 0.0, false));
    assert_eq!(lora.target_modules, LINEAR_MODULES);
    assert_eq!(spec.quantization, None);
    assert_eq!((spec.lr_scheduler, spec.warmup_ratio, spec.max_seq_length), (LrScheduler::Cosine, 0.03, 2048));
    assert!(!spec.packing && !spec.train_on_inputs && !spec.gradient_checkpointing);
    assert_eq!((spec.checkpoint_every, spec.keep_checkpoints, spec.eval_every), (None, 3, None), "OpenAI's cadence: per epoch, keep 3");
    assert_eq!(spec.seed, 0);
    assert_eq!(spec.resources, Resources { pool: "default".into(), gpu_memory_gb: None, priority: 0, gpus: 1, nodes: 1 });
}

#[test]
fn checkpoint_and_validation_cadences_are_steps_and_keep_is_bounded() {
    let spec = spec_of(json!({"checkpoint_every": 50, "keep_checkpoints": 5, "eval_every": 10}));
    assert_eq!((spec.checkpoint_every, spec.keep_checkpoints, spec.eval_every), (Some(50), 5, Some(10)));
    for (body, param) in [
        (json!({"checkpoint_every": 0}), "checkpoint_every"),
        (json!({"keep_checkpoints": 0}), "keep_checkpoints"),
        (json!({"keep_checkpoints": 101}), "keep_checkpoints"),
        (json!({"eval_every": -1}), "eval_every"),
    ] {
        assert_eq!(rejection(body.clone()).param, param, "{body}");
    }
    // A spec stored before these fields existed reads with OpenAI's defaults.
    let mut stored = serde_json::to_value(spec_of(json!({}))).unwrap();
    for field in ["checkpoint_every", "keep_checkpoints", "eval_every"] {
        stored.as_object_mut().unwrap().remove(field);
    }
    let old: JobSpec = serde_json::from_value(stored).unwrap();
    assert_eq!((old.checkpoint_every, old.keep_checkpoints, old.eval_every), (None, 3, None));
}

#[test]
fn auto_hyperparameters_resolve_like_absent_ones() {
    let spec = spec(json!({"hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}})).unwrap();
    assert_eq!(spec.hyperparameters_view(), json!({"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}));
    assert_eq!(spec.auto, AutoHyperparameters { n_epochs: true, batch_size: true });
}

#[test]
fn the_cve_cwe_recipe_round_trips_through_the_stored_json() {
    let spec = spec(json!({
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 8}}},
        "lora": {"rank": 64, "alpha": 128, "dropout": 0.05, "target_modules": ["v_proj", "q_proj"], "use_rslora": true},
        "learning_rate": 5e-5,
        "lr_scheduler": "linear",
        "max_seq_length": 1024,
        "packing": true,
        "suffix": "cve-cwe",
        "seed": 7,
        "metadata": {"team": "cti"},
        "pool": "a100",
        "gpu_memory_gb": 24,
        "priority": 10,
        "integrations": []
    }))
    .unwrap();
    assert_eq!(spec.hyperparameters, Hyperparameters { n_epochs: 10, batch_size: 8, learning_rate_multiplier: 0.5, beta: None });
    assert_eq!(spec.learning_rate, 5e-5);
    let lora = spec.lora.as_ref().unwrap();
    assert_eq!(lora.target_modules, ["q_proj", "v_proj"], "checkpoint order");
    assert_eq!(spec.quantization, None);
    assert_eq!(spec.suffix.as_deref(), Some("cve-cwe"));
    assert_eq!(spec.resources, Resources { pool: "a100".into(), gpu_memory_gb: Some(24), priority: 10, gpus: 1, nodes: 1 });

    let stored = serde_json::to_value(&spec).unwrap();
    assert_eq!(stored["method"], "supervised");
    assert_eq!(stored["lr_scheduler"], "linear");
    assert_eq!(stored["training_file"], training_file());
    assert_eq!(serde_json::from_value::<JobSpec>(stored).unwrap(), spec);
}

#[test]
fn a_multiplier_scales_the_lora_base_rate_and_a_full_job_the_full_base_rate() {
    let lora = spec(json!({"hyperparameters": {"learning_rate_multiplier": 2.0}})).unwrap();
    assert_eq!(lora.learning_rate, 2e-4);
    let full = spec(json!({"method": {"type": "full", "full": {"hyperparameters": {"learning_rate_multiplier": 2.0}}}})).unwrap();
    assert_eq!(full.lora, None);
    assert_eq!(full.learning_rate, 2e-5);
    assert_eq!(full.hyperparameters.learning_rate_multiplier, 2.0);
}

#[test]
fn an_absolute_learning_rate_wins_over_the_multiplier_and_the_view_agrees() {
    let spec = spec(json!({"learning_rate": 3e-4, "hyperparameters": {"learning_rate_multiplier": 9}})).unwrap();
    assert_eq!(spec.learning_rate, 3e-4);
    // Shown as what was asked: the rate, not a multiplier of a base rate nobody mentioned.
    assert_eq!(spec.hyperparameters_view(), json!({"n_epochs": 3, "batch_size": 4, "learning_rate": 3e-4}));
    let multiplied = spec_of(json!({"hyperparameters": {"learning_rate_multiplier": 2}}));
    assert_eq!(multiplied.hyperparameters_view()["learning_rate_multiplier"], 2.0);
    assert!(multiplied.hyperparameters_view().get("learning_rate").is_none());
}

#[test]
fn auto_epochs_and_batch_size_are_sized_from_the_examples_as_openai_does() {
    // OpenAI's rule: 3 epochs, unless examples × epochs leaves the band [100, 25 000].
    assert_eq!([10, 24, 34, 100, 8_333, 8_334, 30_000].map(auto_epochs), [10, 4, 3, 3, 3, 2, 1]);
    assert_eq!(auto_epochs(1), 25);
    assert_eq!([10, 500, 1_000, 10_000, 1_000_000].map(|n| auto_batch_size(n, 1)), [1, 1, 2, 32, 256]);
    assert_eq!(auto_batch_size(10, 4), 4, "a global batch splits over the GPUs");
    assert_eq!(auto_batch_size(1_000, 3), 3);

    let mut spec = spec_of(json!({"hyperparameters": {"batch_size": 8}}));
    spec.size_from_data(24);
    assert_eq!((spec.hyperparameters.n_epochs, spec.hyperparameters.batch_size), (4, 8), "only auto values move");
    let mut spec = spec_of(json!({"gpus": 2, "hyperparameters": {"n_epochs": 2, "batch_size": "auto"}}));
    spec.size_from_data(10_000);
    assert_eq!((spec.hyperparameters.n_epochs, spec.hyperparameters.batch_size), (2, 32));
}

#[test]
fn the_method_view_has_openai_shape() {
    let spec = spec(json!({"hyperparameters": {"n_epochs": 2}})).unwrap();
    assert_eq!(
        spec.method_view(),
        json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}}})
    );
    assert_eq!(serde_json::to_string(&spec.method_view()).unwrap().find("\"type\""), Some(1), "type comes first");
}

#[test]
fn continued_pretraining_is_full_parameter_unless_lora_is_given() {
    let full = spec(json!({"method": {"type": "continued_pretraining"}})).unwrap();
    assert_eq!((full.method, full.lora.is_none()), (Method::ContinuedPretraining, true));
    let adapter = spec(json!({"method": {"type": "continued_pretraining"}, "lora": {"rank": 8}})).unwrap();
    assert_eq!(adapter.lora.unwrap().rank, 8);
}

#[test]
fn a_job_with_rank_zero_is_rejected_naming_lora_rank() {
    let error = rejection(json!({"lora": {"rank": 0}}));
    assert_eq!(error.param, "lora.rank");
    assert_eq!(error.message, "lora.rank: must be between 1 and 1024, got 0");
}

#[test]
fn out_of_range_hyperparameters_name_the_field_where_they_were_given() {
    let error = rejection(json!({"hyperparameters": {"n_epochs": 0}}));
    assert_eq!(error.param, "hyperparameters.n_epochs");
    assert_eq!(error.message, "hyperparameters.n_epochs: must be \"auto\" or between 1 and 50, got 0");

    let error = rejection(json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1000}}}}));
    assert_eq!(error.param, "method.supervised.hyperparameters.batch_size");

    let error = rejection(json!({"hyperparameters": {"learning_rate_multiplier": -1}}));
    assert_eq!(error.param, "hyperparameters.learning_rate_multiplier");
}

#[test]
fn a_mistyped_field_is_named_by_its_path() {
    let cases = [
        (json!({"hyperparameters": {"n_epochs": "three"}}), "hyperparameters.n_epochs", "expected \"auto\" or a number"),
        (json!({"hyperparameters": {"n_epochs": 2.5}}), "hyperparameters.n_epochs", "invalid type"),
        (json!({"lora": {"rank": "big"}}), "lora.rank", "invalid type"),
        (
            json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": []}}}}),
            "method.supervised.hyperparameters.batch_size",
            "invalid type",
        ),
        (json!({"packing": "yes"}), "packing", "invalid type"),
        (json!({"metadata": {"team": 5}}), "metadata.team", "invalid type"),
        (json!({"model": 5}), "model", "invalid type"),
    ];
    for (extra, param, detail) in cases {
        let error = CreateJobRequest::from_value(body(extra.clone())).expect_err("mistyped");
        assert_eq!(error.param, param, "{extra}");
        assert!(error.message.starts_with(&format!("{param}: ")) && error.message.contains(detail), "{}", error.message);
        assert!(!error.message.contains("line 1"), "{}", error.message);
    }
}

#[test]
fn a_body_that_is_not_a_json_object_has_no_param() {
    let error = CreateJobRequest::from_json(b"{\"model\": ").unwrap_err();
    assert_eq!(error.param, "");
    assert!(error.message.starts_with("the request body is not valid JSON: "), "{}", error.message);
    assert_eq!(CreateJobRequest::from_json(b"[1]").unwrap_err().message, "the request body must be a JSON object");
}

#[test]
fn missing_model_or_training_file_is_named() {
    let error = JobSpec::try_from(CreateJobRequest::from_value(json!({"training_file": training_file()})).unwrap()).unwrap_err();
    assert_eq!((error.param.as_str(), error.message.as_str()), ("model", "model: missing required parameter"));
    let error = JobSpec::try_from(CreateJobRequest::from_value(json!({"model": "m"})).unwrap()).unwrap_err();
    assert_eq!(error.param, "training_file");
}

#[test]
fn file_ids_must_be_file_ids() {
    let error = rejection(json!({"training_file": "train.jsonl"}));
    assert_eq!(error.param, "training_file");
    assert!(error.message.contains("`file-`"), "{}", error.message);
    assert_eq!(rejection(json!({"validation_file": "file-short"})).param, "validation_file");
}

#[test]
fn model_names_cannot_climb_out_of_the_models_root() {
    for model in ["../etc", "/abs/path", "a//b", "Qwen/./x", "a\\b", "name with space"] {
        let error = rejection(json!({ "model": model }));
        assert_eq!(error.param, "model", "{model}");
    }
    assert_eq!(spec(json!({"model": "Qwen/Qwen3-0.6B"})).unwrap().model.as_str(), "Qwen/Qwen3-0.6B");
    assert!(rejection(json!({"model": "ft:tiny:x:ftjob-1"})).message.contains("fine-tuned model"));
}

#[test]
fn a_dpo_job_in_openai_s_shape_trains_lora_with_beta() {
    let spec = spec(json!({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}})).unwrap();
    assert_eq!((spec.method, spec.hyperparameters.beta, spec.hyperparameters.n_epochs), (Method::Dpo, Some(0.25), 2));
    assert!(spec.lora.is_some(), "DPO trains a LoRA adapter by default");
    assert_eq!(spec.method_view()["dpo"]["hyperparameters"]["beta"], 0.25);
    let auto = spec_of(json!({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto"}}}}));
    assert_eq!(auto.hyperparameters.beta, Some(DEFAULT_DPO_BETA));
    assert_eq!(spec_of(json!({})).hyperparameters.beta, None);
    assert!(serde_json::to_value(spec_of(json!({})).hyperparameters).unwrap().get("beta").is_none());

    // A DPO job reads preference pairs, and only a DPO job does.
    let pairs = FileSummary { format: DataFormat::Preference, examples: 10, lines: 10, bytes: 100 };
    let chat = FileSummary { format: DataFormat::Chat, ..pairs };
    assert!(auto.check_files(&pairs, Some(&pairs)).is_ok());
    assert!(auto.check_files(&chat, None).unwrap_err().message.contains("dpo reads preference pairs"));
    assert!(spec_of(json!({})).check_files(&pairs, None).unwrap_err().message.contains("train with method.type dpo"));
}

#[test]
fn bad_dpo_settings_and_unknown_methods_are_refused_naming_the_field() {
    for (body, param) in [
        (json!({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}), "method.dpo.hyperparameters.beta"),
        (json!({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}}}), "method.dpo.hyperparameters.beta"),
        (
            json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}}),
            "method.supervised.hyperparameters.beta",
        ),
        (json!({"method": {"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}}), "method.dpo"),
        (json!({"method": {"type": "dpo"}, "packing": true}), "packing"),
        (json!({"method": {"type": "dpo"}, "train_on_inputs": true}), "train_on_inputs"),
        (json!({"method": {}}), "method.type"),
    ] {
        assert_eq!(rejection(body.clone()).param, param, "{body}");
    }
    let error = rejection(json!({"method": {"type": "reinforcement"}}));
    assert_eq!((error.param.as_str(), error.code), ("method.type", SpecCode::UnsupportedParameter));
}

#[test]
fn hyperparameters_in_both_places_are_refused() {
    let error = rejection(json!({
        "hyperparameters": {"n_epochs": 2},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}
    }));
    assert_eq!(error.param, "hyperparameters");
}

#[test]
fn full_fine_tuning_takes_neither_lora_nor_nf4() {
    assert_eq!(rejection(json!({"method": {"type": "full"}, "lora": {"rank": 8}})).param, "lora");
    assert_eq!(rejection(json!({"method": {"type": "full"}, "quantization": "nf4"})).param, "quantization");
    assert_eq!(rejection(json!({"quantization": "int8"})).param, "quantization");
}

#[test]
fn lora_settings_are_checked_field_by_field() {
    assert_eq!(rejection(json!({"lora": {"alpha": 0}})).param, "lora.alpha");
    assert_eq!(rejection(json!({"lora": {"dropout": 1.0}})).param, "lora.dropout");
    let error = rejection(json!({"lora": {"target_modules": ["q_proj", "lm_head"]}}));
    assert_eq!(error.param, "lora.target_modules");
    assert!(error.message.contains("\"lm_head\""), "{}", error.message);
    assert_eq!(rejection(json!({"lora": {"target_modules": []}})).param, "lora.target_modules");
    let all = spec(json!({"lora": {"target_modules": "all-linear"}})).unwrap();
    assert_eq!(all.lora.unwrap().target_modules.len(), 7);
}

#[test]
fn suffix_metadata_and_resources_follow_openai_and_lathe_limits() {
    assert_eq!(rejection(json!({"suffix": "x".repeat(65)})).param, "suffix");
    assert_eq!(rejection(json!({"suffix": "has space"})).param, "suffix");
    assert_eq!(spec(json!({"suffix": ""})).unwrap().suffix, None);
    assert_eq!(spec(json!({"suffix": "a".repeat(64)})).unwrap().suffix.unwrap().len(), 64);

    let seventeen: serde_json::Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let error = rejection(json!({ "metadata": seventeen }));
    assert_eq!((error.param.as_str(), error.message.as_str()), ("metadata", "metadata: at most 16 pairs, got 17"));

    assert_eq!(rejection(json!({"priority": 101})).param, "priority");
    assert_eq!(spec(json!({"priority": -100})).unwrap().resources.priority, -100);
    assert_eq!(rejection(json!({"pool": "../x"})).param, "pool");
    assert_eq!(rejection(json!({"gpu_memory_gb": 0})).param, "gpu_memory_gb");
}

#[test]
fn gpus_split_the_global_batch_and_over_the_nodes() {
    let two = spec(json!({"gpus": 2, "hyperparameters": {"batch_size": 8}})).unwrap();
    assert_eq!((two.resources.gpus, two.resources.nodes, two.hyperparameters.batch_size), (2, 1, 8));
    let uneven = rejection(json!({"gpus": 3, "hyperparameters": {"batch_size": 8}}));
    assert_eq!(uneven.param, "gpus");
    assert!(uneven.message.contains("batch_size 8"), "{}", uneven.message);
    assert_eq!(rejection(json!({"gpus": 0})).param, "gpus");
    assert_eq!(rejection(json!({"gpus": 65})).param, "gpus");
    let nodes = rejection(json!({"gpus": 3, "nodes": 2, "hyperparameters": {"batch_size": 6}}));
    assert_eq!(nodes.param, "nodes");
    assert!(nodes.message.contains("do not split evenly over 2 nodes"), "{}", nodes.message);
    assert_eq!(rejection(json!({"nodes": 65})).param, "nodes");
    let spread = spec(json!({"gpus": 4, "nodes": 2, "hyperparameters": {"batch_size": 8}})).unwrap();
    assert_eq!((spread.resources.gpus, spread.resources.nodes), (4, 2));
}

#[test]
fn loop_settings_out_of_range_are_named() {
    assert_eq!(rejection(json!({"learning_rate": 0})).param, "learning_rate");
    assert_eq!(rejection(json!({"lr_scheduler": "step"})).param, "lr_scheduler");
    assert_eq!(rejection(json!({"warmup_ratio": 1.5})).param, "warmup_ratio");
    assert_eq!(rejection(json!({"max_seq_length": 1})).param, "max_seq_length");
    assert_eq!(rejection(json!({"seed": -1})).param, "seed");
}

#[test]
fn the_data_format_must_suit_the_method() {
    let chat = FileSummary { format: DataFormat::Chat, examples: 10, lines: 10, bytes: 100 };
    let text = FileSummary { format: DataFormat::Text, ..chat };
    let supervised = spec(json!({})).unwrap();
    assert_eq!(supervised.check_files(&chat, Some(&chat)), Ok(()));
    let error = supervised.check_files(&text, None).unwrap_err();
    assert_eq!(error.param, "training_file");
    assert!(error.message.contains("continued_pretraining"), "{}", error.message);
    assert_eq!(supervised.check_files(&chat, Some(&text)).unwrap_err().param, "validation_file");

    let pretraining = spec(json!({"method": {"type": "continued_pretraining"}})).unwrap();
    assert_eq!(pretraining.check_files(&text, None), Ok(()));
    assert_eq!(pretraining.check_files(&chat, None).unwrap_err().param, "training_file");
}

#[test]
fn a_request_serializes_back_to_the_body_the_sdk_would_send() {
    let request = CreateJobRequest::from_value(body(json!({"hyperparameters": {"n_epochs": "auto", "batch_size": 2}}))).unwrap();
    let sent = serde_json::to_value(&request).unwrap();
    assert_eq!(sent, body(json!({"hyperparameters": {"n_epochs": "auto", "batch_size": 2}})));
}

#[test]
fn a_pool_name_the_queue_cannot_key_is_rejected_naming_pool() {
    for pool in ["A100", "gpu pool", "", "a/b"] {
        let error = rejection(json!({ "pool": pool }));
        assert_eq!(error.param, "pool", "{pool:?}");
    }
}

#[test]
fn decontamination_defaults_to_cti_rcm_and_names_an_unknown_benchmark() {
    let spec = |extra: serde_json::Value| {
        let mut body = serde_json::json!({"model": "tiny", "training_file": "file-abcdefghijklmnopqrstuvwx"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        JobSpec::try_from(CreateJobRequest::from_value(body).unwrap())
    };
    assert_eq!(spec(serde_json::json!({})).unwrap().decontaminate, None);
    let on = spec(serde_json::json!({"decontaminate": {}})).unwrap().decontaminate.unwrap();
    assert_eq!((on.benchmarks, on.keep), (vec![crate::Benchmark::CtiRcm], false));
    let error = spec(serde_json::json!({"decontaminate": {"benchmarks": ["mmlu"]}})).unwrap_err();
    assert_eq!(error.param, "decontaminate.benchmarks");
    assert!(error.message.contains("mmlu") && error.message.contains("cti-rcm-2021"), "{}", error.message);
    // A spec stored before the field existed still reads.
    let mut stored = serde_json::to_value(spec(serde_json::json!({})).unwrap()).unwrap();
    stored.as_object_mut().unwrap().remove("decontaminate");
    assert_eq!(serde_json::from_value::<JobSpec>(stored).unwrap().decontaminate, None);
}

#[test]
fn job_evaluations_are_validated_with_their_index() {
    let with = spec(serde_json::json!({"evaluations": [{"benchmark": "cti-mcq", "limit": 10}, {"benchmark": "cti-rcm"}]})).unwrap();
    assert_eq!(with.evaluations.len(), 2);
    assert_eq!((with.evaluations[0].limit, with.evaluations[1].max_new_tokens), (Some(10), 384));
    let error = spec(serde_json::json!({"evaluations": [{"benchmark": "cti-mcq"}, {"benchmark": "mmlu"}]})).unwrap_err();
    assert_eq!(error.param, "evaluations[1].benchmark");
    let error = spec(serde_json::json!({"evaluations": [{"benchmark": "cti-mcq", "model": "x"}]})).unwrap_err();
    assert_eq!(error.param, "evaluations[0].model");
    assert!(spec(serde_json::json!({})).unwrap().evaluations.is_empty());
    let full = spec(serde_json::json!({"method": {"type": "full"}, "evaluations": [{"benchmark": "cti-mcq"}]})).unwrap_err();
    assert_eq!(full.param, "evaluations");
}

#[test]
fn tiny_learning_rates_are_refused_before_anything_is_stored() {
    // 1e-310 and 5e-324 once passed the range check and were stored as a null multiplier,
    // after which the project's job list answered 500.
    for lr in [1e-310, 5e-324, 1e-11] {
        let error = rejection(json!({"learning_rate": lr}));
        assert_eq!(error.param, "learning_rate", "{lr:e}: {}", error.message);
    }
    let error = rejection(json!({"hyperparameters": {"learning_rate_multiplier": 1e-300}}));
    assert_eq!(error.param, "hyperparameters.learning_rate_multiplier");
    // The smallest accepted rate stores and reads back as it was accepted.
    let smallest = spec(json!({"learning_rate": MIN_LEARNING_RATE})).unwrap();
    let stored: JobSpec = serde_json::from_value(serde_json::to_value(&smallest).unwrap()).unwrap();
    assert_eq!(stored, smallest);
    assert!(stored.hyperparameters.learning_rate_multiplier.is_finite() && stored.hyperparameters.learning_rate_multiplier > 0.0);
}

#[test]
fn rounding_a_multiplier_never_makes_a_nan_or_a_zero() {
    for x in [1e-306, 5e-324, 1e300, 1.7976931348623157e308, 0.5] {
        let rounded = round_to_12_digits(x);
        assert!(rounded.is_finite() && rounded > 0.0, "{x:e} -> {rounded:e}");
    }
}

#[test]
fn a_nul_character_in_metadata_is_refused_naming_the_field() {
    for metadata in [json!({"k\u{0}": "v"}), json!({"k": "v\u{0}"})] {
        let error = rejection(json!({"metadata": metadata}));
        assert_eq!(error.param, "metadata");
        assert!(error.message.contains("NUL"), "{}", error.message);
    }
}

#[test]
fn an_unknown_field_is_refused_naming_its_path() {
    for (body, param) in [
        (json!({"learnig_rate": 1e-4}), "learnig_rate"),
        (json!({"lora": {"rnak": 8}}), "lora.rnak"),
        (json!({"hyperparameters": {"epochs": 2}}), "hyperparameters.epochs"),
        (
            json!({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epoch": 2}}}}),
            "method.supervised.hyperparameters.n_epoch",
        ),
        (json!({"decontaminate": {"benchmark": ["cti-rcm"]}}), "decontaminate.benchmark"),
    ] {
        let error = rejection(body);
        assert_eq!((error.param.as_str(), error.code), (param, SpecCode::UnknownParameter), "{}", error.message);
        assert!(error.message.starts_with(&format!("{param}: unknown field")), "{}", error.message);
    }
    // The typo's intended field is among those listed.
    assert!(rejection(json!({"learnig_rate": 1e-4})).message.contains("`learning_rate`"));
}

#[test]
fn nf4_is_qlora_on_a_lora_job() {
    assert_eq!(spec(json!({"quantization": "nf4"})).unwrap().quantization, Some(Quantization::Nf4));
    assert_eq!(rejection(json!({"quantization": "nf4", "method": {"type": "full"}})).param, "quantization");
}

#[test]
fn an_mlflow_integration_is_kept_and_wandb_is_refused_saying_what_works() {
    let mlflow = spec_of(
        json!({"integrations": [{"type": "mlflow", "mlflow": {"experiment": "cve-cwe", "run_name": "r1", "tags": {"team": "sec"}}}]}),
    );
    assert_eq!(mlflow.integrations.len(), 1);
    assert_eq!(mlflow.integrations[0].mlflow.experiment, "cve-cwe");
    assert_eq!(
        serde_json::to_value(&mlflow.integrations).unwrap(),
        json!([{"type": "mlflow", "mlflow": {"experiment": "cve-cwe", "run_name": "r1", "tags": {"team": "sec"}}}])
    );
    let error = rejection(json!({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}));
    assert_eq!((error.param.as_str(), error.code), ("integrations[0].type", SpecCode::UnsupportedParameter));
    assert!(error.message.contains("MLflow"), "{}", error.message);
    for (body, param) in [
        (json!({"integrations": [{"type": "mlflow", "mlflow": {}}]}), "integrations[0].mlflow.experiment"),
        (json!({"integrations": [{"type": "mlflow", "mlflow": {"experiment": "e", "uri": "http://evil"}}]}), "integrations[0].mlflow.uri"),
        (json!({"integrations": [{"type": "comet"}]}), "integrations[0].type"),
        (json!({"integrations": {"type": "mlflow"}}), "integrations"),
    ] {
        assert_eq!(rejection(body.clone()).param, param, "{body}");
    }
    // An empty list (what some clients send by default) asks for nothing.
    assert!(spec(json!({"integrations": []})).unwrap().integrations.is_empty());
    assert!(spec(json!({"integrations": null})).is_ok());
}
