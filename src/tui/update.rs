//! The update: a plain function of (state, event) that returns the effects the runtime must
//! carry out. Keys are routed here to the composer, the chat's scrolling or the diff pane.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEventKind};

use crate::engine::{LoopControl, Request, MAX_LOOPS};

use super::edits::{edits_prepared, on_diff_key, refresh_files};
use super::state::{App, AppEvent, Effect, Focus};
use super::turns::{attachments_read, on_engine, start_answer, submit};
use super::ui::{chat_lines_total, chat_text_size};

/// Lines a mouse wheel notch scrolls.
const WHEEL_LINES: usize = 3;

/// The keys, with what they do (the help overlay lists these).
pub const KEYS: &[(&str, &str)] = &[
    ("Enter", "send the message (or run the /command)"),
    ("Alt+Enter, Ctrl+J", "new line in the message"),
    ("Up / Down", "recall earlier messages (empty input)"),
    ("Alt+Up, F3", "one more loop (up to 8), from the next token"),
    ("Alt+Down, F2", "one loop fewer (down to 1)"),
    ("Esc", "cancel the answer / close this help"),
    ("Ctrl+R", "show or hide the answers' reasoning"),
    ("Ctrl+C", "cancel; when idle, press twice to quit"),
    ("PgUp / PgDn, wheel", "scroll the chat"),
    ("Home / End", "top / bottom of the chat (empty input)"),
    ("Tab", "next focus: input, chat, diff; completes a /command"),
    (
        "Diff: j/k, Space",
        "move to the next/previous hunk; accept or reject it",
    ),
    (
        "Diff: a, A, r, f",
        "apply accepted hunks; accept all; reject all; size",
    ),
    ("F1, ?", "this help (? in an empty input)"),
];

/// Applies one event to the state; returns what the runtime must do.
pub fn update(app: &mut App, event: AppEvent) -> Vec<Effect> {
    match event {
        AppEvent::Key(key) if key.kind != KeyEventKind::Release => on_key(app, key),
        AppEvent::Key(_) => Vec::new(),
        AppEvent::Resize { width, height } => {
            app.screen = (width, height);
            // Text re-wraps at a new width: a position up the chat may be past its top now.
            if app.scroll_from_bottom > 0 {
                scroll(app, 0);
            }
            Vec::new()
        }
        AppEvent::Paste(text) => {
            app.composer.insert(&text);
            Vec::new()
        }
        AppEvent::Wheel(lines) => {
            scroll(app, lines.saturating_mul(WHEEL_LINES as i32));
            Vec::new()
        }
        AppEvent::Engine(event) => on_engine(app, event),
        AppEvent::FileRead { path, result } => {
            match result {
                Ok(text) => {
                    let lines = text.lines().count();
                    app.files.retain(|(p, _)| p != &path);
                    app.files.push((path.clone(), text));
                    app.notice(format!(
                        "added {} ({lines} lines) to the context",
                        path.display()
                    ));
                }
                Err(e) => app.notice(format!("cannot add {}: {e}", path.display())),
            }
            Vec::new()
        }
        AppEvent::AttachmentsRead(read) => attachments_read(app, read),
        AppEvent::Saved(result) => {
            match result {
                Ok(path) => app.notice(format!("saved the transcript to {}", path.display())),
                Err(e) => app.notice(format!("cannot save the transcript: {e}")),
            }
            Vec::new()
        }
        AppEvent::EditsPrepared {
            result,
            complete,
            anchors,
        } => edits_prepared(app, result, complete, anchors),
        AppEvent::Applied(result) => {
            match result {
                Ok(paths) => {
                    app.review = None;
                    if app.focus == Focus::Diff {
                        app.focus = Focus::Input;
                    }
                    app.notice(format!("applied: {} (/undo reverts)", paths.join(", ")));
                    return refresh_files(app);
                }
                Err(e) => app.notice(e),
            }
            Vec::new()
        }
        AppEvent::Undone(result) => {
            match result {
                Ok(Some(paths)) => {
                    app.notice(format!("undid the last apply: {}", paths.join(", ")));
                    return refresh_files(app);
                }
                Ok(None) => app.notice("nothing to undo"),
                Err(e) => app.notice(e),
            }
            Vec::new()
        }
        AppEvent::FilesRefreshed(read) => {
            for (path, result) in read {
                match result {
                    Ok(text) => {
                        if let Some(entry) = app.files.iter_mut().find(|(p, _)| p == &path) {
                            entry.1 = text;
                        }
                    }
                    Err(e) => {
                        app.files.retain(|(p, _)| p != &path);
                        app.notice(format!("dropped {} from the context: {e}", path.display()));
                    }
                }
            }
            if std::mem::take(&mut app.retry_pending) {
                return start_answer(app);
            }
            Vec::new()
        }
    }
}

/// Scrolls the chat `up` lines (down when negative), within its top and bottom.
fn scroll(app: &mut App, up: i32) {
    let wanted = if up >= 0 {
        app.scroll_from_bottom.saturating_add(up as usize)
    } else {
        app.scroll_from_bottom
            .saturating_sub(up.unsigned_abs() as usize)
    };
    let (width, height) = chat_text_size(app);
    let max = chat_lines_total(app, width).saturating_sub(height);
    app.scroll_from_bottom = wanted.min(max);
}

/// Lines a page key scrolls: the chat's height less one, so a line stays in sight.
fn page(app: &App) -> i32 {
    chat_text_size(app).1.max(2) as i32 - 1
}

fn scroll_to_top(app: &mut App) {
    app.scroll_from_bottom = usize::MAX;
    scroll(app, 0);
}

fn change_loops(app: &mut App, delta: i32) -> Vec<Effect> {
    let next = (app.readout.loops as i32 + delta).clamp(1, MAX_LOOPS as i32) as usize;
    if next == app.readout.loops && app.model_info.is_some() {
        return Vec::new();
    }
    set_loops(app, next)
}

/// Asks for `loops` loops from now on, as far as the backend lets the count change.
pub(super) fn set_loops(app: &mut App, loops: usize) -> Vec<Effect> {
    let Some(info) = &app.model_info else {
        app.notice("the model is not loaded yet");
        return Vec::new();
    };
    match info.loop_control {
        LoopControl::Fixed => {
            app.notice("the server fixes the loop count: it runs the count it was started with");
            return Vec::new();
        }
        LoopControl::NextRequest if app.busy() => app.notice(format!(
            "{loops} loops from the next answer; this one keeps its count"
        )),
        LoopControl::NextRequest | LoopControl::Live => {}
    }
    app.readout.loops = loops;
    vec![Effect::Send(Request::SetLoops(loops))]
}

fn on_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    let alt = key.modifiers.contains(KeyModifiers::ALT);
    if !(ctrl && key.code == KeyCode::Char('c')) {
        app.quit_armed = false;
    }
    if app.help {
        // Any key closes the help; F1/Esc/? only close it.
        app.help = false;
        if matches!(key.code, KeyCode::Esc | KeyCode::F(1) | KeyCode::Char('?')) {
            return Vec::new();
        }
    }
    match key.code {
        KeyCode::Char('c') if ctrl => {
            if app.busy() {
                return vec![Effect::Send(Request::Cancel(app.request))];
            }
            if app.quit_armed {
                return vec![Effect::Quit];
            }
            app.quit_armed = true;
            app.notice("press Ctrl+C again to quit");
        }
        KeyCode::Esc => {
            app.confirm_delete = false;
            if app.busy() {
                return vec![Effect::Send(Request::Cancel(app.request))];
            }
            app.focus = Focus::Input;
        }
        KeyCode::Up if alt => return change_loops(app, 1),
        KeyCode::Down if alt => return change_loops(app, -1),
        KeyCode::F(3) => return change_loops(app, 1),
        KeyCode::F(2) => return change_loops(app, -1),
        KeyCode::F(1) => app.help = true,
        KeyCode::Char('r') if ctrl => {
            app.show_reasoning = !app.show_reasoning;
            scroll(app, 0);
        }
        KeyCode::PageUp => scroll(app, page(app)),
        KeyCode::PageDown => scroll(app, -page(app)),
        KeyCode::Tab => {
            if !app.composer.complete() {
                app.focus = match app.focus {
                    Focus::Input => Focus::Chat,
                    Focus::Chat if app.review.is_some() => Focus::Diff,
                    Focus::Chat | Focus::Diff => Focus::Input,
                };
            }
        }
        _ if app.focus == Focus::Diff => return on_diff_key(app, key),
        _ if app.focus == Focus::Chat => match key.code {
            KeyCode::Up | KeyCode::Char('k') => scroll(app, 1),
            KeyCode::Down | KeyCode::Char('j') => scroll(app, -1),
            KeyCode::Home => scroll_to_top(app),
            KeyCode::End => app.scroll_from_bottom = 0,
            _ => {}
        },
        KeyCode::Enter if !alt => return submit(app),
        KeyCode::Char('?') if app.composer.is_empty() => app.help = true,
        KeyCode::Home if app.composer.is_empty() => scroll_to_top(app),
        KeyCode::End if app.composer.is_empty() => app.scroll_from_bottom = 0,
        _ => {
            app.composer.edit(key);
        }
    }
    Vec::new()
}

/// The app event for a crossterm mouse event plait reacts to (the wheel).
pub fn wheel(kind: MouseEventKind) -> Option<AppEvent> {
    match kind {
        MouseEventKind::ScrollUp => Some(AppEvent::Wheel(1)),
        MouseEventKind::ScrollDown => Some(AppEvent::Wheel(-1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use crossterm::event::{KeyCode, KeyModifiers};

    use super::*;
    use crate::engine::StopReason;
    use crate::tui::testing::{done, key, loaded_app, type_text, with};

    #[test]
    fn ctrl_c_when_idle_asks_once_then_quits() {
        let mut app = loaded_app();
        let ctrl_c = with(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert!(update(&mut app, ctrl_c.clone()).is_empty());
        assert!(app.quit_armed);
        assert_eq!(update(&mut app, ctrl_c.clone()), vec![Effect::Quit]);
        // Another key in between disarms it.
        let mut app = loaded_app();
        update(&mut app, ctrl_c.clone());
        update(&mut app, key(KeyCode::Char('x')));
        assert!(update(&mut app, ctrl_c).is_empty());
    }

    #[test]
    fn loop_keys_stay_within_one_to_eight() {
        let mut app = loaded_app();
        assert_eq!(
            update(&mut app, with(KeyCode::Up, KeyModifiers::ALT)),
            vec![Effect::Send(Request::SetLoops(3))]
        );
        assert_eq!(
            update(&mut app, key(KeyCode::F(2))),
            vec![Effect::Send(Request::SetLoops(2))]
        );
        update(&mut app, key(KeyCode::F(2)));
        assert_eq!(app.readout.loops, 1);
        assert!(update(&mut app, with(KeyCode::Down, KeyModifiers::ALT)).is_empty());
        for _ in 0..10 {
            update(&mut app, key(KeyCode::F(3)));
        }
        assert_eq!(app.readout.loops, 8);
        assert!(update(&mut app, key(KeyCode::F(3))).is_empty());
    }

    #[test]
    fn newline_keys_and_history_recall_edit_the_input() {
        let mut app = loaded_app();
        type_text(&mut app, "a");
        update(&mut app, with(KeyCode::Enter, KeyModifiers::ALT));
        update(&mut app, with(KeyCode::Char('j'), KeyModifiers::CONTROL));
        type_text(&mut app, "b");
        assert_eq!(app.composer.text(), "a\n\nb");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, done(StopReason::Eos));
        type_text(&mut app, "second");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, done(StopReason::Eos));
        update(&mut app, key(KeyCode::Up));
        assert_eq!(app.composer.text(), "second");
        update(&mut app, key(KeyCode::Up));
        assert_eq!(app.composer.text(), "a\n\nb");
        update(&mut app, key(KeyCode::Down));
        assert_eq!(app.composer.text(), "second");
        update(&mut app, key(KeyCode::Down));
        assert_eq!(app.composer.text(), "");
    }

    #[test]
    fn slash_completes_with_tab_and_question_mark_opens_help() {
        let mut app = loaded_app();
        type_text(&mut app, "/mo");
        assert_eq!(app.composer.completions().len(), 1);
        update(&mut app, key(KeyCode::Tab));
        assert_eq!(app.composer.text(), "/model ");
        app.composer.set(String::new());
        update(&mut app, key(KeyCode::Char('?')));
        assert!(app.help);
        update(&mut app, key(KeyCode::Esc));
        assert!(!app.help);
    }
}
