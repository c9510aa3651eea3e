//! The remote backend (`plait --remote`) against servers on loopback: a small in-test server
//! that speaks vLLM's dialect (its `/v1/models` fields, `/tokenize`, `reasoning` deltas, its
//! error bodies) and can be told to fail, and a real `plait serve` on the tiny fixture.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_server::*;
use plait::engine::{
    Backend, ChatMessage, Event, FailureKind, GenerateJob, LoopControl, Prompt, RemoteBackend,
    RemoteOptions, Request, SamplingParams, StopReason,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The remote backend on `options` and the events it reports.
fn connect(options: RemoteOptions) -> (RemoteBackend, mpsc::UnboundedReceiver<Event>) {
    let (sender, events) = mpsc::unbounded_channel();
    let backend = RemoteBackend::spawn(
        options,
        Box::new(move |event| {
            let _ = sender.send(event);
        }),
    )
    .unwrap();
    (backend, events)
}

/// The next event, within a bound.
async fn next(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("an event within 60 s")
        .expect("the backend is running")
}

/// Events up to the one `last` picks (included).
async fn until(
    events: &mut mpsc::UnboundedReceiver<Event>,
    last: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = next(events).await;
        let end = last(&event);
        seen.push(event);
        if end {
            return seen;
        }
    }
}

fn ended(event: &Event) -> bool {
    matches!(
        event,
        Event::Done { .. } | Event::Failed { .. } | Event::LoadFailed(_)
    )
}

fn options(url: &str) -> RemoteOptions {
    RemoteOptions {
        retry_delay: Duration::from_millis(20),
        ..RemoteOptions::new(url)
    }
}

fn ask(id: u64, messages: Vec<ChatMessage>, max_tokens: usize) -> Request {
    Request::Generate(common::chat_job(id, &messages, max_tokens))
}

/// Asks request `id` a short question and checks it is answered in full.
async fn assert_answered(
    backend: &RemoteBackend,
    events: &mut mpsc::UnboundedReceiver<Event>,
    id: u64,
) {
    backend.send(ask(id, vec![ChatMessage::new("user", "hi")], 16));
    let seen = until(events, ended).await;
    assert!(
        matches!(seen.last(), Some(Event::Done { id: done, .. }) if *done == id),
        "{seen:?}"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn tokens(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Token { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_request_for_a_conversation_is_the_recorded_json() {
    runtime().block_on(async {
        let fake = Arc::new(Fake::default());
        let url = start_fake(Arc::clone(&fake)).await;
        let mut extra = serde_json::Map::new();
        extra.insert("top_k".into(), json!(20));
        extra.insert(
            "chat_template_kwargs".into(),
            json!({"enable_thinking": false}),
        );
        let (backend, mut events) = connect(RemoteOptions {
            extra,
            ..options(&url)
        });
        let Event::Loading(_) = next(&mut events).await else {
            panic!("loading first")
        };
        let Event::Loaded(info) = next(&mut events).await else {
            panic!("then loaded")
        };
        assert_eq!(info.name, "loopcoder");
        assert_eq!(info.context_size, CONTEXT);
        assert_eq!(info.loop_control, LoopControl::Fixed);
        assert_eq!(
            info.server.as_deref(),
            Some(&url["http://".len()..url.len() - 3])
        );
        let messages = vec![
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", "Reverse a string in Python."),
        ];
        backend.send(Request::Generate(GenerateJob {
            id: 1,
            prompt: Prompt::Chat {
                messages,
                drop_oldest: true,
                tools: Vec::new(),
            },
            sampling: SamplingParams {
                temperature: 0.2,
                top_p: 0.9,
                seed: 7,
                ..SamplingParams::default()
            },
            // More than the room left: clamped to it.
            max_tokens: Some(100_000),
            loops: None,
            cache_key: None,
        }));
        let seen = until(&mut events, ended).await;
        assert!(matches!(seen.last(), Some(Event::Done { .. })), "{seen:?}");
        let sent = fake.requests.lock().unwrap()[0].clone();
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/data/remote/chat_request.json"),
            )
            .unwrap(),
        )
        .unwrap();
        for (field, value) in expected.as_object().unwrap() {
            assert_eq!(&sent[field], value, "field {field}");
        }
        assert_eq!(
            sent.as_object().unwrap().len(),
            expected.as_object().unwrap().len(),
            "{sent}"
        );
        // The room left: the context less the prompt as the server's /tokenize counts it.
        let prompt = fake_count(&sent["messages"]);
        assert_eq!(sent["max_tokens"], json!(CONTEXT - prompt));
    });
}

#[test]
fn an_answer_streams_with_reasoning_and_the_servers_usage() {
    runtime().block_on(async {
        let fake = Arc::new(Fake::default());
        let mut chunks = vec![
            chunk(
                json!({"role": "assistant", "reasoning": "The user wants"}),
                Value::Null,
            ),
            chunk(json!({"reasoning": " a reversal."}), Value::Null),
        ];
        let Reply::Stream { chunks: rest, .. } = answer(&["Use", " s[::-1]."]) else {
            unreachable!()
        };
        chunks.extend(rest);
        fake.replies
            .lock()
            .unwrap()
            .push_back(Reply::Stream { chunks, cut: false });
        let url = start_fake(Arc::clone(&fake)).await;
        let (backend, mut events) = connect(options(&url));
        until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        backend.send(ask(
            1,
            vec![ChatMessage::new("user", "Reverse a string.")],
            64,
        ));
        let seen = until(&mut events, ended).await;
        let reasoning: String = seen
            .iter()
            .filter_map(|e| match e {
                Event::Reasoning { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reasoning, "The user wants a reversal.");
        assert_eq!(tokens(&seen), "Use s[::-1].");
        let Some(Event::Done { stats, .. }) = seen.last() else {
            panic!("{seen:?}")
        };
        assert_eq!(stats.stop_reason, StopReason::Eos);
        assert_eq!((stats.prompt_tokens, stats.tokens), (40, 2));
        assert_eq!(stats.reused_tokens, 32);
        assert!(matches!(seen[0], Event::Started { id: 1, .. }), "{seen:?}");
    });
}

#[test]
fn a_503_is_retried_with_notices_and_then_served() {
    runtime().block_on(async {
        let fake = Arc::new(Fake::default());
        let busy = json!({"object": "error", "message": "The server is overloaded", "type": "ServiceUnavailableError", "code": 503});
        for _ in 0..2 {
            fake.replies
                .lock()
                .unwrap()
                .push_back(Reply::Status(503, busy.clone()));
        }
        let url = start_fake(Arc::clone(&fake)).await;
        let (backend, mut events) = connect(options(&url));
        until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        backend.send(ask(1, vec![ChatMessage::new("user", "hi")], 16));
        let seen = until(&mut events, ended).await;
        let notices: Vec<&String> = seen
            .iter()
            .filter_map(|e| match e {
                Event::Notice(text) => Some(text),
                _ => None,
            })
            .collect();
        assert_eq!(notices.len(), 2, "{seen:?}");
        assert!(notices[0].contains("503") && notices[0].contains("overloaded"), "{notices:?}");
        assert!(notices[1].contains("2 of 4 tries"), "{notices:?}");
        assert_eq!(tokens(&seen), "Hello there.");
        assert!(matches!(seen.last(), Some(Event::Done { .. })));
        assert_eq!(fake.requests.lock().unwrap().len(), 3);
    });
}

#[test]
fn a_400_shows_the_servers_message_and_a_401_names_the_key_setting() {
    runtime().block_on(async {
        let fake = Arc::new(Fake::default());
        let bad = json!({"object": "error", "message": "temperature must be at most 2", "type": "BadRequestError", "code": 400});
        fake.replies.lock().unwrap().push_back(Reply::Status(400, bad));
        let url = start_fake(Arc::clone(&fake)).await;
        let (backend, mut events) = connect(options(&url));
        until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        backend.send(ask(1, vec![ChatMessage::new("user", "hi")], 16));
        let seen = until(&mut events, ended).await;
        let Some(Event::Failed { id: 1, kind, message }) = seen.last() else {
            panic!("{seen:?}")
        };
        assert_eq!(*kind, FailureKind::InvalidRequest);
        assert!(message.contains("temperature must be at most 2"), "{message}");
        // The same backend still answers.
        assert_answered(&backend, &mut events, 2).await;

        let refusing = Arc::new(Fake {
            refuse_key: true,
            ..Fake::default()
        });
        let url = start_fake(refusing).await;
        let (_backend, mut events) = connect(RemoteOptions {
            api_key: Some("wrong".into()),
            ..options(&url)
        });
        let seen = until(&mut events, ended).await;
        let Some(Event::LoadFailed(message)) = seen.last() else {
            panic!("{seen:?}")
        };
        assert!(message.contains("401"), "{message}");
        assert!(message.contains("--api-key or PLAIT_API_KEY"), "{message}");
    });
}

#[test]
fn a_stream_cut_after_five_chunks_keeps_them_and_says_interrupted() {
    runtime().block_on(async {
        let fake = Arc::new(Fake::default());
        let chunks = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|w| chunk(json!({ "content": w }), Value::Null))
            .collect();
        fake.replies
            .lock()
            .unwrap()
            .push_back(Reply::Stream { chunks, cut: true });
        let url = start_fake(Arc::clone(&fake)).await;
        let (backend, mut events) = connect(options(&url));
        until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        backend.send(ask(1, vec![ChatMessage::new("user", "hi")], 16));
        let seen = until(&mut events, ended).await;
        assert_eq!(tokens(&seen), "abcde");
        let Some(Event::Failed { kind, .. }) = seen.last() else {
            panic!("{seen:?}")
        };
        assert_eq!(*kind, FailureKind::Interrupted);
        // /retry sends the same conversation again: it is answered.
        assert_answered(&backend, &mut events, 2).await;
    });
}

#[test]
fn too_long_for_the_server_drops_the_oldest_messages_and_tries_once_more() {
    runtime().block_on(async {
        let fake = Arc::new(Fake::default());
        let long = json!({"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens.", "type": "BadRequestError", "code": 400});
        fake.replies.lock().unwrap().push_back(Reply::Status(400, long));
        let url = start_fake(Arc::clone(&fake)).await;
        let (backend, mut events) = connect(options(&url));
        until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        let messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "first question"),
            ChatMessage::new("assistant", "first answer"),
            ChatMessage::new("user", "second question"),
        ];
        backend.send(ask(1, messages, 16));
        let seen = until(&mut events, ended).await;
        assert!(
            seen.iter().any(|e| matches!(e, Event::Notice(n) if n.contains("too long"))),
            "{seen:?}"
        );
        let Some(Event::Done { stats, .. }) = seen.last() else {
            panic!("{seen:?}")
        };
        assert_eq!(stats.dropped_messages, 2);
        let requests = fake.requests.lock().unwrap();
        assert_eq!(requests.len(), 2);
        let roles: Vec<&str> = requests[1]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user"]);
        assert_eq!(requests[1]["messages"][1]["content"], "second question");
    });
}

#[test]
fn a_server_down_at_the_start_is_reported_and_found_when_it_comes_up() {
    runtime().block_on(async {
        // A port nothing listens on, until the fake is started on it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let url = format!("http://{address}/v1");
        let (backend, mut events) = connect(options(&url));
        let seen = until(&mut events, |e| matches!(e, Event::Unavailable(_))).await;
        let Some(Event::Unavailable(message)) = seen.last() else {
            unreachable!()
        };
        assert!(message.contains(&address.to_string()), "{message}");
        // A request now fails at once, saying why.
        backend.send(ask(1, vec![ChatMessage::new("user", "hi")], 16));
        let seen = until(&mut events, ended).await;
        assert!(
            matches!(
                seen.last(),
                Some(Event::Failed {
                    kind: FailureKind::Unavailable,
                    ..
                })
            ),
            "{seen:?}"
        );
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        serve_fake(listener, Arc::new(Fake::default()));
        until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        assert_answered(&backend, &mut events, 2).await;
    });
}

#[test]
fn cancelling_closes_the_stream_and_keeps_what_came() {
    runtime().block_on(async {
        let fake = Arc::new(Fake::default());
        let url = start_fake(Arc::clone(&fake)).await;
        let (backend, mut events) = connect(options(&url));
        until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        backend.send(ask(1, vec![ChatMessage::new("user", "hi")], 16));
        backend.send(Request::Cancel(1));
        let seen = until(&mut events, ended).await;
        let Some(Event::Done { stats, .. }) = seen.last() else {
            panic!("{seen:?}")
        };
        assert_eq!(stats.stop_reason, StopReason::Cancelled);
    });
}

#[test]
fn against_plait_serve_the_count_matches_and_loops_go_with_the_next_request() {
    let served = common::server::Served::start(
        &common::server::plait_binary(false),
        &common::fixture("plt-tiny-2loop"),
        &[],
    );
    runtime().block_on(async {
        let (backend, mut events) = connect(options(&format!("{}/v1", served.base)));
        let seen = until(&mut events, |e| {
            matches!(e, Event::Loaded(_) | Event::LoadFailed(_))
        })
        .await;
        let Some(Event::Loaded(info)) = seen.last() else {
            panic!("{seen:?}")
        };
        assert_eq!(info.loop_control, LoopControl::NextRequest);
        assert_eq!((info.trained_loops, info.loops), (2, 2));
        let messages = vec![ChatMessage::new("user", "Say something.")];
        backend.send(ask(1, messages.clone(), 4));
        let seen = until(&mut events, ended).await;
        let Some(Event::Started { prompt_tokens, .. }) = seen.first() else {
            panic!("{seen:?}")
        };
        let Some(Event::Done { stats, .. }) = seen.last() else {
            panic!("{seen:?}")
        };
        // The prompt the client fitted with /tokenize is the one the server ran.
        assert_eq!(stats.prompt_tokens, *prompt_tokens);
        assert_eq!(stats.loops, 2);
        backend.send(Request::SetLoops(1));
        assert_eq!(next(&mut events).await, Event::LoopsChanged(1));
        backend.send(ask(2, messages, 4));
        let seen = until(&mut events, ended).await;
        let Some(Event::Done { stats, .. }) = seen.last() else {
            panic!("{seen:?}")
        };
        // The server says it ran the count sent with the request.
        assert_eq!(stats.loops, 1);
        // `plait --remote URL --loops 3`: the first request already asks for three.
        let (backend, mut events) = connect(RemoteOptions {
            loops: Some(3),
            ..options(&format!("{}/v1", served.base))
        });
        let seen = until(&mut events, |e| matches!(e, Event::Loaded(_))).await;
        assert!(
            matches!(seen.last(), Some(Event::Loaded(info)) if info.loops == 3),
            "{seen:?}"
        );
        backend.send(ask(3, vec![ChatMessage::new("user", "hi")], 2));
        let seen = until(&mut events, ended).await;
        assert!(
            matches!(seen.last(), Some(Event::Done { stats, .. }) if stats.loops == 3),
            "{seen:?}"
        );
    });
}

#[test]
fn against_llama_server_the_context_count_and_cache_come_from_the_server() {
    let Some(server) = common::server::llama_server_on_default_model(2048) else {
        return;
    };
    runtime().block_on(async {
        let (backend, mut events) = connect(options(&format!("{}/v1", server.base)));
        let seen = until(&mut events, |e| {
            matches!(e, Event::Loaded(_) | Event::LoadFailed(_))
        })
        .await;
        let Some(Event::Loaded(info)) = seen.last() else {
            panic!("{seen:?}")
        };
        // The running context from /props, not the model's trained one.
        assert_eq!(info.context_size, 2048);
        assert_eq!(info.loop_control, LoopControl::Fixed);
        let messages = vec![
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new("user", "Write a Python function that adds two numbers."),
        ];
        let mut cached = Vec::new();
        for id in 1..=2 {
            backend.send(ask(id, messages.clone(), 8));
            let seen = until(&mut events, ended).await;
            let Some(Event::Started { prompt_tokens, .. }) = seen.first() else {
                panic!("{seen:?}")
            };
            let Some(Event::Done { stats, .. }) = seen.last() else {
                panic!("{seen:?}")
            };
            // Counted with the server's template and tokenizer: the prompt it ran, give or
            // take the start token its template may leave to the tokenizer.
            assert!(
                stats.prompt_tokens.abs_diff(*prompt_tokens) <= 1,
                "counted {prompt_tokens}, ran {}",
                stats.prompt_tokens
            );
            assert!(!tokens(&seen).is_empty(), "{seen:?}");
            cached.push(stats.reused_tokens);
        }
        // The same prompt again comes mostly from the server's prompt cache.
        assert!(cached[1] > 0, "cached prompt tokens: {cached:?}");
    });
}
