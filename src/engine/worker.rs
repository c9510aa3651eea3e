//! The worker thread that owns the model and the kept caches and serves requests in order.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::DType;

use crate::model::{DeviceSpec, LoadedModel, ModelError, Placement, Sampler, TextStream};

use super::caches::{default_cache_budget, CachePool};
use super::conversation::{
    conversation_prompt, encode_conversation, raw_prompt, ConversationPrompt,
};
use super::generate::{generate, GenerateRequest, GenerationObserver, StepControl};
use super::protocol::{
    Backend, Event, FailureKind, GenerateJob, LoopControl, ModelInfo, Prompt, Request, RequestId,
    TurnStats,
};

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
    /// Bytes the kept caches may hold together (default: sized to the machine's memory).
    pub cache_budget: Option<usize>,
}

/// A front end's side of the engine: send requests; events arrive through the sink given
/// to `spawn`.
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
        Self::spawn_with(move |inbox| run(options, inbox, &sink))
    }

    /// Starts the worker on a model already loaded (`options.model` names it; its device
    /// and dtype are the loaded model's).
    pub fn spawn_loaded(
        loaded: LoadedModel,
        options: EngineOptions,
        sink: impl Fn(Event) + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::spawn_with(move |inbox| serve_loaded(loaded, &options, inbox, &sink))
    }

    /// The worker thread running `work` on the requests sent to it.
    fn spawn_with(work: impl FnOnce(Receiver<Request>) + Send + 'static) -> std::io::Result<Self> {
        let (requests, inbox) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("plait-engine".into())
            .spawn(move || work(inbox))?;
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
        supports_tools: loaded.template.supports_tools(),
        loop_control: LoopControl::Live,
        server: None,
    }
}

/// The context the conversation must fit: the configured size, within the model's.
fn context_size(loaded: &LoadedModel, options: &EngineOptions) -> usize {
    let model = loaded.model.config().max_position_embeddings;
    options.context_size.map_or(model, |size| size.min(model))
}

/// The loaded worker's state between requests.
struct Worker<'a> {
    loaded: LoadedModel,
    context: usize,
    /// Loop count of requests that do not name one.
    loops: usize,
    caches: CachePool,
    inbox: Receiver<Request>,
    sink: &'a dyn Fn(Event),
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
    serve_loaded(loaded, &options, inbox, sink);
}

/// Serves requests with a loaded model until Shutdown.
fn serve_loaded(
    loaded: LoadedModel,
    options: &EngineOptions,
    inbox: Receiver<Request>,
    sink: &dyn Fn(Event),
) {
    let loops = options.loops.unwrap_or(loaded.model.config().plt_num_loops);
    if let Err(e) = loaded.model.check_loops(loops) {
        sink(Event::LoadFailed(e.to_string()));
        return;
    }
    sink(Event::Loaded(model_info(&loaded, options, loops)));
    let mut worker = Worker {
        context: context_size(&loaded, options),
        loaded,
        loops,
        caches: CachePool::new(options.cache_budget.unwrap_or_else(default_cache_budget)),
        inbox,
        sink,
    };
    worker.serve();
}

impl Worker<'_> {
    /// Serves requests in order until Shutdown or until every sender is gone.
    fn serve(&mut self) {
        // Requests that arrived while an answer ran, in order: every one is served.
        let mut pending = VecDeque::new();
        loop {
            let request = match pending.pop_front() {
                Some(r) => r,
                None => match self.inbox.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                },
            };
            match request {
                Request::Generate(job) => {
                    let arrived = self.answer(job);
                    pending.extend(arrived);
                }
                Request::Tokenize(job) => match self.encode(&job.prompt) {
                    Ok(ids) => (self.sink)(Event::Tokenized { id: job.id, ids }),
                    Err(e) => {
                        let (kind, message) = failure(e);
                        (self.sink)(Event::Failed {
                            id: job.id,
                            kind,
                            message,
                        });
                    }
                },
                // The kept caches change when next used.
                Request::SetLoops(n) => match self.loaded.model.check_loops(n) {
                    Ok(()) => {
                        self.loops = n;
                        (self.sink)(Event::LoopsChanged(n));
                    }
                    Err(e) => (self.sink)(Event::Error(e.to_string())),
                },
                Request::Reset => {
                    self.caches.clear();
                    (self.sink)(Event::ResetDone);
                }
                // Not running: drop it if it is still queued.
                Request::Cancel(id) => pending.retain(|r| !is_job(r, id)),
                Request::Shutdown => return,
            }
        }
    }

    /// Answers one job; returns the requests that arrived meanwhile, still to be served.
    fn answer(&mut self, job: GenerateJob) -> Vec<Request> {
        let mut deferred = Vec::new();
        if let Err((kind, message)) = self.run_job(&job, &mut deferred) {
            (self.sink)(Event::Failed {
                id: job.id,
                kind,
                message,
            });
        }
        deferred
    }

    fn run_job(
        &mut self,
        job: &GenerateJob,
        deferred: &mut Vec<Request>,
    ) -> Result<(), (FailureKind, String)> {
        let prompt = self.prompt(job).map_err(failure)?;
        let loops = job.loops.unwrap_or(self.loops);
        let model = &self.loaded.model;
        model.check_loops(loops).map_err(failure)?;
        let mut checkout = self
            .caches
            .checkout(model, &prompt.ids, job.cache_key.as_deref(), loops)
            .map_err(failure)?;
        // The last prompt position always runs again (its logits are not kept).
        let cached = checkout
            .cache
            .shared_prefix(&prompt.ids)
            .min(prompt.ids.len() - 1);
        (self.sink)(Event::Started {
            id: job.id,
            prompt_tokens: prompt.ids.len(),
            cached_tokens: cached,
        });
        let request = GenerateRequest {
            prompt: &prompt.ids,
            max_tokens: prompt.max_tokens,
            stop_ids: &self.loaded.stop_ids,
        };
        let mut streamer = Streamer {
            id: job.id,
            stream: self.loaded.tokenizer.as_ref().map(|t| t.stream()),
            sink: self.sink,
            inbox: &self.inbox,
            last: Instant::now(),
            deferred,
            loops: None,
        };
        let mut sampler = Sampler::new((&job.sampling).into());
        let generated = generate(
            model,
            &mut checkout.cache,
            &mut sampler,
            &request,
            &mut streamer,
        );
        if let Some(n) = streamer.loops {
            self.loops = n;
        }
        let out = generated.map_err(failure)?;
        if let Some(Ok(Some(rest))) = streamer.stream.as_mut().map(|s| s.finish()) {
            (self.sink)(Event::Token {
                id: job.id,
                text: rest,
                latency: Duration::ZERO,
            });
        }
        let m = &out.metrics;
        let context_used = checkout.cache.len();
        let loops = checkout.cache.loops();
        self.caches.keep(checkout);
        (self.sink)(Event::Done {
            id: job.id,
            stats: TurnStats {
                stop_reason: out.stop_reason,
                tokens: out.ids.len(),
                prompt_tokens: prompt.ids.len(),
                prefill_time: m.prefill,
                time_to_first_token: m.time_to_first_token,
                decode_time: m.token_latencies.iter().sum(),
                decode_tok_s: m.decode_tokens_per_second(),
                reused_tokens: m.reused_tokens,
                loops,
                context_used,
                kv_bytes: self.caches.bytes(),
                dropped_messages: prompt.dropped_messages,
            },
        });
        Ok(())
    }

    fn tokenizer(&self) -> crate::model::Result<&crate::model::TextTokenizer> {
        self.loaded
            .tokenizer
            .as_ref()
            .ok_or(ModelError::Encode("the model has no tokenizer".into()))
    }

    /// A prompt's ids as a generation would encode them, not fitted to the context.
    fn encode(&self, prompt: &Prompt) -> crate::model::Result<Vec<u32>> {
        match prompt {
            Prompt::Chat {
                messages, tools, ..
            } => encode_conversation(&self.loaded, self.tokenizer()?, messages, tools),
            Prompt::Text(text) => self.tokenizer()?.encode(text, true),
            Prompt::Ids(ids) => Ok(ids.clone()),
        }
    }

    /// The job's prompt ids, fitted to the context.
    fn prompt(&self, job: &GenerateJob) -> crate::model::Result<ConversationPrompt> {
        let tokenizer = || self.tokenizer();
        match &job.prompt {
            Prompt::Chat {
                messages,
                drop_oldest,
                tools,
            } => conversation_prompt(
                &self.loaded,
                tokenizer()?,
                messages,
                tools,
                job.max_tokens,
                self.context,
                *drop_oldest,
            ),
            Prompt::Text(text) => raw_prompt(
                tokenizer()?.encode(text, true)?,
                job.max_tokens,
                self.context,
            ),
            Prompt::Ids(ids) => raw_prompt(ids.clone(), job.max_tokens, self.context),
        }
    }
}

/// Whether `request` is the generation `id`.
fn is_job(request: &Request, id: RequestId) -> bool {
    matches!(request, Request::Generate(job) if job.id == id)
}

/// A model error as a request failure.
fn failure(e: ModelError) -> (FailureKind, String) {
    let kind = match e {
        ModelError::ContextOverflow { .. } => FailureKind::ContextLength,
        ModelError::Encode(_)
        | ModelError::EmptyInput
        | ModelError::TokenOutOfRange { .. }
        | ModelError::LoopCount(_)
        | ModelError::NoPltGates(_)
        | ModelError::Template { .. } => FailureKind::InvalidRequest,
        _ => FailureKind::Internal,
    };
    (kind, e.to_string())
}

/// Streams detokenized text to the sink and applies requests that arrive mid-answer.
struct Streamer<'a> {
    id: RequestId,
    stream: Option<TextStream<'a>>,
    inbox: &'a Receiver<Request>,
    sink: &'a dyn Fn(Event),
    last: Instant,
    /// Requests that are not for the running answer, in order, served after it.
    deferred: &'a mut Vec<Request>,
    /// A loop change that arrived during the answer, for later requests too.
    loops: Option<usize>,
}

impl GenerationObserver for Streamer<'_> {
    fn prefill_progress(&mut self, done: usize, total: usize) {
        (self.sink)(Event::PrefillProgress {
            id: self.id,
            done,
            total,
        });
    }

    fn token(&mut self, token: u32) -> StepControl {
        let latency = self.last.elapsed();
        self.last = Instant::now();
        let text = match self.stream.as_mut().map(|s| s.push(token)) {
            Some(Ok(chunk)) => chunk.unwrap_or_default(),
            Some(Err(e)) => {
                (self.sink)(Event::Error(e.to_string()));
                return StepControl::Stop;
            }
            None => format!(" {token}"),
        };
        (self.sink)(Event::Token {
            id: self.id,
            text,
            latency,
        });
        let mut control = StepControl::Continue;
        loop {
            match self.inbox.try_recv() {
                Ok(Request::Cancel(id)) if id == self.id => return StepControl::Stop,
                Ok(Request::Cancel(id)) => self.deferred.retain(|r| !is_job(r, id)),
                Ok(Request::SetLoops(n)) => {
                    (self.sink)(Event::LoopsChanged(n));
                    self.loops = Some(n);
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
