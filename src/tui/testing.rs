//! What the update's tests share: a loaded app, key and engine events, and an answer
//! with edits run against a workspace as the runtime would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::engine::{
    Event as EngineEvent, LoopControl, ModelInfo, SamplingParams, StopReason, TurnStats,
};

use super::state::{App, AppEvent, Effect, Settings};
use super::update::update;

/// An app whose engine has loaded plt-tiny-2loop (2 trained loops, window 4).
pub fn loaded_app() -> App {
    let mut app = App::new(
        "plt-tiny-2loop",
        Settings {
            sampling: SamplingParams::default(),
            max_tokens: 64,
            system_prompt: None,
        },
        true,
    );
    update(
        &mut app,
        AppEvent::Engine(EngineEvent::Loaded(ModelInfo {
            name: "plt-tiny-2loop".into(),
            path: "tests/fixtures/plt-tiny-2loop".into(),
            parameters: 160_000,
            quantization: "F32".into(),
            trained_loops: 2,
            loops: 2,
            window: 4,
            context_size: 4096,
            supports_tools: false,
            loop_control: LoopControl::Live,
            server: None,
        })),
    );
    app
}

/// `/add`s the file `name` of `root` as the runtime would; returns its text.
pub fn add_file(app: &mut App, root: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(root.join(name)).unwrap();
    let result = Ok(text.clone());
    update(
        app,
        AppEvent::FileRead {
            path: PathBuf::from(name),
            result,
        },
    );
    text
}

/// The text of the newest chat cell.
pub fn last_notice(app: &App) -> String {
    app.cells.last().unwrap().text()
}

/// A key press without modifiers.
pub fn key(code: KeyCode) -> AppEvent {
    AppEvent::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

/// A key press with `modifiers`.
pub fn with(code: KeyCode, modifiers: KeyModifiers) -> AppEvent {
    AppEvent::Key(KeyEvent::new(code, modifiers))
}

/// Types `text` key by key.
pub fn type_text(app: &mut App, text: &str) {
    for c in text.chars() {
        update(app, key(KeyCode::Char(c)));
    }
}

/// A token of request 1 that took `ms` milliseconds.
pub fn token(text: &str, ms: u64) -> AppEvent {
    AppEvent::Engine(EngineEvent::Token {
        id: 1,
        text: text.into(),
        latency: Duration::from_millis(ms),
    })
}

/// The figures of a short answer that ended for `stop_reason`.
pub fn turn_stats(stop_reason: StopReason) -> TurnStats {
    TurnStats {
        stop_reason,
        tokens: 3,
        prompt_tokens: 30,
        prefill_time: Duration::from_millis(30),
        time_to_first_token: Duration::from_millis(40),
        decode_tok_s: 50.0,
        decode_time: Duration::from_millis(40),
        loops: 2,
        reused_tokens: 12,
        context_used: 30,
        kv_bytes: 1024,
        dropped_messages: 0,
    }
}

/// The engine's end of request 1, for `stop_reason`.
pub fn done(stop_reason: StopReason) -> AppEvent {
    AppEvent::Engine(EngineEvent::Done {
        id: 1,
        stats: turn_stats(stop_reason),
    })
}

/// The file `EDIT_ANSWER` edits, in a fresh workspace.
pub fn hello_workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("def greet(name):\n    print(\"Hello\", name)\n");
    for i in 0..8 {
        text.push_str(&format!("\n# filler {i}\n"));
    }
    text.push_str("\ndef bye():\n    pass\n");
    std::fs::write(dir.path().join("hello.py"), text).unwrap();
    dir
}

/// Runs `effects` as the runtime would for edits, against `root`; returns what comes back.
pub fn run_edit_effects(app: &mut App, root: &Path, effects: Vec<Effect>) -> Vec<Effect> {
    let mut rest = Vec::new();
    for effect in effects {
        match effect {
            Effect::PrepareEdits {
                edits,
                expected,
                complete,
                anchors,
            } => {
                let event = crate::tui::prepare_edits(root, &edits, &expected, complete, anchors);
                rest.extend(update(app, event));
            }
            other => rest.push(other),
        }
    }
    rest
}

pub fn answer_with_edits(app: &mut App, root: &Path) -> Vec<Effect> {
    type_text(app, "tidy hello.py");
    update(app, key(KeyCode::Enter));
    let mut prepared = 0;
    for text in EDIT_ANSWER {
        let effects = update(app, token(text, 20));
        prepared += effects.len();
        assert!(run_edit_effects(app, root, effects).is_empty());
    }
    // One proposal as each SEARCH/REPLACE fence closes.
    assert_eq!(prepared, 2);
    let effects = update(app, done(StopReason::Eos));
    run_edit_effects(app, root, effects)
}

/// An answer that edits `hello.py` in two far-apart places.
pub const EDIT_ANSWER: &[&str] = &[
    "Change both:\n\nhello.py\n```python\n<<<<<<< SEARCH\n",
    "def greet(name):\n    print(\"Hello\", name)\n=======\n",
    "def greet(name):\n    print(f\"Hello, {name}!\")\n>>>>>>> REPLACE\n```\n\n",
    "hello.py\n```python\n<<<<<<< SEARCH\ndef bye():\n    pass\n=======\n",
    "def bye():\n    print(\"Bye\")\n>>>>>>> REPLACE\n```\n",
];

/// What a remote backend reports for a model served by `gpu-box:8000`.
pub fn remote_info(loop_control: LoopControl) -> ModelInfo {
    ModelInfo {
        name: "loopcoder".into(),
        path: "http://gpu-box:8000/v1".into(),
        parameters: 0,
        quantization: "unknown".into(),
        trained_loops: 1,
        loops: 1,
        window: 0,
        context_size: 32768,
        supports_tools: false,
        loop_control,
        server: Some("gpu-box:8000".into()),
    }
}
