//! HTTP to an OpenAI-compatible server: the key on every request, JSON in and out, and its
//! failures sorted by what a client does about them (retry, name the key, show the message).

use std::time::Duration;

use serde_json::Value;

/// How long to wait for a connection; a server that accepts it may then take its time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to the server failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HttpError {
    /// No answer: the server is not reachable (worth retrying).
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// Why not.
        reason: String,
    },
    /// 401 or 403: the key is missing or wrong.
    #[error("the server refused the request ({status}): {message}")]
    Unauthorized {
        /// The status code.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// 5xx: the server failed or is not ready (worth retrying).
    #[error("the server failed ({status}): {message}")]
    Server {
        /// The status code.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// Another 4xx, or an answer that is not what the API says.
    #[error("{0}")]
    Refused(String),
}

impl HttpError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            HttpError::Unreachable { .. } | HttpError::Server { .. }
        )
    }

    /// The error of a request to `url` that got no answer.
    pub fn unreachable(url: &str, error: &reqwest::Error) -> Self {
        // reqwest's own text is "error sending request"; the cause says why.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        HttpError::Unreachable {
            url: url.to_owned(),
            reason,
        }
    }
}

/// The message of an error answer: OpenAI's and llama.cpp's `error.message`, vLLM's
/// `message` or `detail`, or the body's text.
pub fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        v["error"]["message"]
            .as_str()
            .or_else(|| v["error"].as_str())
            .or_else(|| v["message"].as_str())
            .or_else(|| v["detail"].as_str())
            .map(str::to_owned)
    });
    from_json.unwrap_or_else(|| {
        let text = body.trim();
        if text.is_empty() {
            "no message".to_owned()
        } else {
            text.chars().take(500).collect()
        }
    })
}

/// Whether an error message says the prompt does not fit the context.
pub fn is_context_error(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "context length",
        "context_length",
        "context window",
        "exceeds the available context",
        "exceed_context_size",
        "too long",
        "maximum context",
    ]
    .iter()
    .any(|needle| message.contains(needle))
}

/// A client for one server, with its key.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    api_key: Option<String>,
}

impl Http {
    /// A client that sends `api_key` as a bearer token, when there is one.
    pub fn new(api_key: Option<String>) -> Result<Self, HttpError> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| HttpError::Refused(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self { client, api_key })
    }

    fn with_key(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends `request` to `url`; an answer that is not a success is an error.
    async fn send(
        &self,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, HttpError> {
        let response = self
            .with_key(request)
            .send()
            .await
            .map_err(|e| HttpError::unreachable(url, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let message = error_message(&body);
        let code = status.as_u16();
        Err(match code {
            401 | 403 => HttpError::Unauthorized {
                status: code,
                message,
            },
            500..=599 => HttpError::Server {
                status: code,
                message,
            },
            _ => HttpError::Refused(format!("{url} answered {code}: {message}")),
        })
    }

    /// GETs `url` as JSON.
    pub async fn get_json(&self, url: &str) -> Result<Value, HttpError> {
        let response = self.send(url, self.client.get(url)).await?;
        response
            .json()
            .await
            .map_err(|e| HttpError::Refused(format!("{url} did not answer JSON: {e}")))
    }

    /// POSTs `body` to `url`, reading the answer as JSON.
    pub async fn post_json(&self, url: &str, body: &Value) -> Result<Value, HttpError> {
        let response = self.post(url, body).await?;
        response
            .json()
            .await
            .map_err(|e| HttpError::Refused(format!("{url} did not answer JSON: {e}")))
    }

    /// POSTs `body` to `url`; the successful answer, to read as it streams.
    pub async fn post(&self, url: &str, body: &Value) -> Result<reqwest::Response, HttpError> {
        self.send(url, self.client.post(url).json(body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_come_from_each_dialects_body() {
        let openai = r#"{"error":{"message":"bad model","type":"invalid_request_error"}}"#;
        assert_eq!(error_message(openai), "bad model");
        let vllm = r#"{"object":"error","message":"This model's maximum context length is 4096 tokens.","type":"BadRequestError","code":400}"#;
        assert!(is_context_error(&error_message(vllm)));
        assert_eq!(error_message("  plain text \n"), "plain text");
        assert_eq!(error_message(""), "no message");
        assert!(!is_context_error("bad model"));
    }
}
