//! What the OpenAI endpoints share: the error shape, request parsing that names the field,
//! sampling fields, stop strings, usage and timings.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{FailureKind, SamplingParams, TurnStats, MAX_LOOPS};

use super::hub::Refusal;

/// An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: Option<u32>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    /// Any other status, of the given type and code.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
            retry_after: None,
        }
    }

    /// The server cannot take the request now; clients retry after `seconds`.
    pub fn unavailable(message: impl Into<String>, seconds: u32) -> Self {
        Self {
            retry_after: Some(seconds),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("server_busy"),
                message,
            )
        }
    }

    /// The request's failure in the engine; `prompt_param` names the prompt field.
    pub fn from_failure(kind: FailureKind, message: String, prompt_param: &str) -> Self {
        match kind {
            FailureKind::ContextLength => Self {
                code: Some("context_length_exceeded"),
                ..Self::invalid(prompt_param, message)
            },
            FailureKind::InvalidRequest => Self::invalid(prompt_param, message),
            // A local engine fails only as above; a relayed backend may fail these ways.
            FailureKind::Unauthorized => Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                message,
            ),
            FailureKind::Unavailable => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                message,
            ),
            FailureKind::Internal | FailureKind::Interrupted => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                message,
            ),
        }
    }

    /// The JSON `error` object.
    pub fn body(&self) -> Value {
        json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param.as_deref().filter(|p| !p.is_empty()),
            "code": self.code,
        })
    }

    /// The `code` (when there is one), for a streamed failure event.
    pub fn code(&self) -> &'static str {
        self.code.unwrap_or(self.kind)
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Busy => Self::unavailable("the queue is full; retry shortly", 1),
            Refusal::Closing => Self::unavailable("the server is shutting down", 5),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, axum::Json(json!({ "error": self.body() }))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// The body as JSON, then as `T`; an error names the field that is wrong.
pub fn parse<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." { String::new() } else { path };
        ApiError::invalid(param, e.into_inner().to_string())
    })
}

/// The request body as a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("", format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid("", "the body must be a JSON object"));
    }
    Ok(value)
}

/// The sampling fields every endpoint takes (unknown fields are for the endpoint).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SamplingFields {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    min_p: Option<f64>,
    seed: Option<u64>,
    repetition_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    n: Option<u64>,
    plait: Option<PlaitFields>,
    stream: Option<bool>,
    user: Option<String>,
    prompt_cache_key: Option<String>,
}

/// plait's own request extension.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PlaitFields {
    loops: Option<usize>,
}

/// The request's settings shared by every endpoint, checked.
#[derive(Debug)]
pub struct Common {
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// The loop count asked for.
    pub loops: Option<usize>,
    /// Whether to stream.
    pub stream: bool,
    /// Which kept cache to prefer.
    pub cache_key: Option<String>,
}

impl Common {
    /// The shared fields of `body`, range-checked.
    pub fn from_body(body: &Value) -> Result<Self, ApiError> {
        let f: SamplingFields = parse(body)?;
        let in_range = |name: &str, value: Option<f64>, lo: f64, hi: f64| match value {
            Some(v) if !(lo..=hi).contains(&v) => Err(ApiError::invalid(
                name,
                format!("{name} {v} is outside {lo}..={hi}"),
            )),
            _ => Ok(()),
        };
        in_range("temperature", f.temperature, 0.0, 2.0)?;
        in_range("top_p", f.top_p, 0.0, 1.0)?;
        in_range("min_p", f.min_p, 0.0, 1.0)?;
        in_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?;
        in_range("presence_penalty", f.presence_penalty, -2.0, 2.0)?;
        if let Some(p) = f
            .repetition_penalty
            .filter(|p| !(*p > 0.0 && p.is_finite()))
        {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("repetition_penalty {p} must be > 0"),
            ));
        }
        if let Some(n) = f.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                format!("n {n}: only 1 choice is served"),
            ));
        }
        let loops = f.plait.and_then(|p| p.loops);
        if let Some(l) = loops.filter(|l| !(1..=MAX_LOOPS).contains(l)) {
            return Err(ApiError::invalid(
                "plait.loops",
                format!("plait.loops {l} is outside 1..={MAX_LOOPS}"),
            ));
        }
        let defaults = SamplingParams::default();
        Ok(Self {
            sampling: SamplingParams {
                // OpenAI's default temperature is 1.
                temperature: f.temperature.unwrap_or(1.0),
                top_k: f.top_k.unwrap_or(defaults.top_k),
                top_p: f.top_p.unwrap_or(defaults.top_p),
                min_p: f.min_p.unwrap_or(defaults.min_p),
                repetition_penalty: f.repetition_penalty.unwrap_or(defaults.repetition_penalty),
                seed: f.seed.unwrap_or_else(rand::random),
            },
            loops,
            stream: f.stream.unwrap_or(false),
            cache_key: f.prompt_cache_key.or(f.user),
        })
    }
}

/// A positive token count from the first of `names` present in `body`.
pub fn max_tokens(body: &Value, names: &[&str]) -> Result<Option<usize>, ApiError> {
    for name in names {
        match body.get(*name) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n >= 1 => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
                    _ => Err(ApiError::invalid(
                        *name,
                        format!("{name} must be an integer >= 1, not {v}"),
                    )),
                }
            }
        }
    }
    Ok(None)
}

/// The `stop` field: a string or up to 4 strings.
pub fn stop_strings(body: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "stop",
            "stop must be a string or an array of up to 4 strings",
        )
    };
    let stops = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Holds back text that may be the start of a stop string; cuts the answer at one.
#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    /// A matcher for `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Takes new text; returns what is final and whether a stop string was met (the text
    /// before it is then all that remains of the answer).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that some stop string starts with.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_owned();
        self.held.drain(..keep);
        (out, false)
    }

    /// The text still held at the end of the answer.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// OpenAI's finish reason for an answer.
pub fn finish_reason(stats: &TurnStats, stopped_by_string: bool) -> &'static str {
    use crate::engine::StopReason;
    match stats.stop_reason {
        StopReason::MaxTokens if !stopped_by_string => "length",
        _ => "stop",
    }
}

/// llama.cpp's `timings` object.
pub fn timings(stats: &TurnStats) -> Value {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let per_second = |n: usize, d: std::time::Duration| {
        if n == 0 || d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    let prompt_n = stats.prompt_tokens - stats.reused_tokens;
    // Sampling the first token and every decode step after it.
    let predicted =
        stats.time_to_first_token.saturating_sub(stats.prefill_time) + stats.decode_time;
    json!({
        "cache_n": stats.reused_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": ms(stats.prefill_time),
        "prompt_per_second": per_second(prompt_n, stats.prefill_time),
        "predicted_n": stats.tokens,
        "predicted_ms": ms(predicted),
        "predicted_per_second": per_second(stats.tokens, predicted),
    })
}

/// plait's own answer extension.
pub fn plait_extension(stats: &TurnStats) -> Value {
    json!({ "loops": stats.loops })
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh id with OpenAI's prefix (`chatcmpl`, `resp`, `msg`, ...).
pub fn fresh_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_the_answer_and_hold_back_a_possible_start() {
        let mut stop = StopText::new(vec!["END".into()]);
        assert_eq!(stop.push("hello E"), ("hello ".into(), false));
        assert_eq!(stop.push("N"), (String::new(), false));
        assert_eq!(stop.push("Dx"), (String::new(), true));
        let mut stop = StopText::new(vec!["END".into()]);
        assert_eq!(stop.push("hello E"), ("hello ".into(), false));
        assert_eq!(stop.push("h"), ("Eh".into(), false));
        assert_eq!(stop.finish(), "");
        let mut none = StopText::new(Vec::new());
        assert_eq!(none.push("ünï"), ("ünï".into(), false));
    }

    #[test]
    fn bad_fields_are_named() {
        let body = json!({"temperature": "hot"});
        let err = Common::from_body(&body).unwrap_err();
        assert_eq!(err.body()["param"], "temperature");
        let err = Common::from_body(&json!({"top_p": 1.5})).unwrap_err();
        assert_eq!(err.body()["param"], "top_p");
        let err = Common::from_body(&json!({"plait": {"loops": 9}})).unwrap_err();
        assert_eq!(err.body()["param"], "plait.loops");
        let err = max_tokens(&json!({"max_tokens": 0}), &["max_tokens"]).unwrap_err();
        assert_eq!(err.body()["param"], "max_tokens");
    }
}
