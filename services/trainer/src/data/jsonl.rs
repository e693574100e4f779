//! Reading training data files (JSONL, one example per line) from disk.
//!
//! Four formats are accepted, one per file:
//! - chat, OpenAI's fine-tuning format: `{"messages": [{"role": "user", "content": "…"}, …]}`
//!   with an optional `weight` (0 or 1) on assistant messages;
//! - prompt/completion: `{"prompt": "…", "completion": "…"}`;
//! - raw text for continued pre-training: `{"text": "…"}`;
//! - preference pairs for DPO, OpenAI's format: `{"input": {"messages": […]},
//!   "preferred_output": […], "non_preferred_output": […]}` (docs/dpo.md).
//!
//! The rules live in `lathe_core::training_file`, shared with the API's upload checks, so a
//! file the service accepted is a file the trainer reads. Every problem is reported with the
//! file, the 1-based line number and the reason.

use std::path::Path;

use lathe_core::training_file::{parse_jsonl, FileError};
pub use lathe_core::training_file::{parse_line, ChatMessage, DataFormat, Example};

use crate::{Result, TrainerError};

/// Reads and validates a JSONL file: every non-blank line is one example, all in the format of
/// the first one. Returns the examples and the 1-based line of each.
pub fn read_examples(path: &Path) -> Result<(Vec<Example>, Vec<usize>)> {
    let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
    match parse_jsonl(&bytes) {
        Ok(parsed) => Ok((parsed.examples, parsed.example_lines)),
        Err(FileError::Line { line, reason }) => Err(TrainerError::data_line(path, line, reason)),
        Err(other) => Err(TrainerError::file(path, other.to_string())),
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

    const GOOD_CHAT: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

    #[test]
    fn prompt_completion_and_text_files_parse() {
        let file = write("{\"prompt\": \"2+2=\", \"completion\": \"4\"}\r\n{\"prompt\": \"\", \"completion\": \"x\"}\n");
        let (examples, _) = read_examples(file.path()).unwrap();
        assert_eq!(examples[0], Example::PromptCompletion { prompt: "2+2=".into(), completion: "4".into() });
        assert_eq!(examples[1].format(), DataFormat::PromptCompletion);

        let file = write("\u{feff}{\"text\": \"CVE-2024-0001 is a heap overflow\"}\n");
        let (examples, _) = read_examples(file.path()).unwrap();
        assert_eq!(examples, vec![Example::Text { text: "CVE-2024-0001 is a heap overflow".into() }]);
    }

    #[test]
    fn a_bad_line_is_reported_as_path_colon_line_with_the_reason() {
        // The rules themselves are tested with the shared parser in lathe-core; here only the
        // file-and-line framing the trainer adds.
        for (bad, reason) in [
            ("{\"messages\": [", "not valid JSON at column"),
            (r#"{"messages": [{"role": "bot", "content": "x"}]}"#, "messages[0]: unknown role `bot`"),
        ] {
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
