//! Answer extraction: how a model's free text becomes an answer. The rules are named and
//! recorded with every result, because published CTIBench numbers differ by points on this
//! alone.
//! - RCM (`rcm-last-cwe`): the last `CWE-<digits>` anywhere in the output (case-insensitive,
//!   leading zeros dropped), as the benchmark's prompt asks for the ID on the last line.
//! - MCQ (`mcq-last-line-letter`): the letter A–D on the last non-empty line — alone or as
//!   `B)`, `(B)`, `**B**`, `Answer: B`, `The answer is B`, `Option B` — else the last
//!   "answer is X" / "Answer: X" anywhere in the text.
//! - Own files (`exact-match`): the whole output against the expected answer, both trimmed,
//!   lower-cased, with runs of whitespace collapsed and a trailing period dropped.

pub use lathe_core::Rule;

/// Applies a [`Rule`] (named and documented in lathe-core) to a model's output.
pub trait Extract {
    /// The answer `output` gives under this rule; `None` when it gives none (unparsable).
    fn extract(self, output: &str) -> Option<String>;
}

impl Extract for Rule {
    fn extract(self, output: &str) -> Option<String> {
        match self {
            Rule::RcmLastCwe => last_cwe(output),
            Rule::McqLastLineLetter => mcq_letter(output).map(String::from),
            Rule::ExactMatch => Some(normalised(output)).filter(|s| !s.is_empty()),
        }
    }
}

/// The last `CWE-<digits>` in `text`, as `CWE-<n>`.
pub fn last_cwe(text: &str) -> Option<String> {
    let upper = text.to_ascii_uppercase();
    let bytes = upper.as_bytes();
    let mut found = None;
    let mut from = 0;
    while let Some(at) = upper[from..].find("CWE-") {
        let start = from + at + 4;
        let digits: String = bytes[start..].iter().take_while(|b| b.is_ascii_digit()).map(|&b| b as char).collect();
        if !digits.is_empty() {
            if let Ok(n) = digits.parse::<u64>() {
                found = Some(format!("CWE-{n}"));
            }
        }
        from = start;
    }
    found
}

/// `text` trimmed, lower-cased, whitespace runs collapsed, one trailing period dropped.
pub fn normalised(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    joined.strip_suffix('.').unwrap_or(&joined).trim_end().to_string()
}

/// The MCQ letter of `text`; see the module docs for the accepted forms.
pub fn mcq_letter(text: &str) -> Option<char> {
    let last = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    let cleaned: String = last.chars().filter(|c| !matches!(c, '*' | '_' | '`' | '#' | '"' | '\'')).collect();
    let cleaned = cleaned.trim();
    if let Some(letter) = lone_letter(cleaned) {
        return Some(letter);
    }
    let lower = cleaned.to_ascii_lowercase();
    for prefix in ["final answer:", "answer:", "the answer is", "answer is", "correct answer is", "option"] {
        if let Some(at) = lower.rfind(prefix) {
            if let Some(letter) = lone_letter(cleaned[at + prefix.len()..].trim()) {
                return Some(letter);
            }
        }
    }
    // Anywhere in the text, the last explicit statement of the answer.
    let lower = text.to_ascii_lowercase();
    ["answer is", "answer:"]
        .iter()
        .filter_map(|p| lower.rfind(p).map(|at| (at, p.len())))
        .max()
        .and_then(|(at, len)| lone_letter(text[at + len..].split_whitespace().next().unwrap_or("")))
}

/// `B`, `B)`, `B.`, `B:`, `(B)`, `B) text…`: a letter A–D standing on its own at the start.
fn lone_letter(text: &str) -> Option<char> {
    let text = text.trim_start_matches(['(', '[']);
    let mut chars = text.chars();
    let letter = chars.next()?.to_ascii_uppercase();
    if !matches!(letter, 'A'..='D') {
        return None;
    }
    match chars.next() {
        None => Some(letter),
        Some(')' | ']' | '.' | ':' | ',' | ' ') => Some(letter),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_cwe_wins_and_is_normalised() {
        assert_eq!(last_cwe("Maybe CWE-20, but really:\ncwe-079").as_deref(), Some("CWE-79"));
        assert_eq!(last_cwe("CWE-787").as_deref(), Some("CWE-787"));
        assert_eq!(last_cwe("no weakness named, CWE- nothing"), None);
        assert_eq!(last_cwe("CWE-22 then CWE-"), Some("CWE-22".into()));
    }

    #[test]
    fn exact_match_ignores_case_spacing_and_a_final_period() {
        assert_eq!(Rule::ExactMatch.extract("  CWE-79:  Cross-site\nScripting. "), Some("cwe-79: cross-site scripting".into()));
        assert_eq!(Rule::ExactMatch.extract(" \n "), None);
        assert_eq!(Rule::parse("exact-match"), Some(Rule::ExactMatch));
        assert_eq!(Rule::parse("regex"), None);
    }

    #[test]
    fn mcq_letters_in_the_common_forms_and_nothing_else() {
        for (text, want) in [
            ("B", Some('B')),
            ("Reasoning…\n\n**C**", Some('C')),
            ("Answer: d", Some('D')),
            ("The answer is (A).", Some('A')),
            ("B) Execution Prevention", Some('B')),
            ("I think the answer is C because …\nThat is all.", Some('C')),
            ("Because of the above.", None),
            ("Definitely", None),
            ("", None),
        ] {
            assert_eq!(mcq_letter(text), want, "{text:?}");
        }
    }
}
