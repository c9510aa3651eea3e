//! The edits of an answer: found while it streams (or inferred from its code blocks once
//! it is done), checked against the files, reviewed hunk by hunk in the diff pane, applied;
//! a failed edit goes back to the model for a corrected one, a bounded number of times.

use std::path::Path;

use crossterm::event::{KeyCode, KeyEvent};

use crate::patch::{infer_edits, parse_edits, FileChange};

use super::cells::{Cell, EditSummaryCell, UserCell};
use super::review::Review;
use super::state::{App, Effect, Focus};
use super::turns::start_answer;

/// How many times a failed edit goes back to the model for a corrected one.
const MAX_EDIT_RETRIES: usize = 2;

/// The path as a key of the hash map sent with edits (`./` dropped).
pub(super) fn path_key(path: &Path) -> String {
    let text = path.to_string_lossy();
    text.strip_prefix("./").unwrap_or(&text).to_string()
}

pub(super) fn refresh_files(app: &App) -> Vec<Effect> {
    if app.files.is_empty() {
        return Vec::new();
    }
    vec![Effect::RefreshFiles(
        app.files.iter().map(|(p, _)| p.clone()).collect(),
    )]
}

/// Proposes the edits of the latest answer once a new one has closed (or the answer is done).
pub(super) fn propose_edits(app: &mut App, complete: bool) -> Vec<Effect> {
    let Some(answer) = app.cells.iter().rev().find_map(Cell::answer) else {
        return Vec::new();
    };
    let edits = parse_edits(answer.text());
    if edits.is_empty() && complete {
        return infer(app);
    }
    if edits.is_empty() || (!complete && edits.len() == app.edits_seen) {
        return Vec::new();
    }
    app.edits_seen = edits.len();
    vec![Effect::PrepareEdits {
        edits,
        expected: app.reply_hashes.clone(),
        complete,
        anchors: Vec::new(),
    }]
}

/// Proposes edits from the code blocks of an answer that wrote none in an edit format,
/// placing them in the files the model was shown.
fn infer(app: &mut App) -> Vec<Effect> {
    let Some(answer) = app.cells.iter().rev().find_map(Cell::answer) else {
        return Vec::new();
    };
    let context: Vec<(String, String)> = app
        .shown_files()
        .map(|(path, text)| (path_key(path), text.clone()))
        .collect();
    if context.is_empty() {
        return Vec::new();
    }
    let inference = infer_edits(answer.text(), &context);
    for reason in &inference.skipped {
        app.notice(reason.clone());
    }
    if inference.edits.is_empty() {
        return Vec::new();
    }
    let anchors = inference
        .edits
        .iter()
        .flat_map(|e| e.anchors.iter().cloned())
        .collect();
    vec![Effect::PrepareEdits {
        edits: inference.edits.into_iter().map(|e| e.edit).collect(),
        expected: app.reply_hashes.clone(),
        complete: true,
        anchors,
    }]
}

pub(super) fn edits_prepared(
    app: &mut App,
    result: Result<Vec<FileChange>, String>,
    complete: bool,
    anchors: Vec<String>,
) -> Vec<Effect> {
    let inferred = !anchors.is_empty();
    match result {
        Ok(changes) if changes.is_empty() => {
            if complete {
                app.notice("the answer's edits change nothing");
            }
            Vec::new()
        }
        Ok(changes) => {
            let mut review = Review::new(changes, anchors, app.theme, app.color);
            if let Some(previous) = &app.review {
                review.carry_choices_from(previous);
            }
            if complete {
                app.cells.push(Cell::EditSummary(EditSummaryCell::new(
                    review.hunk_count(),
                    review.changes.len(),
                    inferred,
                )));
            }
            app.review = Some(review);
            Vec::new()
        }
        Err(_) if !complete => Vec::new(),
        Err(e) if inferred => {
            // Inference was the fallback: the answer is not sent back for a correction.
            app.notice(format!("the inferred edit cannot be applied: {e}"));
            Vec::new()
        }
        Err(e) => {
            app.notice(format!("the edit cannot be applied: {e}"));
            if app.edit_retries >= MAX_EDIT_RETRIES {
                app.notice(format!(
                    "no corrected edit after {MAX_EDIT_RETRIES} tries: ask again or edit the file yourself"
                ));
                return Vec::new();
            }
            app.edit_retries += 1;
            app.notice(format!(
                "asking the model for a corrected edit ({}/{MAX_EDIT_RETRIES})",
                app.edit_retries
            ));
            app.cells.push(Cell::User(UserCell::new(
                format!(
                    "The edit could not be applied: {e}\n\nSend a corrected SEARCH/REPLACE block whose SEARCH lines are copied exactly from the file."
                ),
            )));
            start_answer(app)
        }
    }
}

pub(super) fn apply_accepted(app: &mut App, confirmed: bool) -> Vec<Effect> {
    let Some(review) = &app.review else {
        app.notice("no edits to apply");
        return Vec::new();
    };
    if app.busy() {
        app.notice("wait for the answer to finish before applying its edits");
        return Vec::new();
    }
    if review.accepted_count() == 0 {
        app.notice("no hunk is accepted: Space accepts the selected one, A accepts all");
        return Vec::new();
    }
    let deletions = review.accepted_deletions();
    if !deletions.is_empty() && !confirmed {
        app.confirm_delete = true;
        app.notice(format!(
            "this deletes {}: press a (or /apply) again to confirm",
            deletions.join(", ")
        ));
        return Vec::new();
    }
    vec![Effect::Apply(review.selection())]
}

pub(super) fn on_diff_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    // A deletion is confirmed only by the very next action.
    let confirming = std::mem::take(&mut app.confirm_delete);
    let Some(review) = app.review.as_mut() else {
        app.focus = Focus::Input;
        return Vec::new();
    };
    match key.code {
        KeyCode::Up | KeyCode::Char('k') => review.select(-1),
        KeyCode::Down | KeyCode::Char('j') => review.select(1),
        KeyCode::Home => review.selected = 0,
        KeyCode::End => review.select(isize::MAX),
        KeyCode::Char(' ') => review.toggle_selected(),
        KeyCode::Char('A') => review.set_all(true),
        KeyCode::Char('r') => review.set_all(false),
        KeyCode::Char('f') => app.diff_large = !app.diff_large,
        KeyCode::Char('a') => return apply_accepted(app, confirming),
        _ => {}
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use crossterm::event::KeyCode;

    use super::*;
    use crate::engine::{Request, StopReason};
    use crate::patch::Edit;
    use crate::tui::state::AppEvent;
    use crate::tui::testing::{
        add_file, answer_with_edits, done, hello_workspace, key, last_notice, loaded_app,
        run_edit_effects, token, type_text, EDIT_ANSWER,
    };
    use crate::tui::update::update;

    #[test]
    fn edits_stream_into_the_diff_pane_and_only_accepted_hunks_are_applied() {
        let dir = hello_workspace();
        let mut app = loaded_app();
        assert!(answer_with_edits(&mut app, dir.path()).is_empty());
        let review = app.review.as_ref().unwrap();
        assert_eq!(review.changes.len(), 1);
        assert_eq!((review.hunk_count(), review.accepted_count()), (2, 2));
        assert!(app
            .cells
            .last()
            .unwrap()
            .text()
            .contains("2 hunks in 1 file"));
        // Tab reaches the diff pane; reject the first hunk and apply.
        update(&mut app, key(KeyCode::Tab));
        update(&mut app, key(KeyCode::Tab));
        assert_eq!(app.focus, Focus::Diff);
        update(&mut app, key(KeyCode::Char(' ')));
        update(&mut app, key(KeyCode::Char('j')));
        let effects = update(&mut app, key(KeyCode::Char('a')));
        let [Effect::Apply(selection)] = effects.as_slice() else {
            panic!("{effects:?}");
        };
        assert_eq!(selection[0].1, vec![false, true]);
        let record = crate::patch::apply_reviewed(&[(&selection[0].0, &selection[0].1)]).unwrap();
        let text = std::fs::read_to_string(dir.path().join("hello.py")).unwrap();
        assert!(text.contains("print(\"Hello\", name)") && text.contains("print(\"Bye\")"));
        update(
            &mut app,
            AppEvent::Applied(Ok(record.entries.iter().map(|e| e.path.clone()).collect())),
        );
        assert!(app.review.is_none());
        assert_eq!(app.focus, Focus::Input);
        type_text(&mut app, "/undo");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::Undo { force: false }]
        );
    }

    #[test]
    fn a_failed_edit_goes_back_to_the_model_at_most_twice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.py"), "print('other')\n").unwrap();
        let mut app = loaded_app();
        let effects = answer_with_edits(&mut app, dir.path());
        assert!(
            matches!(effects.as_slice(), [Effect::Send(Request::Generate(_))]),
            "{effects:?}"
        );
        let cells = app.cells.len();
        assert!(matches!(app.cells[cells - 2], Cell::User(_)));
        assert!(app.cells[cells - 2].text().contains("could not be applied"));
        for round in 0..2 {
            for text in EDIT_ANSWER {
                let effects = update(&mut app, token(text, 20));
                run_edit_effects(&mut app, dir.path(), effects);
            }
            let effects = update(&mut app, done(StopReason::Eos));
            let rest = run_edit_effects(&mut app, dir.path(), effects);
            assert_eq!(
                rest.len(),
                usize::from(round == 0),
                "round {round}: {rest:?}"
            );
        }
        assert!(last_notice(&app).contains("no corrected edit after 2 tries"));
        assert!(app.review.is_none());
        // A new message from the user starts the count again.
        type_text(&mut app, "again");
        update(&mut app, key(KeyCode::Enter));
        assert_eq!(app.edit_retries, 0);
    }

    #[test]
    fn a_deletion_waits_for_a_second_apply() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.py"), "x = 1\n").unwrap();
        let mut app = loaded_app();
        let changes = crate::patch::prepare(
            dir.path(),
            &[Edit::Delete {
                path: "old.py".into(),
            }],
            &HashMap::new(),
        )
        .unwrap();
        update(
            &mut app,
            AppEvent::EditsPrepared {
                result: Ok(changes),
                complete: true,
                anchors: Vec::new(),
            },
        );
        type_text(&mut app, "/apply");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        assert!(last_notice(&app).contains("this deletes old.py"));
        // Another action in between cancels the confirmation.
        type_text(&mut app, "/files");
        update(&mut app, key(KeyCode::Enter));
        type_text(&mut app, "/apply");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        type_text(&mut app, "/apply");
        assert!(matches!(
            update(&mut app, key(KeyCode::Enter)).as_slice(),
            [Effect::Apply(_)]
        ));
    }

    #[test]
    fn the_model_is_shown_file_hashes_that_edits_are_checked_against() {
        let dir = hello_workspace();
        let mut app = loaded_app();
        let text = add_file(&mut app, dir.path(), "./hello.py");
        // The file changes after the model was shown it: the edit is refused and retried.
        std::fs::write(dir.path().join("hello.py"), text.replace("bye", "ciao")).unwrap();
        let effects = answer_with_edits(&mut app, dir.path());
        assert!(app.cells.iter().any(|c| c.text().contains("changed since")));
        assert_eq!(effects.len(), 1);
    }

    #[test]
    fn a_plain_code_block_becomes_an_inferred_edit_that_starts_rejected() {
        let dir = hello_workspace();
        let mut app = loaded_app();
        add_file(&mut app, dir.path(), "hello.py");
        type_text(&mut app, "make greet friendlier");
        update(&mut app, key(KeyCode::Enter));
        update(
            &mut app,
            token(
                "```python\ndef greet(name):\n    print(f\"Hi, {name}!\")\n```\n",
                20,
            ),
        );
        let effects = update(&mut app, done(StopReason::Eos));
        assert!(run_edit_effects(&mut app, dir.path(), effects).is_empty());
        let review = app.review.as_ref().unwrap();
        assert_eq!(review.anchors, vec!["hello.py:1 `def greet(name):`"]);
        assert_eq!((review.hunk_count(), review.accepted_count()), (1, 0));
        assert!(app.cells.last().unwrap().text().starts_with("inferred"));
        type_text(&mut app, "/apply");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        assert!(last_notice(&app).contains("no hunk is accepted"));
        type_text(&mut app, "/diff");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, key(KeyCode::Char(' ')));
        let effects = update(&mut app, key(KeyCode::Char('a')));
        let [Effect::Apply(selection)] = effects.as_slice() else {
            panic!("{effects:?}");
        };
        crate::patch::apply_reviewed(&[(&selection[0].0, &selection[0].1)]).unwrap();
        let written = std::fs::read_to_string(dir.path().join("hello.py")).unwrap();
        assert!(written.starts_with("def greet(name):\n    print(f\"Hi, {name}!\")\n\n# filler 0"));
    }

    #[test]
    fn an_unplaceable_code_block_says_why_and_is_not_sent_back() {
        let mut app = loaded_app();
        update(
            &mut app,
            AppEvent::FileRead {
                path: PathBuf::from("hello.py"),
                result: Ok("def greet():\n    pass\n".into()),
            },
        );
        type_text(&mut app, "add a function");
        update(&mut app, key(KeyCode::Enter));
        update(
            &mut app,
            token("```python\ndef wave():\n    pass\n```\n", 20),
        );
        assert!(update(&mut app, done(StopReason::Eos)).is_empty());
        assert!(app.review.is_none());
        assert!(app
            .cells
            .last()
            .unwrap()
            .text()
            .contains("`def wave():` is in none of the context files"));
    }
}
