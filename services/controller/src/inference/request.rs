//! An OpenAI chat completion (`/v1/chat/completions`) or legacy completion
//! (`/v1/completions`) request body, read into what a worker needs. Every refusal names its
//! field: an unknown parameter is a 400 naming it (OpenAI's "Unrecognized request argument"),
//! and a known one Lathe cannot honour (a penalty, a forced tool call) is a 400 saying so,
//! rather than being silently ignored.

use lathe_proto::v1::{completion_request, CompletionRequest};
use serde_json::{Map, Value};

use crate::api::error::{ApiError, ApiResult};

/// Which route the body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// At most this many choices per request (`n`): each is a sequence in a batch.
pub const MAX_CHOICES: u64 = 16;
/// At most this many stop sequences (OpenAI's limit).
const MAX_STOPS: usize = 4;
/// Legacy completions generate 16 tokens unless told otherwise (OpenAI's default).
const TEXT_DEFAULT_MAX_TOKENS: u32 = 16;

const CHAT_KEYS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "metadata",
    "store",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "response_format",
    "service_tier",
];

const TEXT_KEYS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "stream",
    "stream_options",
    "echo",
    "suffix",
    "best_of",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
];

/// A request read and checked: the worker's part and how to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub kind: Kind,
    /// `request_id` is left empty for the caller to fill; `base_model` and `adapter_files`
    /// too (they depend on the caller's project).
    pub request: CompletionRequest,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
}

pub fn parse(kind: Kind, body: &[u8]) -> ApiResult<Parsed> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, "invalid_json", format!("The request body is not valid JSON: {e}")))?;
    let Value::Object(body) = value else {
        return Err(ApiError::invalid(None, "invalid_request", "The request body must be a JSON object."));
    };
    let known = if kind == Kind::Chat { CHAT_KEYS } else { TEXT_KEYS };
    if let Some(unknown) = body.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::invalid(Some(unknown), "unknown_parameter", format!("Unrecognized request argument supplied: {unknown}")));
    }
    let fields = Fields(&body);
    let model = fields.string("model")?.ok_or_else(|| missing("model"))?;
    lathe_core::spec::storable_text("model", &model)?;
    fields.only_default("frequency_penalty", |v| v.as_f64() == Some(0.0), "penalties are not supported; leave it at 0")?;
    fields.only_default("presence_penalty", |v| v.as_f64() == Some(0.0), "penalties are not supported; leave it at 0")?;
    fields.only_default("logit_bias", |v| v.as_object().is_some_and(Map::is_empty), "logit_bias is not supported")?;
    let _user = fields.string("user")?;

    let stream = fields.boolean("stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid(Some("stream_options"), "invalid_value", "stream_options: only allowed with stream: true"));
        }
        Some(Value::Object(options)) => {
            if let Some(key) = options.keys().find(|k| k.as_str() != "include_usage") {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    "unknown_parameter",
                    format!("Unrecognized request argument supplied: stream_options.{key}"),
                ));
            }
            Fields(options).boolean("include_usage")?.unwrap_or(false)
        }
        Some(_) => return Err(ApiError::invalid(Some("stream_options"), "invalid_type", "stream_options: must be an object")),
    };

    let temperature = fields.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(Some("temperature"), "invalid_value", format!("temperature: {temperature} is not in [0, 2]")));
    }
    let top_p = fields.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), "invalid_value", format!("top_p: {top_p} is not in (0, 1]")));
    }
    let n = fields.integer("n", 1, MAX_CHOICES)?.unwrap_or(1) as u32;
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .or_else(|| v.as_u64())
                .ok_or_else(|| ApiError::invalid(Some("seed"), "invalid_type", format!("seed: must be an integer, got {v}")))?,
        ),
    };
    let stop = stops(&body)?;

    let mut request = CompletionRequest { model, temperature, top_p, stop, seed, n, ..Default::default() };
    match kind {
        Kind::Chat => chat_fields(&fields, &mut request)?,
        Kind::Text => text_fields(&fields, &mut request)?,
    }
    Ok(Parsed { kind, request, stream, include_usage })
}

fn chat_fields(fields: &Fields, request: &mut CompletionRequest) -> ApiResult<()> {
    let body = fields.0;
    let messages = body.get("messages").filter(|v| !v.is_null()).ok_or_else(|| missing("messages"))?;
    // OpenAI's newer name for the system role.
    let messages = match messages {
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|m| match m.get("role").and_then(Value::as_str) {
                    Some("developer") => {
                        let mut m = m.clone();
                        m["role"] = Value::from("system");
                        m
                    }
                    _ => m.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    };
    lathe_core::training_file::parse_request_messages(&messages)
        .map_err(|e| ApiError::invalid(Some("messages"), "invalid_value", e.replace('`', "'")))?;
    request.prompt = Some(completion_request::Prompt::MessagesJson(messages.to_string()));

    let max_tokens = fields.integer("max_tokens", 1, u32::MAX as u64)?;
    let max_completion_tokens = fields.integer("max_completion_tokens", 1, u32::MAX as u64)?;
    // 0: as many as the model's context leaves.
    request.max_tokens = max_completion_tokens.or(max_tokens).unwrap_or(0) as u32;

    request.logprobs = fields.boolean("logprobs")?.unwrap_or(false);
    if let Some(top) = fields.integer("top_logprobs", 0, 20)? {
        if !request.logprobs && top > 0 {
            return Err(ApiError::invalid(Some("top_logprobs"), "invalid_value", "top_logprobs: requires logprobs: true"));
        }
        request.top_logprobs = top as u32;
    }

    let tool_choice = match body.get("tool_choice") {
        None | Some(Value::Null) => "auto",
        Some(Value::String(choice)) if choice == "auto" || choice == "none" => choice.as_str(),
        Some(other) => {
            return Err(ApiError::invalid(
                Some("tool_choice"),
                "unsupported_value",
                format!("tool_choice: {other} cannot be enforced here; use \"auto\" (the model decides) or \"none\""),
            ))
        }
    };
    match body.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            for (i, tool) in tools.iter().enumerate() {
                let is_function = tool.get("type").and_then(Value::as_str) == Some("function")
                    && tool.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string);
                if !is_function {
                    return Err(ApiError::invalid(
                        Some(&format!("tools[{i}]")),
                        "invalid_value",
                        format!("tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"),
                    ));
                }
            }
            if tool_choice != "none" && !tools.is_empty() {
                request.tools_json = Value::Array(tools.clone()).to_string();
            }
        }
        Some(_) => return Err(ApiError::invalid(Some("tools"), "invalid_type", "tools: must be an array")),
    }
    let _ = fields.boolean("parallel_tool_calls")?;
    fields.only_default("store", |v| v.as_bool() == Some(false), "stored completions are not supported")?;
    if let Some(metadata) = body.get("metadata").filter(|v| !v.is_null()) {
        if !metadata.is_object() {
            return Err(ApiError::invalid(Some("metadata"), "invalid_type", "metadata: must be an object"));
        }
    }
    fields.only_default(
        "response_format",
        |v| v.get("type").and_then(Value::as_str) == Some("text"),
        "only {\"type\": \"text\"} is supported",
    )?;
    fields.only_default("service_tier", |v| matches!(v.as_str(), Some("auto" | "default")), "only \"auto\" or \"default\"")?;
    Ok(())
}

fn text_fields(fields: &Fields, request: &mut CompletionRequest) -> ApiResult<()> {
    let body = fields.0;
    let prompt = match body.get("prompt") {
        None | Some(Value::Null) => return Err(missing("prompt")),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => items[0].as_str().unwrap_or_default().to_string(),
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "unsupported_value",
                "prompt: one string per request (send a batch of prompts as separate requests; they are batched on the server)",
            ))
        }
        Some(other) => return Err(ApiError::invalid(Some("prompt"), "invalid_type", format!("prompt: must be a string, got {other}"))),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "invalid_value", "prompt: is empty"));
    }
    request.prompt = Some(completion_request::Prompt::Text(prompt));
    request.max_tokens = fields.integer("max_tokens", 1, u32::MAX as u64)?.map_or(TEXT_DEFAULT_MAX_TOKENS, |m| m as u32);
    if let Some(k) = fields.integer("logprobs", 0, 5)? {
        request.logprobs = true;
        request.top_logprobs = k as u32;
    }
    fields.only_default("echo", |v| v.as_bool() == Some(false), "echo is not supported")?;
    fields.only_default("suffix", |_| false, "suffix (insertion) is not supported")?;
    fields.only_default("best_of", |v| v.as_u64() == Some(1), "best_of is not supported; use n")?;
    Ok(())
}

/// `stop`: a string or up to four strings.
fn stops(body: &Map<String, Value>) -> ApiResult<Vec<String>> {
    let bad = || ApiError::invalid(Some("stop"), "invalid_type", format!("stop: a string or an array of at most {MAX_STOPS} strings"));
    let stops = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= MAX_STOPS => {
            items.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(bad)).collect::<ApiResult<_>>()?
        }
        Some(_) => return Err(bad()),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(Some("stop"), "invalid_value", "stop: a stop sequence is empty"));
    }
    Ok(stops)
}

fn missing(field: &str) -> ApiError {
    ApiError::invalid(Some(field), "missing_required_parameter", format!("Missing required parameter: '{field}'."))
}

/// Typed reads of a body's optional fields; `null` is the same as absent.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> ApiResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::invalid(Some(key), "invalid_type", format!("{key}: must be a string, got {other}"))),
        }
    }

    fn boolean(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(ApiError::invalid(Some(key), "invalid_type", format!("{key}: must be true or false, got {other}"))),
        }
    }

    fn number(&self, key: &str) -> ApiResult<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(Some(key), "invalid_type", format!("{key}: must be a number, got {v}"))),
        }
    }

    fn integer(&self, key: &str, min: u64, max: u64) -> ApiResult<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::invalid(Some(key), "invalid_value", format!("{key}: must be an integer in [{min}, {max}], got {v}"))),
            },
        }
    }

    /// A parameter accepted only at its neutral value (absent, null, or `neutral`).
    fn only_default(&self, key: &str, neutral: impl Fn(&Value) -> bool, why: &str) -> ApiResult<()> {
        match self.get(key) {
            Some(v) if !neutral(v) => Err(ApiError::invalid(Some(key), "unsupported_value", format!("{key}: {why} (got {v})"))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> ApiResult<Parsed> {
        parse(Kind::Chat, body.to_string().as_bytes())
    }

    fn refused_param(result: ApiResult<Parsed>) -> Option<String> {
        result.err().and_then(|e| e.param)
    }

    #[test]
    fn a_chat_request_carries_its_sampling_and_messages() {
        let parsed = chat(json!({
            "model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "stop": ["\n"], "seed": 3, "n": 2,
            "logprobs": true, "top_logprobs": 2, "stream": true, "stream_options": {"include_usage": true},
        }))
        .unwrap();
        let r = &parsed.request;
        assert_eq!((r.max_tokens, r.temperature, r.top_p, r.n, r.seed, r.top_logprobs), (7, 0.0, 0.5, 2, Some(3), 2));
        assert_eq!(r.stop, ["\n"]);
        assert!(parsed.stream && parsed.include_usage && r.logprobs);
        let Some(completion_request::Prompt::MessagesJson(messages)) = &r.prompt else { panic!("chat prompt") };
        assert!(messages.contains(r#""role":"system""#), "developer is the system role: {messages}");
        // Defaults: OpenAI's temperature 1, the context's room for tokens.
        let plain = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!((plain.request.temperature, plain.request.max_tokens, plain.request.n), (1.0, 0, 1));
    }

    #[test]
    fn refusals_name_the_field() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let with = |key: &str, value: Value| {
            let mut body = base();
            body[key] = value;
            chat(body)
        };
        assert_eq!(refused_param(with("best_of", json!(2))).as_deref(), Some("best_of"));
        assert_eq!(refused_param(with("frobnicate", json!(1))).as_deref(), Some("frobnicate"));
        assert_eq!(refused_param(with("temperature", json!(3))).as_deref(), Some("temperature"));
        assert_eq!(refused_param(with("presence_penalty", json!(0.5))).as_deref(), Some("presence_penalty"));
        assert!(with("presence_penalty", json!(0)).is_ok());
        assert_eq!(refused_param(with("n", json!(0))).as_deref(), Some("n"));
        assert_eq!(refused_param(with("stop", json!(["a", "b", "c", "d", "e"]))).as_deref(), Some("stop"));
        assert_eq!(refused_param(with("stream_options", json!({"include_usage": true}))).as_deref(), Some("stream_options"));
        assert_eq!(refused_param(with("tool_choice", json!("required"))).as_deref(), Some("tool_choice"));
        assert_eq!(refused_param(with("messages", json!([{"role": "wizard", "content": "x"}]))).as_deref(), Some("messages"));
        assert_eq!(refused_param(chat(json!({"messages": []}))).as_deref(), Some("model"));
        let error = with("messages", json!([{"role": "user"}])).unwrap_err();
        assert!(error.message.contains("messages[0]"), "{}", error.message);
    }

    #[test]
    fn tools_reach_the_template_unless_tool_choice_is_none() {
        let tools = json!([{"type": "function", "function": {"name": "lookup_cwe", "parameters": {"type": "object"}}}]);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools});
        assert!(chat(body.clone()).unwrap().request.tools_json.contains("lookup_cwe"));
        let mut none = body;
        none["tool_choice"] = json!("none");
        assert!(chat(none).unwrap().request.tools_json.is_empty());
    }

    #[test]
    fn a_text_completion_takes_one_prompt_and_openai_defaults() {
        let parsed = parse(Kind::Text, br#"{"model": "m", "prompt": "CVE-2024-1 is", "logprobs": 2}"#).unwrap();
        assert_eq!(parsed.request.prompt, Some(completion_request::Prompt::Text("CVE-2024-1 is".into())));
        assert_eq!((parsed.request.max_tokens, parsed.request.logprobs, parsed.request.top_logprobs), (16, true, 2));
        assert!(parse(Kind::Text, br#"{"model": "m", "prompt": ["a", "b"]}"#).is_err());
        assert!(parse(Kind::Text, br#"{"model": "m", "messages": []}"#).is_err(), "messages belong to chat");
    }
}
