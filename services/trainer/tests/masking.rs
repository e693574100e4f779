//! Loss masking on chat data rendered with the tiny Qwen3 model's own chat template: exactly
//! the assistant replies and their end-of-turn token carry loss; `weight: 0` turns none.

use lathe_trainer::data::encode::{EncodeOptions, Encoder};
use lathe_trainer::data::jsonl::parse_line;
use lathe_trainer::init::{init_model, Arch, InitOptions, Preset};

fn encoder(arch: Arch, train_on_inputs: bool) -> (tempfile::TempDir, Encoder) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    init_model(&InitOptions { arch, preset: Preset::Tiny, seed: 0, out: out.clone() }).unwrap();
    let encoder = Encoder::from_model_dir(&out, EncodeOptions { max_seq_length: 512, train_on_inputs }).unwrap();
    (dir, encoder)
}

/// The text of the trained tokens, with a `|` wherever a run of trained tokens ends.
fn trained_text(encoder: &Encoder, line: &str) -> String {
    let example = parse_line(line).unwrap();
    let encoded = encoder.encode(&example).unwrap();
    let mut out = String::new();
    let mut run: Vec<u32> = Vec::new();
    for (id, trained) in encoded.input_ids.iter().zip(&encoded.trained) {
        if *trained {
            run.push(*id);
        } else if !run.is_empty() {
            out.push_str(&encoder.tokenizer().decode(&run, false).unwrap());
            out.push('|');
            run.clear();
        }
    }
    if !run.is_empty() {
        out.push_str(&encoder.tokenizer().decode(&run, false).unwrap());
        out.push('|');
    }
    out
}

const CONVERSATION: &str = r#"{"messages": [
  {"role": "system", "content": "You are a security analyst."},
  {"role": "user", "content": "Map CVE-2021-1 to a CWE."},
  {"role": "assistant", "content": "CWE-79"},
  {"role": "user", "content": "And CVE-2021-2?"},
  {"role": "assistant", "content": "CWE-89, SQL injection."}
]}"#;

#[test]
fn only_assistant_replies_and_their_end_of_turn_carry_loss_in_qwen3_chat() {
    let (_dir, encoder) = encoder(Arch::Qwen3, false);
    let line = CONVERSATION.replace('\n', "");
    assert_eq!(trained_text(&encoder, &line), "CWE-79<|im_end|>|CWE-89, SQL injection.<|im_end|>|");
}

#[test]
fn a_weight_zero_turn_carries_no_loss() {
    let (_dir, encoder) = encoder(Arch::Qwen3, false);
    let line = CONVERSATION.replace('\n', "").replace(r#""content": "CWE-79"}"#, r#""content": "CWE-79", "weight": 0}"#);
    assert_eq!(trained_text(&encoder, &line), "CWE-89, SQL injection.<|im_end|>|");
}

#[test]
fn llama3_chat_trains_on_replies_and_eot() {
    let (_dir, encoder) = encoder(Arch::Llama, false);
    let line = CONVERSATION.replace('\n', "");
    assert_eq!(trained_text(&encoder, &line), "CWE-79<|eot_id|>|CWE-89, SQL injection.<|eot_id|>|");
}

#[test]
fn train_on_inputs_trains_every_token_but_the_first() {
    let (_dir, encoder) = encoder(Arch::Qwen3, true);
    let encoded = encoder.encode(&parse_line(&CONVERSATION.replace('\n', "")).unwrap()).unwrap();
    assert!(!encoded.trained[0]);
    assert!(encoded.trained[1..].iter().all(|&t| t));
}
