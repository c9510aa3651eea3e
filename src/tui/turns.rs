//! A turn with the engine: a message sent (its `@path` files read first), the answer's
//! events streaming into its cell and the readout, and `/retry`.

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::{
    Event as EngineEvent, FailureKind, GenerateJob, Prompt, Request, StopReason, TurnStats,
};
use crate::patch::content_hash;

use super::cells::{AnswerCell, AnswerStatus, Cell, UserCell};
use super::commands::run_command;
use super::edits::{path_key, propose_edits, refresh_files};
use super::state::{App, Effect, EngineState, SPARKLINE_LEN};

/// The `@path` words of a message.
pub fn attachment_paths(text: &str) -> Vec<PathBuf> {
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix('@'))
        .map(|p| p.trim_end_matches([',', '.', ';', ':', ')', '?', '!']))
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Sends what is typed: a command runs, a message goes to the engine once its files are read.
pub(super) fn submit(app: &mut App) -> Vec<Effect> {
    // A deletion is confirmed only by the very next action.
    let confirming = std::mem::take(&mut app.confirm_delete);
    let Some(text) = app.composer.take() else {
        return Vec::new();
    };
    if text.starts_with('/') {
        return run_command(app, &text, confirming);
    }
    if app.model_info.is_none() {
        app.notice("the model is not loaded yet");
        return Vec::new();
    }
    if app.busy() {
        app.notice("an answer is still streaming: wait, or press Esc to cancel it");
        return Vec::new();
    }
    let paths = attachment_paths(&text);
    app.edit_retries = 0;
    let mut message = UserCell::new(text);
    if !paths.is_empty() {
        // The message goes out once its files are read.
        message.set_pending(true);
        app.cells.push(Cell::User(message));
        return vec![Effect::ReadAttachments(paths)];
    }
    app.cells.push(Cell::User(message));
    start_answer(app)
}

/// Attaches the files read for the waiting message and sends it; any failure sends nothing.
pub(super) fn attachments_read(
    app: &mut App,
    read: Vec<(PathBuf, Result<String, String>)>,
) -> Vec<Effect> {
    let Some(index) = app
        .cells
        .iter()
        .rposition(|c| matches!(c, Cell::User(user) if user.pending()))
    else {
        return Vec::new();
    };
    let Cell::User(message) = &mut app.cells[index] else {
        return Vec::new();
    };
    let mut failed = Vec::new();
    for (path, result) in read {
        match result {
            Ok(text) => message.attach(path, text),
            Err(e) => failed.push(format!("@{}: {e}", path.display())),
        }
    }
    if !failed.is_empty() {
        // Nothing is sent: the message stays in the history to edit with Up.
        app.cells.remove(index);
        app.notice(format!("cannot attach {}", failed.join("; ")));
        return Vec::new();
    }
    message.set_pending(false);
    start_answer(app)
}

/// Opens an answer cell and asks the engine for it with the whole conversation.
pub(super) fn start_answer(app: &mut App) -> Vec<Effect> {
    // The prompt is the conversation before the answer's (empty) cell.
    let messages = app.messages();
    app.cells.push(Cell::Answer(AnswerCell::streaming()));
    app.scroll_from_bottom = 0;
    let r = &mut app.readout;
    r.state = EngineState::Prefill(0.0);
    r.ttft = None;
    r.tok_s = None;
    r.turn_tokens = 0;
    r.turn_decode_time = Duration::ZERO;
    app.edits_seen = 0;
    // What the model is shown now is what its edits are checked against when applied.
    app.reply_hashes = app
        .shown_files()
        .map(|(path, text)| (path_key(path), content_hash(text.as_bytes())))
        .collect();
    app.request += 1;
    vec![Effect::Send(Request::Generate(GenerateJob {
        id: app.request,
        prompt: Prompt::Chat {
            messages,
            drop_oldest: true,
            tools: Vec::new(),
        },
        sampling: app.settings.sampling.clone(),
        max_tokens: Some(app.settings.max_tokens),
        loops: None,
        cache_key: None,
    }))]
}

/// Drops the answers after the last message and asks again, with the context files re-read.
pub(super) fn retry(app: &mut App) -> Vec<Effect> {
    if app.model_info.is_none() || app.busy() {
        app.notice("/retry needs a loaded model and no answer streaming");
        return Vec::new();
    }
    let Some(last_user) = app.cells.iter().rposition(|c| matches!(c, Cell::User(_))) else {
        app.notice("no message to answer again");
        return Vec::new();
    };
    let mut index = 0;
    app.cells.retain(|c| {
        index += 1;
        index <= last_user + 1 || !matches!(c, Cell::Answer(_))
    });
    if app.files.is_empty() {
        return start_answer(app);
    }
    app.retry_pending = true;
    refresh_files(app)
}

/// The answer being streamed, if any.
fn streaming_answer(app: &mut App) -> Option<&mut AnswerCell> {
    app.cells.iter_mut().rev().find_map(|c| match c {
        Cell::Answer(answer) if answer.status() == AnswerStatus::Streaming => Some(answer),
        _ => None,
    })
}

/// What the engine reported: loading, the answer's tokens and its end, failures.
pub(super) fn on_engine(app: &mut App, event: EngineEvent) -> Vec<Effect> {
    let r = &mut app.readout;
    match event {
        EngineEvent::Started { .. } => {}
        EngineEvent::Loading(p) => r.state = EngineState::Loading(p),
        EngineEvent::Loaded(info) => {
            r.state = EngineState::Idle;
            r.model = match &info.server {
                // A served model's id may be a path or a hub name: its last part says enough.
                Some(server) => {
                    let name = info.name.rsplit('/').next().unwrap_or(&info.name);
                    format!("{name} @ {server}")
                }
                None => info.name.clone(),
            };
            r.loops = info.loops;
            r.trained_loops = info.trained_loops;
            r.context_size = info.context_size;
            app.model_info = Some(info);
        }
        EngineEvent::LoadFailed(message) => {
            r.state = EngineState::Failed;
            app.error(message);
        }
        EngineEvent::Unavailable(message) => {
            // Said once when the backend goes away, not at every retry.
            if r.state != EngineState::Offline {
                r.state = EngineState::Offline;
                app.error(message);
            }
        }
        EngineEvent::Notice(text) => app.notice(text),
        EngineEvent::Reasoning { text, .. } => {
            r.state = EngineState::Generating;
            if let Some(answer) = streaming_answer(app) {
                answer.push_reasoning(&text);
            }
        }
        EngineEvent::Tokenized { .. } | EngineEvent::Step { .. } => {}
        EngineEvent::PrefillProgress { done, total, .. } => {
            if matches!(r.state, EngineState::Prefill(_)) {
                r.state = EngineState::Prefill(done as f32 / total.max(1) as f32);
            }
        }
        EngineEvent::Token { text, latency, .. } => {
            if r.ttft.is_none() {
                r.ttft = Some(latency);
            } else {
                r.turn_tokens += 1;
                r.turn_decode_time += latency;
                r.tok_s = Some(r.turn_tokens as f64 / r.turn_decode_time.as_secs_f64().max(1e-9));
            }
            if latency > Duration::ZERO {
                r.latencies.push_back(latency);
                while r.latencies.len() > SPARKLINE_LEN {
                    r.latencies.pop_front();
                }
            }
            r.state = EngineState::Generating;
            if let Some(answer) = streaming_answer(app) {
                answer.push_text(&text);
                // Only a token with a backtick can close a fence: the reply is parsed
                // again only then, not on every token.
                if text.contains('`') {
                    return propose_edits(app, false);
                }
            }
        }
        EngineEvent::LoopsChanged(n) => r.loops = n,
        EngineEvent::Done { stats, .. } => {
            let cancelled = stats.stop_reason == StopReason::Cancelled;
            finish_turn(app, stats);
            // A cancelled answer's closed edits can be reviewed, but never go back to the model.
            return propose_edits(app, !cancelled);
        }
        EngineEvent::ResetDone => app.notice("new conversation"),
        EngineEvent::Error(message) => fail_answer(app, AnswerStatus::Failed, message),
        EngineEvent::Failed { kind, message, .. } => {
            let status = if kind == FailureKind::Interrupted {
                AnswerStatus::Interrupted
            } else {
                AnswerStatus::Failed
            };
            fail_answer(app, status, message);
        }
    }
    Vec::new()
}

/// The answer streaming (if any) ended with `status`; the failure is shown.
fn fail_answer(app: &mut App, status: AnswerStatus, message: String) {
    if let Some(answer) = streaming_answer(app) {
        answer.set_status(status);
    }
    if app.busy() {
        app.readout.state = EngineState::Idle;
    }
    app.error(message);
}

/// The answer ended: the readout takes the engine's figures, the cell its final status.
fn finish_turn(app: &mut App, stats: TurnStats) {
    let r = &mut app.readout;
    r.state = EngineState::Idle;
    r.ttft = Some(stats.time_to_first_token);
    if stats.tokens > 1 {
        r.tok_s = Some(stats.decode_tok_s);
    }
    r.context_used = stats.context_used;
    r.cached_tokens = stats.reused_tokens;
    app.kv_bytes = stats.kv_bytes;
    if stats.dropped_messages > 0 {
        app.notice(format!(
            "the conversation outgrew the context: its {} oldest message{} were left out",
            stats.dropped_messages,
            if stats.dropped_messages == 1 { "" } else { "s" }
        ));
    }
    if let Some(answer) = streaming_answer(app) {
        answer.set_status(if stats.stop_reason == StopReason::Cancelled {
            AnswerStatus::Cancelled
        } else {
            AnswerStatus::Done
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crossterm::event::{KeyCode, KeyModifiers};

    use super::*;
    use crate::engine::ChatMessage;
    use crate::tui::state::App;
    use crate::tui::state::AppEvent;
    use crate::tui::testing::{
        done, key, last_notice, loaded_app, remote_info, token, type_text, with,
    };
    use crate::tui::update::update;

    #[test]
    fn sending_a_message_asks_the_engine_with_the_whole_conversation() {
        let mut app = loaded_app();
        type_text(&mut app, "hello");
        let effects = update(&mut app, key(KeyCode::Enter));
        let [Effect::Send(Request::Generate(GenerateJob {
            prompt: Prompt::Chat { messages, .. },
            max_tokens: Some(max_tokens),
            ..
        }))] = effects.as_slice()
        else {
            panic!("{effects:?}");
        };
        assert_eq!(messages, &vec![ChatMessage::new("user", "hello")]);
        assert_eq!(*max_tokens, 64);
        assert!(app.composer.is_empty());
        assert_eq!(app.readout.state, EngineState::Prefill(0.0));
        assert_eq!(app.cells.len(), 2);
    }

    #[test]
    fn tokens_stream_into_the_answer_and_done_reports_the_figures() {
        let mut app = loaded_app();
        type_text(&mut app, "hi");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, token("Hel", 40));
        update(&mut app, token("lo", 20));
        update(&mut app, token("!", 20));
        assert_eq!(app.cells[1].text(), "Hello!");
        assert_eq!(app.readout.state, EngineState::Generating);
        assert_eq!(app.readout.ttft, Some(Duration::from_millis(40)));
        assert!((app.readout.tok_s.unwrap() - 50.0).abs() < 1e-6);
        update(&mut app, done(StopReason::Eos));
        assert_eq!(app.cells[1].answer().unwrap().status(), AnswerStatus::Done);
        assert_eq!(app.readout.state, EngineState::Idle);
        assert_eq!(app.readout.cached_tokens, 12);
        assert_eq!(app.readout.context_used, 30);
        // The next turn carries the answer.
        type_text(&mut app, "more");
        let effects = update(&mut app, key(KeyCode::Enter));
        let [Effect::Send(Request::Generate(GenerateJob {
            prompt: Prompt::Chat { messages, .. },
            ..
        }))] = effects.as_slice()
        else {
            panic!("{effects:?}");
        };
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1], ChatMessage::new("assistant", "Hello!"));
    }

    #[test]
    fn esc_and_ctrl_c_cancel_and_a_cancelled_answer_stays_marked() {
        let mut app = loaded_app();
        type_text(&mut app, "hi");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, token("partial", 10));
        assert_eq!(
            update(&mut app, key(KeyCode::Esc)),
            vec![Effect::Send(Request::Cancel(1))]
        );
        assert_eq!(
            update(&mut app, with(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            vec![Effect::Send(Request::Cancel(1))]
        );
        update(&mut app, done(StopReason::Cancelled));
        assert_eq!(
            app.cells[1].answer().unwrap().status(),
            AnswerStatus::Cancelled
        );
        assert_eq!(app.cells[1].text(), "partial");
    }

    #[test]
    fn at_path_attaches_a_file_to_the_message_before_it_is_sent() {
        let mut app = loaded_app();
        type_text(&mut app, "explain @src/lib.rs please");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::ReadAttachments(vec!["src/lib.rs".into()])]
        );
        let effects = update(
            &mut app,
            AppEvent::AttachmentsRead(vec![("src/lib.rs".into(), Ok("pub mod tui;".into()))]),
        );
        let [Effect::Send(Request::Generate(GenerateJob {
            prompt: Prompt::Chat { messages, .. },
            ..
        }))] = effects.as_slice()
        else {
            panic!("{effects:?}");
        };
        assert!(messages[0]
            .content
            .starts_with("explain @src/lib.rs please"));
        assert!(messages[0].content.contains("pub mod tui;"));
        // A file that cannot be read stops the message with a one-line error.
        type_text(&mut app, "and @nope.rs");
        update(&mut app, done(StopReason::Eos));
        update(&mut app, key(KeyCode::Enter));
        let effects = update(
            &mut app,
            AppEvent::AttachmentsRead(vec![("nope.rs".into(), Err("not found".into()))]),
        );
        assert!(effects.is_empty());
        assert!(last_notice(&app).contains("cannot attach @nope.rs: not found"));
    }

    #[test]
    fn a_server_that_is_down_is_said_once_and_named_when_it_answers() {
        let mut app = App::new("http://gpu-box:8000/v1", loaded_app().settings, true);
        for _ in 0..3 {
            update(
                &mut app,
                AppEvent::Engine(EngineEvent::Unavailable("cannot reach gpu-box".into())),
            );
        }
        assert_eq!(app.readout.state, EngineState::Offline);
        assert_eq!(app.cells.len(), 1);
        assert_eq!(last_notice(&app), "error: cannot reach gpu-box");
        update(
            &mut app,
            AppEvent::Engine(EngineEvent::Loaded(remote_info(
                crate::engine::LoopControl::Fixed,
            ))),
        );
        assert_eq!(app.readout.state, EngineState::Idle);
        assert_eq!(app.readout.model, "loopcoder @ gpu-box:8000");
    }

    #[test]
    fn an_interrupted_answer_keeps_its_text_and_retry_asks_again() {
        let mut app = loaded_app();
        type_text(&mut app, "hi");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, token("partial", 10));
        update(
            &mut app,
            AppEvent::Engine(EngineEvent::Failed {
                id: 1,
                kind: FailureKind::Interrupted,
                message: "the answer's stream stopped before its end".into(),
            }),
        );
        let answer = app.cells[1].answer().unwrap();
        assert_eq!(answer.status(), AnswerStatus::Interrupted);
        assert_eq!(answer.text(), "partial");
        assert!(!app.busy());
        type_text(&mut app, "/retry");
        let effects = update(&mut app, key(KeyCode::Enter));
        assert!(
            matches!(effects.as_slice(), [Effect::Send(Request::Generate(_))]),
            "{effects:?}"
        );
    }

    #[test]
    fn reasoning_streams_into_the_answer_apart_from_its_text() {
        let mut app = loaded_app();
        type_text(&mut app, "hi");
        update(&mut app, key(KeyCode::Enter));
        for text in ["Think", "ing."] {
            update(
                &mut app,
                AppEvent::Engine(EngineEvent::Reasoning {
                    id: 1,
                    text: text.into(),
                }),
            );
        }
        update(&mut app, token("Answer.", 10));
        let answer = app.cells[1].answer().unwrap();
        assert_eq!(
            (answer.reasoning(), answer.text()),
            ("Thinking.", "Answer.")
        );
        // The conversation sent back holds the answer, not the reasoning.
        update(&mut app, done(StopReason::Eos));
        assert_eq!(app.messages()[1], ChatMessage::new("assistant", "Answer."));
    }

    #[test]
    fn loop_keys_say_when_the_server_fixes_the_count_or_it_waits_for_the_next_answer() {
        use crate::engine::LoopControl;
        let mut app = loaded_app();
        update(
            &mut app,
            AppEvent::Engine(EngineEvent::Loaded(remote_info(LoopControl::Fixed))),
        );
        assert!(update(&mut app, key(KeyCode::F(3))).is_empty());
        assert!(last_notice(&app).contains("the server fixes the loop count"));
        type_text(&mut app, "/loops 2");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        assert_eq!(app.readout.loops, 1);
        update(
            &mut app,
            AppEvent::Engine(EngineEvent::Loaded(remote_info(LoopControl::NextRequest))),
        );
        type_text(&mut app, "hi");
        update(&mut app, key(KeyCode::Enter));
        assert_eq!(
            update(&mut app, key(KeyCode::F(3))),
            vec![Effect::Send(Request::SetLoops(2))]
        );
        assert!(last_notice(&app).contains("2 loops from the next answer"));
    }
}
