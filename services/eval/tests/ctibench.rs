//! Against the real CTIBench files in ../shared/datasets (CC BY-NC-SA 4.0; read in place,
//! never copied): the scoring reproduces the paper's GPT-4 numbers from the authors' stored
//! answers, and the contamination filter finds the CVE->CWE training rows that leak CTI-RCM-2021.

use std::path::{Path, PathBuf};

use lathe_eval::contamination::{check_file, write_filtered, Reason};
use lathe_eval::ctibench::{load, read_tsv};
use lathe_eval::score::score;
use lathe_eval::{Benchmark, EvalError};

fn datasets() -> PathBuf {
    let dir = std::env::var_os("LATHE_SHARED_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets"));
    assert!(dir.join("ctibench/cti-mcq.tsv").is_file(), "CTIBench not found under {} (set LATHE_SHARED_DATASETS)", dir.display());
    dir
}

/// The stored answers of one model, row-aligned with the benchmark.
fn stored_answers(benchmark: Benchmark, model: &str) -> Vec<String> {
    let (header, rows) = read_tsv(&lathe_eval::ctibench::responses_file(benchmark, &datasets().join("ctibench"))).unwrap();
    let column = header.iter().position(|h| h == model).unwrap();
    rows.into_iter().map(|(_, cells)| cells[column].clone()).collect()
}

#[test]
fn scoring_the_authors_gpt4_answers_reproduces_the_published_accuracies() {
    let data = datasets().join("ctibench");
    for (benchmark, published, items) in
        [(Benchmark::CtiMcq, 0.7100, 2500), (Benchmark::CtiRcm, 0.7200, 1000), (Benchmark::CtiRcm2021, 0.6800, 1000)]
    {
        let loaded = load(benchmark, &data).unwrap();
        assert_eq!(loaded.len(), items, "{}", benchmark.name());
        let scored = score(benchmark, &loaded, &stored_answers(benchmark, "ChatGPT-4"), true);
        assert_eq!(scored.items, items);
        assert!((scored.accuracy - published).abs() < 5e-5, "{}: {} vs published {published}", benchmark.name(), scored.accuracy);
        assert!(scored.ci95.0 < published && published < scored.ci95.1);
        assert_eq!(scored.unparsable, 0, "{}: stored answers are all parsable", benchmark.name());
    }
}

#[test]
fn the_mcq_file_quirks_are_handled() {
    let items = load(Benchmark::CtiMcq, &datasets().join("ctibench")).unwrap();
    // File line 110 has GT "b": upper-cased like the other 2499.
    assert_eq!(items[108].answer, "B");
    assert!(items.iter().all(|i| matches!(i.answer.as_str(), "A" | "B" | "C" | "D")));
}

#[test]
fn cve_cwe_training_rows_that_leak_cti_rcm_2021_are_flagged_and_dropped() {
    let data = datasets();
    let items = load(Benchmark::CtiRcm2021, &data.join("ctibench")).unwrap();
    let training = data.join("cve-cwe/cybersecqwen_rcm_2021_train.jsonl");
    let report = check_file(&training, &items).unwrap();
    assert_eq!(report.training_rows, 6776);
    assert_eq!(report.count(Reason::Description), 1003, "rows whose normalised description is a CTI-RCM-2021 item");
    assert_eq!(report.items_covered_by(Reason::Description), 999, "of the 1000 CTI-RCM-2021 rows");
    // The n-gram and CVE-id signals only add to that: never fewer items, never fewer rows.
    assert!(report.items_covered >= 999 && report.overlaps.len() >= 1003);
    eprintln!(
        "flagged {} rows (description {}, CVE id {}, 13-gram {}), covering {} of {} items",
        report.overlaps.len(),
        report.count(Reason::Description),
        report.count(Reason::CveId),
        report.count(Reason::Ngram),
        report.items_covered,
        report.items
    );

    let out = std::env::temp_dir().join(format!("lathe-decontaminated-{}.jsonl", std::process::id()));
    let kept = write_filtered(&training, &report, &out).unwrap();
    assert_eq!(kept, 6776 - report.overlaps.len());
    let again = check_file(&out, &items).unwrap();
    assert!(again.overlaps.is_empty(), "the filtered file still overlaps: {:?}", &again.overlaps[..again.overlaps.len().min(3)]);
    std::fs::remove_file(out).unwrap();
}

#[test]
fn bad_inputs_name_the_problem() {
    let missing = load(Benchmark::CtiRcm, Path::new("/nonexistent/ctibench")).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/ctibench") && missing.to_string().contains("not a directory"), "{missing}");
    let unknown = EvalError::from("cti-xyz".parse::<Benchmark>().unwrap_err());
    assert!(matches!(unknown, EvalError::UnknownBenchmark(_)) && unknown.to_string().contains("cti-mcq"), "{unknown}");

    let dir = std::env::temp_dir().join(format!("lathe-bad-tsv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cti-rcm.tsv"), "URL\tDescription\tPrompt\tGT\r\nu\td\tp\tCWE-79\r\nu\td\tp\r\n").unwrap();
    let malformed = load(Benchmark::CtiRcm, &dir).unwrap_err();
    assert_eq!(malformed.to_string(), format!("{}:3: 3 columns, the header has 4", dir.join("cti-rcm.tsv").display()));
    std::fs::write(dir.join("cti-rcm.tsv"), "URL\tDescription\tPrompt\tGT\r\nu\td\tp\tCWE-x\r\n").unwrap();
    let bad_gt = load(Benchmark::CtiRcm, &dir).unwrap_err();
    assert!(bad_gt.to_string().ends_with(":2: GT \"CWE-x\" is not a valid answer"), "{bad_gt}");
    std::fs::remove_dir_all(dir).unwrap();
}
