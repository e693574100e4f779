//! CTIBench's tab-separated files: CTI-MCQ (`URL, Question, Option A..D, Prompt, GT`) and
//! CTI-RCM / CTI-RCM-2021 (`URL, Description, Prompt, GT`). UTF-8, CRLF, one record per line;
//! columns are found by their header names, so a reordered file still reads.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::EvalError;

#[cfg(test)]
mod tests {
    #[test]
    fn quoted_cells_read_like_python_csv() {
        assert_eq!(super::unquote("\"Clear History\" did not clear"), "Clear History did not clear");
        assert_eq!(super::unquote("\"say \"\"hi\"\"\""), "say \"hi\"");
        assert_eq!(super::unquote("plain \"quoted\" inside"), "plain \"quoted\" inside");
    }
}

pub use lathe_core::Benchmark;

/// The benchmark's data file in the CTIBench data directory.
pub fn data_file(benchmark: Benchmark, data_dir: &Path) -> PathBuf {
    data_dir.join(format!("{}.tsv", benchmark.name()))
}

/// The authors' stored answers of five LLMs, row-aligned with the data file.
pub fn responses_file(benchmark: Benchmark, data_dir: &Path) -> PathBuf {
    data_dir.join("responses").join(format!("{}-responses.tsv", benchmark.name()))
}

/// One evaluation item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// 0-based row of the data file (line `index + 2`).
    pub index: usize,
    pub url: String,
    /// The dataset's Prompt column: what the model is asked.
    pub prompt: String,
    /// `A`–`D` for MCQ (upper-cased: the file has one lowercase `b`), `CWE-n` for RCM.
    pub answer: String,
    /// RCM: the CVE description (the contamination filter compares it with training data).
    pub description: Option<String>,
    /// Turns before `prompt` as `(role, content)`: the system message and earlier exchanges of
    /// a chat example in the user's own file; empty for CTIBench.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub turns: Vec<(String, String)>,
}

/// A TSV file's data rows: `(line number, cells)`.
pub type Rows = Vec<(usize, Vec<String>)>;

/// The header and rows of a tab-separated file.
pub fn read_tsv(path: &Path) -> Result<(Vec<String>, Rows), EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    let mut lines = text.lines().enumerate();
    let header: Vec<String> = match lines.next() {
        Some((_, h)) => h.trim_end_matches('\r').split('\t').map(str::to_string).collect(),
        None => return Err(EvalError::File { path: path.into(), message: "empty file, expected a header row".into() }),
    };
    let mut rows = Vec::new();
    for (i, line) in lines {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let cells: Vec<String> = line.split('\t').map(unquote).collect();
        if cells.len() != header.len() {
            return Err(EvalError::Row {
                path: path.into(),
                line: i + 1,
                message: format!("{} columns, the header has {}", cells.len(), header.len()),
            });
        }
        rows.push((i + 1, cells));
    }
    Ok((header, rows))
}

/// A cell as Python's `csv` module and pandas read it (the readers the benchmark's own tooling
/// and published scores use): a cell that starts with `"` opens a quoted section, where `""`
/// is a literal quote, up to the closing quote; the rest of the cell follows as is. Only one
/// cell of CTIBench is affected (cti-rcm-2021 line 922: `"Clear History and Website Data" did
/// not clear…`), but it decides whether that description matches a training row.
fn unquote(cell: &str) -> String {
    let Some(rest) = cell.strip_prefix('"') else { return cell.to_string() };
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            if chars.peek() == Some(&'"') {
                chars.next();
                out.push('"');
                continue;
            }
            out.extend(chars);
            return out;
        }
        out.push(c);
    }
    out
}

fn column(header: &[String], name: &str, path: &Path) -> Result<usize, EvalError> {
    header
        .iter()
        .position(|h| h == name)
        .ok_or_else(|| EvalError::File { path: path.into(), message: format!("no {name:?} column (columns: {})", header.join(", ")) })
}

/// Reads several benchmarks as one item list (the contamination check protects them all at
/// once); indices are renumbered to stay distinct across benchmarks.
pub fn load_all(benchmarks: &[Benchmark], data_dir: &Path) -> Result<Vec<Item>, EvalError> {
    let mut items = Vec::new();
    for &benchmark in benchmarks {
        let offset = items.len();
        items.extend(load(benchmark, data_dir)?.into_iter().map(|mut item| {
            item.index += offset;
            item
        }));
    }
    Ok(items)
}

/// Reads a benchmark from the data directory.
pub fn load(benchmark: Benchmark, data_dir: &Path) -> Result<Vec<Item>, EvalError> {
    if benchmark == Benchmark::File {
        return Err(EvalError::File {
            path: data_dir.into(),
            message: "the \"file\" benchmark reads a JSONL file, not the CTIBench directory".into(),
        });
    }
    if !data_dir.is_dir() {
        return Err(EvalError::File { path: data_dir.into(), message: "not a directory (the CTIBench data directory)".into() });
    }
    let path = data_file(benchmark, data_dir);
    let (header, rows) = read_tsv(&path)?;
    let (url, prompt, gt) = (column(&header, "URL", &path)?, column(&header, "Prompt", &path)?, column(&header, "GT", &path)?);
    let description = if benchmark.is_mcq() { None } else { Some(column(&header, "Description", &path)?) };
    rows.into_iter()
        .enumerate()
        .map(|(index, (line, cells))| {
            let answer = cells[gt].trim().to_uppercase();
            let valid = if benchmark.is_mcq() {
                matches!(answer.as_str(), "A" | "B" | "C" | "D")
            } else {
                crate::extract::last_cwe(&answer).as_deref() == Some(answer.as_str())
            };
            if !valid {
                return Err(EvalError::Row { path: path.clone(), line, message: format!("GT {:?} is not a valid answer", cells[gt]) });
            }
            Ok(Item {
                index,
                url: cells[url].clone(),
                prompt: cells[prompt].clone(),
                answer,
                description: description.map(|d| cells[d].clone()),
                turns: Vec::new(),
            })
        })
        .collect()
}
