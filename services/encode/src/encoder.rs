//! From an [`Example`] to token ids and a per-token loss mask.
//!
//! Chat examples are rendered once with the model's template and tokenized once, so the ids
//! are exactly what an inference server would produce for the same conversation. Which tokens
//! carry loss is decided in text space, then mapped onto tokens through their offsets:
//!
//! - for each assistant turn i (weight ≠ 0), `prefix` = the conversation up to i rendered with
//!   the generation prompt and `upto` = the conversation through i. The turn's text is
//!   `upto[prefix.len()..]` with trailing whitespace trimmed: the content and the end-of-turn
//!   token (`<|im_end|>`, `<|eot_id|>`), but not the header before it nor the newline after;
//! - a token is trained when its first byte lies in such a span.
//!
//! This needs the template to be prefix-stable: rendering a shorter conversation must give a
//! prefix of the longer one. Qwen3's template is not quite: it adds an empty `<think>` block to
//! the *last* assistant turn only, so turn i rendered alone differs from turn i inside the
//! whole conversation. For that case the end of the turn is found by locating its content in
//! the full text (see [`end_of_turn_in_full`]); anything stranger is an error rather than a
//! silently wrong mask.
//!
//! Offsets from `Tokenizer::encode` are byte offsets, as are Rust string lengths, so the
//! comparison is safe for non-ASCII text.
//!
//! Cost: rendering turn i's prefix costs the length of the conversation before it, so marking
//! every turn of a long conversation would be quadratic in its length (a 10,000-message line
//! once took minutes). Only the first `max_seq_length` tokens are kept, and a turn that starts
//! after them carries no kept token, so turns are rendered only up to that cut: the work is
//! one render and one tokenization of the whole line plus at most `max_seq_length`-bounded
//! renders, linear in the line for a given `max_seq_length`.

use std::ops::Range;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::chat_template::{read_special_tokens, ChatTemplate, SpecialTokens};
use crate::{EncodeError, Result};
use lathe_core::training_file::{ChatMessage, Example};

/// One example as tokens. `trained[i]` is true when token i is a target of the loss (it is
/// predicted from tokens 0..i). Same length as `input_ids`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedExample {
    pub input_ids: Vec<u32>,
    pub trained: Vec<bool>,
    /// The example was longer than `max_seq_length` and lost its end.
    pub truncated: bool,
}

impl EncodedExample {
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    pub max_seq_length: usize,
    /// Train on every token (prompts and user turns too), not only on answers.
    pub train_on_inputs: bool,
}

pub struct Encoder {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    opts: EncodeOptions,
}

impl Encoder {
    pub fn new(mut tokenizer: Tokenizer, template: Option<ChatTemplate>, special: &SpecialTokens, opts: EncodeOptions) -> Result<Encoder> {
        if opts.max_seq_length < 2 {
            return Err(EncodeError::invalid("max_seq_length", "must be at least 2 (one token predicts the next)"));
        }
        // Some tokenizer.json files ship with truncation or padding switched on; either would
        // silently change our ids. We truncate ourselves, and packing replaces padding.
        tokenizer.with_truncation(None).map_err(|e| EncodeError::Tokenizer(format!("cannot disable truncation: {e}")))?;
        tokenizer.with_padding(None);
        let id_of = |name: &str, token: &Option<String>| -> Result<Option<u32>> {
            let Some(token) = token else { return Ok(None) };
            tokenizer
                .token_to_id(token)
                .map(Some)
                .ok_or_else(|| EncodeError::Tokenizer(format!("{name} `{token}` from tokenizer_config.json is not in the vocabulary")))
        };
        let bos_id = id_of("bos_token", &special.bos)?;
        let eos_id = id_of("eos_token", &special.eos)?;
        if eos_id.is_none() {
            tracing::warn!("tokenizer_config.json has no eos_token: prompt/completion and text examples get no end-of-sequence token");
        }
        Ok(Encoder { tokenizer, template, bos_id, eos_id, opts })
    }

    /// Loads tokenizer.json + tokenizer_config.json from a model directory.
    pub fn from_model_dir(dir: &Path, opts: EncodeOptions) -> Result<Encoder> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(EncodeError::file(&tokenizer_path, "missing: the model directory needs a tokenizer.json"));
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| EncodeError::file(&tokenizer_path, format!("cannot load the tokenizer: {e}")))?;
        let config_path = dir.join("tokenizer_config.json");
        let special = read_special_tokens(&config_path)?;
        let template = ChatTemplate::from_tokenizer_config(&config_path)?;
        Encoder::new(tokenizer, template, &special, opts)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn encode(&self, example: &Example) -> Result<EncodedExample> {
        let train_on_inputs = self.opts.train_on_inputs;
        let (input_ids, trained) = match example {
            Example::Chat { messages } => self.encode_chat(messages)?,
            Example::PromptCompletion { prompt, completion } => {
                let mut row = Row::default();
                row.push_optional(self.bos_id, false);
                row.extend(&self.tokenize(prompt)?, train_on_inputs);
                row.extend(&self.tokenize(completion)?, true);
                row.push_optional(self.eos_id, true);
                (row.ids, row.trained)
            }
            Example::Text { text } => {
                let mut row = Row::default();
                row.push_optional(self.bos_id, true);
                row.extend(&self.tokenize(text)?, true);
                row.push_optional(self.eos_id, true);
                (row.ids, row.trained)
            }
            Example::Preference { .. } => {
                return Err(EncodeError::invalid("example", "a preference pair is two sequences; encode it with `encode_line`"))
            }
        };
        Ok(finish(input_ids, trained, self.opts.max_seq_length))
    }

    /// One conversation as a chat example: what each side of a preference pair is.
    pub fn encode_chat_example(&self, messages: &[ChatMessage]) -> Result<EncodedExample> {
        let (input_ids, trained) = self.encode_chat(messages)?;
        Ok(finish(input_ids, trained, self.opts.max_seq_length))
    }

    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<(Vec<u32>, Vec<bool>)> {
        let template = self.template.as_ref().ok_or_else(|| {
            EncodeError::ChatTemplate(
                "the model has no chat template (no `chat_template` in tokenizer_config.json); \
                 use prompt/completion data or a model with a template"
                    .into(),
            )
        })?;
        let text = template.render(messages, false)?;
        // The template writes BOS itself when the model wants one.
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| EncodeError::Tokenizer(format!("cannot tokenize the rendered conversation: {e}")))?;
        let trained = if self.opts.train_on_inputs {
            vec![true; encoding.get_ids().len()]
        } else {
            let offsets = encoding.get_offsets();
            let kept = &offsets[..offsets.len().min(self.opts.max_seq_length)];
            let cut = kept.iter().map(|&(start, _)| start).max().unwrap_or(0);
            let spans = assistant_spans(template, messages, &text, cut)?;
            offsets.iter().map(|&(start, _)| in_spans(&spans, start)).collect()
        };
        Ok((encoding.get_ids().to_vec(), trained))
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| EncodeError::Tokenizer(format!("cannot tokenize: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

#[derive(Default)]
struct Row {
    ids: Vec<u32>,
    trained: Vec<bool>,
}

impl Row {
    fn push_optional(&mut self, id: Option<u32>, trained: bool) {
        if let Some(id) = id {
            self.ids.push(id);
            self.trained.push(trained);
        }
    }

    fn extend(&mut self, ids: &[u32], trained: bool) {
        self.ids.extend_from_slice(ids);
        self.trained.extend(std::iter::repeat_n(trained, ids.len()));
    }
}

/// The first token is never a target (nothing predicts it); keep the start when too long.
fn finish(mut input_ids: Vec<u32>, mut trained: Vec<bool>, max_seq_length: usize) -> EncodedExample {
    if let Some(first) = trained.first_mut() {
        *first = false;
    }
    let truncated = input_ids.len() > max_seq_length;
    input_ids.truncate(max_seq_length);
    trained.truncate(max_seq_length);
    EncodedExample { input_ids, trained, truncated }
}

/// Byte ranges of `full` (the rendered conversation) that carry loss: each assistant turn with
/// weight ≠ 0, from after its header to its end-of-turn token, in order. Turns that start after
/// byte `cut` (the start of the last kept token) are not looked at: they are truncated away.
fn assistant_spans(template: &ChatTemplate, messages: &[ChatMessage], full: &str, cut: usize) -> Result<Vec<Range<usize>>> {
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" || message.weight == Some(0) {
            continue;
        }
        let not_stable = || EncodeError::ChatTemplate(format!("template is not prefix-stable at message {i}"));
        let prefix = template.render(&messages[..i], true)?;
        if prefix.len() > cut {
            // Prefixes only grow (each is a prefix of `full`), so every later turn starts later.
            break;
        }
        let upto = template.render(&messages[..=i], false)?;
        if !upto.starts_with(&prefix) || !full.starts_with(&prefix) {
            return Err(not_stable());
        }
        let start = prefix.len();
        let turn = upto[start..].trim_end();
        let end = if full.starts_with(&upto) {
            start + turn.len()
        } else {
            end_of_turn_in_full(full, start, turn, &message.content).ok_or_else(not_stable)?
        };
        if end > start {
            spans.push(start..end);
        }
    }
    Ok(spans)
}

/// Whether byte `at` lies in one of `spans` (sorted and disjoint): a binary search, so marking
/// every token stays O(tokens · log turns).
fn in_spans(spans: &[Range<usize>], at: usize) -> bool {
    let i = spans.partition_point(|span| span.end <= at);
    spans.get(i).is_some_and(|span| span.contains(&at))
}

/// For templates that render the last turn differently (Qwen3's empty `<think>` block): find
/// the turn's content in `full` after `start`, then require what followed the content in the
/// turn rendered alone (the end-of-turn token) to follow it in `full` too.
fn end_of_turn_in_full(full: &str, start: usize, turn: &str, content: &str) -> Option<usize> {
    let content = content.trim();
    if content.is_empty() {
        return None;
    }
    let tail = &turn[turn.rfind(content)? + content.len()..];
    let at = start + full[start..].find(content)?;
    let after = at + content.len();
    full[after..].starts_with(tail).then_some(after + tail.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, NormalizerWrapper, TokenizerBuilder};

    const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
    const QWEN3: &str = include_str!("testdata/qwen3.jinja");
    const LLAMA3: &str = include_str!("testdata/llama3_instruct.jinja");

    /// A real byte-level BPE (the kind Qwen and Llama 3 use), trained on a few sentences.
    fn tiny_tokenizer(specials: &[&str]) -> Tokenizer {
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(400)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tokenizer = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_pre_tokenizer(Some(ByteLevel::new(false, false, true)))
            .with_post_processor(Some(ByteLevel::new(false, false, true)))
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .unwrap();
        let corpus = ["You are a security analyst.", "What is CVE-2021-44228? ANSWER ONE", "ANSWER TWO is the answer", "über naïve café"];
        tokenizer.train(&mut trainer, corpus.iter()).unwrap();
        let mut tokenizer = Tokenizer::from(tokenizer);
        let specials: Vec<AddedToken> = specials.iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
        tokenizer.add_special_tokens(&specials);
        tokenizer
    }

    fn chatml_encoder(train_on_inputs: bool, max_seq_length: usize) -> Encoder {
        let tokenizer = tiny_tokenizer(&["<|im_start|>", "<|im_end|>", "<|endoftext|>"]);
        let template = ChatTemplate::from_source(CHATML, None, Some("<|im_end|>".into())).unwrap();
        let special = SpecialTokens { bos: None, eos: Some("<|endoftext|>".into()), pad: None };
        Encoder::new(tokenizer, Some(template), &special, EncodeOptions { max_seq_length, train_on_inputs }).unwrap()
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), weight: None, extra: Default::default() }
    }

    fn conversation() -> Vec<ChatMessage> {
        vec![
            msg("system", "You are a security analyst."),
            msg("user", "What is CVE-2021-44228?"),
            msg("assistant", "ANSWER ONE"),
            msg("user", "And naïve café?"),
            msg("assistant", "ANSWER TWO über"),
        ]
    }

    /// The trained tokens, decoded (special tokens kept).
    fn trained_text(encoder: &Encoder, encoded: &EncodedExample) -> String {
        let ids: Vec<u32> = encoded.input_ids.iter().zip(&encoded.trained).filter(|(_, &t)| t).map(|(&id, _)| id).collect();
        encoder.tokenizer().decode(&ids, false).unwrap()
    }

    #[test]
    fn only_assistant_contents_and_their_end_tokens_are_trained() {
        let encoder = chatml_encoder(false, 1024);
        let encoded = encoder.encode(&Example::Chat { messages: conversation() }).unwrap();
        assert_eq!(trained_text(&encoder, &encoded), "ANSWER ONE<|im_end|>ANSWER TWO über<|im_end|>");
        assert_eq!(encoded.input_ids.len(), encoded.trained.len());
        assert!(!encoded.truncated);
        // The ids are the tokenization of the whole rendered conversation, without extra BOS.
        let full = encoder.tokenizer().decode(&encoded.input_ids, false).unwrap();
        assert!(full.starts_with("<|im_start|>system\nYou are"), "{full}");
    }

    #[test]
    fn a_weight_zero_turn_carries_no_loss() {
        let encoder = chatml_encoder(false, 1024);
        let mut messages = conversation();
        messages[2].weight = Some(0);
        let encoded = encoder.encode(&Example::Chat { messages }).unwrap();
        assert_eq!(trained_text(&encoder, &encoded), "ANSWER TWO über<|im_end|>");
    }

    #[test]
    fn train_on_inputs_trains_every_token_but_the_first() {
        let encoder = chatml_encoder(true, 1024);
        let encoded = encoder.encode(&Example::Chat { messages: conversation() }).unwrap();
        assert!(!encoded.trained[0]);
        assert!(encoded.trained[1..].iter().all(|&t| t));
    }

    #[test]
    fn long_examples_keep_their_start_and_are_marked_truncated() {
        let encoder = chatml_encoder(false, 1024);
        let full = encoder.encode(&Example::Chat { messages: conversation() }).unwrap();
        let short = chatml_encoder(false, 8).encode(&Example::Chat { messages: conversation() }).unwrap();
        assert!(short.truncated);
        assert_eq!(short.input_ids, full.input_ids[..8]);
        assert_eq!(short.trained, full.trained[..8]);
        assert_eq!(short.trained_tokens(), 0, "the answers were cut off; the caller drops this example");
    }

    #[test]
    fn prompt_completion_trains_the_completion_and_eos() {
        let encoder = chatml_encoder(false, 1024);
        let example = Example::PromptCompletion { prompt: "What is CVE-2021-44228?".into(), completion: " ANSWER ONE".into() };
        let encoded = encoder.encode(&example).unwrap();
        assert_eq!(trained_text(&encoder, &encoded), " ANSWER ONE<|endoftext|>");
        assert_eq!(encoded.input_ids.last(), encoder.tokenizer().token_to_id("<|endoftext|>").as_ref());

        let all = chatml_encoder(true, 1024).encode(&example).unwrap();
        assert_eq!(all.trained_tokens(), all.input_ids.len() - 1);
    }

    #[test]
    fn text_gets_bos_and_eos_and_trains_all_but_the_first_token() {
        let tokenizer = tiny_tokenizer(&["<|begin_of_text|>", "<|end_of_text|>"]);
        let special = SpecialTokens { bos: Some("<|begin_of_text|>".into()), eos: Some("<|end_of_text|>".into()), pad: None };
        let encoder = Encoder::new(tokenizer, None, &special, EncodeOptions { max_seq_length: 64, train_on_inputs: false }).unwrap();
        let encoded = encoder.encode(&Example::Text { text: "ANSWER ONE".into() }).unwrap();
        let tokens = encoder.tokenizer().decode(&encoded.input_ids, false).unwrap();
        assert_eq!(tokens, "<|begin_of_text|>ANSWER ONE<|end_of_text|>");
        assert_eq!(trained_text(&encoder, &encoded), "ANSWER ONE<|end_of_text|>");

        let error = encoder.encode(&Example::Chat { messages: conversation() }).unwrap_err().to_string();
        assert!(error.contains("no chat template"), "{error}");
    }

    #[test]
    fn llama3_headers_are_not_trained_and_bos_comes_from_the_template() {
        let tokenizer = tiny_tokenizer(&["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]);
        let template = ChatTemplate::from_source(LLAMA3, Some("<|begin_of_text|>".into()), Some("<|eot_id|>".into())).unwrap();
        let special = SpecialTokens { bos: Some("<|begin_of_text|>".into()), eos: Some("<|eot_id|>".into()), pad: None };
        let encoder =
            Encoder::new(tokenizer, Some(template), &special, EncodeOptions { max_seq_length: 1024, train_on_inputs: false }).unwrap();
        let encoded = encoder.encode(&Example::Chat { messages: conversation() }).unwrap();
        assert_eq!(trained_text(&encoder, &encoded), "ANSWER ONE<|eot_id|>ANSWER TWO über<|eot_id|>");
        let bos = encoder.tokenizer().token_to_id("<|begin_of_text|>").unwrap();
        assert_eq!(encoded.input_ids.iter().filter(|&&id| id == bos).count(), 1);
    }

    #[test]
    fn qwen3_multi_turn_trains_earlier_turns_without_the_think_block() {
        let tokenizer = tiny_tokenizer(&["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]);
        let template = ChatTemplate::from_source(QWEN3, None, Some("<|im_end|>".into())).unwrap();
        let special = SpecialTokens { bos: None, eos: Some("<|im_end|>".into()), pad: None };
        let encoder =
            Encoder::new(tokenizer, Some(template), &special, EncodeOptions { max_seq_length: 1024, train_on_inputs: false }).unwrap();
        let encoded = encoder.encode(&Example::Chat { messages: conversation() }).unwrap();
        // The last turn is rendered with an empty think block, which is part of what it learns.
        assert_eq!(trained_text(&encoder, &encoded), "ANSWER ONE<|im_end|><think>\n\n</think>\n\nANSWER TWO über<|im_end|>");
    }

    #[test]
    fn turns_past_the_kept_tokens_are_not_rendered() {
        // The template refuses to render a long prefix; the whole conversation (rendered without
        // the generation prompt) is fine. With 64 kept tokens only the first turns are marked,
        // so no long prefix is rendered: marking costs what is kept, not the whole line.
        let source = format!("{{% if add_generation_prompt and messages | length > 40 %}}{{{{ raise_exception('rendered a long prefix') }}}}{{% endif %}}{CHATML}");
        let tokenizer = tiny_tokenizer(&["<|im_start|>", "<|im_end|>", "<|endoftext|>"]);
        let template = ChatTemplate::from_source(&source, None, Some("<|im_end|>".into())).unwrap();
        let special = SpecialTokens { bos: None, eos: Some("<|endoftext|>".into()), pad: None };
        let options = |max_seq_length| EncodeOptions { max_seq_length, train_on_inputs: false };
        let messages: Vec<ChatMessage> =
            (0..1000).map(|i| if i % 2 == 0 { msg("user", "What is CVE-2021-44228?") } else { msg("assistant", "ANSWER ONE") }).collect();
        let example = Example::Chat { messages };

        let encoder = Encoder::new(tokenizer.clone(), Some(template), &special, options(64)).unwrap();
        let encoded = encoder.encode(&example).unwrap();
        assert!(encoded.truncated);
        assert_eq!(encoded.input_ids.len(), 64);
        assert!(trained_text(&encoder, &encoded).starts_with("ANSWER ONE<|im_end|>ANSWER ONE<|im_end|>"));

        // Same marks as a run that keeps everything, cut to 64 tokens.
        let whole = Encoder::new(
            tokenizer,
            Some(ChatTemplate::from_source(CHATML, None, Some("<|im_end|>".into())).unwrap()),
            &special,
            options(1 << 20),
        )
        .unwrap()
        .encode(&example)
        .unwrap();
        assert_eq!((&whole.input_ids[..64], &whole.trained[..64]), (&encoded.input_ids[..], &encoded.trained[..]));
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_rejected() {
        // Every render shows its last message in upper case, so the conversation up to the first
        // answer is not a prefix of the whole conversation.
        let source = "{% for m in messages %}{% if loop.last %}{{ m.content | upper }}{% else %}{{ m.content }}{% endif %}|{% endfor %}";
        let tokenizer = tiny_tokenizer(&[]);
        let template = ChatTemplate::from_source(source, None, None).unwrap();
        let encoder = Encoder::new(
            tokenizer,
            Some(template),
            &SpecialTokens::default(),
            EncodeOptions { max_seq_length: 64, train_on_inputs: false },
        )
        .unwrap();
        let messages = vec![msg("user", "q"), msg("assistant", "a"), msg("user", "q2"), msg("assistant", "b")];
        let error = encoder.encode(&Example::Chat { messages }).unwrap_err().to_string();
        assert_eq!(error, "chat template: template is not prefix-stable at message 1");
    }
}
