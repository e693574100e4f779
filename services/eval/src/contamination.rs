//! The contamination filter: before training, every training example is compared with the
//! evaluation items it could leak, on three signals, strongest first:
//! 1. the same CVE description, after lower-casing and collapsing whitespace;
//! 2. the same CVE id (from the item's NVD URL or text, and anywhere in the example);
//! 3. long word n-grams in common (13 words, as in GPT-3's decontamination) covering at least
//!    half of an item's n-grams, which catches a description quoted inside a longer prompt or
//!    lightly edited. A single shared 13-gram is not enough here: vendor boilerplate ("could
//!    allow an authenticated, remote attacker to …") repeats across unrelated CVEs.
//!
//! A training example's text is every string of its JSON line (`prompt`, `completion`,
//! `response`, `text`, `messages[].content`); when a prompt carries CTIBench's
//! `CVE Description:` marker, the description is the text after it.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::Path;

use serde::Serialize;

use crate::ctibench::Item;
use crate::EvalError;

pub const NGRAM: usize = 13;
/// Share of an item's n-grams a training text must contain to count as overlapping it.
pub const NGRAM_SHARE: f64 = 0.5;
const DESCRIPTION_MARKER: &str = "CVE Description:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Description,
    CveId,
    Ngram,
}

/// A flagged training line and the evaluation items it overlaps (several when the
/// benchmark repeats a description).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overlap {
    /// 1-based line of the training file.
    pub line: usize,
    pub reason: Reason,
    pub items: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub training_rows: usize,
    pub overlaps: Vec<Overlap>,
    /// Evaluation items that some training row overlaps.
    pub items_covered: usize,
    pub items: usize,
}

impl Report {
    pub fn count(&self, reason: Reason) -> usize {
        self.overlaps.iter().filter(|o| o.reason == reason).count()
    }

    /// Evaluation items overlapped by some training row for this reason.
    pub fn items_covered_by(&self, reason: Reason) -> usize {
        self.overlaps.iter().filter(|o| o.reason == reason).flat_map(|o| o.items.iter().copied()).collect::<HashSet<_>>().len()
    }

    pub fn flagged_lines(&self) -> HashSet<usize> {
        self.overlaps.iter().map(|o| o.line).collect()
    }
}

/// Lower-case, whitespace collapsed: the form descriptions are compared in.
pub fn normalize(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// `CVE-YYYY-NNNN…` ids in `text`, upper-cased.
pub fn cve_ids(text: &str) -> Vec<String> {
    let upper = text.to_ascii_uppercase();
    let bytes = upper.as_bytes();
    let mut ids = Vec::new();
    let mut from = 0;
    while let Some(at) = upper[from..].find("CVE-") {
        let start = from + at + 4;
        let year: String = bytes[start..].iter().take_while(|b| b.is_ascii_digit()).map(|&b| b as char).collect();
        let after_year = start + year.len();
        if year.len() == 4 && bytes.get(after_year) == Some(&b'-') {
            let number: String = bytes[after_year + 1..].iter().take_while(|b| b.is_ascii_digit()).map(|&b| b as char).collect();
            if number.len() >= 4 {
                ids.push(format!("CVE-{year}-{number}"));
            }
        }
        from = start;
    }
    ids
}

fn ngram_hashes(normalized: &str) -> Vec<u64> {
    let words: Vec<&str> = normalized.split(' ').filter(|w| !w.is_empty()).collect();
    words
        .windows(NGRAM)
        .map(|w| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            w.hash(&mut h);
            h.finish()
        })
        .collect()
}

/// The evaluation side, indexed once.
pub struct Index {
    descriptions: HashMap<String, Vec<usize>>,
    cve_ids: HashMap<String, Vec<usize>>,
    ngrams: HashMap<u64, Vec<usize>>,
    /// Distinct n-grams of each item, by item index.
    ngrams_per_item: HashMap<usize, usize>,
    items: usize,
}

impl Index {
    pub fn new(items: &[Item]) -> Index {
        let mut index = Index {
            descriptions: HashMap::new(),
            cve_ids: HashMap::new(),
            ngrams: HashMap::new(),
            ngrams_per_item: HashMap::new(),
            items: items.len(),
        };
        for item in items {
            let text = item.description.clone().unwrap_or_else(|| item.prompt.clone());
            let normalized = normalize(&text);
            index.descriptions.entry(normalized.clone()).or_default().push(item.index);
            let mut ids = cve_ids(&item.url);
            ids.extend(cve_ids(&text));
            ids.dedup();
            for id in ids {
                index.cve_ids.entry(id).or_default().push(item.index);
            }
            let distinct: HashSet<u64> = ngram_hashes(&normalized).into_iter().collect();
            index.ngrams_per_item.insert(item.index, distinct.len());
            for h in distinct {
                index.ngrams.entry(h).or_default().push(item.index);
            }
        }
        index
    }

    /// The overlap of one training example (its JSON line), if any: why, and which items.
    pub fn check(&self, example: &serde_json::Value) -> Option<(Reason, Vec<usize>)> {
        let mut texts = Vec::new();
        collect_strings(example, &mut texts);
        for text in &texts {
            if let Some((_, description)) = text.split_once(DESCRIPTION_MARKER) {
                if let Some(items) = self.descriptions.get(&normalize(description)) {
                    return Some((Reason::Description, items.clone()));
                }
            }
            if let Some(items) = self.descriptions.get(&normalize(text)) {
                return Some((Reason::Description, items.clone()));
            }
        }
        for text in &texts {
            if let Some(items) = cve_ids(text).iter().find_map(|id| self.cve_ids.get(id)) {
                return Some((Reason::CveId, items.clone()));
            }
        }
        texts.iter().find_map(|text| {
            let mut shared: HashMap<usize, usize> = HashMap::new();
            let distinct: HashSet<u64> = ngram_hashes(&normalize(text)).into_iter().collect();
            for h in &distinct {
                for &item in self.ngrams.get(h).into_iter().flatten() {
                    *shared.entry(item).or_default() += 1;
                }
            }
            let mut items: Vec<usize> = shared
                .into_iter()
                .filter(|(item, n)| *n as f64 >= NGRAM_SHARE * self.ngrams_per_item[item].max(1) as f64)
                .map(|(item, _)| item)
                .collect();
            items.sort_unstable();
            (!items.is_empty()).then_some((Reason::Ngram, items))
        })
    }
}

fn collect_strings<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// Checks every line of a JSONL training file against the items.
pub fn check_file(training: &Path, items: &[Item]) -> Result<Report, EvalError> {
    let text = std::fs::read_to_string(training).map_err(|e| EvalError::io(training, e))?;
    let index = Index::new(items);
    let mut overlaps = Vec::new();
    let mut rows = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        rows += 1;
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| EvalError::Row {
            path: training.into(),
            line: i + 1,
            message: format!("not JSON: {e}"),
        })?;
        if let Some((reason, items)) = index.check(&value) {
            overlaps.push(Overlap { line: i + 1, reason, items });
        }
    }
    let items_covered = overlaps.iter().flat_map(|o| o.items.iter().copied()).collect::<HashSet<_>>().len();
    Ok(Report { training_rows: rows, overlaps, items_covered, items: index.items })
}

/// Writes the training file without its flagged lines (temp file, then rename).
pub fn write_filtered(training: &Path, report: &Report, out: &Path) -> Result<usize, EvalError> {
    let text = std::fs::read_to_string(training).map_err(|e| EvalError::io(training, e))?;
    let flagged = report.flagged_lines();
    let mut kept = 0;
    let mut body = String::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || flagged.contains(&(i + 1)) {
            continue;
        }
        body.push_str(line);
        body.push('\n');
        kept += 1;
    }
    let tmp = out.with_extension("jsonl.part");
    std::fs::write(&tmp, body).map_err(|e| EvalError::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| EvalError::io(out, e))?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(index: usize, description: &str) -> Item {
        Item {
            index,
            url: format!("https://nvd.nist.gov/vuln/detail/CVE-2021-{:04}", 1000 + index),
            prompt: format!("Analyze … CVE Description: {description}"),
            answer: "CWE-79".into(),
            description: Some(description.into()),
            turns: Vec::new(),
        }
    }

    #[test]
    fn each_signal_is_caught_and_unrelated_text_is_not() {
        let long = "a stored cross site scripting vulnerability in the admin panel of acme cms allows remote attackers to inject script via the title field";
        let index = Index::new(&[item(0, "Buffer overflow in FooServer 1.2."), item(1, long)]);
        let check = |v: serde_json::Value| index.check(&v);
        assert_eq!(
            check(serde_json::json!({"prompt": "Map it. CVE Description:   BUFFER overflow in  FooServer 1.2. ", "response": "CWE-120"})),
            Some((Reason::Description, vec![0]))
        );
        assert_eq!(
            check(serde_json::json!({"messages": [{"role": "user", "content": "What is cve-2021-1001?"}]})),
            Some((Reason::CveId, vec![1]))
        );
        let quoted = format!("Summary: {} and more words here.", &long[..long.len() - 6]);
        assert_eq!(check(serde_json::json!({"text": quoted})), Some((Reason::Ngram, vec![1])));
        assert_eq!(check(serde_json::json!({"prompt": "SQL injection in BarApp via the id parameter.", "completion": "CWE-89"})), None);
    }
}
