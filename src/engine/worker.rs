//! The worker thread that owns the model and the kept caches and serves requests in order.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::DType;

use crate::model::{
    DeviceSpec, LoadedModel, ModelError, Placement, PltCache, Sampler, TextStream, PREFILL_CHUNK,
};

use super::caches::{default_cache_budget, CachePool, Checkout};
use super::conversation::{
    conversation_prompt, encode_conversation, raw_prompt, ConversationPrompt,
};
use super::generate::{GenerateRequest, Sequence};
use super::protocol::{
    Backend, Event, FailureKind, GenerateJob, LoopControl, ModelInfo, Prompt, Request, RequestId,
    TurnStats,
};

/// How many answers the worker runs together and how it fits new prompts in beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Answers running at once: every decode step carries the loop rows of all of them.
    /// More requests wait in order.
    pub max_conversations: usize,
    /// Prompt positions computed between two decode steps of the running answers, so a
    /// long new prompt delays them by at most one chunk per step.
    pub prefill_chunk: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_conversations: 4,
            prefill_chunk: PREFILL_CHUNK,
        }
    }
}

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
    /// Bytes the running and the kept caches may hold together (default: sized to the
    /// machine's memory); a request that would pass it waits for room.
    pub cache_budget: Option<usize>,
    /// Answers run together and the prompt chunk beside them.
    pub batching: Batching,
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

/// The loaded worker: the running answers, the requests waiting, the kept caches.
struct Worker<'m> {
    loaded: &'m LoadedModel,
    context: usize,
    /// Loop count of requests that do not name one.
    loops: usize,
    batching: Batching,
    /// Bytes the running and the kept caches may hold together.
    budget: usize,
    caches: CachePool,
    inbox: Receiver<Request>,
    sink: &'m dyn Fn(Event),
    waiting: VecDeque<Waiting>,
    running: Vec<Answer<'m>>,
    /// The last `Step` reported (running, waiting), so an idle loop says it once.
    reported: (usize, usize),
}

/// A request waiting for a place; its prompt is fitted once, when first considered.
struct Waiting {
    job: GenerateJob,
    prompt: Option<ConversationPrompt>,
}

/// A running answer: its sequence, its cache, and how it streams.
struct Answer<'m> {
    id: RequestId,
    checkout: Checkout,
    sequence: Sequence,
    sampler: Sampler,
    stream: Option<TextStream<'m>>,
    /// When its last token (or its request) was streamed.
    last: Instant,
    dropped_messages: usize,
    /// Whether it runs at the worker's loop count, so that a loop change moves it too.
    default_loops: bool,
    failed: Option<(FailureKind, String)>,
}

impl Answer<'_> {
    fn ended(&self) -> bool {
        self.failed.is_some() || self.sequence.stop_reason().is_some()
    }
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
    let budget = options.cache_budget.unwrap_or_else(default_cache_budget);
    let mut worker = Worker {
        context: context_size(&loaded, options),
        loaded: &loaded,
        loops,
        batching: Batching {
            max_conversations: options.batching.max_conversations.max(1),
            prefill_chunk: options.batching.prefill_chunk.max(1),
        },
        budget,
        caches: CachePool::new(budget),
        inbox,
        sink,
        waiting: VecDeque::new(),
        running: Vec::new(),
        reported: (0, 0),
    };
    worker.serve();
}

impl<'m> Worker<'m> {
    /// Serves until Shutdown, or until every sender is gone and nothing is left to answer:
    /// requests are taken between steps, so a cancel or a loop change lands at the next.
    fn serve(&mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                let Ok(request) = self.inbox.recv() else {
                    return;
                };
                if !self.handle(request) {
                    return;
                }
            }
            // Disconnected while answering: finish what runs, then the recv above ends it.
            while let Ok(request) = self.inbox.try_recv() {
                if !self.handle(request) {
                    return;
                }
            }
            self.admit();
            let rows = self.step();
            self.finish_ended();
            let counts = (self.running.len(), self.waiting.len());
            if rows > 0 || counts != self.reported {
                self.reported = counts;
                (self.sink)(Event::Step {
                    running: counts.0,
                    waiting: counts.1,
                    rows,
                });
            }
        }
    }

    /// Applies one request; false for Shutdown.
    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Generate(job) => self.waiting.push_back(Waiting { job, prompt: None }),
            Request::Tokenize(job) => match self.encode(&job.prompt) {
                Ok(ids) => (self.sink)(Event::Tokenized { id: job.id, ids }),
                Err(e) => self.fail(job.id, failure(e)),
            },
            Request::Cancel(id) => {
                self.waiting.retain(|w| w.job.id != id);
                for answer in self.running.iter_mut().filter(|a| a.id == id) {
                    answer.sequence.cancel();
                }
            }
            // Running answers at the worker's count change at their next step.
            Request::SetLoops(n) => match self.loaded.model.check_loops(n) {
                Ok(()) => {
                    self.loops = n;
                    let model = &self.loaded.model;
                    for answer in self.running.iter_mut().filter(|a| a.default_loops) {
                        if let Err(e) = model.set_loops(&mut answer.checkout.cache, n) {
                            answer.failed = Some(failure(e));
                        }
                    }
                    (self.sink)(Event::LoopsChanged(n));
                }
                Err(e) => (self.sink)(Event::Error(e.to_string())),
            },
            // Every request sent before the reset ends with it: those that fit start, so
            // that their answers end (cancelled) before the caches go.
            Request::Reset => {
                self.admit();
                for answer in &mut self.running {
                    answer.sequence.cancel();
                }
                self.finish_ended();
                self.caches.clear();
                (self.sink)(Event::ResetDone);
            }
            Request::Shutdown => return false,
        }
        true
    }

    fn fail(&self, id: RequestId, (kind, message): (FailureKind, String)) {
        (self.sink)(Event::Failed { id, kind, message });
    }

    /// Bytes the running answers' caches hold.
    fn running_bytes(&self) -> usize {
        let bytes = self.running.iter().map(|a| a.checkout.cache.size_bytes());
        bytes.sum()
    }

    /// Starts waiting requests in order while the conversation limit and the KV budget
    /// leave room (the first always starts when nothing runs); the kept caches give way.
    fn admit(&mut self) {
        let running = self.running.len();
        while self.running.len() < self.batching.max_conversations {
            let Some(Waiting { job, prompt }) = self.waiting.pop_front() else {
                break;
            };
            let loops = job.loops.unwrap_or(self.loops);
            let model = &self.loaded.model;
            let fitted = match prompt {
                Some(prompt) => Ok(prompt),
                None => self.prompt(&job),
            };
            let prompt = match fitted.and_then(|p| model.check_loops(loops).map(|()| p)) {
                Ok(prompt) => prompt,
                Err(e) => {
                    self.fail(job.id, failure(e));
                    continue;
                }
            };
            let positions = prompt.ids.len() + prompt.max_tokens;
            let needs = model.decode_kv_bytes(positions, loops) as usize;
            if !self.running.is_empty() && self.running_bytes() + needs > self.budget {
                let prompt = Some(prompt);
                self.waiting.push_front(Waiting { job, prompt });
                break;
            }
            if let Err(e) = self.begin(&job, prompt, loops) {
                self.fail(job.id, failure(e));
            }
        }
        if self.running.len() > running {
            self.caches.trim(self.running_bytes());
        }
    }

    /// Takes the cache for `job` and starts its answer.
    fn begin(
        &mut self,
        job: &GenerateJob,
        prompt: ConversationPrompt,
        loops: usize,
    ) -> crate::model::Result<()> {
        let loaded = self.loaded;
        let mut checkout =
            self.caches
                .checkout(&loaded.model, &prompt.ids, job.cache_key.as_deref(), loops)?;
        let request = GenerateRequest {
            prompt: &prompt.ids,
            max_tokens: prompt.max_tokens,
            stop_ids: &loaded.stop_ids,
        };
        let sequence = Sequence::start(&loaded.model, &mut checkout.cache, &request)?;
        (self.sink)(Event::Started {
            id: job.id,
            prompt_tokens: prompt.ids.len(),
            cached_tokens: sequence.reused_tokens(),
        });
        self.running.push(Answer {
            id: job.id,
            checkout,
            sequence,
            sampler: Sampler::new((&job.sampling).into()),
            stream: loaded.tokenizer.as_ref().map(|t| t.stream()),
            last: Instant::now(),
            dropped_messages: prompt.dropped_messages,
            default_loops: job.loops.is_none(),
            failed: None,
        });
        Ok(())
    }

    /// One step: a chunk of the first prompt still to compute, then one decode step of
    /// every answer with a token due, all in one batch. Returns the decode step's rows.
    fn step(&mut self) -> usize {
        let model = &self.loaded.model;
        let chunk = self.batching.prefill_chunk;
        if let Some(answer) = self
            .running
            .iter_mut()
            .find(|a| !a.ended() && a.sequence.is_prefilling())
        {
            match answer
                .sequence
                .prefill_chunk(model, &mut answer.checkout.cache, chunk)
            {
                Ok((done, total)) => {
                    (self.sink)(Event::PrefillProgress {
                        id: answer.id,
                        done,
                        total,
                    });
                    if !answer.sequence.is_prefilling() {
                        stream_next(answer, self.sink);
                    }
                }
                Err(e) => answer.failed = Some(failure(e)),
            }
        }
        let mut due: Vec<(&mut Answer<'m>, u32)> = self
            .running
            .iter_mut()
            .filter(|a| a.failed.is_none())
            .filter_map(|a| a.sequence.due().map(|id| (a, id)))
            .collect();
        if due.is_empty() {
            return 0;
        }
        let ids: Vec<u32> = due.iter().map(|(_, id)| *id).collect();
        let stepped = {
            let mut caches: Vec<&mut PltCache> =
                due.iter_mut().map(|(a, _)| &mut a.checkout.cache).collect();
            model.decode_batch(&mut caches, &ids)
        };
        let rows = due.iter().map(|(a, _)| a.checkout.cache.loops()).sum();
        match stepped {
            Ok(logits) => {
                for ((answer, _), logits) in due.into_iter().zip(logits) {
                    answer.sequence.stepped(logits);
                    stream_next(answer, self.sink);
                }
            }
            Err(e) => {
                let failed = failure(e);
                for (answer, _) in due {
                    answer.failed = Some(failed.clone());
                }
            }
        }
        rows
    }

    /// Reports the answers that ended and keeps their caches (not a failed one's).
    fn finish_ended(&mut self) {
        let (ended, running) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(Answer::ended);
        self.running = running;
        for answer in ended {
            self.finish(answer);
        }
    }

    fn finish(&mut self, mut answer: Answer<'m>) {
        if let Some(failed) = answer.failed.take() {
            self.fail(answer.id, failed);
            return;
        }
        if let Some(Ok(Some(rest))) = answer.stream.as_mut().map(|s| s.finish()) {
            (self.sink)(Event::Token {
                id: answer.id,
                text: rest,
                latency: Duration::ZERO,
            });
        }
        let out = answer.sequence.finish();
        let m = &out.metrics;
        let context_used = answer.checkout.cache.len();
        let loops = answer.checkout.cache.loops();
        self.caches.keep(answer.checkout, self.running_bytes());
        (self.sink)(Event::Done {
            id: answer.id,
            stats: TurnStats {
                stop_reason: out.stop_reason,
                tokens: out.ids.len(),
                prompt_tokens: m.prefill_tokens + m.reused_tokens,
                prefill_time: m.prefill,
                time_to_first_token: m.time_to_first_token,
                decode_time: m.token_latencies.iter().sum(),
                decode_tok_s: m.decode_tokens_per_second(),
                reused_tokens: m.reused_tokens,
                loops,
                context_used,
                kv_bytes: self.caches.bytes() + self.running_bytes(),
                dropped_messages: answer.dropped_messages,
            },
        });
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
            } => encode_conversation(self.loaded, self.tokenizer()?, messages, tools),
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
                self.loaded,
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

/// Samples `answer`'s next token from its fresh logits and streams its text.
fn stream_next(answer: &mut Answer<'_>, sink: &dyn Fn(Event)) {
    let token = match answer.sequence.sample(&mut answer.sampler) {
        Ok(Some(token)) => token,
        Ok(None) => return,
        Err(e) => {
            answer.failed = Some(failure(e));
            return;
        }
    };
    let latency = answer.last.elapsed();
    answer.last = Instant::now();
    let text = match answer.stream.as_mut().map(|s| s.push(token)) {
        Some(Ok(chunk)) => chunk.unwrap_or_default(),
        Some(Err(e)) => {
            sink(Event::Error(e.to_string()));
            answer.sequence.cancel();
            return;
        }
        None => format!(" {token}"),
    };
    sink(Event::Token {
        id: answer.id,
        text,
        latency,
    });
}
