//! Between HTTP handlers and the engine's worker: each request's events routed to its own
//! channel, a bounded number of requests admitted, and a ticket whose drop cancels.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::{
    Backend, Event, GenerateJob, ModelInfo, Prompt, Request, RequestId, TokenizeJob,
};

use super::metrics::Metrics;

/// Whether the model can serve.
#[derive(Debug, Clone)]
pub enum ModelStatus {
    /// Loading, this fraction done.
    Loading(f32),
    /// Ready.
    Ready(ModelInfo),
    /// It could not be loaded.
    Failed(String),
}

/// What the engine's sink and the handlers share.
pub struct Routes {
    channels: Mutex<HashMap<RequestId, UnboundedSender<Event>>>,
    status: Mutex<ModelStatus>,
    /// Prometheus figures.
    pub metrics: Metrics,
}

/// A poisoned lock only means a panic elsewhere; the map itself is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Routes {
    /// Nothing routed yet; the model loading.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            channels: Mutex::new(HashMap::new()),
            status: Mutex::new(ModelStatus::Loading(0.0)),
            metrics: Metrics::default(),
        })
    }

    /// The engine's sink: model events update the status, request events go to their
    /// request's channel (dropped when its client has gone).
    pub fn dispatch(&self, event: Event) {
        self.metrics.observe(&event);
        let id = match &event {
            Event::Loading(p) => {
                *lock(&self.status) = ModelStatus::Loading(*p);
                return;
            }
            Event::Loaded(info) => {
                *lock(&self.status) = ModelStatus::Ready(info.clone());
                return;
            }
            Event::LoadFailed(message) => {
                *lock(&self.status) = ModelStatus::Failed(message.clone());
                return;
            }
            Event::LoopsChanged(n) => {
                if let ModelStatus::Ready(info) = &mut *lock(&self.status) {
                    info.loops = *n;
                }
                return;
            }
            Event::Started { id, .. }
            | Event::PrefillProgress { id, .. }
            | Event::Token { id, .. }
            | Event::Done { id, .. }
            | Event::Failed { id, .. }
            | Event::Reasoning { id, .. }
            | Event::Tokenized { id, .. } => *id,
            Event::ResetDone
            | Event::Error(_)
            | Event::Notice(_)
            | Event::Unavailable(_)
            | Event::Step { .. } => return,
        };
        let channels = lock(&self.channels);
        if let Some(channel) = channels.get(&id) {
            let _ = channel.send(event);
        }
    }

    /// The model's status now.
    pub fn status(&self) -> ModelStatus {
        lock(&self.status).clone()
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full.
    Busy,
    /// The server is shutting down.
    Closing,
}

/// The server's side of the engine.
pub struct Hub {
    backend: Box<dyn Backend + Send + Sync>,
    /// Shared with the engine's sink.
    pub routes: Arc<Routes>,
    next_id: AtomicU64,
    /// Requests admitted and not yet finished (running or waiting).
    in_flight: AtomicUsize,
    /// Most requests admitted at once: the running ones and the queue.
    limit: usize,
    closing: AtomicBool,
}

impl Hub {
    /// A hub over `backend`, whose events reach `routes`, admitting the `running` requests
    /// the engine answers together and `queue_length` more.
    pub fn new(
        backend: Box<dyn Backend + Send + Sync>,
        routes: Arc<Routes>,
        running: usize,
        queue_length: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            backend,
            routes,
            next_id: AtomicU64::new(1),
            in_flight: AtomicUsize::new(0),
            limit: running + queue_length,
            closing: Default::default(),
        })
    }

    /// Queues `job` (its id is assigned here) unless the queue is full.
    pub fn submit(self: &Arc<Self>, mut job: GenerateJob) -> Result<Ticket, Refusal> {
        self.admit(move |id| {
            job.id = id;
            Request::Generate(job)
        })
    }

    /// Queues the encoding of `prompt` unless the queue is full; it ends with `Tokenized`.
    pub fn tokenize(self: &Arc<Self>, prompt: Prompt) -> Result<Ticket, Refusal> {
        self.admit(move |id| Request::Tokenize(TokenizeJob { id, prompt }))
    }

    /// Admits the request `make` builds for a fresh id, unless the queue is full.
    fn admit(self: &Arc<Self>, make: impl FnOnce(RequestId) -> Request) -> Result<Ticket, Refusal> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Refusal::Closing);
        }
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .map_err(|_| Refusal::Busy)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, events) = unbounded_channel();
        lock(&self.routes.channels).insert(id, sender);
        self.backend.send(make(id));
        Ok(Ticket {
            id,
            events,
            hub: Arc::clone(self),
            finished: false,
        })
    }

    /// Refuses new requests from now on.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }
}

/// One admitted request: its events, in order; dropping it before the end cancels it.
pub struct Ticket {
    id: RequestId,
    events: UnboundedReceiver<Event>,
    hub: Arc<Hub>,
    finished: bool,
}

impl Ticket {
    /// The next event; `None` only if the engine went away.
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.events.recv().await;
        if matches!(
            event,
            None | Some(Event::Done { .. } | Event::Failed { .. } | Event::Tokenized { .. })
        ) {
            self.finished = true;
        }
        event
    }

    /// Stops the generation now (a stop string was met).
    pub fn cancel(&self) {
        self.hub.backend.send(Request::Cancel(self.id));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            // The client went away (or the answer was cut short): free the worker.
            self.cancel();
        }
        lock(&self.hub.routes.channels).remove(&self.id);
        self.hub.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
