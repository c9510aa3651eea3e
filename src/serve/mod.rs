//! `plait serve`: the engine behind the OpenAI HTTP APIs (Chat Completions, Responses,
//! Completions), with models, health and Prometheus metrics, on axum.

mod answer;
mod chat;
mod hub;
mod metrics;
mod openai;
mod responses;
mod tools;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::engine::{Engine, EngineOptions};

use hub::{Hub, ModelStatus, Routes};
use openai::{parse_body, ApiError};

/// How `plait serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The engine and its model.
    pub engine: EngineOptions,
    /// Address to listen on.
    pub host: String,
    /// Port to listen on (0: any free port).
    pub port: u16,
    /// Key every route but /health needs.
    pub api_key: Option<String>,
    /// Requests that may wait behind the running ones.
    pub queue_length: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Origins allowed to call from a browser (CORS); empty: none.
    pub cors_origins: Vec<String>,
    /// Most tokens in an answer whose request does not say (default: the room left).
    pub max_tokens: Option<usize>,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A non-loopback address without a key.
    #[error("refusing to listen on {host} without an API key: anyone who can reach it could use the model; pass --api-key (or set serve.api_key), or listen on 127.0.0.1")]
    OpenWithoutKey {
        /// The address asked for.
        host: String,
    },
    /// The address could not be resolved or bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// host:port.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// A CORS origin is not a valid header value.
    #[error("serve.cors_origins: {origin:?} is not a valid origin")]
    BadOrigin {
        /// The origin.
        origin: String,
    },
    /// The runtime or the engine thread could not start, or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What every handler reaches.
pub struct Server {
    hub: Arc<Hub>,
    api_key: Option<String>,
    max_tokens: Option<usize>,
}

impl Server {
    /// The served model's id; 503 until it has loaded.
    fn model_id(&self) -> Result<String, ApiError> {
        match self.hub.routes.status() {
            ModelStatus::Ready(info) => Ok(model_id(&info.name)),
            ModelStatus::Loading(_) => Err(ApiError::unavailable("the model is still loading", 2)),
            ModelStatus::Failed(message) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("model_not_loaded"),
                message,
            )),
        }
    }
}

impl Server {
    /// The served model's context size (0 until it has loaded).
    fn context_size(&self) -> usize {
        match self.hub.routes.status() {
            ModelStatus::Ready(info) => info.context_size,
            _ => 0,
        }
    }

    /// The function tools `body` offers, when the model's template renders them (else none:
    /// the model answers in text).
    fn tools(&self, body: &Value) -> Vec<Value> {
        match self.hub.routes.status() {
            ModelStatus::Ready(info) if info.supports_tools => tools::function_tools(body),
            _ => Vec::new(),
        }
    }
}

/// The id clients see: the model file's name without `.gguf`.
fn model_id(name: &str) -> String {
    name.strip_suffix(".gguf").unwrap_or(name).to_owned()
}

/// Whether every address `host` names is a loopback one.
fn is_loopback(host: &str, port: u16) -> std::io::Result<bool> {
    let addresses: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    Ok(!addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback()))
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    let Some(key) = &server.api_key else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" || request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        return next.run(request).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        Some("invalid_api_key"),
        "a valid API key is required: Authorization: Bearer KEY",
    )
    .into_response()
}

/// Counts and logs every answer: route, status and time, never the content.
async fn record(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    server.hub.routes.metrics.count_request(&route, status);
    tracing::info!(%method, route, status, ms = started.elapsed().as_millis() as u64, "request");
    response
}

/// The body, or 413 past the limit.
fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|rejection| {
        let status = rejection.status();
        let code = (status == StatusCode::PAYLOAD_TOO_LARGE).then_some("request_too_large");
        ApiError::new(status, "invalid_request_error", code, rejection.body_text())
    })?;
    parse_body(&bytes)
}

async fn chat_completions(
    State(server): State<Arc<Server>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    chat::chat_completions(server, body_json(body)?).await
}

async fn completions(
    State(server): State<Arc<Server>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    chat::completions(server, body_json(body)?).await
}

async fn responses(
    State(server): State<Arc<Server>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    responses::responses(server, body_json(body)?).await
}

async fn tokenize(
    State(server): State<Arc<Server>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    chat::tokenize(server, body_json(body)?).await
}

async fn models(State(server): State<Arc<Server>>) -> Result<Response, ApiError> {
    server.model_id()?;
    let ModelStatus::Ready(info) = server.hub.routes.status() else {
        return Err(ApiError::unavailable("the model is still loading", 2));
    };
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{
            "id": model_id(&info.name),
            "object": "model",
            "created": 0,
            "owned_by": "plait",
            "context_length": info.context_size,
            "plait": {
                "trained_loops": info.trained_loops,
                "loops": info.loops,
                "window": info.window,
                "parameters": info.parameters,
                "quantization": info.quantization,
            },
        }],
    }))
    .into_response())
}

async fn health(State(server): State<Arc<Server>>) -> Response {
    match server.hub.routes.status() {
        ModelStatus::Ready(info) => {
            axum::Json(json!({ "status": "ok", "model": model_id(&info.name) })).into_response()
        }
        ModelStatus::Loading(progress) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "loading", "progress": progress })),
        )
            .into_response(),
        ModelStatus::Failed(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "error", "message": message })),
        )
            .into_response(),
    }
}

async fn prometheus(State(server): State<Arc<Server>>) -> Response {
    let text = server.hub.routes.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        format!(
            "unknown route: {} {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn wrong_method(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        Some("method_not_allowed"),
        format!(
            "{} is not served at {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// The routes over `server`.
fn router(server: Arc<Server>, options: &ServeOptions) -> Result<Router, ServeError> {
    let mut router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&server),
            authorize,
        ))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&server), record))
        .with_state(server);
    if !options.cors_origins.is_empty() {
        let origins = options
            .cors_origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o).map_err(|_| ServeError::BadOrigin { origin: o.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        router = router.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    Ok(router)
}

/// Serves until SIGTERM or Ctrl+C, then lets the answers in progress finish.
pub fn run(options: ServeOptions) -> Result<(), ServeError> {
    let address = format!("{}:{}", options.host, options.port);
    let listen_error = |source| ServeError::Listen {
        address: address.clone(),
        source,
    };
    if options.api_key.is_none()
        && !is_loopback(&options.host, options.port).map_err(listen_error)?
    {
        return Err(ServeError::OpenWithoutKey {
            host: options.host.clone(),
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(listen_error)?;
        let local = listener.local_addr()?;
        let routes = Routes::new();
        let sink = Arc::clone(&routes);
        let engine = Engine::spawn(options.engine.clone(), move |event| sink.dispatch(event))?;
        let running = options.engine.batching.max_conversations;
        let hub = Hub::new(Box::new(engine), routes, running, options.queue_length);
        let server = Arc::new(Server {
            hub: Arc::clone(&hub),
            api_key: options.api_key.clone(),
            max_tokens: options.max_tokens,
        });
        let app = router(server, &options)?;
        // Tests and scripts read this line for the address (with --port 0, the port chosen).
        eprintln!("plait serve: listening on http://{local}");
        let closing = Arc::clone(&hub);
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("plait serve: shutting down after the answers in progress");
                closing.close();
            })
            .await?;
        Ok(())
    })
}

/// SIGTERM or Ctrl+C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
