//! The user's own validation set as a benchmark: a JSONL file in the training formats. Each
//! example's last answer is the expected answer and everything before it is the prompt:
//! - chat: the last message must be the assistant's and the one before it the user's; earlier
//!   messages (a system prompt, earlier exchanges) become [`Item::turns`];
//! - prompt/completion: the prompt is the user's turn, the completion the answer.
//!
//! Text documents have no answer to score and are refused with their line number.

use std::path::Path;

use lathe_core::training_file::{parse_line, Example};

use crate::{EvalError, Item};

/// Reads `path` as evaluation items, one per non-blank line (`index` = 0-based example number).
pub fn load(path: &Path) -> Result<Vec<Item>, EvalError> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|_| EvalError::File { path: path.into(), message: "not valid UTF-8".into() })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let row = |line: usize, message: String| EvalError::Row { path: path.into(), line, message };
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let example = parse_line(line).map_err(|reason| row(i + 1, reason))?;
        let (turns, prompt, answer) = match example {
            Example::PromptCompletion { prompt, completion } => (Vec::new(), prompt, completion),
            Example::Text { .. } => {
                return Err(row(i + 1, "a text document has no answer to score; use chat or prompt/completion examples".into()))
            }
            Example::Preference { .. } => {
                return Err(row(
                    i + 1,
                    "a preference pair has two answers, not one to score; use chat or prompt/completion examples".into(),
                ))
            }
            Example::Chat { mut messages } => {
                let answer = match messages.pop() {
                    Some(m) if m.role == "assistant" => m.content,
                    _ => return Err(row(i + 1, "the last message must be the assistant's answer to score".into())),
                };
                let prompt = match messages.pop() {
                    Some(m) if m.role == "user" => m.content,
                    _ => return Err(row(i + 1, "the message before the answer must be the user's question".into())),
                };
                (messages.into_iter().map(|m| (m.role, m.content)).collect(), prompt, answer)
            }
        };
        if answer.trim().is_empty() {
            return Err(row(i + 1, "the expected answer is empty".into()));
        }
        items.push(Item { index: items.len(), url: String::new(), prompt, answer, description: None, turns });
    }
    if items.is_empty() {
        return Err(EvalError::File { path: path.into(), message: "no examples".into() });
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile_dir::Dir, std::path::PathBuf) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.0.join("valid.jsonl");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// A directory removed on drop (the crate has no tempfile dependency).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir().join(format!("lathe-eval-chat-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn chat_and_prompt_completion_examples_become_items() {
        let (_dir, path) = write(concat!(
            r#"{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "CVE-1?"}, {"role": "assistant", "content": "CWE-79"}]}"#,
            "\n\n",
            r#"{"messages": [{"role": "user", "content": "CVE-2?"}, {"role": "assistant", "content": "CWE-89"}]}"#,
            "\n"
        ));
        let items = load(&path).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!((items[0].prompt.as_str(), items[0].answer.as_str()), ("CVE-1?", "CWE-79"));
        assert_eq!(items[0].turns, vec![("system".to_string(), "Be terse.".to_string())]);
        assert_eq!((items[1].index, items[1].turns.len()), (1, 0));

        let (_dir, path) = write("{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n");
        assert_eq!(load(&path).unwrap()[0].answer, "4");
    }

    #[test]
    fn examples_without_an_answer_are_refused_with_their_line() {
        let (_dir, path) = write(concat!(
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c?"}]}"#,
            "\n"
        ));
        let error = load(&path).unwrap_err().to_string();
        assert!(error.ends_with("valid.jsonl:2: the last message must be the assistant's answer to score"), "{error}");
        let (_dir, path) = write("{\"text\": \"a document\"}\n");
        assert!(load(&path).unwrap_err().to_string().contains(":1: a text document has no answer"));
    }
}
