//! The TUI's redraw time at a short (10 messages) and a long (300 messages) transcript
//! with code blocks in several languages at 120x40, timed per token while the last answer
//! streams. Ignored (it
//! measures; run it in a release build):
//! `cargo test --release --test redraw -- --ignored --nocapture`.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use crossterm::event::{KeyCode, KeyEvent};
use plait::engine::{Event, LoopControl, ModelInfo, SamplingParams, StopReason, TurnStats};
use plait::tui::{update, App, AppEvent, Settings};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

const ANSWERS: [&str; 4] = [
    "Here is a Rust version:\n\n```rust\nfn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\nfn main() {\n    println!(\"{}\", add(2, 3));\n}\n```\n\nIt returns the **sum**; overflow panics in debug builds.",
    "In Python:\n\n```python\ndef reverse(s: str) -> str:\n    \"\"\"Reverse a string.\"\"\"\n    return s[::-1]\n\nprint(reverse(\"plait\"))\n```\n\nSlicing with a step of `-1` walks backwards.",
    "A JavaScript debounce:\n\n```javascript\nfunction debounce(fn, ms) {\n  let timer;\n  return (...args) => {\n    clearTimeout(timer);\n    timer = setTimeout(() => fn(...args), ms);\n  };\n}\n```\n\n- resets the timer on each call\n- runs once the calls stop",
    "Go, with an error:\n\n```go\nfunc parse(s string) (int, error) {\n\tn, err := strconv.Atoi(s)\n\tif err != nil {\n\t\treturn 0, fmt.Errorf(\"parse %q: %w\", s, err)\n\t}\n\treturn n, nil\n}\n```\n\n| case | result |\n| --- | --- |\n| \"12\" | 12 |\n| \"x\" | error |",
];

fn key(app: &mut App, code: KeyCode) {
    update(app, AppEvent::Key(KeyEvent::from(code)));
}

fn token(text: &str) -> AppEvent {
    AppEvent::Engine(Event::Token {
        id: 0,
        text: text.to_owned(),
        latency: Duration::from_millis(20),
    })
}

fn done() -> AppEvent {
    AppEvent::Engine(Event::Done {
        id: 0,
        stats: TurnStats {
            stop_reason: StopReason::Eos,
            tokens: 40,
            prompt_tokens: 100,
            prefill_time: Duration::from_millis(10),
            time_to_first_token: Duration::from_millis(20),
            decode_time: Duration::from_millis(800),
            decode_tok_s: 50.0,
            reused_tokens: 90,
            loops: 2,
            context_used: 140,
            kv_bytes: 1 << 20,
            dropped_messages: 0,
        },
    })
}

/// Sends `question` and streams `answer` in word-sized tokens, drawing after each; the
/// redraw times go to `times` when it is given.
fn turn(
    app: &mut App,
    question: &str,
    answer: &str,
    mut draw: impl FnMut(&mut App) -> Duration,
    mut times: Option<&mut Vec<Duration>>,
) {
    update(app, AppEvent::Paste(question.to_owned()));
    key(app, KeyCode::Enter);
    for word in answer.split_inclusive(' ') {
        update(app, token(word));
        // Every token is drawn, as the TUI does (which also loads each language's syntax
        // before the measured turn); only the measured turn's times are kept.
        let took = draw(app);
        if let Some(times) = times.as_deref_mut() {
            times.push(took);
        }
    }
    update(app, done());
}

/// Builds a transcript of `messages` messages (the last answer streaming) at 120x40 and
/// prints the redraw times of the last answer's tokens.
fn measure(messages: usize) {
    let mut app = App::new(
        "bench",
        Settings {
            sampling: SamplingParams::default(),
            max_tokens: 512,
            system_prompt: None,
        },
        true,
    );
    update(
        &mut app,
        AppEvent::Engine(Event::Loaded(ModelInfo {
            name: "bench".into(),
            path: "bench".into(),
            parameters: 0,
            quantization: "none".into(),
            trained_loops: 2,
            loops: 2,
            window: 4,
            context_size: 1 << 20,
            supports_tools: false,
            loop_control: LoopControl::Live,
            server: None,
        })),
    );
    update(
        &mut app,
        AppEvent::Resize {
            width: 120,
            height: 40,
        },
    );
    let mut terminal = Terminal::new(TestBackend::new(120, 40)).unwrap();
    let mut draw = |app: &mut App| {
        let started = Instant::now();
        terminal
            .draw(|frame| plait::tui::ui::draw(frame, app))
            .unwrap();
        started.elapsed()
    };
    for i in 0..messages / 2 - 1 {
        let answer = ANSWERS[i % ANSWERS.len()];
        turn(
            &mut app,
            &format!("question {i}: show me an example"),
            answer,
            &mut draw,
            None,
        );
    }
    let mut times = Vec::new();
    let last = ANSWERS.join("\n\n");
    turn(
        &mut app,
        "the last question",
        &last,
        &mut draw,
        Some(&mut times),
    );
    assert_eq!(app.cells.len(), messages);
    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    println!(
        "redraw at {messages} messages, 120x40, {} streamed tokens: p50 {:?}, p99 {:?}, max {:?}",
        times.len(),
        pct(0.5),
        pct(0.99),
        times[times.len() - 1]
    );
}

#[test]
#[ignore = "a measurement: run in a release build with --ignored --nocapture"]
fn redraw_while_streaming_at_300_messages() {
    // The same answer streaming at the end of a short and of a long transcript: the
    // per-token work must not grow with the transcript.
    measure(10);
    measure(300);
}
