//! Reading and validating training data files (JSONL, one example per line).
//!
//! Three formats are accepted, one per file:
//! - chat, OpenAI's fine-tuning format: `{"messages": [{"role": "user", "content": "…"}, …]}`
//!   with an optional `weight` (0 or 1) on assistant messages;
//! - prompt/completion: `{"prompt": "…", "completion": "…"}`;
//! - raw text for continued pre-training: `{"text": "…"}`.
//!
//! Every problem is reported with the file, the 1-based line number and the reason, because the
//! person who has to fix it is looking at the file in an editor, not at our types.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Result, TrainerError};

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

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Chat { messages: Vec<ChatMessage> },
    PromptCompletion { prompt: String, completion: String },
    Text { text: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    Chat,
    PromptCompletion,
    Text,
}

impl DataFormat {
    fn describe(self) -> &'static str {
        match self {
            DataFormat::Chat => "chat (`messages`)",
            DataFormat::PromptCompletion => "prompt/completion",
            DataFormat::Text => "text",
        }
    }
}

impl Example {
    pub fn format(&self) -> DataFormat {
        match self {
            Example::Chat { .. } => DataFormat::Chat,
            Example::PromptCompletion { .. } => DataFormat::PromptCompletion,
            Example::Text { .. } => DataFormat::Text,
        }
    }
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Reads and validates a JSONL file: every non-blank line is one example, all in the format of
/// the first one.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
    // Editors on Windows like to start UTF-8 files with a byte-order mark; it is not JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);

    let mut examples = Vec::new();
    let mut first: Option<(usize, DataFormat)> = None;
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let example = parse_line(line).map_err(|reason| TrainerError::data_line(path, line_number, reason))?;
        match first {
            None => first = Some((line_number, example.format())),
            Some((first_line, format)) if format != example.format() => {
                let message = format!(
                    "this line is in {} format but line {first_line} is in {} format; use one format per file",
                    example.format().describe(),
                    format.describe()
                );
                return Err(TrainerError::data_line(path, line_number, message));
            }
            Some(_) => {}
        }
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(TrainerError::file(path, "no examples: the file is empty or has only blank lines"));
    }
    Ok(examples)
}

/// Parses and validates one line; the error is the reason, without file or line number.
pub fn parse_line(line: &str) -> std::result::Result<Example, String> {
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
    let formats = [
        (has("messages"), "`messages`"),
        (has("prompt") || has("completion"), "`prompt`/`completion`"),
        (has("text"), "`text`"),
    ];
    let present: Vec<&str> = formats.iter().filter(|(p, _)| *p).map(|(_, name)| *name).collect();
    if present.len() > 1 {
        return Err(format!(
            "mixed keys {}: use exactly one of `messages`, `prompt`+`completion` or `text`",
            present.join(" and ")
        ));
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
    Err(format!("missing keys: expected `messages`, `prompt`+`completion` or `text`, found [{}]", keys.join(", ")))
}

fn string_field(object: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("`{key}` must be a string, found {}", kind_of(other))),
        None => Err(format!("missing key `{key}`")),
    }
}

fn parse_messages(messages: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let Value::Array(items) = messages else {
        return Err(format!("`messages` must be an array, found {}", kind_of(messages)));
    };
    if items.is_empty() {
        return Err("`messages` is empty".into());
    }
    let messages = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_message(item).map_err(|reason| format!("messages[{i}]: {reason}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if !messages.iter().any(|m| m.role == "assistant" && m.weight != Some(0)) {
        return Err("no assistant message with weight 1: there is nothing to train on".into());
    }
    Ok(messages)
}

fn parse_message(item: &Value) -> std::result::Result<ChatMessage, String> {
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
        Some(Value::Null) | None => {
            return Err("missing `content` (only an assistant message with `tool_calls` may omit it)".into())
        }
        Some(other) => {
            return Err(format!("`content` must be a string or an array of text parts, found {}", kind_of(other)))
        }
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
fn join_text_parts(parts: &[Value]) -> std::result::Result<String, String> {
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

    fn write(content: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), content).unwrap();
        file
    }

    fn error_of(content: &str) -> String {
        let file = write(content);
        read_examples(file.path()).unwrap_err().to_string()
    }

    const GOOD_CHAT: &str =
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

    #[test]
    fn a_chat_file_parses_into_messages_with_extra_keys() {
        let file = write(&format!(
            "{GOOD_CHAT}\n\n{}\n",
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a", "weight": 1}]}"#
        ));
        let examples = read_examples(file.path()).unwrap();
        assert_eq!(examples.len(), 2);
        let Example::Chat { messages } = &examples[1] else { panic!("not chat") };
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1].extra.get("name"), Some(&Value::String("ann".into())));
        assert_eq!(messages[2].weight, Some(1));
        assert!(messages[2].extra.is_empty(), "weight is not an extra key");
    }

    #[test]
    fn prompt_completion_and_text_files_parse() {
        let file =
            write("{\"prompt\": \"2+2=\", \"completion\": \"4\"}\r\n{\"prompt\": \"\", \"completion\": \"x\"}\n");
        let examples = read_examples(file.path()).unwrap();
        assert_eq!(examples[0], Example::PromptCompletion { prompt: "2+2=".into(), completion: "4".into() });
        assert_eq!(examples[1].format(), DataFormat::PromptCompletion);

        let file = write("\u{feff}{\"text\": \"CVE-2024-0001 is a heap overflow\"}\n");
        let examples = read_examples(file.path()).unwrap();
        assert_eq!(examples, vec![Example::Text { text: "CVE-2024-0001 is a heap overflow".into() }]);
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

        let all_zero =
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}"#;
        assert!(parse_line(all_zero).unwrap_err().contains("no assistant message with weight 1"));
    }

    #[test]
    fn each_bad_line_names_its_line_number_and_reason() {
        let cases = [
            ("{\"messages\": [", "not valid JSON at column"),
            ("[1, 2]", "expected a JSON object, found an array"),
            ("{\"input\": \"x\"}", "missing keys"),
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
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "a"}]}"#,
                "part type `image_url` is not supported",
            ),
            ("{\"text\": \"\"}", "`text` is empty"),
            ("{\"prompt\": \"p\", \"completion\": \"\"}", "`completion` is empty"),
        ];
        for (bad, reason) in cases {
            let error = error_of(&format!("{GOOD_CHAT}\n\n{bad}\n"));
            assert!(error.contains(":3: "), "{bad}: no line number in `{error}`");
            assert!(error.contains(reason), "{bad}: expected `{reason}` in `{error}`");
        }
    }

    #[test]
    fn a_line_of_another_format_than_line_one_is_rejected() {
        let error = error_of(&format!("\n{GOOD_CHAT}\n{{\"text\": \"raw\"}}\n"));
        assert!(error.contains(":3: this line is in text format but line 2 is in chat"), "{error}");
    }

    #[test]
    fn an_empty_file_is_an_error() {
        assert!(error_of("\n  \n").contains("no examples"));
    }
}
