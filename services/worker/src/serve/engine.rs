//! The inference engine: one thread that owns the device. It keeps up to `max_models` models
//! loaded (a base's weights read once and shared by every adapter on it), and one
//! [`Batch`] per model. Each turn of its loop it takes new requests, admits the waiting ones
//! into their model's batch while there is room (continuous batching: a request joins between
//! two steps, it does not wait for the batch to drain), and runs one step of every batch,
//! sending each choice's new text out as a [`Completion`].

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use lathe_proto::v1::{completion_request, Completion, CompletionError, CompletionRequest, TokenLogprob, TopLogprob};
use lathe_trainer::generate::{Batch, Finish, Sampling, Token};
use lathe_trainer::inference::{Prompter, TextStream};
use lathe_trainer::models::decoder::Decoder;
use lathe_trainer::models::SharedBase;
use tokio::sync::mpsc::UnboundedSender;

use crate::evaluation::link_adapter;
use crate::spec::model_dir;

/// What the engine is told at start.
#[derive(Clone)]
pub struct EngineConfig {
    pub models_root: PathBuf,
    /// Resolved: cpu or cuda:N.
    pub device: String,
    /// auto, fp32 or bf16.
    pub dtype: String,
    pub threads: usize,
    pub max_batch: usize,
    pub max_models: usize,
    /// Special tokens in a request's message contents are made plain text.
    pub escape_special_tokens: bool,
}

pub enum Command {
    Submit(Box<CompletionRequest>),
    /// The client went away.
    Cancel(String),
    /// The stream to the controller ended: it has failed every request it sent.
    CancelAll,
}

/// Reports what the engine does (batch sizes for the metrics).
pub type Observer = Box<dyn Fn(usize) + Send>;

pub fn start(config: EngineConfig, events: UnboundedSender<Completion>, observe_batch: Observer) -> Sender<Command> {
    let (commands, inbox) = std::sync::mpsc::channel();
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("lathe-inference".into())
        .spawn(move || span.in_scope(|| Engine::new(config, events, observe_batch).run(inbox)))
        .expect("spawning the inference thread");
    commands
}

/// A model ready to generate: a decoder (base, or base + adapter) and its batch.
struct Slot {
    model: String,
    base: String,
    decoder: Decoder,
    prompter: Rc<Prompter>,
    batch: Batch,
    used: Instant,
}

/// A choice being generated.
struct Choice {
    request_id: String,
    index: u32,
    model: String,
    text: TextStream,
    generated: u32,
    prompt_tokens: u32,
    logprobs: bool,
}

/// A request whose sequences wait for room in their model's batch.
struct Waiting {
    request_id: String,
    model: String,
    sequences: Vec<(u64, Vec<i64>, Sampling)>,
}

struct Engine {
    config: EngineConfig,
    events: UnboundedSender<Completion>,
    observe_batch: Observer,
    kind: tch::Kind,
    device: tch::Device,
    bases: HashMap<String, (Rc<SharedBase>, Rc<Prompter>)>,
    slots: Vec<Slot>,
    waiting: VecDeque<Waiting>,
    choices: HashMap<u64, Choice>,
    next_key: u64,
}

/// Why a request cannot be served, as the controller reports it.
struct Refusal {
    bad_request: bool,
    param: &'static str,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn bad(param: &'static str, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { bad_request: true, param, code, message: message.into() }
    }

    fn server(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { bad_request: false, param: "", code, message: message.into() }
    }
}

impl Engine {
    fn new(config: EngineConfig, events: UnboundedSender<Completion>, observe_batch: Observer) -> Engine {
        if config.threads > 0 {
            tch::set_num_threads(config.threads as i32);
        }
        let device = lathe_trainer::device::parse_device(&config.device).unwrap_or(tch::Device::Cpu);
        let kind = lathe_trainer::device::resolve_dtype(&config.dtype, device).unwrap_or(tch::Kind::Float);
        Engine {
            config,
            events,
            observe_batch,
            kind,
            device,
            bases: HashMap::new(),
            slots: Vec::new(),
            waiting: VecDeque::new(),
            choices: HashMap::new(),
            next_key: 0,
        }
    }

    fn run(mut self, inbox: Receiver<Command>) {
        loop {
            let busy = !self.waiting.is_empty() || self.slots.iter().any(|s| !s.batch.is_empty());
            // Idle: sleep until a command comes. Busy: take what has come and go on generating.
            let first = if busy {
                inbox.try_recv().ok()
            } else {
                match inbox.recv_timeout(Duration::from_secs(60)) {
                    Ok(command) => Some(command),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            for command in first.into_iter().chain(std::iter::from_fn(|| inbox.try_recv().ok())) {
                match command {
                    Command::Submit(request) => self.submit(*request),
                    Command::Cancel(request_id) => self.cancel(&request_id),
                    Command::CancelAll => {
                        let ids: Vec<String> = self.choices.values().map(|c| c.request_id.clone()).collect();
                        for id in ids {
                            self.cancel(&id);
                        }
                        self.waiting.clear();
                    }
                }
            }
            self.admit();
            for index in 0..self.slots.len() {
                if !self.slots[index].batch.is_empty() {
                    self.step(index);
                }
            }
        }
    }

    /// Tokenizes the request's prompt on its model (loading the model when needed) and queues
    /// its choices.
    fn submit(&mut self, request: CompletionRequest) {
        let request_id = request.request_id.clone();
        match self.prepare(request) {
            Ok(waiting) => self.waiting.push_back(waiting),
            Err(refusal) => {
                tracing::info!(request_id, code = refusal.code, message = refusal.message, "completion refused");
                self.send(Completion {
                    request_id,
                    error: Some(CompletionError {
                        bad_request: refusal.bad_request,
                        param: refusal.param.into(),
                        code: refusal.code.into(),
                        message: refusal.message,
                    }),
                    ..Default::default()
                });
            }
        }
    }

    fn prepare(&mut self, request: CompletionRequest) -> Result<Waiting, Refusal> {
        let slot = self.slot_for(&request)?;
        let (prompter, context) =
            (self.slots[slot].prompter.clone(), self.slots[slot].decoder.config.max_position_embeddings.max(1) as usize);
        let prompt = match &request.prompt {
            Some(completion_request::Prompt::MessagesJson(json)) => {
                let value: serde_json::Value =
                    serde_json::from_str(json).map_err(|e| Refusal::bad("messages", "invalid_value", format!("messages: {e}")))?;
                let mut messages =
                    lathe_core::training_file::parse_request_messages(&value).map_err(|e| Refusal::bad("messages", "invalid_value", e))?;
                if self.config.escape_special_tokens {
                    for message in &mut messages {
                        message.content = prompter.escape_special_tokens(&message.content);
                    }
                }
                let tools: Option<serde_json::Value> = if request.tools_json.is_empty() {
                    None
                } else {
                    Some(
                        serde_json::from_str(&request.tools_json)
                            .map_err(|e| Refusal::bad("tools", "invalid_value", format!("tools: {e}")))?,
                    )
                };
                prompter.chat_prompt(&messages, tools.as_ref()).map_err(|e| Refusal::bad("messages", "invalid_value", e.to_string()))?
            }
            Some(completion_request::Prompt::Text(text)) => {
                prompter.text_prompt(text).map_err(|e| Refusal::bad("prompt", "invalid_value", e.to_string()))?
            }
            None => return Err(Refusal::bad("messages", "invalid_value", "the request has no prompt")),
        };
        if prompt.is_empty() {
            return Err(Refusal::bad("prompt", "invalid_value", "the prompt is empty"));
        }
        let room = context.saturating_sub(prompt.len());
        let asked = request.max_tokens as usize;
        if room == 0 || asked > room {
            let param = if matches!(request.prompt, Some(completion_request::Prompt::Text(_))) { "prompt" } else { "messages" };
            let wanted = if asked > 0 { format!("{asked} tokens of completion") } else { "at least 1 token of completion".into() };
            return Err(Refusal::bad(
                param,
                "context_length_exceeded",
                format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the prompt, {wanted}). Please reduce the length of the prompt or the max_tokens.",
                    prompt.len() + asked.max(1),
                    prompt.len()
                ),
            ));
        }
        let max_new_tokens = if asked == 0 { room } else { asked };
        let seed = request
            .seed
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        let n = request.n.max(1);
        let mut sequences = Vec::with_capacity(n as usize);
        for index in 0..n {
            let key = self.next_key;
            self.next_key += 1;
            let sampling = Sampling {
                max_new_tokens,
                temperature: request.temperature,
                top_p: request.top_p,
                seed: seed.wrapping_add(u64::from(index)),
                stop_ids: prompter.stop_ids.clone(),
                logprobs: request.logprobs.then_some(request.top_logprobs as usize),
            };
            self.choices.insert(
                key,
                Choice {
                    request_id: request.request_id.clone(),
                    index,
                    model: request.model.clone(),
                    text: TextStream::new(request.stop.clone()),
                    generated: 0,
                    prompt_tokens: prompt.len() as u32,
                    logprobs: request.logprobs,
                },
            );
            sequences.push((key, prompt.clone(), sampling));
        }
        Ok(Waiting { request_id: request.request_id, model: request.model, sequences })
    }

    /// The slot of the request's model, loaded now if it is not; an idle model goes when more
    /// than `max_models` are loaded.
    fn slot_for(&mut self, request: &CompletionRequest) -> Result<usize, Refusal> {
        if let Some(index) = self.slots.iter().position(|s| s.model == request.model) {
            self.slots[index].used = Instant::now();
            return Ok(index);
        }
        let started = Instant::now();
        let base_name = lathe_core::ModelName::parse(&request.base_model).map_err(|e| Refusal::server("model_unavailable", e))?;
        let dir = model_dir(&self.config.models_root, &base_name).map_err(|e| Refusal::server(e.code, e.message))?;
        let (base, prompter) = match self.bases.get(&request.base_model) {
            Some((base, prompter)) => (base.clone(), prompter.clone()),
            None => {
                let base =
                    SharedBase::read(&dir, self.kind, self.device).map_err(|e| Refusal::server("model_unavailable", e.to_string()))?;
                let prompter = Prompter::open(&dir).map_err(|e| Refusal::server("model_unavailable", e.to_string()))?;
                let loaded = (Rc::new(base), Rc::new(prompter));
                self.bases.insert(request.base_model.clone(), loaded.clone());
                loaded
            }
        };
        let decoder = if request.adapter_files.is_empty() {
            base.decoder(None)
        } else {
            let unique = format!("lathe-serve-{}-{}", std::process::id(), self.next_key);
            let adapter =
                link_adapter(std::env::temp_dir().join(unique), &request.adapter_files).map_err(|e| Refusal::server(e.code, e.message))?;
            base.decoder(Some(&adapter.0))
        }
        .map_err(|e| Refusal::server("model_unavailable", e.to_string()))?;
        tracing::info!(
            model = request.model,
            base = request.base_model,
            seconds = started.elapsed().as_secs_f64(),
            "model loaded for inference"
        );
        self.slots.push(Slot {
            model: request.model.clone(),
            base: request.base_model.clone(),
            decoder,
            prompter,
            batch: Batch::default(),
            used: Instant::now(),
        });
        self.evict();
        Ok(self.slots.len() - 1)
    }

    /// Unloads the least recently used idle models beyond `max_models` (and bases no model uses).
    fn evict(&mut self) {
        while self.slots.len() > self.config.max_models.max(1) {
            let waiting_for = |model: &str| self.waiting.iter().any(|w| w.model == model);
            let newest = self.slots.len() - 1;
            let idle = (0..newest)
                .filter(|&i| self.slots[i].batch.is_empty() && !waiting_for(&self.slots[i].model))
                .min_by_key(|&i| self.slots[i].used);
            let Some(index) = idle else { return };
            let slot = self.slots.remove(index);
            tracing::info!(model = slot.model, "model unloaded (least recently used)");
            if !self.slots.iter().any(|s| s.base == slot.base) {
                self.bases.remove(&slot.base);
            }
        }
    }

    /// Moves waiting requests into their model's batch while it has room, oldest first.
    fn admit(&mut self) {
        let mut still_waiting = VecDeque::new();
        let mut groups: HashMap<usize, Vec<Waiting>> = HashMap::new();
        while let Some(waiting) = self.waiting.pop_front() {
            let Some(slot) = self.slots.iter().position(|s| s.model == waiting.model) else {
                // Its model was unloaded meanwhile (cannot happen while it waits; be safe).
                self.fail(&waiting.request_id, "model_unavailable", "the model was unloaded");
                continue;
            };
            let admitted: usize = groups.get(&slot).map_or(0, |g| g.iter().map(|w| w.sequences.len()).sum());
            let fits = self.slots[slot].batch.len() + admitted + waiting.sequences.len() <= self.config.max_batch.max(1)
                || (self.slots[slot].batch.is_empty() && admitted == 0);
            // Later requests for the same model wait behind an earlier one that did not fit.
            if fits && !still_waiting.iter().any(|w: &Waiting| w.model == waiting.model) {
                groups.entry(slot).or_default().push(waiting);
            } else {
                still_waiting.push_back(waiting);
            }
        }
        self.waiting = still_waiting;
        for (slot, group) in groups {
            let ids: Vec<String> = group.iter().map(|w| w.request_id.clone()).collect();
            let sequences: Vec<_> = group.into_iter().flat_map(|w| w.sequences).collect();
            let Slot { batch, decoder, .. } = &mut self.slots[slot];
            if let Err(error) = batch.admit(decoder, sequences) {
                tracing::warn!(%error, "prefill failed");
                for id in ids {
                    self.fail(&id, "inference_error", &error.to_string());
                }
            }
        }
    }

    fn step(&mut self, slot: usize) {
        let batch_size = self.slots[slot].batch.len();
        (self.observe_batch)(batch_size);
        let tokens = {
            let Slot { batch, decoder, .. } = &mut self.slots[slot];
            batch.step(decoder)
        };
        let tokens = match tokens {
            Ok(tokens) => tokens,
            Err(error) => {
                tracing::warn!(%error, "generation failed");
                let model = self.slots[slot].model.clone();
                self.slots[slot].batch = Batch::default();
                let ids: Vec<String> = self.choices.values().filter(|c| c.model == model).map(|c| c.request_id.clone()).collect();
                for id in ids {
                    self.fail(&id, "inference_error", &error.to_string());
                }
                return;
            }
        };
        let prompter = self.slots[slot].prompter.clone();
        let mut stopped = Vec::new();
        for token in tokens {
            let Token { key, finish, .. } = token;
            let Some(choice) = self.choices.get_mut(&key) else { continue };
            choice.generated += 1;
            let piece = match choice.text.push(&prompter, token.token, finish.is_some()) {
                Ok(piece) => piece,
                Err(error) => {
                    let id = choice.request_id.clone();
                    self.fail(&id, "inference_error", &error.to_string());
                    continue;
                }
            };
            let finish = if piece.stopped && finish.is_none() {
                stopped.push(key);
                Some(Finish::Stop)
            } else {
                finish
            };
            let logprobs = if choice.logprobs && !(finish == Some(Finish::Stop) && prompter.stop_ids.contains(&token.token)) {
                vec![token_logprob(&prompter, &token)]
            } else {
                Vec::new()
            };
            let mut completion = Completion {
                request_id: choice.request_id.clone(),
                index: choice.index,
                text: piece.text,
                logprobs,
                batch_size: batch_size as u32,
                ..Default::default()
            };
            if let Some(finish) = finish {
                completion.finish_reason = match finish {
                    Finish::Stop => "stop",
                    Finish::Length => "length",
                }
                .into();
                completion.prompt_tokens = choice.prompt_tokens;
                completion.completion_tokens = choice.generated;
                self.choices.remove(&key);
            }
            self.send(completion);
        }
        if !stopped.is_empty() {
            self.slots[slot].batch.remove(&stopped);
        }
    }

    /// Stops a request wherever it is (waiting or generating), silently.
    fn cancel(&mut self, request_id: &str) {
        self.waiting.retain(|w| w.request_id != request_id);
        let keys: Vec<u64> = self.choices.iter().filter(|(_, c)| c.request_id == request_id).map(|(&k, _)| k).collect();
        if keys.is_empty() {
            return;
        }
        for slot in &mut self.slots {
            slot.batch.remove(&keys);
        }
        for key in keys {
            self.choices.remove(&key);
        }
    }

    fn fail(&mut self, request_id: &str, code: &str, message: &str) {
        self.cancel(request_id);
        self.send(Completion {
            request_id: request_id.into(),
            error: Some(CompletionError { bad_request: false, param: String::new(), code: code.into(), message: message.into() }),
            ..Default::default()
        });
    }

    fn send(&self, mut completion: Completion) {
        // A refusal's words reach a tenant: never this worker's folders.
        if let Some(error) = &mut completion.error {
            error.message = self.redact(&error.message);
        }
        // The receiver lives as long as the worker; a send fails only while it shuts down.
        let _ = self.events.send(completion);
    }

    /// `message` with the models root and the temporary adapter folders named as a tenant
    /// knows them.
    fn redact(&self, message: &str) -> String {
        let root = self.config.models_root.display().to_string();
        let temp = std::env::temp_dir().display().to_string();
        let mut message = message.to_string();
        for (path, name) in [(root.trim_end_matches('/'), "<models>"), (temp.trim_end_matches('/'), "<adapter>")] {
            if path.len() > 1 {
                message = message.replace(path, name);
            }
        }
        message
    }
}

fn token_logprob(prompter: &Prompter, token: &Token) -> TokenLogprob {
    let text = prompter.token_text(token.token);
    TokenLogprob {
        bytes: text.as_bytes().to_vec(),
        token: text,
        logprob: token.logprob.unwrap_or(0.0),
        top: token
            .top_logprobs
            .iter()
            .map(|&(id, logprob)| {
                let text = prompter.token_text(id);
                TopLogprob { bytes: text.as_bytes().to_vec(), token: text, logprob }
            })
            .collect(),
    }
}
