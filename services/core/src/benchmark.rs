//! The benchmarks Lathe evaluates on and the rules that turn a model's text into an answer:
//! their names, and each benchmark's defaults (extraction rule, answer length). This is the one
//! place those are written; the API, the CLI, the worker and `lathe-eval` all read them here.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Benchmark {
    #[serde(rename = "cti-mcq")]
    CtiMcq,
    #[serde(rename = "cti-rcm")]
    CtiRcm,
    #[serde(rename = "cti-rcm-2021")]
    CtiRcm2021,
    /// The user's own JSONL validation set: not a CTIBench file.
    #[serde(rename = "file")]
    File,
}

impl Benchmark {
    /// The CTIBench benchmarks (read from a data directory; what decontamination checks).
    pub const CTIBENCH: [Benchmark; 3] = [Benchmark::CtiMcq, Benchmark::CtiRcm, Benchmark::CtiRcm2021];
    pub const ALL: [Benchmark; 4] = [Benchmark::CtiMcq, Benchmark::CtiRcm, Benchmark::CtiRcm2021, Benchmark::File];

    pub fn name(self) -> &'static str {
        match self {
            Benchmark::CtiMcq => "cti-mcq",
            Benchmark::CtiRcm => "cti-rcm",
            Benchmark::CtiRcm2021 => "cti-rcm-2021",
            Benchmark::File => "file",
        }
    }

    pub fn is_mcq(self) -> bool {
        self == Benchmark::CtiMcq
    }

    /// The extraction rule the benchmark is scored by. CTIBench answers have one form each;
    /// only an own file may be scored by another rule.
    pub fn rule(self) -> Rule {
        match self {
            Benchmark::CtiMcq => Rule::McqLastLineLetter,
            Benchmark::CtiRcm | Benchmark::CtiRcm2021 => Rule::RcmLastCwe,
            Benchmark::File => Rule::ExactMatch,
        }
    }

    /// Generation budget unless the request says otherwise: a letter needs few tokens, an RCM
    /// answer reasons before its CWE id.
    pub fn default_max_new_tokens(self) -> u32 {
        match self {
            Benchmark::CtiMcq => 32,
            Benchmark::CtiRcm | Benchmark::CtiRcm2021 => 384,
            Benchmark::File => 256,
        }
    }

    /// "a, b, c" of `list`'s names, for error messages.
    pub fn names(list: &[Benchmark]) -> String {
        list.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Benchmark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a benchmark; its message lists the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown benchmark {0:?}; known: cti-mcq, cti-rcm, cti-rcm-2021, file")]
pub struct UnknownBenchmark(pub String);

impl FromStr for Benchmark {
    type Err = UnknownBenchmark;
    fn from_str(name: &str) -> Result<Self, UnknownBenchmark> {
        Benchmark::ALL.into_iter().find(|b| b.name() == name).ok_or_else(|| UnknownBenchmark(name.to_string()))
    }
}

/// How a model's free text becomes an answer (`lathe_eval::extract` implements each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// The last `CWE-<digits>` anywhere in the output.
    RcmLastCwe,
    /// The letter A–D on the last non-empty line.
    McqLastLineLetter,
    /// The whole output, normalised, against the expected answer.
    ExactMatch,
}

impl Rule {
    pub const ALL: [Rule; 3] = [Rule::RcmLastCwe, Rule::McqLastLineLetter, Rule::ExactMatch];

    pub fn name(self) -> &'static str {
        match self {
            Rule::RcmLastCwe => "rcm-last-cwe",
            Rule::McqLastLineLetter => "mcq-last-line-letter",
            Rule::ExactMatch => "exact-match",
        }
    }

    pub fn parse(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }

    /// "a, b, c" of every rule's name, for error messages.
    pub fn names() -> String {
        Rule::ALL.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_serialize_as_themselves() {
        for benchmark in Benchmark::ALL {
            assert_eq!(benchmark.name().parse::<Benchmark>(), Ok(benchmark));
            assert_eq!(serde_json::to_value(benchmark).unwrap(), benchmark.name());
        }
        for rule in Rule::ALL {
            assert_eq!(Rule::parse(rule.name()), Some(rule));
            assert_eq!(serde_json::to_value(rule).unwrap(), rule.name());
        }
        let unknown = "cti-xyz".parse::<Benchmark>().unwrap_err().to_string();
        assert!(unknown.contains("cti-xyz") && unknown.contains("cti-rcm-2021"), "{unknown}");
    }

    #[test]
    fn each_benchmark_has_its_rule_and_answer_budget() {
        let table: Vec<_> = Benchmark::ALL.iter().map(|b| (b.name(), b.rule().name(), b.default_max_new_tokens())).collect();
        assert_eq!(
            table,
            [
                ("cti-mcq", "mcq-last-line-letter", 32),
                ("cti-rcm", "rcm-last-cwe", 384),
                ("cti-rcm-2021", "rcm-last-cwe", 384),
                ("file", "exact-match", 256)
            ]
        );
    }
}
