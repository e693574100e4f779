//! The tokenizer files: a byte-level BPE trained on the embedded corpus (CVE descriptions and
//! a little chat text, see `assets/NOTICE`), laid out like the family's real `tokenizer.json`,
//! plus `tokenizer_config.json` with the chat template and `generation_config.json`.
//!
//! Layout, as in Qwen2's tokenizer.json: NFC normalizer; pre-tokenizer = the Qwen split regex
//! (isolated) then ByteLevel without its own regex; ByteLevel decoder; all 256 byte symbols in
//! the alphabet, so any text encodes without an unknown token. Llama 3 differs as the real one
//! does: no normalizer, digits grouped by up to three, and a post-processor that prepends
//! `<|begin_of_text|>`. Special tokens come after the BPE vocabulary, as in the real files.
//!
//! BPE training is deterministic (merges are ordered by count, then by pair), so the same
//! corpus and target always give the same bytes.

use serde_json::{json, Map, Value};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::{NormalizerWrapper, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, Tokenizer, TokenizerBuilder, TokenizerImpl};

use super::presets::one_or_many;
use super::Arch;
use crate::{Result, TrainerError};

const CORPUS: &str = include_str!("../../assets/tokenizer_corpus.jsonl");
const QWEN3_TEMPLATE: &str = include_str!("../../assets/chat_templates/qwen3.jinja");
const QWEN2_TEMPLATE: &str = include_str!("../../assets/chat_templates/qwen2.jinja");
const LLAMA3_TEMPLATE: &str = include_str!("../../assets/chat_templates/llama3.jinja");

/// Qwen2/Qwen3 split regex (from their tokenizer.json).
const QWEN_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3 split regex: the same except that digits group by up to three.
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

type BpeTokenizer = TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// A token added after the BPE vocabulary.
#[derive(Debug, Clone)]
pub(crate) struct AddedTokenId {
    pub id: u32,
    pub content: &'static str,
    /// `<think>` and `</think>` are added but not special, as in Qwen3.
    pub special: bool,
}

/// The ids the config files refer to.
#[derive(Debug, Clone)]
pub(crate) struct SpecialIds {
    /// `bos_token_id` of config.json: `<|endoftext|>` for Qwen (which never prepends it),
    /// `<|begin_of_text|>` for Llama.
    pub bos: u32,
    /// `eos_token_id` of config.json.
    pub eos: Vec<u32>,
    pub pad: u32,
    /// `eos_token_id` of generation_config.json: every token that ends a turn.
    pub generation_eos: Vec<u32>,
    pub added: Vec<AddedTokenId>,
}

pub(crate) struct TrainedTokenizer {
    pub tokenizer_json: String,
    pub special_ids: SpecialIds,
    vocab_len: usize,
}

impl TrainedTokenizer {
    /// Number of ids the tokenizer can produce (BPE vocabulary plus added tokens).
    pub fn len(&self) -> usize {
        self.vocab_len
    }
}

/// (content, special) of the tokens added after the BPE vocabulary, in id order.
fn added_tokens(arch: Arch) -> &'static [(&'static str, bool)] {
    match arch {
        Arch::Qwen3 => &[("<|endoftext|>", true), ("<|im_start|>", true), ("<|im_end|>", true), ("<think>", false), ("</think>", false)],
        Arch::Qwen2 => &[("<|endoftext|>", true), ("<|im_start|>", true), ("<|im_end|>", true)],
        Arch::Llama => &[
            ("<|begin_of_text|>", true),
            ("<|end_of_text|>", true),
            ("<|start_header_id|>", true),
            ("<|end_header_id|>", true),
            ("<|eot_id|>", true),
        ],
    }
}

/// Trains the tokenizer so that it has exactly `vocab_target` ids (BPE merges stop early only
/// if the corpus runs out of pairs, which it does not for the presets).
pub(crate) fn train(arch: Arch, vocab_target: usize) -> Result<TrainedTokenizer> {
    let added = added_tokens(arch);
    let mut tokenizer = untrained_tokenizer(arch)?;
    let mut trainer = BpeTrainer::builder()
        .vocab_size(vocab_target - added.len())
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    tokenizer.train(&mut trainer, corpus_documents()?.into_iter()).map_err(tokenizer_error)?;

    for &(content, special) in added {
        let token = AddedToken::from(content, special).normalized(false);
        if special {
            tokenizer.add_special_tokens(&[token]);
        } else {
            tokenizer.add_tokens(&[token]);
        }
    }
    let id_of = |content: &str| tokenizer.token_to_id(content).ok_or_else(|| TrainerError::Tokenizer(format!("`{content}` was not added")));
    let added_ids =
        added.iter().map(|&(content, special)| Ok(AddedTokenId { id: id_of(content)?, content, special })).collect::<Result<Vec<_>>>()?;
    let special_ids = match arch {
        Arch::Qwen3 | Arch::Qwen2 => {
            let (end_of_text, im_end) = (id_of("<|endoftext|>")?, id_of("<|im_end|>")?);
            SpecialIds {
                bos: end_of_text,
                eos: vec![im_end],
                pad: end_of_text,
                generation_eos: vec![im_end, end_of_text],
                added: added_ids,
            }
        }
        Arch::Llama => {
            let (begin, end, eot) = (id_of("<|begin_of_text|>")?, id_of("<|end_of_text|>")?, id_of("<|eot_id|>")?);
            tokenizer.with_post_processor(Some(llama_post_processor(begin)?));
            SpecialIds { bos: begin, eos: vec![end, eot], pad: end, generation_eos: vec![end, eot], added: added_ids }
        }
    };

    let vocab_len = tokenizer.get_vocab_size(true);
    let tokenizer_json = Tokenizer::from(tokenizer).to_string(true).map_err(tokenizer_error)?;
    Ok(TrainedTokenizer { tokenizer_json, special_ids, vocab_len })
}

fn untrained_tokenizer(arch: Arch) -> Result<BpeTokenizer> {
    // The ByteLevel decoder ignores its flags; they are set as each family's file has them.
    let (normalizer, split_regex, decoder) = match arch {
        Arch::Qwen3 | Arch::Qwen2 => (Some(NormalizerWrapper::from(NFC)), QWEN_SPLIT, ByteLevel::new(false, false, false)),
        Arch::Llama => (None, LLAMA3_SPLIT, ByteLevel::default()),
    };
    let split = Split::new(SplitPattern::Regex(split_regex.into()), SplitDelimiterBehavior::Isolated, false).map_err(tokenizer_error)?;
    let byte_level = ByteLevel::new(false, false, false);
    let pre_tokenizer = PreTokenizerSequence::new(vec![split.into(), byte_level.into()]);
    TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(normalizer)
        .with_pre_tokenizer(Some(pre_tokenizer.into()))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level)))
        .with_decoder(Some(DecoderWrapper::ByteLevel(decoder)))
        .build()
        .map_err(tokenizer_error)
}

/// Llama 3: ByteLevel offsets, then `<|begin_of_text|>` before every sequence.
fn llama_post_processor(begin_of_text: u32) -> Result<PostProcessorWrapper> {
    let template = TemplateProcessing::builder()
        .try_single("<|begin_of_text|> $A:0")
        .and_then(|builder| builder.try_pair("<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1"))
        .map_err(TrainerError::Tokenizer)?
        .special_tokens(vec![("<|begin_of_text|>", begin_of_text)])
        .build()
        .map_err(|err| TrainerError::Tokenizer(err.to_string()))?;
    Ok(PostProcessorWrapper::Sequence(ProcessorSequence::new(vec![
        PostProcessorWrapper::ByteLevel(ByteLevel::new(true, false, true)),
        PostProcessorWrapper::Template(template),
    ])))
}

/// The `text` of every line of the embedded corpus.
fn corpus_documents() -> Result<Vec<String>> {
    CORPUS
        .lines()
        .enumerate()
        .map(|(index, line)| {
            serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|doc| doc.get("text").and_then(Value::as_str).map(str::to_owned))
                .ok_or_else(|| TrainerError::data_line("assets/tokenizer_corpus.jsonl", index + 1, "expected {\"text\": …}"))
        })
        .collect()
}

fn tokenizer_error(err: impl std::fmt::Display) -> TrainerError {
    TrainerError::Tokenizer(err.to_string())
}

pub(crate) fn tokenizer_config_json(arch: Arch, ids: &SpecialIds, model_max_length: usize) -> Value {
    let added_tokens_decoder: Map<String, Value> = ids
        .added
        .iter()
        .map(|token| {
            let entry = json!({
                "content": token.content,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": token.special,
            });
            (token.id.to_string(), entry)
        })
        .collect();
    let (bos, eos, pad, template) = match arch {
        Arch::Qwen3 => (None, "<|im_end|>", "<|endoftext|>", QWEN3_TEMPLATE),
        Arch::Qwen2 => (None, "<|im_end|>", "<|endoftext|>", QWEN2_TEMPLATE),
        Arch::Llama => (Some("<|begin_of_text|>"), "<|eot_id|>", "<|end_of_text|>", LLAMA3_TEMPLATE),
    };
    let mut config = json!({
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": bos,
        "chat_template": template.trim_end(),
        "clean_up_tokenization_spaces": false,
        "eos_token": eos,
        "model_max_length": model_max_length,
        "pad_token": pad,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if arch != Arch::Llama {
        let qwen_fields = json!({
            "add_bos_token": false,
            "add_prefix_space": false,
            "errors": "replace",
            "split_special_tokens": false,
            "unk_token": null,
        });
        if let (Value::Object(config_map), Value::Object(extra)) = (&mut config, qwen_fields) {
            config_map.extend(extra);
        }
    }
    config
}

pub(crate) fn generation_config_json(arch: Arch, ids: &SpecialIds) -> Value {
    let mut config = json!({
        "bos_token_id": ids.bos,
        "do_sample": false,
        "eos_token_id": one_or_many(&ids.generation_eos),
    });
    if arch != Arch::Llama {
        config["pad_token_id"] = json!(ids.pad);
    }
    config
}
