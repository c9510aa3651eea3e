//! What a remote server is: its model, context size and dialect, read from `/v1/models`
//! (and llama.cpp's `/props`), and how to count a conversation's tokens on it.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{json, Value};

use super::http::{Http, HttpError};
use crate::engine::protocol::{ChatMessage, LoopControl, ModelInfo};

/// The context size assumed when the server does not say and the config sets none.
pub const DEFAULT_CONTEXT: usize = 4096;

/// Which server it is, as far as its dialect matters.
#[derive(Debug, Clone, PartialEq)]
pub enum Dialect {
    /// `plait serve`: loops per request, its own `/tokenize`.
    Plait {
        /// Loop count the checkpoint was trained with.
        trained_loops: usize,
        /// Loop count the server runs by default.
        loops: usize,
        /// Sliding window of loops >= 1.
        window: usize,
        /// Parameter count.
        parameters: u64,
        /// Storage of the weights.
        quantization: String,
    },
    /// vLLM: `max_model_len` and a `/tokenize` that takes messages.
    Vllm,
    /// llama.cpp's server: `/props`, `/apply-template` and `/tokenize`.
    LlamaCpp,
    /// Another OpenAI-compatible server.
    Other,
}

/// A server found at an address.
#[derive(Debug)]
pub struct Server {
    /// The `/v1` base of the OpenAI endpoints.
    pub v1: String,
    /// The server's root (where `/tokenize` and `/props` are).
    pub root: String,
    /// Host and port, for the status line.
    pub host: String,
    /// The model id requests name.
    pub model: String,
    /// The context the conversation must fit.
    pub context: usize,
    /// Its dialect.
    pub dialect: Dialect,
    /// Whether counting fell back to the estimate (the server's tokenizer failed).
    estimating: AtomicBool,
}

/// The `/v1` base and the root of a server address given with or without `/v1`.
pub fn bases(url: &str) -> (String, String) {
    let url = url.trim().trim_end_matches('/');
    match url.strip_suffix("/v1") {
        Some(root) => (url.to_owned(), root.to_owned()),
        None => (format!("{url}/v1"), url.to_owned()),
    }
}

/// The host and port of `url` (what follows the scheme, up to the path).
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

fn as_usize(value: &Value) -> Option<usize> {
    value.as_u64().and_then(|n| usize::try_from(n).ok())
}

impl Server {
    /// Reads the server at `url`: its model (`wanted`, or the first it lists) and context
    /// (`fallback_context` when it does not say). Also returns a notice to show, if any.
    pub async fn discover(
        http: &Http,
        url: &str,
        wanted: Option<&str>,
        fallback_context: Option<usize>,
    ) -> Result<(Self, Option<String>), HttpError> {
        let (v1, root) = bases(url);
        let models = http.get_json(&format!("{v1}/models")).await?;
        let listed = models["data"].as_array().cloned().unwrap_or_default();
        let ids: Vec<&str> = listed.iter().filter_map(|m| m["id"].as_str()).collect();
        let entry = match wanted {
            Some(name) => listed.iter().find(|m| m["id"] == name).ok_or_else(|| {
                HttpError::Refused(format!(
                    "{v1}/models does not list the model {name}; it serves: {}",
                    ids.join(", ")
                ))
            })?,
            None => listed
                .first()
                .ok_or_else(|| HttpError::Refused(format!("{v1}/models lists no model")))?,
        };
        let model = entry["id"].as_str().unwrap_or_default().to_owned();
        let plait = &entry["plait"];
        let dialect = if plait.is_object() {
            Dialect::Plait {
                trained_loops: as_usize(&plait["trained_loops"]).unwrap_or(1),
                loops: as_usize(&plait["loops"]).unwrap_or(1),
                window: as_usize(&plait["window"]).unwrap_or(0),
                parameters: plait["parameters"].as_u64().unwrap_or(0),
                quantization: plait["quantization"].as_str().unwrap_or("?").to_owned(),
            }
        } else if entry["owned_by"] == "vllm" || entry.get("max_model_len").is_some() {
            Dialect::Vllm
        } else if entry["owned_by"] == "llamacpp" || entry.get("meta").is_some() {
            Dialect::LlamaCpp
        } else {
            Dialect::Other
        };
        let mut context = as_usize(&entry["max_model_len"]);
        if context.is_none() && dialect == Dialect::LlamaCpp {
            // The running context, which may be smaller than the one trained.
            context = match http.get_json(&format!("{root}/props")).await {
                Ok(props) => as_usize(&props["default_generation_settings"]["n_ctx"]),
                Err(_) => None,
            };
        }
        let context = context
            .or_else(|| as_usize(&entry["meta"]["n_ctx_train"]))
            .or_else(|| as_usize(&entry["context_length"]));
        let (context, notice) = match (context, fallback_context) {
            (Some(n), _) => (n, None),
            (None, Some(n)) => (n, None),
            (None, None) => (
                DEFAULT_CONTEXT,
                Some(format!(
                    "the server does not say its context size: assuming {DEFAULT_CONTEXT} tokens (set remote.context_size)"
                )),
            ),
        };
        let server = Self {
            host: host_of(&root),
            v1,
            root,
            model,
            context,
            dialect,
            estimating: AtomicBool::new(false),
        };
        Ok((server, notice))
    }

    /// How the loop count can change on this server.
    pub fn loop_control(&self) -> LoopControl {
        match self.dialect {
            Dialect::Plait { .. } => LoopControl::NextRequest,
            _ => LoopControl::Fixed,
        }
    }

    /// The model as the engine protocol describes it.
    pub fn model_info(&self) -> ModelInfo {
        let (trained_loops, loops, window, parameters, quantization) = match &self.dialect {
            Dialect::Plait {
                trained_loops,
                loops,
                window,
                parameters,
                quantization,
            } => (
                *trained_loops,
                *loops,
                *window,
                *parameters,
                quantization.clone(),
            ),
            _ => (1, 1, 0, 0, "unknown".to_owned()),
        };
        ModelInfo {
            name: self.model.clone(),
            path: self.v1.clone().into(),
            parameters,
            quantization,
            trained_loops,
            loops,
            window,
            context_size: self.context,
            supports_tools: false,
            loop_control: self.loop_control(),
            server: Some(self.host.clone()),
        }
    }

    /// The tokens `messages` take as a prompt: counted by the server's tokenizer where it
    /// has one, else estimated. Also returns a notice when counting falls back.
    pub async fn count(&self, http: &Http, messages: &[ChatMessage]) -> (usize, Option<String>) {
        if !self.estimating.load(Ordering::Relaxed) {
            match self.count_on_server(http, messages).await {
                Some(Ok(n)) => return (n, None),
                Some(Err(e)) => {
                    self.estimating.store(true, Ordering::Relaxed);
                    let notice = format!(
                        "cannot count tokens on the server ({e}): estimating one token per {ESTIMATE_BYTES} bytes"
                    );
                    return (estimate(messages), Some(notice));
                }
                None => {}
            }
        }
        (estimate(messages), None)
    }

    /// The server's count, `None` when the dialect has no tokenizer endpoint.
    async fn count_on_server(
        &self,
        http: &Http,
        messages: &[ChatMessage],
    ) -> Option<Result<usize, HttpError>> {
        let messages = wire_messages(messages);
        let tokenize = format!("{}/tokenize", self.root);
        let counted = match self.dialect {
            Dialect::Plait { .. } | Dialect::Vllm => {
                let body = json!({ "model": self.model, "messages": messages });
                http.post_json(&tokenize, &body).await
            }
            Dialect::LlamaCpp => {
                let template = format!("{}/apply-template", self.root);
                match http
                    .post_json(&template, &json!({ "messages": messages }))
                    .await
                {
                    Ok(rendered) => {
                        let prompt = rendered["prompt"].as_str().unwrap_or_default();
                        let body = json!({ "content": prompt, "add_special": false });
                        http.post_json(&tokenize, &body).await
                    }
                    Err(e) => Err(e),
                }
            }
            Dialect::Other => return None,
        };
        Some(counted.and_then(|answer| {
            as_usize(&answer["count"])
                .or_else(|| answer["tokens"].as_array().map(Vec::len))
                .ok_or_else(|| HttpError::Refused(format!("{tokenize} gave no count")))
        }))
    }
}

/// Bytes per token of the estimate: fewer than any tokenizer of English or code averages,
/// so the estimate errs on the long side.
pub const ESTIMATE_BYTES: usize = 3;

/// A conservative token count: one token per [`ESTIMATE_BYTES`] bytes, 8 more per message
/// for the template's markers.
pub fn estimate(messages: &[ChatMessage]) -> usize {
    8 + messages
        .iter()
        .map(|m| (m.role.len() + m.content.len()).div_ceil(ESTIMATE_BYTES) + 8)
        .sum::<usize>()
}

/// Messages as the OpenAI API writes them.
pub fn wire_messages(messages: &[ChatMessage]) -> Value {
    Value::Array(
        messages
            .iter()
            .map(|m| json!({ "role": m.role, "content": m.content }))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_with_or_without_v1_has_the_same_bases_and_host() {
        for url in [
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:8000/v1/",
            "http://127.0.0.1:8000",
        ] {
            let (v1, root) = bases(url);
            assert_eq!(v1, "http://127.0.0.1:8000/v1");
            assert_eq!(root, "http://127.0.0.1:8000");
            assert_eq!(host_of(&root), "127.0.0.1:8000");
        }
    }

    #[test]
    fn the_estimate_errs_long_and_grows_with_the_text() {
        let short = [ChatMessage::new("user", "hi")];
        let long = [ChatMessage::new("user", "hi ".repeat(300))];
        // 900 bytes of "hi " are 300 tokens for any tokenizer; the estimate says more.
        assert!(estimate(&long) >= 300);
        assert!(estimate(&long) > estimate(&short));
    }
}
