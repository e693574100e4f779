//! `lathe eval`: scoring answers on CTIBench and the contamination check of training data.
//! (Generating the answers with a model is the next step of the evaluation work.)

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use lathe_eval::contamination::{check_file, write_filtered, Reason};
use lathe_eval::ctibench::{load, read_tsv};
use lathe_eval::score::score;
use lathe_eval::Benchmark;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Score stored answers (one per line of a TSV column, row-aligned with the benchmark),
    /// e.g. the CTIBench authors' responses/cti-mcq-responses.tsv.
    Score {
        /// cti-mcq, cti-rcm or cti-rcm-2021.
        #[arg(long)]
        benchmark: String,
        /// The CTIBench data directory (it is CC BY-NC-SA 4.0: Lathe does not ship it).
        #[arg(long)]
        data_dir: PathBuf,
        /// TSV with a header; one answer per row [default: DATA_DIR/responses/BENCHMARK-responses.tsv].
        #[arg(long)]
        responses: Option<PathBuf>,
        /// The column of answers to score.
        #[arg(long)]
        column: String,
        /// Leave unparsable answers out of the denominator instead of counting them wrong.
        #[arg(long)]
        skip_unparsable: bool,
        /// Print the result (with per-item predictions) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a JSONL training file against evaluation sets (same description, same CVE id,
    /// long n-gram overlap) and optionally write it without the overlapping rows.
    Contamination {
        #[arg(long)]
        training_file: PathBuf,
        /// Benchmarks to protect, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "cti-rcm,cti-rcm-2021")]
        benchmarks: Vec<String>,
        #[arg(long)]
        data_dir: PathBuf,
        /// Write the training file without the flagged rows here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Score { benchmark, data_dir, responses, column, skip_unparsable, json } => {
            let benchmark: Benchmark = benchmark.parse()?;
            let items = load(benchmark, &data_dir)?;
            let path = responses.unwrap_or_else(|| benchmark.responses_file(&data_dir));
            let (header, rows) = read_tsv(&path)?;
            let index = header
                .iter()
                .position(|h| h == &column)
                .with_context(|| format!("{}: no column {column:?} (columns: {})", path.display(), header.join(", ")))?;
            anyhow::ensure!(rows.len() == items.len(), "{}: {} rows, the benchmark has {}", path.display(), rows.len(), items.len());
            let outputs: Vec<String> = rows.into_iter().map(|(_, cells)| cells[index].clone()).collect();
            let scored = score(benchmark, &items, &outputs, !skip_unparsable);
            if json {
                println!("{}", serde_json::to_string_pretty(&scored)?);
            } else {
                println!(
                    "{} {column}: accuracy {:.4} (95% CI {:.4}-{:.4}), {}/{} correct, {} unparsable ({}), rule {}",
                    benchmark.name(),
                    scored.accuracy,
                    scored.ci95.0,
                    scored.ci95.1,
                    scored.correct,
                    scored.items,
                    scored.unparsable,
                    if scored.unparsable_counts_as_wrong { "counted wrong" } else { "left out" },
                    scored.rule
                );
            }
        }
        EvalCommand::Contamination { training_file, benchmarks, data_dir, out } => {
            let mut items = Vec::new();
            for name in &benchmarks {
                let benchmark: Benchmark = name.parse()?;
                let offset = items.len();
                items.extend(load(benchmark, &data_dir)?.into_iter().map(|mut item| {
                    item.index += offset;
                    item
                }));
            }
            let report = check_file(&training_file, &items)?;
            println!(
                "{}: {} of {} rows overlap {} (description {}, CVE id {}, {}-gram {}), covering {} of {} items",
                training_file.display(),
                report.overlaps.len(),
                report.training_rows,
                benchmarks.join("+"),
                report.count(Reason::Description),
                report.count(Reason::CveId),
                lathe_eval::contamination::NGRAM,
                report.count(Reason::Ngram),
                report.items_covered,
                report.items
            );
            if let Some(out) = out {
                let kept = write_filtered(&training_file, &report, &out)?;
                println!("wrote {kept} rows to {}", out.display());
            }
        }
    }
    Ok(())
}
