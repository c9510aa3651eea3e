//! The server's Prometheus figures: requests, tokens, latency histograms, the running and
//! waiting answers and the rows per decode step, KV bytes.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::{Event, RequestId};

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds (seconds) of the inter-token latency buckets.
const ITL_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram with fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: Duration) {
        let v = value.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *bound {
                *count += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What the histograms and per-route counters need a lock for.
struct Locked {
    requests: BTreeMap<(String, u16), u64>,
    /// Answers finished, by the loop count they ran with.
    answers_by_loops: BTreeMap<usize, u64>,
    /// Requests that have had their first token (whose latency is the TTFT, not a step).
    streaming: HashSet<RequestId>,
    ttft: Histogram,
    itl: Histogram,
}

/// Counters and gauges, updated from the engine's events and the HTTP layer.
pub struct Metrics {
    locked: Mutex<Locked>,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    queue: AtomicUsize,
    running: AtomicUsize,
    batch_rows: AtomicUsize,
    decode_steps: AtomicU64,
    decode_rows: AtomicU64,
    kv_bytes: AtomicUsize,
    loops: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            locked: Mutex::new(Locked {
                requests: BTreeMap::new(),
                answers_by_loops: BTreeMap::new(),
                streaming: HashSet::new(),
                ttft: Histogram::new(&TTFT_BUCKETS),
                itl: Histogram::new(&ITL_BUCKETS),
            }),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queue: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            batch_rows: AtomicUsize::new(0),
            decode_steps: AtomicU64::new(0),
            decode_rows: AtomicU64::new(0),
            kv_bytes: AtomicUsize::new(0),
            loops: AtomicUsize::new(0),
        }
    }
}

impl Metrics {
    fn locked(&self) -> std::sync::MutexGuard<'_, Locked> {
        self.locked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts an engine event.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::Loaded(info) => self.loops.store(info.loops, Ordering::Relaxed),
            Event::LoopsChanged(n) => self.loops.store(*n, Ordering::Relaxed),
            Event::Started {
                prompt_tokens,
                cached_tokens,
                ..
            } => {
                self.prompt_tokens
                    .fetch_add(*prompt_tokens as u64, Ordering::Relaxed);
                self.cached_tokens
                    .fetch_add(*cached_tokens as u64, Ordering::Relaxed);
            }
            Event::Token { id, latency, .. } => {
                let mut locked = self.locked();
                // The last chunk of text comes with no step of its own (zero latency).
                if !locked.streaming.insert(*id) && !latency.is_zero() {
                    locked.itl.observe(*latency);
                }
            }
            Event::Done { id, stats } => {
                self.kv_bytes.store(stats.kv_bytes, Ordering::Relaxed);
                self.generated_tokens
                    .fetch_add(stats.tokens as u64, Ordering::Relaxed);
                let mut locked = self.locked();
                locked.streaming.remove(id);
                *locked.answers_by_loops.entry(stats.loops).or_default() += 1;
                if stats.tokens > 0 {
                    locked.ttft.observe(stats.time_to_first_token);
                }
            }
            Event::Failed { id, .. } => {
                self.locked().streaming.remove(id);
            }
            Event::Step {
                running,
                waiting,
                rows,
            } => {
                self.running.store(*running, Ordering::Relaxed);
                self.queue.store(*waiting, Ordering::Relaxed);
                self.batch_rows.store(*rows, Ordering::Relaxed);
                if *rows > 0 {
                    self.decode_steps.fetch_add(1, Ordering::Relaxed);
                    self.decode_rows.fetch_add(*rows as u64, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    /// Counts one answered HTTP request.
    pub fn count_request(&self, route: &str, status: u16) {
        *self
            .locked()
            .requests
            .entry((route.to_owned(), status))
            .or_default() += 1;
    }

    /// Cached prompt tokens served so far.
    pub fn cached_tokens(&self) -> u64 {
        self.cached_tokens.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every figure.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let locked = self.locked();
        out.push_str("# HELP plait_requests_total HTTP requests answered, by route and status.\n# TYPE plait_requests_total counter\n");
        for ((route, status), n) in &locked.requests {
            let _ = writeln!(
                out,
                "plait_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP plait_answers_total Answers finished, by the loop count they ran with.\n# TYPE plait_answers_total counter\n");
        for (loops, n) in &locked.answers_by_loops {
            let _ = writeln!(out, "plait_answers_total{{loops=\"{loops}\"}} {n}");
        }
        let counters = [
            (
                "plait_prompt_tokens_total",
                "Prompt tokens of requests served (computed or cached).",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "plait_prompt_tokens_cached_total",
                "Prompt tokens served from a kept cache.",
                self.cached_tokens(),
            ),
            (
                "plait_generated_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "plait_decode_steps_total",
                "Decode steps run (each carries every running answer's loop rows).",
                self.decode_steps.load(Ordering::Relaxed),
            ),
            (
                "plait_decode_rows_total",
                "Rows the decode steps carried; over plait_decode_steps_total, rows per step.",
                self.decode_rows.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let gauges = [
            (
                "plait_queue_length",
                "Requests waiting for a place beside the running ones.",
                self.queue.load(Ordering::Relaxed),
            ),
            (
                "plait_running_answers",
                "Answers running together (prefilling or decoding).",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "plait_batch_rows",
                "Rows of the last decode step: the running answers' loops.",
                self.batch_rows.load(Ordering::Relaxed),
            ),
            (
                "plait_kv_cache_bytes",
                "Bytes the KV caches hold, running and kept (at the last answer's end).",
                self.kv_bytes.load(Ordering::Relaxed),
            ),
            (
                "plait_loops",
                "Loop count of requests that do not name one.",
                self.loops.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        locked.ttft.write(
            &mut out,
            "plait_time_to_first_token_seconds",
            "Time from a request's start to its first token.",
        );
        locked.itl.write(
            &mut out,
            "plait_inter_token_latency_seconds",
            "Time between tokens of an answer.",
        );
        out
    }
}
