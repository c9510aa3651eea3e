//! The engine's worker thread over the real model: load, stream, loop changes, cancel, reuse.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use plait::engine::{Engine, EngineOptions, Event, Request, StopReason, TurnStats};
use plait::model::{ChatMessage, DeviceSpec, SamplingParams};

fn start(loops: Option<usize>) -> (Engine, mpsc::Receiver<Event>) {
    start_with_context(loops, None)
}

fn start_with_context(
    loops: Option<usize>,
    context_size: Option<usize>,
) -> (Engine, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let engine = Engine::spawn(
        EngineOptions {
            model: fixture("plt-tiny-2loop"),
            loops,
            context_size,
            device: DeviceSpec::Cpu,
            dtype: None,
        },
        move |event| {
            let _ = tx.send(event);
        },
    )
    .unwrap();
    (engine, rx)
}

fn next(rx: &mpsc::Receiver<Event>) -> Event {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the engine went quiet")
}

/// Events until the turn's Done, with the Done.
fn until_done(rx: &mpsc::Receiver<Event>) -> (Vec<Event>, TurnStats) {
    let mut seen = Vec::new();
    loop {
        match next(rx) {
            Event::Done(stats) => return (seen, stats),
            Event::Error(e) => panic!("engine error: {e}"),
            other => seen.push(other),
        }
    }
}

fn ask(messages: &[ChatMessage], max_tokens: usize) -> Request {
    Request::Generate {
        messages: messages.to_vec(),
        sampling: SamplingParams::default(),
        max_tokens,
    }
}

#[test]
fn the_worker_loads_streams_and_keeps_the_cache_across_turns() {
    let (engine, rx) = start(None);
    let info = loop {
        match next(&rx) {
            Event::Loading(p) => assert!((0.0..=1.0).contains(&p)),
            Event::Loaded(info) => break info,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!((info.trained_loops, info.loops, info.window), (2, 2, 4));

    let mut messages = vec![ChatMessage::new(
        "user",
        "Write a function that adds two numbers.",
    )];
    engine.send(ask(&messages, 8));
    let (events, first) = until_done(&rx);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::PrefillProgress { done, total } if done == total)));
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(first.reused_tokens, 0);
    assert!(first.tokens > 0 && first.context_used > 0 && first.kv_bytes > 0);

    // A follow-up carries the answer: the rendered prompt shares the cached prefix.
    messages.push(ChatMessage::new("assistant", text));
    messages.push(ChatMessage::new("user", "Now in Rust."));
    engine.send(ask(&messages, 4));
    let (_, second) = until_done(&rx);
    assert!(
        second.reused_tokens > 10,
        "only {} positions reused",
        second.reused_tokens
    );
}

#[test]
fn loops_change_mid_answer_and_cancel_keeps_the_partial_answer() {
    let (engine, rx) = start(Some(2));
    while !matches!(next(&rx), Event::Loaded(_)) {}
    engine.send(ask(
        &[ChatMessage::new("user", "Count to one hundred.")],
        400,
    ));
    // Wait for the answer to start, then change loops and cancel while it streams.
    while !matches!(next(&rx), Event::Token { .. }) {}
    engine.send(Request::SetLoops(3));
    let mut changed = false;
    let mut cancelled_sent = false;
    let stats = loop {
        match next(&rx) {
            Event::LoopsChanged(3) => {
                changed = true;
                if !cancelled_sent {
                    engine.send(Request::Cancel);
                    cancelled_sent = true;
                }
            }
            Event::Done(stats) => break stats,
            Event::Error(e) => panic!("{e}"),
            _ => {}
        }
    };
    assert!(changed);
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    assert!(stats.tokens >= 1 && stats.tokens < 400);

    engine.send(Request::SetLoops(1));
    assert_eq!(next(&rx), Event::LoopsChanged(1));
    engine.send(Request::Reset);
    assert_eq!(next(&rx), Event::ResetDone);
    engine.send(ask(&[ChatMessage::new("user", "hi")], 2));
    let (_, stats) = until_done(&rx);
    assert_eq!(stats.reused_tokens, 0, "reset forgets the cache");
}

#[test]
fn a_missing_model_is_reported_not_a_crash() {
    let (tx, rx) = mpsc::channel();
    let engine = Engine::spawn(
        EngineOptions {
            model: "/no/such/model".into(),
            loops: None,
            context_size: None,
            device: DeviceSpec::Cpu,
            dtype: None,
        },
        move |event| {
            let _ = tx.send(event);
        },
    )
    .unwrap();
    loop {
        match next(&rx) {
            Event::Loading(_) => {}
            Event::LoadFailed(message) => {
                assert!(message.contains("/no/such/model"), "{message}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    drop(engine);
}

#[test]
fn a_conversation_that_outgrows_the_context_drops_its_oldest_messages() {
    let (engine, rx) = start_with_context(None, Some(96));
    let info = loop {
        if let Event::Loaded(info) = next(&rx) {
            break info;
        }
    };
    assert_eq!(
        info.context_size, 96,
        "the configured size, within the model's"
    );
    let long = "one two three four five six seven eight nine ten ".repeat(2);
    let mut messages = vec![ChatMessage::new("system", "Be brief.")];
    for turn in 0..3 {
        messages.push(ChatMessage::new("user", format!("{turn}: {long}")));
        messages.push(ChatMessage::new("assistant", long.clone()));
    }
    messages.push(ChatMessage::new("user", "And now?"));
    engine.send(ask(&messages, 8));
    let (_, stats) = until_done(&rx);
    assert!(stats.dropped_messages >= 2, "{stats:?}");
    assert_eq!(
        stats.dropped_messages % 2,
        0,
        "a question is dropped with its answer"
    );
    assert!(stats.context_used <= 96, "{stats:?}");

    // A single message longer than the context is an error, not a crash.
    engine.send(ask(&[ChatMessage::new("user", long.repeat(10))], 8));
    loop {
        match next(&rx) {
            Event::Error(e) => {
                assert!(e.contains("exceeds the model's context of 96"), "{e}");
                break;
            }
            Event::Done(stats) => panic!("answered: {stats:?}"),
            _ => {}
        }
    }
}

#[test]
fn requests_sent_during_an_answer_are_all_served_in_order() {
    let (engine, rx) = start(None);
    // All three are queued before the first answer's first token: the worker takes the
    // other two in while it streams, and must keep both.
    let lengths = [5, 3, 4];
    for (i, &n) in lengths.iter().enumerate() {
        let question = format!("question {i}");
        engine.send(ask(&[ChatMessage::new("user", question.as_str())], n));
    }
    for &n in &lengths {
        let (_, stats) = until_done(&rx);
        assert_eq!(
            (stats.stop_reason, stats.tokens),
            (StopReason::MaxTokens, n),
            "answers in the order asked"
        );
    }
}

#[test]
fn a_reset_during_an_answer_cancels_it_first() {
    let (engine, rx) = start(None);
    engine.send(ask(&[ChatMessage::new("user", "tell me everything")], 200));
    engine.send(Request::Reset);
    let (_, stats) = until_done(&rx);
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    assert!(stats.tokens < 200, "{stats:?}");
    loop {
        match next(&rx) {
            Event::ResetDone => break,
            Event::Error(e) => panic!("engine error: {e}"),
            _ => {}
        }
    }
}
