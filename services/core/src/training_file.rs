//! Checking a training or validation file (JSONL, one example per line) at upload and again at
//! job create, with the same rules and messages the trainer applies when it reads the file.
//!
//! Four formats are accepted, one per file:
//! - chat, OpenAI's fine-tuning format: `{"messages": [{"role": "user", "content": "…"}, …]}`
//!   with an optional `weight` (0 or 1) on assistant messages;
//! - prompt/completion: `{"prompt": "…", "completion": "…"}`;
//! - raw text for continued pre-training: `{"text": "…"}`;
//! - preference pairs, OpenAI's DPO format: `{"input": {"messages": […]}, "preferred_output":
//!   [assistant message], "non_preferred_output": [assistant message]}` (the older names
//!   `preferred_completion` / `non_preferred_completion` too).
//!
//! Every problem is reported with the 1-based line number and the reason, because the person
//! who has to fix it is looking at the file in an editor, not at our types. [`parse_line`] is
//! the single definition of a valid line: the trainer's reader calls it too.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// OpenAI refuses training files with fewer examples; so do we.
pub const MIN_TRAINING_EXAMPLES: usize = 10;
/// Messages in one chat example. Far more than any conversation a model trains on, and low
/// enough that one line cannot tie a worker up before training (the cost of rendering a
/// conversation grows faster than its length).
pub const MAX_MESSAGES_PER_EXAMPLE: usize = 1024;
/// Characters in one line: four times the longest context any supported model has (131,072
/// tokens at ~4 characters each), so no trainable example is refused.
pub const MAX_CHARACTERS_PER_EXAMPLE: usize = 2 * 1024 * 1024;
/// Bytes in one line: a longer line has more than [`MAX_CHARACTERS_PER_EXAMPLE`] characters
/// (at most 4 bytes each), so a streaming reader may refuse it without holding it whole.
pub const MAX_LINE_BYTES: usize = 4 * MAX_CHARACTERS_PER_EXAMPLE;

/// One message of a chat example.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    /// The text; an array of text parts is joined, and null (allowed on an assistant message
    /// with `tool_calls`) becomes "".
    pub content: String,
    /// OpenAI's per-message weight: `Some(0)` keeps an assistant turn out of the loss.
    pub weight: Option<u8>,
    /// Every other key of the message (`name`, `tool_calls`, `tool_call_id`, …), handed to the
    /// chat template unchanged so tool-calling data renders the way the model expects.
    pub extra: Map<String, Value>,
}

/// One training example, in the format of its file.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Chat {
        messages: Vec<ChatMessage>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Text {
        text: String,
    },
    /// A conversation and two answers to its last turn, the first preferred (DPO data).
    Preference {
        messages: Vec<ChatMessage>,
        preferred: Box<ChatMessage>,
        non_preferred: Box<ChatMessage>,
    },
}

impl Example {
    /// The conversations a preference pair trains on: the prompt followed by each answer, the
    /// prompt's own assistant turns out of the loss. None for other formats.
    pub fn preference_conversations(&self) -> Option<[Vec<ChatMessage>; 2]> {
        let Example::Preference { messages, preferred, non_preferred } = self else { return None };
        let prompt: Vec<ChatMessage> =
            messages.iter().map(|m| ChatMessage { weight: (m.role == "assistant").then_some(0).or(m.weight), ..m.clone() }).collect();
        let with = |answer: &ChatMessage| {
            let mut conversation = prompt.clone();
            conversation.push(ChatMessage { weight: Some(1), ..answer.clone() });
            conversation
        };
        Some([with(preferred), with(non_preferred)])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    Chat,
    PromptCompletion,
    Text,
    /// Preference pairs for DPO.
    Preference,
}

impl DataFormat {
    /// How a message to the user names the format.
    pub fn describe(self) -> &'static str {
        match self {
            DataFormat::Chat => "chat (`messages`)",
            DataFormat::PromptCompletion => "prompt/completion",
            DataFormat::Text => "text",
            DataFormat::Preference => "preference (`input`/`preferred_output`/`non_preferred_output`)",
        }
    }
}

impl Example {
    pub fn format(&self) -> DataFormat {
        match self {
            Example::Chat { .. } => DataFormat::Chat,
            Example::PromptCompletion { .. } => DataFormat::PromptCompletion,
            Example::Text { .. } => DataFormat::Text,
            Example::Preference { .. } => DataFormat::Preference,
        }
    }
}

/// What the API records about an accepted file (the `files` row, and the job-create checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    pub format: DataFormat,
    pub examples: usize,
    /// Lines in the file, blank ones included (a trailing newline does not start a line).
    pub lines: usize,
    pub bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// A line that is not a valid example; `line` is 1-based.
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("training file has {examples} examples; at least {MIN_TRAINING_EXAMPLES} are required")]
    TooFewExamples { examples: usize },
    #[error("no examples: the file is empty or has only blank lines")]
    Empty,
}

impl FileError {
    /// The 1-based line the error is about, if it is about one line.
    pub fn line(&self) -> Option<usize> {
        match self {
            FileError::Line { line, .. } => Some(*line),
            _ => None,
        }
    }
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Checks a training file: a valid JSONL file of one format with at least
/// [`MIN_TRAINING_EXAMPLES`] examples.
pub fn validate_training_file(bytes: &[u8]) -> Result<FileSummary, FileError> {
    enough_to_train(validate_jsonl(bytes)?)
}

/// A training file needs at least [`MIN_TRAINING_EXAMPLES`] examples.
pub fn enough_to_train(summary: FileSummary) -> Result<FileSummary, FileError> {
    if summary.examples < MIN_TRAINING_EXAMPLES {
        return Err(FileError::TooFewExamples { examples: summary.examples });
    }
    Ok(summary)
}

/// Checks a JSONL file of examples with no minimum count (a validation file may be small).
pub fn validate_jsonl(bytes: &[u8]) -> Result<FileSummary, FileError> {
    let mut reader = LineReader::default();
    for line in split_lines(bytes) {
        reader.push(line)?;
    }
    reader.summary(bytes.len())
}

/// The examples of a JSONL file, all of one format.
pub struct ParsedFile {
    pub format: DataFormat,
    pub examples: Vec<Example>,
    /// The 1-based line of each example (blank lines count as lines but hold no example).
    pub example_lines: Vec<usize>,
    /// Lines in the file, blank ones included.
    pub lines: usize,
}

/// Parses a whole JSONL file: UTF-8, one example per non-blank line, every line in the format
/// of the first. The one reader behind upload checks, job-create checks and the trainer.
pub fn parse_jsonl(bytes: &[u8]) -> Result<ParsedFile, FileError> {
    let mut reader = LineReader::default();
    let (mut examples, mut example_lines) = (Vec::new(), Vec::new());
    for line in split_lines(bytes) {
        if let Some(example) = reader.push(line)? {
            examples.push(example);
            example_lines.push(reader.lines());
        }
    }
    let (format, _) = reader.finish()?;
    Ok(ParsedFile { format, examples, example_lines, lines: reader.lines })
}

/// The lines of a file as `str::lines` sees them: split at `\n`, no empty line after a final one.
pub fn split_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let trailing = bytes.ends_with(b"\n") || bytes.is_empty();
    let mut pieces = bytes.split(|b| *b == b'\n').peekable();
    std::iter::from_fn(move || {
        let piece = pieces.next()?;
        if trailing && pieces.peek().is_none() {
            return None;
        }
        Some(piece)
    })
}

/// Checks a JSONL file one line at a time, so a file of any size is checked in the memory of
/// its longest line (uploads are streamed through it). The rules are those of [`parse_jsonl`].
#[derive(Debug, Default)]
pub struct LineReader {
    lines: usize,
    examples: usize,
    first: Option<(usize, DataFormat)>,
}

impl LineReader {
    /// Feeds the next line, without its `\n` (a trailing `\r` is dropped). Returns its example,
    /// or `None` for a blank line.
    pub fn push(&mut self, raw: &[u8]) -> Result<Option<Example>, FileError> {
        self.lines += 1;
        let line_number = self.lines;
        let mut raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line_number == 1 {
            // Editors on Windows like to start UTF-8 files with a byte-order mark; it is not JSON.
            raw = raw.strip_prefix("\u{feff}".as_bytes()).unwrap_or(raw);
        }
        let line = std::str::from_utf8(raw).map_err(|e| FileError::Line {
            line: line_number,
            reason: format!("not valid UTF-8 at byte {} of the line", e.valid_up_to() + 1),
        })?;
        if line.trim().is_empty() {
            return Ok(None);
        }
        let example = parse_line(line).map_err(|reason| FileError::Line { line: line_number, reason })?;
        match self.first {
            None => self.first = Some((line_number, example.format())),
            Some((first_line, format)) if format != example.format() => {
                let reason = format!(
                    "this line is in {} format but line {first_line} is in {} format; use one format per file",
                    example.format().describe(),
                    format.describe()
                );
                return Err(FileError::Line { line: line_number, reason });
            }
            Some(_) => {}
        }
        self.examples += 1;
        Ok(Some(example))
    }

    /// The error for line `lines() + 1` when it grows past [`MAX_LINE_BYTES`] before its end.
    pub fn line_too_long(&self) -> FileError {
        FileError::Line {
            line: self.lines + 1,
            reason: format!(
                "the line is longer than {MAX_LINE_BYTES} bytes, so it has more than {MAX_CHARACTERS_PER_EXAMPLE} characters; at most {MAX_CHARACTERS_PER_EXAMPLE} are allowed per line"
            ),
        }
    }

    /// Lines fed so far, blank ones included.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// The file's format and example count, once every line is in.
    pub fn finish(&self) -> Result<(DataFormat, usize), FileError> {
        match self.first {
            Some((_, format)) => Ok((format, self.examples)),
            None => Err(FileError::Empty),
        }
    }

    /// [`LineReader::finish`] as the summary the API stores for a file of `bytes` bytes.
    pub fn summary(&self, bytes: usize) -> Result<FileSummary, FileError> {
        let (format, examples) = self.finish()?;
        Ok(FileSummary { format, examples, lines: self.lines, bytes })
    }
}

/// Parses and validates one line; the error is the reason, without file or line number.
pub fn parse_line(line: &str) -> Result<Example, String> {
    // Bytes bound characters from above: count characters only when the bytes could be too many.
    if line.len() > MAX_CHARACTERS_PER_EXAMPLE && line.chars().count() > MAX_CHARACTERS_PER_EXAMPLE {
        return Err(format!(
            "the example has {} characters; at most {MAX_CHARACTERS_PER_EXAMPLE} are allowed per line",
            line.chars().count()
        ));
    }
    let value: Value = serde_json::from_str(line).map_err(|e| {
        // serde's message ends with "at line 1 column N"; a JSONL line is always line 1.
        let message = e.to_string();
        let reason = message.split(" at line ").next().unwrap_or(&message).to_string();
        format!("not valid JSON at column {}: {reason}", e.column())
    })?;
    let Value::Object(object) = value else {
        return Err(format!("expected a JSON object, found {}", kind_of(&value)));
    };

    let has = |key: &str| object.contains_key(key);
    let preference = PREFERENCE_KEYS.iter().any(|k| has(k));
    let formats = [
        (has("messages"), "`messages`"),
        (has("prompt") || has("completion"), "`prompt`/`completion`"),
        (has("text"), "`text`"),
        (preference, "`input`/`preferred_output`/`non_preferred_output`"),
    ];
    let present: Vec<&str> = formats.iter().filter(|(p, _)| *p).map(|(_, name)| *name).collect();
    if present.len() > 1 {
        return Err(format!(
            "mixed keys {}: use exactly one of `messages`, `prompt`+`completion`, `text` or `input`+`preferred_output`+`non_preferred_output`",
            present.join(" and ")
        ));
    }
    if preference {
        return parse_preference(&object);
    }

    if let Some(messages) = object.get("messages") {
        return parse_messages(messages).map(|messages| Example::Chat { messages });
    }
    if has("prompt") || has("completion") {
        let prompt = string_field(&object, "prompt")?;
        let completion = string_field(&object, "completion")?;
        if completion.is_empty() {
            return Err("`completion` is empty: there is nothing to train on".into());
        }
        return Ok(Example::PromptCompletion { prompt, completion });
    }
    if has("text") {
        let text = string_field(&object, "text")?;
        if text.is_empty() {
            return Err("`text` is empty".into());
        }
        return Ok(Example::Text { text });
    }
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    Err(format!(
        "missing keys: expected `messages`, `prompt`+`completion`, `text` or `input`+`preferred_output`+`non_preferred_output`, found [{}]",
        keys.join(", ")
    ))
}

/// Keys of a preference line: OpenAI's, and the older names of its two outputs.
const PREFERENCE_KEYS: [&str; 5] =
    ["input", "preferred_output", "non_preferred_output", "preferred_completion", "non_preferred_completion"];

fn parse_preference(object: &Map<String, Value>) -> Result<Example, String> {
    let input = match object.get("input") {
        Some(Value::Object(input)) => input,
        Some(other) => return Err(format!("`input` must be an object with `messages`, found {}", kind_of(other))),
        None => return Err("missing key `input` (an object with the prompt's `messages`)".into()),
    };
    let messages = match input.get("messages") {
        Some(messages) => parse_request_messages(messages).map_err(|reason| format!("input.{reason}"))?,
        None => return Err("missing key `input.messages`".into()),
    };
    if messages.len() >= MAX_MESSAGES_PER_EXAMPLE {
        return Err(format!("`input.messages` has {} messages; at most {} are allowed", messages.len(), MAX_MESSAGES_PER_EXAMPLE - 1));
    }
    if messages.last().is_some_and(|m| m.role == "assistant") {
        return Err("input.messages ends with an assistant message: the prompt must end where the answers begin".into());
    }
    let output = |name: &str, old: &str| -> Result<ChatMessage, String> {
        let (key, value) = match (object.get(name), object.get(old)) {
            (Some(_), Some(_)) => return Err(format!("give `{name}` or its older name `{old}`, not both")),
            (Some(v), None) => (name, v),
            (None, Some(v)) => (old, v),
            (None, None) => return Err(format!("missing key `{name}`")),
        };
        let Value::Array(items) = value else {
            return Err(format!("`{key}` must be an array holding one assistant message, found {}", kind_of(value)));
        };
        let [item] = items.as_slice() else {
            return Err(format!("`{key}` must hold exactly one assistant message, found {}", items.len()));
        };
        let message = parse_message(item).map_err(|reason| format!("{key}[0]: {reason}"))?;
        if message.role != "assistant" {
            return Err(format!("{key}[0]: must be an assistant message, found role `{}`", message.role));
        }
        if message.weight == Some(0) {
            return Err(format!("{key}[0]: weight 0 would leave nothing to compare"));
        }
        if message.content.is_empty() && !message.extra.contains_key("tool_calls") {
            return Err(format!("{key}[0]: the answer is empty"));
        }
        Ok(message)
    };
    let preferred = output("preferred_output", "preferred_completion")?;
    let non_preferred = output("non_preferred_output", "non_preferred_completion")?;
    if preferred == non_preferred {
        return Err("`preferred_output` and `non_preferred_output` are the same answer: there is nothing to prefer".into());
    }
    Ok(Example::Preference { messages, preferred: Box::new(preferred), non_preferred: Box::new(non_preferred) })
}

fn string_field(object: &Map<String, Value>, key: &str) -> Result<String, String> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind_of(other))),
        None => Err(format!("missing key `{key}`")),
    }
}

fn parse_messages(messages: &Value) -> Result<Vec<ChatMessage>, String> {
    let Value::Array(items) = messages else {
        return Err(format!("`messages` must be an array, found {}", kind_of(messages)));
    };
    if items.is_empty() {
        return Err("`messages` is empty".into());
    }
    if items.len() > MAX_MESSAGES_PER_EXAMPLE {
        return Err(format!("`messages` has {} messages; at most {MAX_MESSAGES_PER_EXAMPLE} are allowed per example", items.len()));
    }
    let messages = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_message(item).map_err(|reason| format!("messages[{i}]: {reason}")))
        .collect::<Result<Vec<_>, _>>()?;
    if !messages.iter().any(|m| m.role == "assistant" && m.weight != Some(0)) {
        return Err("no assistant message with weight 1: there is nothing to train on".into());
    }
    Ok(messages)
}

/// The `messages` of a chat completion request: like a training example's, without the need
/// for an assistant turn to train on. Errors name the message (`messages[2]: …`).
pub fn parse_request_messages(messages: &Value) -> Result<Vec<ChatMessage>, String> {
    let Value::Array(items) = messages else {
        return Err(format!("`messages` must be an array, found {}", kind_of(messages)));
    };
    if items.is_empty() {
        return Err("`messages` is empty".into());
    }
    items.iter().enumerate().map(|(i, item)| parse_message(item).map_err(|reason| format!("messages[{i}]: {reason}"))).collect()
}

fn parse_message(item: &Value) -> Result<ChatMessage, String> {
    let Value::Object(object) = item else {
        return Err(format!("expected an object, found {}", kind_of(item)));
    };
    let role = match object.get("role") {
        Some(Value::String(role)) if ROLES.contains(&role.as_str()) => role.clone(),
        Some(Value::String(role)) => {
            return Err(format!("unknown role `{role}` (expected one of {})", ROLES.join(", ")));
        }
        Some(other) => return Err(format!("`role` must be a string, found {}", kind_of(other))),
        None => return Err("missing key `role`".into()),
    };

    let has_tool_calls = object.get("tool_calls").is_some_and(|v| !v.is_null());
    let content = match object.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => join_text_parts(parts)?,
        Some(Value::Null) | None if role == "assistant" && has_tool_calls => String::new(),
        Some(Value::Null) | None => return Err("missing `content` (only an assistant message with `tool_calls` may omit it)".into()),
        Some(other) => return Err(format!("`content` must be a string or an array of text parts, found {}", kind_of(other))),
    };

    let weight = match object.get("weight") {
        None | Some(Value::Null) => None,
        Some(w) => {
            let weight = match w.as_u64() {
                Some(0) => 0,
                Some(1) => 1,
                _ => return Err(format!("`weight` must be 0 or 1, found {w}")),
            };
            if role != "assistant" {
                return Err(format!("`weight` is only allowed on assistant messages, found it on a {role} message"));
            }
            Some(weight)
        }
    };

    let extra = object
        .iter()
        .filter(|(key, _)| !matches!(key.as_str(), "role" | "content" | "weight"))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    Ok(ChatMessage { role, content, weight, extra })
}

/// OpenAI allows `content` as `[{"type": "text", "text": "…"}, …]`; the parts are one message.
fn join_text_parts(parts: &[Value]) -> Result<String, String> {
    let mut content = String::new();
    for (i, part) in parts.iter().enumerate() {
        let kind = part.get("type").and_then(Value::as_str);
        match (kind, part.get("text")) {
            (Some("text"), Some(Value::String(text))) => content.push_str(text),
            (Some("text"), _) => return Err(format!("content[{i}]: a text part needs a string `text`")),
            (Some(other), _) => return Err(format!("content[{i}]: part type `{other}` is not supported, only `text`")),
            (None, _) => return Err(format!("content[{i}]: expected an object with `type` and `text`")),
        }
    }
    Ok(content)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_CHAT: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

    fn chat_file(examples: usize) -> String {
        vec![GOOD_CHAT; examples].join("\n") + "\n"
    }

    fn error_of(content: &str) -> FileError {
        validate_jsonl(content.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_chat_file_of_ten_examples_is_summarised() {
        let content = chat_file(10);
        let summary = validate_training_file(content.as_bytes()).unwrap();
        assert_eq!(summary, FileSummary { format: DataFormat::Chat, examples: 10, lines: 10, bytes: content.len() });
        assert_eq!(serde_json::to_value(summary.format).unwrap(), "chat");
    }

    #[test]
    fn a_training_file_of_nine_examples_is_refused_with_the_count() {
        let error = validate_training_file(chat_file(9).as_bytes()).unwrap_err();
        assert_eq!(error, FileError::TooFewExamples { examples: 9 });
        assert_eq!(error.to_string(), "training file has 9 examples; at least 10 are required");
        // A validation file may be that small.
        assert_eq!(validate_jsonl(chat_file(9).as_bytes()).unwrap().examples, 9);
    }

    #[test]
    fn blank_lines_count_as_lines_but_not_examples() {
        let content = format!("\n{GOOD_CHAT}\n\n  \n{GOOD_CHAT}\r\n");
        let summary = validate_jsonl(content.as_bytes()).unwrap();
        assert_eq!((summary.examples, summary.lines), (2, 5));
    }

    #[test]
    fn an_empty_file_has_no_examples() {
        assert_eq!(error_of("\n  \n"), FileError::Empty);
        assert_eq!(validate_training_file(b"").unwrap_err().to_string(), "no examples: the file is empty or has only blank lines");
    }

    const GOOD_PAIR: &str = r#"{"input": {"messages": [{"role": "user", "content": "CWE of CVE-1?"}]}, "preferred_output": [{"role": "assistant", "content": "CWE-79"}], "non_preferred_output": [{"role": "assistant", "content": "CWE-89"}]}"#;

    #[test]
    fn a_preference_line_in_openai_format_or_with_the_older_names_parses() {
        let Example::Preference { messages, preferred, non_preferred } = parse_line(GOOD_PAIR).unwrap() else { panic!("not a pair") };
        assert_eq!((messages.len(), preferred.content.as_str(), non_preferred.content.as_str()), (1, "CWE-79", "CWE-89"));
        let older = GOOD_PAIR.replace("preferred_output", "preferred_completion");
        assert_eq!(parse_line(&older).unwrap(), parse_line(GOOD_PAIR).unwrap());
        let summary = validate_training_file([GOOD_PAIR; 10].join("\n").as_bytes()).unwrap();
        assert_eq!((summary.format, summary.examples), (DataFormat::Preference, 10));
        assert_eq!(serde_json::to_value(summary.format).unwrap(), "preference");
    }

    #[test]
    fn a_pair_trains_each_answer_after_the_prompt_and_never_the_prompt_s_own_answers() {
        let line = r#"{"input": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}, "preferred_output": [{"role": "assistant", "content": "good"}], "non_preferred_output": [{"role": "assistant", "content": "bad"}]}"#;
        let [preferred, non_preferred] = parse_line(line).unwrap().preference_conversations().unwrap();
        assert_eq!(preferred.len(), 4);
        assert_eq!((preferred[1].weight, preferred[3].weight, preferred[3].content.as_str()), (Some(0), Some(1), "good"));
        assert_eq!(non_preferred[3].content, "bad");
    }

    #[test]
    fn a_bad_preference_line_names_the_key_and_the_reason() {
        let cases = [
            (GOOD_PAIR.replace(r#""input": {"messages""#, r#""input": {"msgs""#), "missing key `input.messages`"),
            (
                GOOD_PAIR.replace(r#"[{"role": "assistant", "content": "CWE-79"}]"#, "[]"),
                "`preferred_output` must hold exactly one assistant message, found 0",
            ),
            (
                GOOD_PAIR.replace(r#"{"role": "assistant", "content": "CWE-89"}"#, r#"{"role": "user", "content": "CWE-89"}"#),
                "non_preferred_output[0]: must be an assistant message",
            ),
            (GOOD_PAIR.replace("CWE-89", "CWE-79"), "the same answer"),
            (GOOD_PAIR.replace(r#""preferred_output""#, r#""preferred_completion": [], "preferred_output""#), "not both"),
            (GOOD_PAIR.replace(r#""input""#, r#""messages": [], "input""#), "mixed keys"),
            (
                GOOD_PAIR.replace(r#""role": "user", "content": "CWE of CVE-1?""#, r#""role": "bot", "content": "x""#),
                "input.messages[0]: unknown role `bot`",
            ),
        ];
        for (line, reason) in cases {
            let error = parse_line(&line).map(|_| ()).expect_err(&line);
            assert!(error.contains(reason), "{line}: expected `{reason}` in `{error}`");
        }
    }

    #[test]
    fn a_chat_line_parses_into_messages_with_extra_keys() {
        let line = r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a", "weight": 1}]}"#;
        let Example::Chat { messages } = parse_line(line).unwrap() else { panic!("not chat") };
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1].extra.get("name"), Some(&Value::String("ann".into())));
        assert_eq!(messages[2].weight, Some(1));
        assert!(messages[2].extra.is_empty(), "weight is not an extra key");
    }

    #[test]
    fn prompt_completion_and_text_files_parse_and_a_bom_is_skipped() {
        let summary =
            validate_jsonl(b"{\"prompt\": \"2+2=\", \"completion\": \"4\"}\r\n{\"prompt\": \"\", \"completion\": \"x\"}\n").unwrap();
        assert_eq!(summary.format, DataFormat::PromptCompletion);
        assert_eq!(
            parse_line(r#"{"prompt": "2+2=", "completion": "4"}"#).unwrap(),
            Example::PromptCompletion { prompt: "2+2=".into(), completion: "4".into() }
        );
        let summary = validate_jsonl("\u{feff}{\"text\": \"CVE-2024-0001 is a heap overflow\"}\n".as_bytes()).unwrap();
        assert_eq!((summary.format, summary.examples), (DataFormat::Text, 1));
    }

    #[test]
    fn content_parts_are_joined_and_null_content_with_tool_calls_is_empty() {
        let line = r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "42", "tool_call_id": "c1"}, {"role": "assistant", "content": "done"}]}"#;
        let Example::Chat { messages } = parse_line(line).unwrap() else { panic!("not chat") };
        assert_eq!(messages[0].content, "ab");
        assert_eq!(messages[1].content, "");
        assert!(messages[1].extra.contains_key("tool_calls"));
    }

    #[test]
    fn weight_zero_turns_are_kept_but_one_trained_turn_is_required() {
        let line = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad", "weight": 0}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good"}]}"#;
        let Example::Chat { messages } = parse_line(line).unwrap() else { panic!("not chat") };
        assert_eq!(messages[1].weight, Some(0));
        assert_eq!(messages[3].weight, None);
    }

    #[test]
    fn each_bad_line_names_its_line_number_and_reason() {
        let cases = [
            ("{\"messages\": [", "not valid JSON at column"),
            ("[1, 2]", "expected a JSON object, found an array"),
            ("{\"inputs\": \"x\"}", "missing keys"),
            ("{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}", "mixed keys"),
            ("{\"prompt\": \"b\"}", "missing key `completion`"),
            ("{\"messages\": []}", "`messages` is empty"),
            ("{\"messages\": {\"role\": \"user\"}}", "`messages` must be an array"),
            (r#"{"messages": [{"role": "bot", "content": "x"}]}"#, "messages[0]: unknown role `bot`"),
            (r#"{"messages": [{"role": "user", "content": 5}]}"#, "messages[0]: `content` must be a string"),
            (
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}"#,
                "messages[1]: `weight` must be 0 or 1, found 2",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}"#,
                "messages[0]: `weight` is only allowed on assistant messages",
            ),
            (r#"{"messages": [{"role": "user", "content": "q"}]}"#, "no assistant message with weight 1"),
            (
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}"#,
                "no assistant message with weight 1",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "a"}]}"#,
                "part type `image_url` is not supported",
            ),
            ("{\"text\": \"\"}", "`text` is empty"),
            ("{\"input\": \"x\"}", "`input` must be an object with `messages`"),
            ("{\"prompt\": \"p\", \"completion\": \"\"}", "`completion` is empty"),
        ];
        for (bad, reason) in cases {
            let error = error_of(&format!("{GOOD_CHAT}\n\n{bad}\n"));
            assert_eq!(error.line(), Some(3), "{bad}: {error}");
            let message = error.to_string();
            assert!(message.starts_with("line 3: "), "{bad}: no line number in `{message}`");
            assert!(message.contains(reason), "{bad}: expected `{reason}` in `{message}`");
        }
    }

    #[test]
    fn a_line_of_another_format_than_the_first_is_rejected() {
        let error = error_of(&format!("\n{GOOD_CHAT}\n{{\"text\": \"raw\"}}\n"));
        assert_eq!(
            error.to_string(),
            "line 3: this line is in text format but line 2 is in chat (`messages`) format; use one format per file"
        );
    }

    #[test]
    fn invalid_utf8_is_reported_on_its_line() {
        let mut content = format!("{GOOD_CHAT}\n{{\"text\": \"ab").into_bytes();
        content.extend_from_slice(&[0xff, b'"', b'}', b'\n']);
        let error = validate_jsonl(&content).unwrap_err();
        assert_eq!(error.to_string(), "line 2: not valid UTF-8 at byte 13 of the line");
    }

    #[test]
    fn an_example_with_too_many_messages_is_refused_naming_its_line() {
        // Once 10,000 messages in one line held a worker for minutes before training.
        let turn = r#"{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}"#;
        let huge = format!(r#"{{"messages": [{}]}}"#, vec![turn; MAX_MESSAGES_PER_EXAMPLE / 2 + 1].join(", "));
        let content = format!("{}\n{huge}\n", [GOOD_CHAT; 3].join("\n"));
        let message = error_of(&content).to_string();
        assert!(message.contains("line 4") && message.contains("at most 1024"), "{message}");
        let fits = format!(r#"{{"messages": [{}]}}"#, vec![turn; MAX_MESSAGES_PER_EXAMPLE / 2].join(", "));
        assert!(parse_line(&fits).is_ok());
    }

    #[test]
    fn an_over_long_line_is_refused_naming_its_line() {
        let long = format!(r#"{{"text": "{}"}}"#, "x".repeat(MAX_CHARACTERS_PER_EXAMPLE));
        let content = format!("{GOOD_CHAT}\n{long}\n");
        let message = error_of(&content).to_string();
        assert!(message.contains("line 2") && message.contains("characters"), "{message}");
    }

    #[test]
    fn lines_split_like_str_lines_and_examples_know_their_line() {
        for text in ["", "\n", "a", "a\n", "a\n\nb", "a\r\nb\n", "a\n\n"] {
            let ours: Vec<&[u8]> = split_lines(text.as_bytes()).collect();
            let std: Vec<&[u8]> = text.lines().map(|l| l.as_bytes()).map(|l| l.strip_suffix(b"\r").unwrap_or(l)).collect();
            let ours: Vec<&[u8]> = ours.into_iter().map(|l| l.strip_suffix(b"\r").unwrap_or(l)).collect();
            assert_eq!(ours, std, "{text:?}");
        }
        let parsed = parse_jsonl(format!("\n{}\n\n{}\n", r#"{"text": "a"}"#, r#"{"text": "b"}"#).as_bytes()).unwrap();
        assert_eq!((parsed.example_lines, parsed.lines), (vec![2, 4], 4));
    }
}
