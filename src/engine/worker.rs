//! The worker thread that owns the model and its cache and serves requests.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::DType;

use crate::model::{
    ChatMessage, DeviceSpec, LoadedModel, ModelError, Placement, PltCache, Result, Sampler,
};

use super::conversation::conversation_prompt;
use super::generate::{generate, GenerateRequest, GenerationObserver, StepControl};
use super::protocol::{Backend, Event, ModelInfo, Request, TurnStats};

/// How the worker starts.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Checkpoint directory or .gguf file.
    pub model: PathBuf,
    /// Loop count to start with (default: the trained count).
    pub loops: Option<usize>,
    /// Most positions a conversation may take (default, and at most: the model's).
    pub context_size: Option<usize>,
    /// Where the model runs.
    pub device: DeviceSpec,
    /// Compute dtype of a safetensors checkpoint (default: the device's).
    pub dtype: Option<DType>,
}

/// The UI's side of the engine: send requests; events arrive through the sink given to `spawn`.
pub struct Engine {
    requests: Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the worker; it loads the model and then serves requests, reporting to `sink`.
    pub fn spawn(
        options: EngineOptions,
        sink: impl Fn(Event) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("plait-engine".into())
            .spawn(move || run(options, inbox, &sink))?;
        Ok(Self {
            requests,
            thread: Some(thread),
        })
    }

    /// Queues a request (ignored once the worker has stopped).
    pub fn send(&self, request: Request) {
        // A send fails only when the worker has exited, after Shutdown or a panic: nothing to do.
        let _ = self.requests.send(request);
    }
}

impl Backend for Engine {
    fn send(&self, request: Request) {
        Engine::send(self, request);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.send(Request::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn model_info(loaded: &LoadedModel, options: &EngineOptions, loops: usize) -> ModelInfo {
    let c = loaded.model.config();
    let name = options
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| options.model.display().to_string());
    ModelInfo {
        name,
        path: options.model.clone(),
        parameters: loaded.model.parameter_count(),
        quantization: loaded.model.weight_storage(),
        trained_loops: c.plt_num_loops,
        loops,
        window: c.plt_window,
        context_size: context_size(loaded, options),
    }
}

/// The context the conversation must fit: the configured size, within the model's.
fn context_size(loaded: &LoadedModel, options: &EngineOptions) -> usize {
    let model = loaded.model.config().max_position_embeddings;
    options.context_size.map_or(model, |size| size.min(model))
}

fn run(options: EngineOptions, inbox: Receiver<Request>, sink: &dyn Fn(Event)) {
    sink(Event::Loading(0.0));
    let loaded = match Placement::open(options.device, options.dtype).and_then(|placement| {
        LoadedModel::load_with_progress(&options.model, &placement, &mut |p| {
            sink(Event::Loading(p))
        })
    }) {
        Ok(loaded) => loaded,
        Err(e) => {
            sink(Event::LoadFailed(format!(
                "cannot load {}: {e}",
                options.model.display()
            )));
            // Keep answering until told to stop, so the UI never waits on a dead channel.
            while let Ok(request) = inbox.recv() {
                if request == Request::Shutdown {
                    return;
                }
            }
            return;
        }
    };
    let loops = options.loops.unwrap_or(loaded.model.config().plt_num_loops);
    let mut cache = match loaded.model.new_cache(loops) {
        Ok(cache) => cache,
        Err(e) => {
            sink(Event::LoadFailed(e.to_string()));
            return;
        }
    };
    sink(Event::Loaded(model_info(&loaded, &options, loops)));
    // Requests that arrived while an answer ran, in order: every one is served.
    let mut pending = VecDeque::new();
    loop {
        let request = match pending.pop_front() {
            Some(r) => r,
            None => match inbox.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        match request {
            Request::Generate {
                messages,
                sampling,
                max_tokens,
            } => {
                let mut sampler = Sampler::new(sampling);
                match answer(
                    &loaded,
                    &mut cache,
                    &messages,
                    &mut sampler,
                    (max_tokens, context_size(&loaded, &options)),
                    &inbox,
                    sink,
                ) {
                    Ok(arrived) => pending.extend(arrived),
                    Err(e) => sink(Event::Error(e.to_string())),
                }
            }
            Request::SetLoops(n) => match loaded.model.set_loops(&mut cache, n) {
                Ok(()) => sink(Event::LoopsChanged(n)),
                Err(e) => sink(Event::Error(e.to_string())),
            },
            Request::Reset => match loaded.model.new_cache(cache.loops()) {
                Ok(fresh) => {
                    cache = fresh;
                    sink(Event::ResetDone);
                }
                Err(e) => sink(Event::Error(e.to_string())),
            },
            Request::Cancel => {}
            Request::Shutdown => return,
        }
    }
}

/// Streams detokenized text to the sink and applies requests that arrive mid-answer.
struct Streamer<'a> {
    stream: Option<crate::model::TextStream<'a>>,
    inbox: &'a Receiver<Request>,
    sink: &'a dyn Fn(Event),
    last: Instant,
    /// Requests that are not for the running answer, in order, served after it.
    deferred: Vec<Request>,
}

impl GenerationObserver for Streamer<'_> {
    fn prefill_progress(&mut self, done: usize, total: usize) {
        (self.sink)(Event::PrefillProgress { done, total });
    }

    fn token(&mut self, id: u32) -> StepControl {
        let latency = self.last.elapsed();
        self.last = Instant::now();
        let text = match self.stream.as_mut().map(|s| s.push(id)) {
            Some(Ok(chunk)) => chunk.unwrap_or_default(),
            Some(Err(e)) => {
                (self.sink)(Event::Error(e.to_string()));
                return StepControl::Stop;
            }
            None => format!(" {id}"),
        };
        (self.sink)(Event::Token { text, latency });
        let mut control = StepControl::Continue;
        loop {
            match self.inbox.try_recv() {
                Ok(Request::Cancel) => return StepControl::Stop,
                Ok(Request::SetLoops(n)) => {
                    (self.sink)(Event::LoopsChanged(n));
                    control = StepControl::SetLoops(n);
                }
                // A new conversation (or the end) stops the answer first.
                Ok(request @ (Request::Shutdown | Request::Reset)) => {
                    self.deferred.push(request);
                    return StepControl::Stop;
                }
                Ok(other) => self.deferred.push(other),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return control,
            }
        }
    }
}

/// Answers one turn; returns the requests that arrived meanwhile, still to be served.
fn answer(
    loaded: &LoadedModel,
    cache: &mut PltCache,
    messages: &[ChatMessage],
    sampler: &mut Sampler,
    (max_tokens, context): (usize, usize),
    inbox: &Receiver<Request>,
    sink: &dyn Fn(Event),
) -> Result<Vec<Request>> {
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or(ModelError::Encode("the model has no tokenizer".into()))?;
    let prompt = conversation_prompt(loaded, tokenizer, messages, max_tokens, context)?;
    let dropped_messages = prompt.dropped_messages;
    let request = GenerateRequest {
        prompt: &prompt.ids,
        max_tokens: prompt.max_tokens,
        stop_ids: &loaded.stop_ids,
    };
    let mut streamer = Streamer {
        stream: Some(tokenizer.stream()),
        inbox,
        sink,
        last: Instant::now(),
        deferred: Vec::new(),
    };
    let out = generate(&loaded.model, cache, sampler, &request, &mut streamer)?;
    if let Some(Ok(Some(rest))) = streamer.stream.as_mut().map(|s| s.finish()) {
        sink(Event::Token {
            text: rest,
            latency: std::time::Duration::ZERO,
        });
    }
    sink(Event::Done(TurnStats {
        stop_reason: out.stop_reason,
        tokens: out.ids.len(),
        time_to_first_token: out.metrics.time_to_first_token,
        decode_tok_s: out.metrics.decode_tokens_per_second(),
        reused_tokens: out.metrics.reused_tokens,
        context_used: cache.len(),
        kv_bytes: cache.size_bytes(),
        dropped_messages,
    }));
    Ok(streamer.deferred)
}
