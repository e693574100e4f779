//! Property tests of what tenants feed the service: the training-file parser and the job-create
//! body parser. Generated input, a fixed number of cases (bounded time in every CI run), and the
//! properties a server needs: never panic, refuse with a named line or field, and read a file
//! the same whether it arrives whole or in chunks (uploads are streamed).

use lathe_core::training_file::{parse_jsonl, split_lines, validate_jsonl, FileError, LineReader};
use lathe_core::{CreateJobRequest, JobSpec};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Lines that are sometimes valid examples, sometimes nearly valid, sometimes junk.
fn line() -> impl Strategy<Value = String> {
    let text = "[ -~éü\\\\\"\\n\\t\u{0}]{0,24}";
    prop_oneof![
        text.prop_map(|t| json!({"text": t}).to_string()),
        (text, text).prop_map(|(p, c)| json!({"prompt": p, "completion": c}).to_string()),
        (prop::collection::vec(("(system|user|assistant|tool|bot)", text), 0..5)).prop_map(|turns| {
            json!({"messages": turns.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>()}).to_string()
        }),
        text,
        Just(String::new()),
        Just("{\"messages\": [".to_string()),
    ]
}

fn file() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(line(), 0..12), any::<bool>(), prop::collection::vec(any::<u8>(), 0..3)).prop_map(|(lines, crlf, junk)| {
        let mut bytes = lines.join(if crlf { "\r\n" } else { "\n" }).into_bytes();
        bytes.extend(junk); // sometimes invalid UTF-8 at the end
        bytes
    })
}

/// The streaming reader (what an upload goes through), fed in chunks of `chunk` bytes.
fn streamed(bytes: &[u8], chunk: usize) -> Result<(usize, usize), FileError> {
    let mut reader = LineReader::default();
    let mut line = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        for &byte in piece {
            if byte == b'\n' {
                reader.push(&line)?;
                line.clear();
            } else {
                line.push(byte);
            }
        }
    }
    for last in split_lines(&line) {
        reader.push(last)?;
    }
    reader.finish().map(|(_, examples)| (examples, reader.lines()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_file_parser_never_panics_and_names_a_line_that_exists(bytes in file()) {
        match parse_jsonl(&bytes) {
            Ok(parsed) => {
                prop_assert_eq!(parsed.examples.len(), parsed.example_lines.len());
                prop_assert!(parsed.example_lines.iter().all(|&l| (1..=parsed.lines).contains(&l)));
            }
            Err(FileError::Line { line, reason }) => {
                prop_assert!(line >= 1 && line <= bytes.split(|b| *b == b'\n').count(), "line {} of {:?}", line, String::from_utf8_lossy(&bytes));
                prop_assert!(!reason.is_empty());
            }
            Err(_) => {}
        }
    }

    #[test]
    fn a_file_reads_the_same_whole_or_streamed_in_chunks(bytes in file(), chunk in 1usize..64) {
        let whole = validate_jsonl(&bytes).map(|s| (s.examples, s.lines));
        prop_assert_eq!(streamed(&bytes, chunk), whole);
    }

    #[test]
    fn the_create_body_parser_never_panics_and_names_the_field(body in create_body()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        match CreateJobRequest::from_json(&bytes).and_then(JobSpec::try_from) {
            Ok(spec) => {
                prop_assert!(spec.learning_rate.is_finite() && spec.learning_rate > 0.0);
                prop_assert!(spec.max_seq_length >= 2);
            }
            Err(error) => prop_assert!(!error.message.is_empty()),
        }
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(Value::from),
        prop_oneof![Just(1e-310), Just(5e-324), Just(0.0), Just(-1.0), Just(1e308)].prop_map(Value::from),
        "[a-z0-9_\\-\u{0}]{0,12}".prop_map(Value::from),
        Just(Value::from("auto")),
        Just(Value::from("nf4")),
    ]
}

/// Create bodies built from the real field names (and a few that are not), nested as the API
/// nests them, with values of every JSON kind.
fn create_body() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "model",
        "training_file",
        "validation_file",
        "suffix",
        "seed",
        "metadata",
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "max_seq_length",
        "packing",
        "train_on_inputs",
        "quantization",
        "pool",
        "priority",
        "gpu_memory_gb",
        "integrations",
        "learnig_rate",
    ]);
    let nested = prop::sample::select(vec!["hyperparameters", "lora", "method", "decontaminate"]);
    let inner_keys = prop::sample::select(vec![
        "n_epochs",
        "batch_size",
        "learning_rate_multiplier",
        "rank",
        "alpha",
        "dropout",
        "target_modules",
        "type",
        "supervised",
        "benchmarks",
        "keep",
    ]);
    (
        prop::collection::vec((keys, scalar()), 0..8),
        prop::collection::vec((nested, prop::collection::vec((inner_keys, scalar()), 0..4)), 0..3),
    )
        .prop_map(|(flat, nests)| {
            let mut body = serde_json::Map::new();
            body.insert("model".into(), json!("tiny-qwen3"));
            body.insert("training_file".into(), json!("file-abcdefghijklmnopqrstuvwx"));
            for (key, value) in flat {
                body.insert(key.to_string(), value);
            }
            for (key, inner) in nests {
                body.insert(key.to_string(), Value::Object(inner.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
            }
            Value::Object(body)
        })
}
