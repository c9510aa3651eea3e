//! The engine's worker thread over the real model: load, stream, loop changes, cancel, reuse.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use plait::engine::{
    Batching, ChatMessage, Engine, EngineOptions, Event, FailureKind, GenerateJob, Request,
    RequestId, StopReason, TurnStats,
};
use plait::model::{DeviceSpec, LoadedModel};

fn start(loops: Option<usize>) -> (Engine, mpsc::Receiver<Event>) {
    start_with_context(loops, None)
}

fn start_with_context(
    loops: Option<usize>,
    context_size: Option<usize>,
) -> (Engine, mpsc::Receiver<Event>) {
    start_with(loops, context_size, None, Batching::default())
}

/// The engine answering one request at a time, the others queued in order.
fn start_one_at_a_time() -> (Engine, mpsc::Receiver<Event>) {
    let batching = Batching {
        max_conversations: 1,
        ..Batching::default()
    };
    start_with(None, None, None, batching)
}

fn start_with(
    loops: Option<usize>,
    context_size: Option<usize>,
    cache_budget: Option<usize>,
    batching: Batching,
) -> (Engine, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let engine = Engine::spawn(
        EngineOptions {
            model: fixture("plt-tiny-2loop"),
            loops,
            context_size,
            device: DeviceSpec::Cpu,
            dtype: None,
            cache_budget,
            batching,
        },
        move |event| {
            let _ = tx.send(event);
        },
    )
    .unwrap();
    (engine, rx)
}

/// The next event but the worker's scheduling reports (`Event::Step`).
fn next(rx: &mpsc::Receiver<Event>) -> Event {
    loop {
        let event = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the engine went quiet");
        if !matches!(event, Event::Step { .. }) {
            return event;
        }
    }
}

/// Events until a turn's Done, with the Done.
fn until_done(rx: &mpsc::Receiver<Event>) -> (Vec<Event>, TurnStats) {
    let (seen, _, stats) = until_done_with_id(rx);
    (seen, stats)
}

/// Events until a turn's Done, with its request id and figures.
fn until_done_with_id(rx: &mpsc::Receiver<Event>) -> (Vec<Event>, RequestId, TurnStats) {
    let mut seen = Vec::new();
    loop {
        match next(rx) {
            Event::Done { id, stats } => return (seen, id, stats),
            Event::Error(e) | Event::Failed { message: e, .. } => panic!("engine error: {e}"),
            other => seen.push(other),
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn job(messages: &[ChatMessage], max_tokens: usize) -> GenerateJob {
    chat_job(
        NEXT_ID.fetch_add(1, Ordering::Relaxed),
        messages,
        max_tokens,
    )
}

fn ask(messages: &[ChatMessage], max_tokens: usize) -> Request {
    Request::Generate(job(messages, max_tokens))
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
        .any(|e| matches!(e, Event::PrefillProgress { done, total, .. } if done == total)));
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
    let count = job(&[ChatMessage::new("user", "Count to one hundred.")], 400);
    let running = count.id;
    engine.send(Request::Generate(count));
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
                    engine.send(Request::Cancel(running));
                    cancelled_sent = true;
                }
            }
            Event::Done { stats, .. } => break stats,
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
            cache_budget: None,
            batching: Default::default(),
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
            Event::Failed { kind, message, .. } => {
                assert_eq!(kind, FailureKind::ContextLength);
                assert!(
                    message.contains("exceeds the model's context of 96"),
                    "{message}"
                );
                break;
            }
            Event::Done { stats, .. } => panic!("answered: {stats:?}"),
            _ => {}
        }
    }
}

#[test]
fn requests_past_the_conversation_limit_are_all_served_in_order() {
    let (engine, rx) = start_one_at_a_time();
    // All three are queued before the first answer's first token: the worker takes the
    // other two in while it streams, and must keep both.
    let lengths = [5, 3, 4];
    for (i, &n) in lengths.iter().enumerate() {
        let question = format!("question {i}");
        engine.send(ask(&[ChatMessage::new("user", question.as_str())], n));
    }
    let first = NEXT_ID.load(Ordering::Relaxed) - lengths.len() as u64;
    for (i, &n) in lengths.iter().enumerate() {
        let (events, id, stats) = until_done_with_id(&rx);
        assert_eq!(id, first + i as u64, "answers in the order asked");
        assert!(
            events.iter().all(|e| match e {
                Event::Started { id: e, .. }
                | Event::PrefillProgress { id: e, .. }
                | Event::Token { id: e, .. } => *e == id,
                _ => true,
            }),
            "every event names its request"
        );
        assert_eq!(
            (stats.stop_reason, stats.tokens),
            (StopReason::MaxTokens, n)
        );
    }
}

#[test]
fn a_queued_request_cancelled_is_never_run() {
    let (engine, rx) = start_one_at_a_time();
    let jobs: Vec<GenerateJob> = (0..3)
        .map(|i| job(&[ChatMessage::new("user", format!("question {i}"))], 6))
        .collect();
    let ids: Vec<RequestId> = jobs.iter().map(|j| j.id).collect();
    for j in jobs {
        engine.send(Request::Generate(j));
    }
    engine.send(Request::Cancel(ids[1]));
    let (_, a, _) = until_done_with_id(&rx);
    let (_, b, _) = until_done_with_id(&rx);
    assert_eq!((a, b), (ids[0], ids[2]));
}

/// Two conversations with the same system prompt, each a question and a follow-up.
fn two_conversations() -> [Vec<ChatMessage>; 2] {
    [
        "Write a function that adds two numbers.",
        "Explain what a closure is.",
    ]
    .map(|q| {
        vec![
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", q),
        ]
    })
}

#[test]
fn interleaved_conversations_each_keep_their_cache() {
    let (engine, rx) = start(None);
    let mut conversations = two_conversations();
    let mut first_prompts = Vec::new();
    for messages in &mut conversations {
        engine.send(ask(messages, 6));
        let (events, stats) = until_done(&rx);
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                Event::Token { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        messages.push(ChatMessage::new("assistant", text));
        messages.push(ChatMessage::new("user", "And in Rust?"));
        first_prompts.push(stats.prompt_tokens);
    }
    // The second conversation's first turn shared only the system prompt with the first's
    // cache; the first's cache was copied, not taken: both second turns reuse their own.
    for (messages, first_prompt) in conversations.iter().zip(&first_prompts) {
        engine.send(ask(messages, 4));
        let (_, stats) = until_done(&rx);
        assert!(
            stats.reused_tokens > *first_prompt,
            "reused {} of a conversation whose first prompt was {first_prompt}",
            stats.reused_tokens
        );
    }
}

#[test]
fn a_cache_budget_of_one_cache_keeps_only_the_last_conversation() {
    let (engine, rx) = start_with(None, None, Some(1), Batching::default());
    let conversations = two_conversations();
    let mut first_prompt = 0;
    for messages in &conversations {
        engine.send(ask(messages, 4));
        first_prompt = first_prompt.max(until_done(&rx).1.prompt_tokens);
    }
    let mut again = conversations[0].clone();
    again.push(ChatMessage::new("assistant", "x"));
    again.push(ChatMessage::new("user", "more"));
    engine.send(ask(&again, 2));
    let (_, stats) = until_done(&rx);
    assert!(
        stats.reused_tokens < first_prompt,
        "the first conversation's cache was dropped: {stats:?}"
    );
    assert!(
        stats.reused_tokens > 0,
        "the shared system prompt is reused"
    );
}

#[test]
fn a_forked_cache_continues_exactly_as_a_fresh_one() {
    let loaded = LoadedModel::load(&fixture("plt-tiny-2loop"), &candle_core::Device::Cpu).unwrap();
    let model = &loaded.model;
    let prompt: Vec<u32> = (1..60).map(|i| (i * 7) % 200 + 3).collect();
    let mut original = model.new_cache(2).unwrap();
    model
        .prefill_reusing(&mut original, &prompt, &mut |_, _| {})
        .unwrap();
    let mut other = prompt[..40].to_vec();
    other.extend([9, 8, 7, 6, 5]);
    let mut fork = model.fork_cache(&original, 40).unwrap();
    assert_eq!(fork.tokens(), &prompt[..40]);
    let (forked, reused) = model
        .prefill_reusing(&mut fork, &other, &mut |_, _| {})
        .unwrap();
    assert_eq!(reused, 40);
    let mut fresh = model.new_cache(2).unwrap();
    let (expected, _) = model
        .prefill_reusing(&mut fresh, &other, &mut |_, _| {})
        .unwrap();
    let diff = (forked - expected).unwrap().abs().unwrap().max(0).unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    // The original is untouched.
    assert_eq!(original.tokens(), prompt.as_slice());
    let next = model.decode(&mut original, 11).unwrap();
    let mut check = model.new_cache(2).unwrap();
    let mut longer = prompt.clone();
    longer.push(11);
    let (want, _) = model
        .prefill_reusing(&mut check, &longer, &mut |_, _| {})
        .unwrap();
    let diff = (next - want).unwrap().abs().unwrap().max(0).unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
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

/// Each request's streamed text and figures from `events` (which hold all of their Done
/// events); checks that each request's events come in order (Started, tokens, Done).
fn answers(events: &[Event], ids: &[RequestId]) -> Vec<(String, TurnStats)> {
    let mut texts = vec![None::<String>; ids.len()];
    let mut done = vec![None; ids.len()];
    for event in events {
        let slot = |id: &RequestId| ids.iter().position(|i| i == id);
        match event {
            Event::Started { id, .. } => {
                if let Some(i) = slot(id) {
                    texts[i] = Some(String::new());
                }
            }
            Event::Token { id, text, .. } => {
                if let Some(i) = slot(id) {
                    assert!(done[i].is_none(), "a token after its Done");
                    texts[i]
                        .as_mut()
                        .expect("a token before Started")
                        .push_str(text);
                }
            }
            Event::Done { id, stats } => {
                if let Some(i) = slot(id) {
                    done[i] = Some(stats.clone());
                }
            }
            Event::Error(e) | Event::Failed { message: e, .. } => panic!("engine error: {e}"),
            _ => {}
        }
    }
    texts
        .into_iter()
        .zip(done)
        .map(|(text, stats)| (text.expect("started"), stats.expect("done")))
        .collect()
}

/// Three questions at loop counts 1, 2, 3 (prompts of different lengths).
fn three_questions() -> Vec<GenerateJob> {
    let questions = [
        "hi",
        "Write a function that adds two numbers, then explain how it works in detail.",
        "What is a loop?",
    ];
    questions
        .iter()
        .zip([1, 2, 3])
        .map(|(q, loops)| {
            let mut job = job(&[ChatMessage::new("user", *q)], 24);
            job.loops = Some(loops);
            job
        })
        .collect()
}

#[test]
fn conversations_answered_together_each_get_their_solo_answer() {
    // Alone: one at a time.
    let (engine, rx) = start_one_at_a_time();
    while !matches!(next(&rx), Event::Loaded(_)) {}
    let solo: Vec<(String, TurnStats)> = three_questions()
        .into_iter()
        .map(|job| {
            let id = job.id;
            engine.send(Request::Generate(job));
            let (mut events, _, stats) = until_done_with_id(&rx);
            events.push(Event::Done { id, stats });
            answers(&events, &[id]).remove(0)
        })
        .collect();
    drop(engine);

    // Together: the first two start at once, the third joins once the first streams, and
    // a fourth joins with it and is cancelled mid-way.
    let (engine, rx) = start(None);
    while !matches!(next(&rx), Event::Loaded(_)) {}
    let mut jobs = three_questions();
    let third_job = jobs.pop().unwrap();
    let ids: Vec<RequestId> = jobs.iter().map(|j| j.id).chain([third_job.id]).collect();
    let mut third = Some(third_job);
    for job in jobs {
        engine.send(Request::Generate(job));
    }
    let cancelled = job(&[ChatMessage::new("user", "Count to one hundred.")], 200);
    let cancelled_id = cancelled.id;
    let mut cancelled = Some(cancelled);
    let (mut events, mut rows, mut ended) = (Vec::new(), Vec::new(), 0);
    let (mut first_tokens, mut cancelled_tokens) = (0, 0);
    while ended < 4 {
        let event = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        match &event {
            Event::Step { rows: r, .. } => rows.push(*r),
            Event::Token { id, .. } if *id == ids[0] => {
                first_tokens += 1;
                if first_tokens == 3 {
                    engine.send(Request::Generate(third.take().unwrap()));
                    engine.send(Request::Generate(cancelled.take().unwrap()));
                }
            }
            Event::Token { id, .. } if *id == cancelled_id => {
                cancelled_tokens += 1;
                if cancelled_tokens == 3 {
                    engine.send(Request::Cancel(cancelled_id));
                }
            }
            Event::Done { id, .. } => {
                assert!(*id != ids[0] || first_tokens >= 3, "the first ended early");
                ended += 1;
            }
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
        events.push(event);
    }
    let together = answers(&events, &ids);
    for (i, ((solo_text, solo), (text, stats))) in solo.iter().zip(&together).enumerate() {
        assert_eq!(text, solo_text, "question {i}'s answer");
        assert_eq!(
            (stats.tokens, stats.stop_reason, stats.loops),
            (solo.tokens, solo.stop_reason, solo.loops)
        );
    }
    let (_, cancelled) = answers(&events, &[cancelled_id]).remove(0);
    assert_eq!(cancelled.stop_reason, StopReason::Cancelled);
    assert!(cancelled.tokens >= 3 && cancelled.tokens < 200);
    assert!(
        rows.iter().any(|&r| r >= 1 + 2 + 3),
        "one step carried the loop rows of the three questions: {rows:?}"
    );
}

#[test]
fn a_long_prompt_is_computed_a_chunk_per_step_beside_a_running_answer() {
    let batching = Batching {
        max_conversations: 4,
        prefill_chunk: 16,
    };
    let (engine, rx) = start_with(None, None, None, batching);
    while !matches!(next(&rx), Event::Loaded(_)) {}
    let running = job(&[ChatMessage::new("user", "Count to one hundred.")], 60);
    let running_id = running.id;
    engine.send(Request::Generate(running));
    let long_text = "Explain what this code does, line by line. ".repeat(12);
    let long = job(&[ChatMessage::new("user", long_text)], 4);
    let long_id = long.id;
    let mut long = Some(long);
    let mut order = Vec::new();
    let mut ended = 0;
    while ended < 2 {
        match next(&rx) {
            Event::Token { id, .. } if id == running_id => {
                order.push('t');
                if let Some(long) = long.take() {
                    engine.send(Request::Generate(long));
                }
            }
            Event::PrefillProgress { id, .. } if id == long_id => order.push('p'),
            Event::Done { id, stats } => {
                ended += 1;
                if id == running_id {
                    assert!(stats.tokens > 1, "{stats:?}");
                    order.push('d');
                }
            }
            Event::Failed { message, .. } | Event::Error(message) => panic!("{message}"),
            _ => {}
        }
    }
    let order: String = order.into_iter().collect();
    let chunks = order.matches('p').count();
    assert!(chunks >= 4, "the long prompt took {chunks} chunks: {order}");
    // While the first answer streams, each of its steps waits for one chunk at most.
    let streaming = &order[..order.find('d').unwrap()];
    assert!(
        !streaming.contains("pp"),
        "two chunks between two tokens: {order}"
    );
    assert!(
        streaming.trim_end_matches('t').contains('p'),
        "the prompt was computed while the answer streamed: {order}"
    );
}

#[test]
fn a_request_past_the_kv_budget_waits_for_the_running_answer() {
    // One byte of budget: a second answer never fits beside the first, which always runs.
    let (engine, rx) = start_with(None, None, Some(1), Batching::default());
    while !matches!(next(&rx), Event::Loaded(_)) {}
    let (first, second) = (
        job(&[ChatMessage::new("user", "hi")], 6),
        job(&[ChatMessage::new("user", "hello")], 6),
    );
    let ids = [first.id, second.id];
    engine.send(Request::Generate(first));
    engine.send(Request::Generate(second));
    let (mut order, mut waited, mut ended) = (Vec::new(), false, 0);
    while ended < 2 {
        let event = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        match event {
            Event::Step {
                running, waiting, ..
            } => {
                assert!(running <= 1, "{running} answers beside each other");
                waited |= waiting == 1;
            }
            Event::Started { id, .. } => order.push(("started", id)),
            Event::Done { id, .. } => {
                order.push(("done", id));
                ended += 1;
            }
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
    assert!(waited, "the second request was reported waiting");
    let want = [
        ("started", ids[0]),
        ("done", ids[0]),
        ("started", ids[1]),
        ("done", ids[1]),
    ];
    assert_eq!(order, want);
}
