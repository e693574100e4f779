//! The model's own chat template, rendered the way `transformers` renders it.
//!
//! A fine-tuned model must see the exact bytes it will see at inference, and inference servers
//! (vLLM, HF) render the Jinja template shipped in `tokenizer_config.json`. So we do not write
//! per-family formats: we run that template with minijinja in the same environment transformers
//! sets up — `trim_blocks` + `lstrip_blocks`, loop controls, Python string methods (pycompat),
//! its `tojson`, `raise_exception` and `strftime_now`, and the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::Value as Json;

use crate::jinja_compat;
use crate::{EncodeError, Result};
use lathe_core::training_file::ChatMessage;

const TEMPLATE_NAME: &str = "chat_template";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// Special tokens read from tokenizer_config.json (strings), used by the encoder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
}

impl ChatTemplate {
    /// Reads tokenizer_config.json; Ok(None) when the model has no chat template. Recent
    /// `transformers` saves the template next to it as `chat_template.jinja` instead, so that
    /// file is used when the config has none.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>> {
        let config = read_json_object(path)?;
        let special = special_tokens_of(path, &config)?;
        let source = match config.get("chat_template") {
            None | Some(Json::Null) => {
                let sibling = path.with_file_name("chat_template.jinja");
                if !sibling.is_file() {
                    return Ok(None);
                }
                std::fs::read_to_string(&sibling).map_err(|e| EncodeError::io(&sibling, e))?
            }
            Some(Json::String(source)) => source.clone(),
            // Some models ship several named templates (e.g. "default" and "tool_use").
            Some(Json::Array(named)) => default_of_named_templates(path, named)?,
            Some(_) => return Err(EncodeError::file(path, "`chat_template` must be a string or a list of {name, template}")),
        };
        let template = ChatTemplate::from_source(&source, special.bos, special.eos).map_err(|e| EncodeError::file(path, e.to_string()))?;
        Ok(Some(template))
    }

    pub fn from_source(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", jinja_compat::tojson);
        env.add_function("raise_exception", |message: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| jinja_compat::strftime_now(&format));
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| EncodeError::ChatTemplate(format!("cannot parse the template: {e:#}")))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with the request's `tools` (OpenAI function definitions), which
    /// templates that support tool calling list in the prompt; `None` leaves `tools` undefined,
    /// as transformers does.
    pub fn render_with_tools(&self, messages: &[ChatMessage], tools: Option<&Json>, add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Json> = messages.iter().map(message_to_json).collect();
        let mut context =
            vec![("messages", Value::from_serialize(&messages)), ("add_generation_prompt", Value::from(add_generation_prompt))];
        if let Some(tools) = tools {
            context.push(("tools", Value::from_serialize(tools)));
        }
        // transformers leaves unset special tokens undefined (not None), and templates test
        // `bos_token is defined`; so do we.
        if let Some(bos) = &self.bos_token {
            context.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            context.push(("eos_token", Value::from(eos.as_str())));
        }
        let template = self.env.get_template(TEMPLATE_NAME).expect("added in from_source");
        template.render(Value::from_iter(context)).map_err(|e| EncodeError::ChatTemplate(render_error_message(&e)))
    }
}

/// Reads the special tokens of tokenizer_config.json (each a string, null or {"content": …}).
pub fn read_special_tokens(tokenizer_config: &Path) -> Result<SpecialTokens> {
    let config = read_json_object(tokenizer_config)?;
    special_tokens_of(tokenizer_config, &config)
}

fn special_tokens_of(path: &Path, config: &serde_json::Map<String, Json>) -> Result<SpecialTokens> {
    let token = |key: &str| -> Result<Option<String>> {
        match config.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(Json::Object(o)) => match o.get("content") {
                Some(Json::String(s)) => Ok(Some(s.clone())),
                _ => Err(EncodeError::file(path, format!("`{key}` is an object without a string `content`"))),
            },
            Some(_) => Err(EncodeError::file(path, format!("`{key}` must be a string, null or an object with `content`"))),
        }
    };
    Ok(SpecialTokens { bos: token("bos_token")?, eos: token("eos_token")?, pad: token("pad_token")? })
}

fn read_json_object(path: &Path) -> Result<serde_json::Map<String, Json>> {
    let text = std::fs::read_to_string(path).map_err(|e| EncodeError::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Json::Object(object)) => Ok(object),
        Ok(_) => Err(EncodeError::file(path, "expected a JSON object")),
        Err(e) => Err(EncodeError::file(path, format!("not valid JSON: {e}"))),
    }
}

fn default_of_named_templates(path: &Path, named: &[Json]) -> Result<String> {
    let mut names = Vec::new();
    for entry in named {
        let name = entry.get("name").and_then(Json::as_str);
        let template = entry.get("template").and_then(Json::as_str);
        match (name, template) {
            (Some("default"), Some(template)) => return Ok(template.to_string()),
            (Some(name), Some(_)) => names.push(name.to_string()),
            _ => return Err(EncodeError::file(path, "`chat_template` list entries need a string `name` and `template`")),
        }
    }
    Err(EncodeError::file(path, format!("`chat_template` has no template named `default` (found: {})", names.join(", "))))
}

/// The message as the template sees it: the OpenAI dict, minus our `weight`.
fn message_to_json(message: &ChatMessage) -> Json {
    let mut object = serde_json::Map::new();
    object.insert("role".into(), Json::String(message.role.clone()));
    object.insert("content".into(), Json::String(message.content.clone()));
    for (key, value) in &message.extra {
        object.insert(key.clone(), value.clone());
    }
    Json::Object(object)
}

/// `raise_exception("…")` is how templates reject a conversation (e.g. "Conversation roles must
/// alternate user/assistant/user/assistant/..."); show that message first, then the location.
fn render_error_message(error: &Error) -> String {
    match (error.kind(), error.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => {
            let line = error.line().map(|l| format!(" (template line {l})")).unwrap_or_default();
            format!("the template rejected the conversation: {detail}{line}")
        }
        _ => format!("cannot render: {error:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";
    const QWEN2_5: &str = include_str!("testdata/qwen2_5_instruct.jinja");
    const QWEN3: &str = include_str!("testdata/qwen3.jinja");
    const LLAMA3: &str = include_str!("testdata/llama3_instruct.jinja");

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), weight: None, extra: Default::default() }
    }

    fn with_extra(mut message: ChatMessage, extra: &str) -> ChatMessage {
        message.extra = serde_json::from_str(extra).unwrap();
        message
    }

    #[test]
    fn chatml_renders_each_turn_and_the_generation_prompt() {
        let template = ChatTemplate::from_source(CHATML, None, Some("<|im_end|>".into())).unwrap();
        let messages = [msg("system", "S"), msg("user", "Q"), msg("assistant", "A")];
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        );
        assert_eq!(
            template.render(&messages[..2], true).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn qwen2_5_adds_its_default_system_prompt_and_renders_tool_calls_like_transformers() {
        let template = ChatTemplate::from_source(QWEN2_5, None, Some("<|im_end|>".into())).unwrap();
        let call = with_extra(
            msg("assistant", ""),
            r#"{"tool_calls": [{"type": "function", "function": {"name": "get_cvss", "arguments": {"cve": "CVE-2021-44228", "version": 3}}}]}"#,
        );
        let messages = [msg("user", "Score?"), call, msg("tool", "10.0"), msg("assistant", "It is 10.0.")];
        // Expected string produced by transformers 5 apply_chat_template(tokenize=False).
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nScore?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_cvss\", \"arguments\": {\"cve\": \"CVE-2021-44228\", \"version\": 3}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n<tool_response>\n10.0\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\nIt is 10.0.<|im_end|>\n"
        );
        let with_system = [msg("system", "Be terse."), msg("user", "Hi")];
        assert_eq!(
            template.render(&with_system, true).unwrap(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn qwen3_uses_python_string_methods_and_thinks_only_after_the_last_query() {
        let template = ChatTemplate::from_source(QWEN3, None, Some("<|im_end|>".into())).unwrap();
        let messages =
            [msg("user", "Q1"), msg("assistant", "<think>\nold reasoning\n</think>\n\nA1"), msg("user", "Q2"), msg("assistant", "A2")];
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n\
             <|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA2<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_starts_with_bos_and_trims_content() {
        let template = ChatTemplate::from_source(LLAMA3, Some("<|begin_of_text|>".into()), Some("<|eot_id|>".into())).unwrap();
        let messages = [msg("user", " Hi \n"), msg("assistant", "Hello")];
        assert_eq!(
            template.render(&messages, false).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        );
        assert_eq!(
            template.render(&messages[..1], true).unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_chat_template_error_with_its_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let template = ChatTemplate::from_source(source, None, None).unwrap();
        let error = template.render(&[msg("assistant", "A")], false).unwrap_err().to_string();
        assert!(error.contains("rejected the conversation: Conversation must start with user"), "{error}");
        assert_eq!(template.render(&[msg("user", "Q")], false).unwrap(), "ok");
    }

    #[test]
    fn a_template_that_does_not_parse_is_reported() {
        let error = ChatTemplate::from_source("{% for m in messages %}", None, None).err().unwrap().to_string();
        assert!(error.starts_with("chat template: cannot parse the template"), "{error}");
    }

    #[test]
    fn tokenizer_config_special_tokens_may_be_strings_null_or_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer_config.json");
        let config = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "pad_token": null,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}],
        });
        std::fs::write(&path, config.to_string()).unwrap();
        let special = read_special_tokens(&path).unwrap();
        assert_eq!(special, SpecialTokens { bos: Some("<s>".into()), eos: Some("</s>".into()), pad: None });
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "<s>D");
    }

    #[test]
    fn a_config_without_template_uses_chat_template_jinja_or_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer_config.json");
        std::fs::write(&path, r#"{"eos_token": "<|endoftext|>"}"#).unwrap();
        assert!(ChatTemplate::from_tokenizer_config(&path).unwrap().is_none());

        std::fs::write(dir.path().join("chat_template.jinja"), "{{ eos_token }}\n").unwrap();
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "<|endoftext|>");
    }
}
