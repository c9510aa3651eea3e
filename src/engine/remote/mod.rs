//! The engine protocol over HTTP: a backend that answers with any OpenAI-compatible server
//! (plait serve, vLLM, llama.cpp's server) by streaming `/v1/chat/completions`, fitting the
//! conversation to the server's context as the local engine does, and measuring the answer
//! on the client.

mod http;
mod server;
mod stream;

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::conversation::{answer_room, DropOrder};
use super::generate::StopReason;
use super::protocol::{
    Backend, ChatMessage, Event, EventSink, FailureKind, GenerateJob, LoopControl, Prompt, Request,
    RequestId, SamplingParams, TurnStats,
};
use http::{is_context_error, Http, HttpError};
use server::{wire_messages, Dialect, Server};
use stream::{Chunk, SseLines, Usage};

/// How the remote backend reaches its server.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// The server's address, with or without `/v1`.
    pub url: String,
    /// Sent as a bearer token when set.
    pub api_key: Option<String>,
    /// Where the user sets the key, for the message when the server refuses it.
    pub key_setting: String,
    /// The model to ask for (default: the first the server lists).
    pub model: Option<String>,
    /// Fields added to every request body as they are (vLLM's `top_k`, ...).
    pub extra: Map<String, Value>,
    /// The context size when the server does not say it.
    pub context_size: Option<usize>,
    /// The loop count to ask a plait server for (default: the server's).
    pub loops: Option<usize>,
    /// Tries of a request the server answers with 5xx (or does not answer), the first included.
    pub tries: u32,
    /// The wait before the second try; it doubles after each.
    pub retry_delay: Duration,
}

impl RemoteOptions {
    /// Options for `url` with the defaults: no key, the server's first model, 4 tries.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            api_key: None,
            key_setting: "--api-key or PLAIT_API_KEY".into(),
            model: None,
            extra: Map::new(),
            context_size: None,
            loops: None,
            tries: 4,
            retry_delay: Duration::from_millis(500),
        }
    }
}

/// The longest wait between two tries to reach a server that is down at the start.
const MAX_CONNECT_DELAY: Duration = Duration::from_secs(10);

/// A front end's side of a remote server; events arrive through the sink given to `spawn`.
pub struct RemoteBackend {
    requests: mpsc::UnboundedSender<Request>,
    task: tokio::task::JoinHandle<()>,
}

impl RemoteBackend {
    /// Starts the client on the current tokio runtime: it finds the server (retrying until
    /// it answers) and then serves requests in order, reporting to `sink`.
    pub fn spawn(options: RemoteOptions, sink: EventSink) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| std::io::Error::other(format!("the remote client needs tokio: {e}")))?;
        let http = Http::new(options.api_key.clone()).map_err(std::io::Error::other)?;
        let options_loops = options.loops;
        let (requests, inbox) = mpsc::unbounded_channel();
        let worker = Worker {
            client: Client {
                http,
                options,
                sink: Mutex::new(sink),
            },
            inbox,
            pending: Pending {
                queue: VecDeque::new(),
                loops: options_loops,
            },
        };
        let task = runtime.spawn(worker.run());
        Ok(Self { requests, task })
    }
}

impl Backend for RemoteBackend {
    fn send(&self, request: Request) {
        // A send fails only once the client has stopped: nothing to do.
        let _ = self.requests.send(request);
    }
}

impl Drop for RemoteBackend {
    fn drop(&mut self) {
        // Closing the requests ends the client; aborting also closes a stream in progress.
        self.task.abort();
    }
}

/// What an answer needs: HTTP, the options and the sink.
struct Client {
    http: Http,
    options: RemoteOptions,
    /// Behind a lock so that the task, which holds it across awaits, can move threads.
    sink: Mutex<EventSink>,
}

/// The client's task: the requests as they come, and what they leave for later.
struct Worker {
    client: Client,
    inbox: mpsc::UnboundedReceiver<Request>,
    pending: Pending,
}

/// What requests leave for the next answers.
struct Pending {
    /// Generations waiting, in order.
    queue: VecDeque<GenerateJob>,
    /// The loop count asked for, sent with requests to a plait server.
    loops: Option<usize>,
}

impl Pending {
    /// A request served at once: a generation queues, a loop change applies to the next
    /// request, a cancel drops a queued one.
    fn apply(&mut self, client: &Client, request: Request) {
        match request {
            Request::Generate(job) => self.queue.push_back(job),
            Request::Cancel(id) => self.queue.retain(|job| job.id != id),
            Request::SetLoops(n) => {
                self.loops = Some(n);
                client.emit(Event::LoopsChanged(n));
            }
            // The server keeps no conversation to forget: its prompt cache is its own.
            Request::Reset => client.emit(Event::ResetDone),
            Request::Tokenize(job) => client.fail(
                job.id,
                FailureKind::InvalidRequest,
                "the remote client does not tokenize".into(),
            ),
            Request::Shutdown => {}
        }
    }

    /// A request that comes while the server is not found yet.
    fn before_connected(&mut self, client: &Client, request: Request) {
        match request {
            Request::Generate(GenerateJob { id, .. })
            | Request::Tokenize(super::protocol::TokenizeJob { id, .. }) => client.fail(
                id,
                FailureKind::Unavailable,
                format!("not connected to {} yet", client.options.url),
            ),
            Request::SetLoops(n) => self.loops = Some(n),
            other => self.apply(client, other),
        }
    }
}

impl Client {
    fn emit(&self, event: Event) {
        let sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        sink(event);
    }

    fn fail(&self, id: RequestId, kind: FailureKind, message: String) {
        self.emit(Event::Failed { id, kind, message });
    }

    /// The message for a failure, naming the key setting when the key was refused.
    fn describe(&self, e: &HttpError) -> String {
        match e {
            HttpError::Unauthorized { .. } => format!(
                "{e}: check the API key ({}){}",
                self.options.key_setting,
                if self.options.api_key.is_none() {
                    "; none is set"
                } else {
                    ""
                }
            ),
            e => e.to_string(),
        }
    }
}

impl Worker {
    async fn run(mut self) {
        self.client.emit(Event::Loading(0.0));
        let Some(server) = self.connect().await else {
            return;
        };
        let mut info = server.model_info();
        if let (LoopControl::NextRequest, Some(loops)) = (info.loop_control, self.pending.loops) {
            info.loops = loops;
        }
        self.client.emit(Event::Loaded(info));
        self.serve(&server).await;
    }

    /// Finds the server, retrying while it is not reachable; `None` when told to stop or
    /// when it refuses (the reason is reported).
    async fn connect(&mut self) -> Option<Server> {
        let mut delay = self.client.options.retry_delay;
        loop {
            let options = &self.client.options;
            let found = Server::discover(
                &self.client.http,
                &options.url,
                options.model.as_deref(),
                options.context_size,
            )
            .await;
            match found {
                Ok((server, notice)) => {
                    if let Some(notice) = notice {
                        self.client.emit(Event::Notice(notice));
                    }
                    return Some(server);
                }
                Err(e) if e.retryable() => self.client.emit(Event::Unavailable(format!(
                    "{e}; trying again every few seconds"
                ))),
                Err(e) => {
                    self.client
                        .emit(Event::LoadFailed(self.client.describe(&e)));
                    // Keep answering until told to stop, so the UI never waits on a dead channel.
                    while let Some(request) = self.inbox.recv().await {
                        if request == Request::Shutdown {
                            break;
                        }
                    }
                    return None;
                }
            }
            let deadline = tokio::time::sleep(delay);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    request = self.inbox.recv() => match request {
                        None | Some(Request::Shutdown) => return None,
                        Some(request) => self.pending.before_connected(&self.client, request),
                    },
                }
            }
            delay = (delay * 2).min(MAX_CONNECT_DELAY);
        }
    }

    /// Serves requests in order until Shutdown or until the front end is gone.
    async fn serve(&mut self, server: &Server) {
        loop {
            let job = match self.pending.queue.pop_front() {
                Some(job) => job,
                None => match self.inbox.recv().await {
                    None | Some(Request::Shutdown) => return,
                    Some(request) => {
                        self.pending.apply(&self.client, request);
                        continue;
                    }
                },
            };
            let (cancel, cancelled) = oneshot::channel::<()>();
            let mut cancel = Some(cancel);
            let loops = self.pending.loops;
            let answer = answer(&self.client, server, &job, loops, cancelled);
            tokio::pin!(answer);
            let mut stop = false;
            loop {
                if stop {
                    // Cancelled above: let the answer report its end, then stop.
                    (&mut answer).await;
                    return;
                }
                tokio::select! {
                    () = &mut answer => break,
                    request = self.inbox.recv() => match request {
                        // Dropping the sender cancels: the answer closes its stream, which is
                        // how a server learns of it.
                        Some(Request::Cancel(id)) if id == job.id => drop(cancel.take()),
                        None | Some(Request::Shutdown) => {
                            drop(cancel.take());
                            stop = true;
                        }
                        // A generation queues behind this one; the rest apply now, a new
                        // conversation once this answer is stopped.
                        Some(request) => {
                            if request == Request::Reset {
                                drop(cancel.take());
                            }
                            self.pending.apply(&self.client, request);
                        }
                    },
                }
            }
        }
    }
}

/// Why a request to the server did not get a streaming answer.
enum Failure {
    /// The front end cancelled first.
    Cancelled,
    /// The server failed (after the retries, for the kinds worth retrying).
    Http(HttpError),
}

/// Answers `job` on `server`: fits the conversation to the context, streams the answer,
/// and reports every event; a message on `cancelled` (or its sender dropped) stops it.
async fn answer(
    client: &Client,
    server: &Server,
    job: &GenerateJob,
    loops: Option<usize>,
    mut cancelled: oneshot::Receiver<()>,
) {
    let Prompt::Chat {
        messages,
        drop_oldest,
        ..
    } = &job.prompt
    else {
        return client.fail(
            job.id,
            FailureKind::InvalidRequest,
            "a remote server answers conversations, not raw prompts".into(),
        );
    };
    let loops = job.loops.or(loops).or(match server.dialect {
        Dialect::Plait { loops, .. } => Some(loops),
        _ => None,
    });
    let mut order = DropOrder::new(messages);
    let room = answer_room(job.max_tokens, server.context);
    let mut shortened = false;
    loop {
        let (prompt_tokens, kept) = loop {
            let kept = order.kept();
            let (n, notice) = server.count(&client.http, &kept).await;
            if let Some(notice) = notice {
                client.emit(Event::Notice(notice));
            }
            if n + room <= server.context {
                break (n, kept);
            }
            if !drop_oldest || !order.drop_oldest() {
                return client.fail(
                    job.id,
                    FailureKind::ContextLength,
                    format!(
                        "the conversation takes {n} tokens and the answer {room} more, past the server's context of {} tokens",
                        server.context
                    ),
                );
            }
        };
        let max_tokens = job
            .max_tokens
            .unwrap_or(usize::MAX)
            .min(server.context - prompt_tokens);
        let body = request_body(
            server,
            &client.options,
            &kept,
            &job.sampling,
            max_tokens,
            loops,
        );
        let measured = Measured::new(Instant::now(), prompt_tokens, order.dropped(), loops);
        let url = format!("{}/chat/completions", server.v1);
        let response = match post_with_retries(client, &url, &body, &mut cancelled).await {
            Ok(response) => response,
            Err(Failure::Cancelled) => {
                return client.emit(Event::Done {
                    id: job.id,
                    stats: measured.finish(StopReason::Cancelled),
                });
            }
            Err(Failure::Http(HttpError::Refused(message)))
                if is_context_error(&message)
                    && *drop_oldest
                    && !shortened
                    && order.drop_oldest() =>
            {
                // The count was an estimate, or the server counts otherwise: try once more.
                shortened = true;
                client.emit(Event::Notice(
                    "the server says the conversation is too long: leaving out its oldest messages and trying once more".into(),
                ));
                continue;
            }
            Err(Failure::Http(e)) => {
                let kind = match &e {
                    HttpError::Unauthorized { .. } => FailureKind::Unauthorized,
                    HttpError::Unreachable { .. } | HttpError::Server { .. } => {
                        FailureKind::Unavailable
                    }
                    HttpError::Refused(message) if is_context_error(message) => {
                        FailureKind::ContextLength
                    }
                    HttpError::Refused(_) => FailureKind::InvalidRequest,
                };
                return client.fail(job.id, kind, client.describe(&e));
            }
        };
        client.emit(Event::Started {
            id: job.id,
            prompt_tokens,
            cached_tokens: 0,
        });
        return stream_answer(client, job.id, response, measured, &mut cancelled).await;
    }
}

/// POSTs `body`, trying again with a doubling wait while the server answers 5xx or does
/// not answer, as many times as the options say; each retry is reported.
async fn post_with_retries(
    client: &Client,
    url: &str,
    body: &Value,
    cancelled: &mut oneshot::Receiver<()>,
) -> Result<reqwest::Response, Failure> {
    let tries = client.options.tries.max(1);
    let mut delay = client.options.retry_delay;
    for attempt in 1..=tries {
        let posted = tokio::select! {
            posted = client.http.post(url, body) => posted,
            _ = &mut *cancelled => return Err(Failure::Cancelled),
        };
        match posted {
            Ok(response) => return Ok(response),
            Err(e) if e.retryable() && attempt < tries => {
                client.emit(Event::Notice(format!(
                    "{e}; trying again in {:.1} s ({attempt} of {tries} tries)",
                    delay.as_secs_f64()
                )));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = &mut *cancelled => return Err(Failure::Cancelled),
                }
                delay *= 2;
            }
            Err(e) => return Err(Failure::Http(e)),
        }
    }
    Err(Failure::Http(HttpError::Refused(format!(
        "{url}: no try left"
    ))))
}

/// The chat completion request for `messages`.
fn request_body(
    server: &Server,
    options: &RemoteOptions,
    messages: &[ChatMessage],
    sampling: &SamplingParams,
    max_tokens: usize,
    loops: Option<usize>,
) -> Value {
    let mut body = json!({
        "model": server.model,
        "messages": wire_messages(messages),
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_tokens": max_tokens,
        // Sent always: the API's default is 1, the engine's greedy 0.
        "temperature": sampling.temperature,
    });
    if sampling.top_p < 1.0 {
        body["top_p"] = json!(sampling.top_p);
    }
    if sampling.top_k > 0 {
        body["top_k"] = json!(sampling.top_k);
    }
    if sampling.min_p > 0.0 {
        body["min_p"] = json!(sampling.min_p);
    }
    if sampling.repetition_penalty != 1.0 {
        let name = match server.dialect {
            Dialect::LlamaCpp => "repeat_penalty",
            _ => "repetition_penalty",
        };
        body[name] = json!(sampling.repetition_penalty);
    }
    if sampling.temperature > 0.0 {
        body["seed"] = json!(sampling.seed);
    }
    if let (Dialect::Plait { .. }, Some(loops)) = (&server.dialect, loops) {
        body["plait"] = json!({ "loops": loops });
    }
    for (name, value) in &options.extra {
        body[name] = value.clone();
    }
    body
}

/// An answer's figures as the client measures them.
struct Measured {
    started: Instant,
    last: Instant,
    first: Option<Duration>,
    decode_time: Duration,
    deltas: usize,
    prompt_tokens: usize,
    dropped: usize,
    loops: Option<usize>,
    usage: Usage,
}

impl Measured {
    fn new(started: Instant, prompt_tokens: usize, dropped: usize, loops: Option<usize>) -> Self {
        Self {
            started,
            last: started,
            first: None,
            decode_time: Duration::ZERO,
            deltas: 0,
            prompt_tokens,
            dropped,
            loops,
            usage: Usage::default(),
        }
    }

    /// A delta arrived: the time since the previous one (or since the request).
    fn delta(&mut self) -> Duration {
        let now = Instant::now();
        let latency = now - self.last;
        self.last = now;
        if self.first.is_none() {
            self.first = Some(now - self.started);
        } else {
            self.decode_time += latency;
        }
        self.deltas += 1;
        latency
    }

    fn finish(&self, stop_reason: StopReason) -> TurnStats {
        let tokens = self.usage.completion.unwrap_or(self.deltas);
        let prompt_tokens = self.usage.prompt.unwrap_or(self.prompt_tokens);
        let first = self.first.unwrap_or_else(|| self.started.elapsed());
        let decode_tok_s = if self.decode_time.is_zero() {
            0.0
        } else {
            tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64()
        };
        TurnStats {
            stop_reason,
            tokens,
            prompt_tokens,
            prefill_time: first,
            time_to_first_token: first,
            decode_time: self.decode_time,
            decode_tok_s,
            reused_tokens: self.usage.cached.unwrap_or(0),
            loops: self.loops.unwrap_or(0),
            context_used: prompt_tokens + tokens,
            kv_bytes: 0,
            dropped_messages: self.dropped,
        }
    }
}

/// Reads the streamed answer into events until its end, a cancel, or a cut.
async fn stream_answer(
    client: &Client,
    id: RequestId,
    response: reqwest::Response,
    mut measured: Measured,
    cancelled: &mut oneshot::Receiver<()>,
) {
    let mut bytes = response.bytes_stream();
    let mut lines = SseLines::default();
    let mut finish: Option<String> = None;
    let mut done = false;
    while !done {
        let read = tokio::select! {
            read = bytes.next() => read,
            _ = &mut *cancelled => {
                return client.emit(Event::Done { id, stats: measured.finish(StopReason::Cancelled) });
            }
        };
        let data = match read {
            None => break,
            Some(Ok(data)) => data,
            Some(Err(e)) => {
                let e = HttpError::unreachable("the answer's stream", &e);
                return client.fail(
                    id,
                    FailureKind::Interrupted,
                    format!("the answer stopped before its end: {e}"),
                );
            }
        };
        for line in lines.push(&data) {
            if line == "[DONE]" {
                done = true;
                break;
            }
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let chunk = Chunk::parse(&value);
            if let Some(message) = chunk.error {
                return client.fail(id, FailureKind::Interrupted, message);
            }
            if let Some(text) = chunk.reasoning {
                measured.delta();
                client.emit(Event::Reasoning { id, text });
            }
            if let Some(text) = chunk.content {
                let latency = measured.delta();
                client.emit(Event::Token { id, text, latency });
            }
            if chunk.finish_reason.is_some() {
                finish = chunk.finish_reason;
            }
            if chunk.loops.is_some() {
                measured.loops = chunk.loops;
            }
            if let Some(usage) = chunk.usage {
                measured.usage = Usage {
                    prompt: usage.prompt.or(measured.usage.prompt),
                    completion: usage.completion.or(measured.usage.completion),
                    cached: usage.cached.or(measured.usage.cached),
                };
            }
        }
    }
    // A server may end without `[DONE]` once it has said why the answer ended.
    let finish = match finish {
        Some(finish) => finish,
        None if done => String::new(),
        None => {
            return client.fail(
                id,
                FailureKind::Interrupted,
                "the answer's stream stopped before its end".into(),
            )
        }
    };
    let stop_reason = if finish == "length" {
        StopReason::MaxTokens
    } else {
        StopReason::Eos
    };
    client.emit(Event::Done {
        id,
        stats: measured.finish(stop_reason),
    });
}
