//! Evaluation on CTIBench (docs/architecture.md §1), the parts that need no model: reading the
//! benchmarks, the answer-extraction rules, scoring with a confidence interval, and the
//! contamination filter that keeps evaluation items out of training data.
//!
//! ```text
//! data dir (cti-mcq.tsv, cti-rcm.tsv, …) ──ctibench::load──▶ items {prompt, gt}
//! model outputs (or the authors' stored responses) ──extract──▶ answers ──score──▶ accuracy ± 95 %
//! training JSONL ──contamination::check(items)──▶ flagged rows (CVE id, description, n-gram)
//! the user's validation JSONL ──chat_file::load──▶ items {turns, prompt, last answer}
//! ```
//!
//! The protocol is explicit: every [`score::Scored`] records the extraction rule and whether an
//! unparsable answer counts as wrong (it does by default), so two results are comparable only
//! when their protocols are. The data directory is always a path the caller gives: CTIBench is
//! CC BY-NC-SA 4.0 and the project does not ship it.

pub mod chat_file;
pub mod contamination;
pub mod ctibench;
pub mod error;
pub mod extract;
pub mod score;

pub use ctibench::{Benchmark, Item};
pub use error::EvalError;
