//! Turns trainer events into a progress bar (or JSON lines with `--json`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use lathe_trainer::train::Event;

pub struct ProgressPrinter {
    json: bool,
    bar: Option<ProgressBar>,
}

impl ProgressPrinter {
    pub fn new(json: bool) -> Self {
        ProgressPrinter { json, bar: None }
    }

    pub fn handle(&mut self, event: &Event) {
        if self.json {
            println!("{}", event.to_json_line());
            return;
        }
        match event {
            Event::Started {
                total_steps,
                start_step,
                train_examples,
                train_rows,
                truncated_examples,
                dropped_examples,
                trainable_parameters,
                total_parameters,
                device,
                dtype,
                ranks,
                dist_backend,
                ..
            } => {
                let ranks = if *ranks > 1 { format!(" × {ranks} ranks ({dist_backend})") } else { String::new() };
                eprintln!(
                    "training {trainable_parameters} of {total_parameters} parameters on {device}{ranks} ({dtype}); \
                     {train_examples} examples in {train_rows} rows ({truncated_examples} truncated, {dropped_examples} without trainable tokens)"
                );
                let bar = ProgressBar::new(*total_steps);
                bar.set_style(
                    ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_position(*start_step);
                self.bar = Some(bar);
            }
            Event::Step(m) => {
                let message = format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss, m.lr, m.tokens_per_second);
                if let Some(bar) = &self.bar {
                    bar.set_position(m.step);
                    // Without a terminal the bar is hidden: log about twenty lines per run instead.
                    let every = (m.total_steps / 20).max(1);
                    if bar.is_hidden() && (m.step % every == 0 || m.step == m.total_steps) {
                        eprintln!("step {}/{} {message}", m.step, m.total_steps);
                    }
                    bar.set_message(message);
                }
            }
            Event::Eval { step, valid_loss, valid_mean_token_accuracy, .. } => {
                self.println(format!("step {step}: valid loss {valid_loss:.4}, token accuracy {valid_mean_token_accuracy:.3}"));
            }
            Event::Checkpoint { step, path } => self.println(format!("step {step}: checkpoint {path}")),
            Event::Log { level, message } => self.println(format!("{level}: {message}")),
            Event::Finished { .. } => self.finish(),
        }
    }

    fn println(&self, line: String) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

/// SIGINT/SIGTERM set a flag the trainer polls between steps: it then checkpoints and stops.
pub fn install_stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook_consts::SIGINT, signal_hook_consts::SIGTERM] {
        let _ = signal_hook::flag::register(signal, Arc::clone(&flag));
    }
    flag
}

mod signal_hook_consts {
    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;
}
