//! What serving a chat model needs besides the decoder ([`crate::generate::Batch`]): its
//! tokenizer and chat template, the tokens that end a turn, the prompt of a chat or a text
//! request, and the text of the generated tokens as it grows ([`TextStream`]).

use std::path::Path;

use lathe_core::training_file::ChatMessage;
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::chat_template::{read_special_tokens, ChatTemplate, SpecialTokens};
use crate::{Result, TrainerError};

/// End-of-turn and end-of-text tokens of the common families, besides the model's own EOS.
const TURN_ENDS: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"];

/// The ids that end generation: the model's EOS and whichever end-of-turn tokens it has.
pub fn stop_token_ids(tokenizer: &Tokenizer, special: &SpecialTokens) -> Vec<i64> {
    let mut ids: Vec<i64> = Vec::new();
    for token in special.eos.iter().map(String::as_str).chain(TURN_ENDS) {
        if let Some(id) = tokenizer.token_to_id(token) {
            if !ids.contains(&(id as i64)) {
                ids.push(id as i64);
            }
        }
    }
    ids
}

/// A model directory's text side.
pub struct Prompter {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// Generation ends at one of these.
    pub stop_ids: Vec<i64>,
}

impl Prompter {
    pub fn open(model_dir: &Path) -> Result<Prompter> {
        let tokenizer_path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| TrainerError::file(&tokenizer_path, e.to_string()))?;
        let config_path = model_dir.join("tokenizer_config.json");
        let template = ChatTemplate::from_tokenizer_config(&config_path)?;
        let special = read_special_tokens(&config_path)?;
        let stop_ids = stop_token_ids(&tokenizer, &special);
        Ok(Prompter { tokenizer, template, stop_ids })
    }

    /// The tokens of a chat request: its messages (and tools) through the model's template,
    /// opening the assistant's turn, tokenized without added special tokens (the template
    /// writes them), as `transformers`' `apply_chat_template` does.
    pub fn chat_prompt(&self, messages: &[ChatMessage], tools: Option<&Json>) -> Result<Vec<i64>> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| TrainerError::invalid("model", "this model has no chat template; use /v1/completions with a text prompt"))?;
        let text = template.render_with_tools(messages, tools, true)?;
        self.encode(&text, false)
    }

    /// `text` with every special token of the tokenizer (`<|im_start|>`, `<|eot_id|>`, …) made
    /// plain text, by a zero-width space after its first character: rendered and tokenized, it
    /// is ordinary text to the model, so a user cannot forge a turn of another role. Off by
    /// default (transformers parses special tokens wherever they appear); the operator turns it
    /// on for a server (`lathe worker --serve --escape-special-tokens`).
    pub fn escape_special_tokens(&self, text: &str) -> String {
        let mut text = text.to_string();
        for token in self.tokenizer.get_added_tokens_decoder().values().filter(|t| t.special && t.content.chars().count() > 1) {
            if text.contains(&token.content) {
                let mut chars = token.content.chars();
                let first = chars.next().expect("at least two characters");
                text = text.replace(&token.content, &format!("{first}\u{200B}{}", chars.as_str()));
            }
        }
        text
    }

    /// The tokens of a text prompt (legacy completions), with the tokenizer's special tokens
    /// (a BOS where the model has one).
    pub fn text_prompt(&self, text: &str) -> Result<Vec<i64>> {
        self.encode(text, true)
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let encoding = self.tokenizer.encode(text, add_special_tokens).map_err(|e| TrainerError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| id as i64).collect())
    }

    /// The text of `tokens`, special tokens left out.
    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        self.tokenizer.decode(tokens, true).map_err(|e| TrainerError::Tokenizer(e.to_string()))
    }

    /// One token as text, special tokens included (log-probability listings).
    pub fn token_text(&self, token: i64) -> String {
        self.tokenizer.decode(&[token as u32], false).unwrap_or_default()
    }
}

/// The text of one sequence's tokens as they come: each [`TextStream::push`] returns what can
/// be shown now. Text is held back while it could still be the start of a stop sequence or
/// ends in an incomplete UTF-8 character, and a stop sequence ends the text before it.
pub struct TextStream {
    tokens: Vec<u32>,
    emitted: String,
    stops: Vec<String>,
}

/// What one token added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// A stop sequence appeared: the text ends here and the sequence should stop.
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> TextStream {
        TextStream { tokens: Vec::new(), emitted: String::new(), stops: stops.into_iter().filter(|s| !s.is_empty()).collect() }
    }

    /// Adds `token`; `last` flushes everything held back.
    pub fn push(&mut self, prompter: &Prompter, token: i64, last: bool) -> Result<Piece> {
        self.tokens.push(token as u32);
        let text = prompter.decode(&self.tokens)?;
        Ok(self.advance(&text, last))
    }

    /// The text shown so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    fn advance(&mut self, text: &str, last: bool) -> Piece {
        // Where the already shown text ends in the new decode (normally all of it).
        let start = if text.starts_with(&self.emitted) { self.emitted.len() } else { floor_boundary(text, self.emitted.len()) };
        // A stop can only begin in what was held back, at most its own length before `start`.
        let earliest_stop = self
            .stops
            .iter()
            .filter_map(|stop| {
                let from = floor_boundary(text, start.saturating_sub(stop.len()));
                text[from..].find(stop.as_str()).map(|i| from + i)
            })
            .min();
        if let Some(at) = earliest_stop {
            let at = at.max(start);
            let piece = text[start..at].to_string();
            self.emitted.push_str(&piece);
            return Piece { text: piece, stopped: true };
        }
        let end = if last { text.len() } else { text.len() - self.held_back(text) };
        let piece = if end > start { text[start..end].to_string() } else { String::new() };
        self.emitted.push_str(&piece);
        Piece { text: piece, stopped: false }
    }

    /// Bytes at the end of `text` not to show yet: an incomplete character (the tokenizer's
    /// U+FFFD) or a proper prefix of a stop sequence.
    fn held_back(&self, text: &str) -> usize {
        let replacement = text.len() - text.trim_end_matches('\u{FFFD}').len();
        let body = &text[..text.len() - replacement];
        let prefix = self
            .stops
            .iter()
            .flat_map(|stop| stop.char_indices().skip(1).map(|(i, _)| &stop[..i]))
            .filter(|p| body.ends_with(*p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        replacement + prefix
    }
}

fn floor_boundary(text: &str, mut index: usize) -> usize {
    index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], decodes: &[&str]) -> (Vec<String>, bool) {
        let mut stream = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut pieces = Vec::new();
        for (i, text) in decodes.iter().enumerate() {
            let piece = stream.advance(text, i + 1 == decodes.len());
            pieces.push(piece.text);
            if piece.stopped {
                return (pieces, true);
            }
        }
        (pieces, false)
    }

    #[test]
    fn text_streams_as_it_grows_and_a_stop_sequence_ends_it_unshown() {
        let (pieces, stopped) = run(&["END"], &["Hel", "Hello", "Hello E", "Hello EN", "Hello END", "Hello END more"]);
        assert_eq!(pieces, ["Hel", "lo", " ", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn a_prefix_of_a_stop_that_does_not_complete_is_shown_later() {
        let (pieces, stopped) = run(&["END"], &["a E", "a EX", "a EXIT"]);
        assert_eq!(pieces, ["a ", "EX", "IT"]);
        assert!(!stopped);
    }

    #[test]
    fn an_incomplete_character_waits_for_its_next_token() {
        let (pieces, _) = run(&[], &["caf\u{FFFD}", "café", "café!"]);
        assert_eq!(pieces, ["caf", "é", "!"]);
        assert_eq!(pieces.concat(), "café!");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (pieces, stopped) = run(&["\n\n", "B"], &["A", "AB\n\nC"]);
        assert_eq!(pieces, ["A", ""]);
        assert!(stopped);
    }
}
