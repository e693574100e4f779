//! The Lathe trainer: fine-tunes Hugging Face decoder checkpoints (Qwen3, Qwen2/2.5, Llama 3)
//! on libtorch through `tch`. It is a synchronous library with no knowledge of the service:
//! the `lathe train` CLI and the worker daemon both call [`train::run`] and receive progress
//! through an event callback.
//!
//! The flow through the crate:
//! - [`model_dir`] finds and checks the files of a model directory; [`model_config`] turns its
//!   `config.json` into a validated [`model_config::ModelConfig`].
//! - [`models::decoder`] is the one decoder implementation; [`lora`] adapts its linear layers.
//! - [`data`] reads JSONL, encodes it with `lathe-encode` (the tokenizer's own chat template
//!   decides the text, the loss mask follows the assistant turns), and packs sequences into
//!   batches.
//! - [`train`] runs the loop ([`optim`], [`schedule`]), writes [`checkpoint`]s and exports
//!   a PEFT adapter or merged model ([`export`]).
//! - [`init`] writes a random model in the real HF layout, for tests, demos and benchmarks.

pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod evaluate;
pub mod export;
pub mod generate;
pub mod gguf;
mod hash;
pub mod inference;
pub mod init;
pub mod launch;
pub mod lora;
pub mod model_config;
pub mod model_dir;
pub mod models;
pub mod nf4;
pub mod optim;
pub mod peft;
pub mod schedule;
pub mod train;

pub use error::{Result, TrainerError};
/// The encoding side (template, tokenizer, loss mask) lives in `lathe-encode`, shared with the
/// controller's job-create checks.
pub use lathe_encode::chat_template;
