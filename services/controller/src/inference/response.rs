//! The worker's pieces ([`Completion`]) as OpenAI's objects: a whole `chat.completion` /
//! `text_completion`, or the chunks of a stream (`chat.completion.chunk`, with the role first,
//! the text as it comes, an empty delta carrying the finish reason, and with
//! `stream_options.include_usage` a last chunk with no choices and the usage).

use lathe_proto::v1::{Completion, CompletionError, TokenLogprob};
use serde_json::{json, Value};

use super::request::Kind;
use crate::api::error::ApiError;

/// What every object of one answer shares.
#[derive(Debug, Clone)]
pub struct Answer {
    pub kind: Kind,
    pub id: String,
    pub created: i64,
    pub model: String,
    pub include_usage: bool,
}

/// The fingerprint of the serving software (OpenAI's field for "the backend changed").
fn fingerprint() -> String {
    format!("lathe-{}", env!("CARGO_PKG_VERSION"))
}

impl Answer {
    fn object(&self, streamed: bool) -> &'static str {
        match (self.kind, streamed) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, streamed: bool, choices: Vec<Value>) -> Value {
        let mut object = json!({
            "id": self.id, "object": self.object(streamed), "created": self.created, "model": self.model,
            "system_fingerprint": fingerprint(), "choices": choices,
        });
        if streamed && self.include_usage {
            object["usage"] = Value::Null;
        }
        object
    }

    /// The chunks one piece becomes; `first` when it is its choice's first piece.
    pub fn chunks(&self, piece: &Completion, first: bool) -> Vec<Value> {
        let mut out = Vec::new();
        let finish = (!piece.finish_reason.is_empty()).then(|| piece.finish_reason.clone());
        match self.kind {
            Kind::Chat => {
                if first {
                    let delta = json!({"role": "assistant", "content": ""});
                    out.push(
                        self.envelope(true, vec![json!({"index": piece.index, "delta": delta, "logprobs": null, "finish_reason": null})]),
                    );
                }
                if !piece.text.is_empty() || !piece.logprobs.is_empty() {
                    let logprobs = if piece.logprobs.is_empty() { Value::Null } else { chat_logprobs(&piece.logprobs) };
                    let choice =
                        json!({"index": piece.index, "delta": {"content": piece.text}, "logprobs": logprobs, "finish_reason": null});
                    out.push(self.envelope(true, vec![choice]));
                }
                if let Some(finish) = finish {
                    out.push(
                        self.envelope(true, vec![json!({"index": piece.index, "delta": {}, "logprobs": null, "finish_reason": finish})]),
                    );
                }
            }
            Kind::Text => {
                if !piece.text.is_empty() || finish.is_some() || !piece.logprobs.is_empty() {
                    let logprobs = if piece.logprobs.is_empty() { Value::Null } else { text_logprobs(&piece.logprobs, 0) };
                    let choice = json!({"text": piece.text, "index": piece.index, "logprobs": logprobs, "finish_reason": finish});
                    out.push(self.envelope(true, vec![choice]));
                }
            }
        }
        out
    }

    /// The last chunk of a stream with `include_usage`.
    pub fn usage_chunk(&self, usage: &Usage) -> Value {
        let mut chunk = self.envelope(true, Vec::new());
        chunk["usage"] = usage.json();
        chunk
    }
}

/// Token counts of a whole request: the prompt once, every choice's completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Usage {
    pub fn add(&mut self, piece: &Completion) {
        if !piece.finish_reason.is_empty() {
            self.prompt_tokens = piece.prompt_tokens;
            self.completion_tokens += piece.completion_tokens;
        }
    }

    fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// A non-streamed answer, gathered piece by piece.
#[derive(Debug, Default)]
pub struct Gathered {
    texts: Vec<String>,
    logprobs: Vec<Vec<TokenLogprob>>,
    finish: Vec<String>,
    pub usage: Usage,
    /// The largest batch any piece was generated in.
    pub max_batch: u32,
}

impl Gathered {
    pub fn new(choices: u32) -> Gathered {
        let n = choices.max(1) as usize;
        Gathered { texts: vec![String::new(); n], logprobs: vec![Vec::new(); n], finish: vec![String::new(); n], ..Default::default() }
    }

    pub fn add(&mut self, piece: Completion) {
        let i = piece.index as usize;
        if i >= self.texts.len() {
            return;
        }
        self.usage.add(&piece);
        self.max_batch = self.max_batch.max(piece.batch_size);
        self.texts[i].push_str(&piece.text);
        self.logprobs[i].extend(piece.logprobs);
        if !piece.finish_reason.is_empty() {
            self.finish[i] = piece.finish_reason;
        }
    }

    pub fn body(&self, answer: &Answer, logprobs: bool) -> Value {
        let choices = (0..self.texts.len())
            .map(|i| {
                let finish = Value::from(self.finish[i].clone());
                match answer.kind {
                    Kind::Chat => json!({
                        "index": i,
                        "message": {"role": "assistant", "content": self.texts[i], "refusal": null},
                        "logprobs": if logprobs { chat_logprobs(&self.logprobs[i]) } else { Value::Null },
                        "finish_reason": finish,
                    }),
                    Kind::Text => json!({
                        "text": self.texts[i], "index": i,
                        "logprobs": if logprobs { text_logprobs(&self.logprobs[i], 0) } else { Value::Null },
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        let mut body = answer.envelope(false, choices);
        body["usage"] = self.usage.json();
        body
    }
}

fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t.top.iter().map(|a| json!({"token": a.token, "logprob": a.logprob, "bytes": a.bytes})).collect();
            json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions' column-wise logprobs, offsets counted from `offset`.
fn text_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.token.len();
    }
    let top: Vec<Value> =
        tokens.iter().map(|t| Value::Object(t.top.iter().map(|a| (a.token.clone(), Value::from(a.logprob))).collect())).collect();
    json!({
        "tokens": tokens.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// A worker's refusal as the API's error: the request's fault is a 400 naming the field,
/// the server's a 500.
/// The worker's refusal as the client sees it. A fault of the request names the field; a fault
/// of the server is opaque (the worker's words can name its folders and internals): the client
/// gets the request id, the log gets the details.
pub fn refusal(error: &CompletionError) -> ApiError {
    if error.bad_request {
        ApiError::invalid(Some(&error.param), &error.code, error.message.clone())
    } else {
        tracing::error!(code = error.code, message = error.message, "the inference worker failed a request");
        ApiError {
            status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: "The inference worker failed to serve this request; retry, or report the request id.".into(),
            param: None,
            code: Some("inference_failed".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(kind: Kind, include_usage: bool) -> Answer {
        Answer { kind, id: "chatcmpl-x".into(), created: 1, model: "m".into(), include_usage }
    }

    fn piece(index: u32, text: &str, finish: &str) -> Completion {
        let (prompt_tokens, completion_tokens) = if finish.is_empty() { (0, 0) } else { (5, 3) };
        Completion {
            request_id: "r".into(),
            index,
            text: text.into(),
            finish_reason: finish.into(),
            prompt_tokens,
            completion_tokens,
            ..Default::default()
        }
    }

    #[test]
    fn a_stream_opens_with_the_role_and_ends_with_the_reason_then_the_usage() {
        let a = answer(Kind::Chat, true);
        let first = a.chunks(&piece(0, "Hel", ""), true);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first[1]["choices"][0]["delta"]["content"], "Hel");
        assert!(first[1]["usage"].is_null() && first[1].get("usage").is_some(), "usage: null on every chunk");
        let last = a.chunks(&piece(0, "lo", "stop"), false);
        assert_eq!(last.last().unwrap()["choices"][0]["finish_reason"], "stop");
        assert_eq!(last.last().unwrap()["choices"][0]["delta"], json!({}));
        let mut usage = Usage::default();
        usage.add(&piece(0, "lo", "stop"));
        let tail = a.usage_chunk(&usage);
        assert_eq!(tail["choices"], json!([]));
        assert_eq!(tail["usage"]["total_tokens"], 8);
    }

    #[test]
    fn gathered_choices_count_the_prompt_once() {
        let a = answer(Kind::Chat, false);
        let mut gathered = Gathered::new(2);
        for p in [piece(0, "a", ""), piece(1, "b", "length"), piece(0, "c", "stop")] {
            gathered.add(p);
        }
        let body = gathered.body(&a, false);
        assert_eq!(body["choices"][0]["message"]["content"], "ac");
        assert_eq!(body["choices"][1]["finish_reason"], "length");
        assert_eq!(body["usage"], json!({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}));
        assert_eq!(body["object"], "chat.completion");
    }
}
