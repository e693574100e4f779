//! Training data, from a JSONL file to packed rows of token ids.
//!
//! - [`jsonl`] reads and validates the file (chat, prompt/completion or raw text).
//! - [`encode`] (from `lathe-encode`) turns an example into token ids and marks which tokens
//!   carry loss: for chat, the conversation is rendered once with the model's own template
//!   ([`crate::chat_template`]) and the assistant turns are located in the rendered text.
//! - [`packing`] puts several examples in one row with per-example segments, so attention and
//!   positions never cross from one example into the next.

pub use lathe_encode::encoder as encode;
pub mod jsonl;
pub mod packing;
