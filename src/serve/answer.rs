//! One answer in progress: engine events as text, with stop strings applied.

use std::sync::Arc;

use crate::engine::{Event, GenerateJob, TurnStats};

use super::hub::{Hub, Ticket};
use super::openai::{ApiError, StopText};

/// What an answer did next.
pub enum Step {
    /// Text that is final.
    Text(String),
    /// The prompt is being computed (a chance to keep the stream alive).
    Progress,
    /// The answer ended; whether a stop string ended it.
    Done(TurnStats, bool),
    /// It failed.
    Failed(ApiError),
}

/// An admitted request whose prompt the engine has started on.
pub struct Answer {
    ticket: Ticket,
    stop: StopText,
    stopped: bool,
    done: Option<TurnStats>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Of those, served from a kept cache.
    pub cached_tokens: usize,
}

impl Answer {
    /// Queues `job` and waits until the engine starts on it (or refuses it); the prompt's
    /// failures name `prompt_param`.
    pub async fn start(
        hub: &Arc<Hub>,
        job: GenerateJob,
        stops: Vec<String>,
        prompt_param: &str,
    ) -> Result<Self, ApiError> {
        let mut ticket = hub.submit(job)?;
        loop {
            match ticket.next().await {
                Some(Event::Started {
                    prompt_tokens,
                    cached_tokens,
                    ..
                }) => {
                    return Ok(Self {
                        ticket,
                        stop: StopText::new(stops),
                        stopped: false,
                        done: None,
                        prompt_tokens,
                        cached_tokens,
                    })
                }
                Some(Event::Failed { kind, message, .. }) => {
                    return Err(ApiError::from_failure(kind, message, prompt_param))
                }
                Some(_) => {}
                None => return Err(engine_gone()),
            }
        }
    }

    /// The next step of the answer; after `Done` or `Failed` it is not called again.
    pub async fn next(&mut self) -> Step {
        if let Some(stats) = self.done.take() {
            return Step::Done(stats, self.stopped);
        }
        loop {
            match self.ticket.next().await {
                Some(Event::Token { text, .. }) => {
                    if self.stopped {
                        continue;
                    }
                    let (out, stopped) = self.stop.push(&text);
                    if stopped {
                        self.stopped = true;
                        self.ticket.cancel();
                    }
                    if !out.is_empty() {
                        return Step::Text(out);
                    }
                }
                Some(Event::PrefillProgress { .. }) => return Step::Progress,
                Some(Event::Done { stats, .. }) => {
                    let rest = self.stop.finish();
                    if rest.is_empty() || self.stopped {
                        return Step::Done(stats, self.stopped);
                    }
                    self.done = Some(stats);
                    return Step::Text(rest);
                }
                Some(Event::Failed { kind, message, .. }) => {
                    return Step::Failed(ApiError::from_failure(kind, message, ""))
                }
                Some(_) => {}
                None => return Step::Failed(engine_gone()),
            }
        }
    }

    /// The whole answer's text and figures, for a response that does not stream.
    pub async fn collect(mut self) -> Result<(String, TurnStats, bool), ApiError> {
        let mut text = String::new();
        loop {
            match self.next().await {
                Step::Text(t) => text.push_str(&t),
                Step::Progress => {}
                Step::Done(stats, stopped) => return Ok((text, stats, stopped)),
                Step::Failed(e) => return Err(e),
            }
        }
    }
}

/// The error when the engine's worker has gone away.
pub fn engine_gone() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        "the engine stopped",
    )
}
