//! The screen's snapshots, and the cached chat drawn as a fresh one.

use std::time::Duration;

use ratatui::backend::TestBackend;
use ratatui::Terminal;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::*;
use crate::engine::{Event as EngineEvent, StopReason, TurnStats};
use crate::tui::cells::{AnswerStatus, Cell};
use crate::tui::state::AppEvent;
use crate::tui::testing::{
    done, hello_workspace, loaded_app, remote_info, run_edit_effects, token, turn_stats, type_text,
    EDIT_ANSWER,
};
use crate::tui::update::update;

fn ask(app: &mut App, question: &str, answer: &[&str]) {
    for c in question.chars() {
        update(
            app,
            AppEvent::Key(crossterm::event::KeyEvent::from(
                crossterm::event::KeyCode::Char(c),
            )),
        );
    }
    update(
        app,
        AppEvent::Key(crossterm::event::KeyEvent::from(
            crossterm::event::KeyCode::Enter,
        )),
    );
    for (i, text) in answer.iter().enumerate() {
        update(
            app,
            AppEvent::Engine(EngineEvent::Token {
                id: 1,
                text: text.to_string(),
                latency: Duration::from_millis(20 + (i as u64 * 7) % 30),
            }),
        );
    }
}

/// Draws `app` on a `width` x `height` screen, resized there first as the runtime does.
fn render(app: &mut App, width: u16, height: u16) -> Terminal<TestBackend> {
    update(app, AppEvent::Resize { width, height });
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| draw(frame, app)).unwrap();
    terminal
}

/// The screen as text with its styles.
fn screen(app: &mut App, width: u16, height: u16) -> String {
    format!("{:?}", render(app, width, height).backend().buffer())
}

/// The screen of a copy of `app`, whose cells keep no lines (they are drawn afresh).
fn fresh_screen(app: &App, width: u16, height: u16) -> String {
    screen(&mut app.clone(), width, height)
}

#[test]
fn cached_cells_draw_as_fresh_ones_after_a_resize_an_edit_or_a_status_change() {
    let mut app = loaded_app();
    ask(&mut app, "hi", CODE_ANSWER);
    update(
        &mut app,
        AppEvent::Engine(EngineEvent::Done {
            id: 1,
            stats: finished_stats(),
        }),
    );
    for (width, height) in [(80, 24), (60, 30), (80, 24)] {
        assert_eq!(
            screen(&mut app, width, height),
            fresh_screen(&app, width, height)
        );
    }
    let Cell::Answer(answer) = &mut app.cells[1] else {
        panic!("{:?}", app.cells[1]);
    };
    answer.push_text(" More.");
    answer.set_status(AnswerStatus::Cancelled);
    let drawn = screen(&mut app, 80, 24);
    assert_eq!(drawn, fresh_screen(&app, 80, 24));
    assert!(drawn.contains("(cancelled)"));
    app.color = false;
    assert_eq!(screen(&mut app, 80, 24), fresh_screen(&app, 80, 24));
}

#[test]
fn a_streaming_answer_draws_as_a_fresh_render_at_every_token() {
    let answers = [
        CODE_ANSWER.concat(),
        "# Plan\n\n1. read\n2. write\n\n- a\n\n- b\n\n> quoted\n> more\n\n| a | b |\n| - | - |\n| 1 | 2 |\n\nTitle\n=====\n\n```rust\nfn f() {}\n```\n\n---\n\nend *here*".to_string(),
    ];
    for answer in answers {
        let mut app = loaded_app();
        ask(&mut app, "hi", &[]);
        for piece in answer.split_inclusive([' ', '\n']) {
            update(
                &mut app,
                AppEvent::Engine(EngineEvent::Token {
                    id: 1,
                    text: piece.into(),
                    latency: Duration::from_millis(5),
                }),
            );
            assert_eq!(
                screen(&mut app, 70, 60),
                fresh_screen(&app, 70, 60),
                "after {:?}",
                app.cells[1].text()
            );
        }
    }
}

#[test]
fn scrolled_up_the_chat_shows_the_lines_above_and_stops_at_the_top() {
    let mut app = loaded_app();
    for i in 0..40 {
        app.notice(format!("notice {i}"));
    }
    let bottom = screen(&mut app, 80, 24);
    assert!(bottom.contains("notice 39") && !bottom.contains("notice 20"));
    for _ in 0..4 {
        update(&mut app, AppEvent::Key(KeyEvent::from(KeyCode::PageUp)));
    }
    // 40 notices and 39 blank lines between them, 19 rows in sight: the top is 60 up.
    assert_eq!(app.scroll_from_bottom, 60);
    let top = screen(&mut app, 80, 24);
    assert!(top.contains("notice 0") && top.contains("notice 9") && !top.contains("notice 10"));
    update(&mut app, AppEvent::Key(KeyEvent::from(KeyCode::End)));
    assert_eq!(screen(&mut app, 80, 24), bottom);
}

#[test]
fn every_kind_of_cell() {
    let dir = hello_workspace();
    let mut app = loaded_app();
    ask(&mut app, "tidy hello.py", &[]);
    for text in EDIT_ANSWER {
        let effects = update(&mut app, token(text, 20));
        run_edit_effects(&mut app, dir.path(), effects);
    }
    let effects = update(&mut app, done(StopReason::Eos));
    run_edit_effects(&mut app, dir.path(), effects);
    app.review = None;
    type_text(&mut app, "/files");
    update(&mut app, AppEvent::Key(KeyEvent::from(KeyCode::Enter)));
    update(
        &mut app,
        AppEvent::Engine(EngineEvent::Error("cannot change the loop count".into())),
    );
    let kinds: Vec<&str> = app
        .cells
        .iter()
        .map(|c| match c {
            Cell::User(_) => "user",
            Cell::Answer(_) => "answer",
            Cell::Notice(_) => "notice",
            Cell::EditSummary(_) => "edit summary",
            Cell::Error(_) => "error",
        })
        .collect();
    assert_eq!(kinds, ["user", "answer", "edit summary", "notice", "error"]);
    let terminal = render(&mut app, 80, 48);
    insta::assert_snapshot!("every_kind_of_cell_80x48", terminal.backend());
    // The error stands out in red; notices are dimmed.
    let buffer = terminal.backend().buffer();
    let row = |text: &str| {
        (0..48u16)
            .find(|&y| {
                (0..80u16)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    .contains(text)
            })
            .unwrap()
    };
    assert_eq!(buffer[(2, row("error: cannot change"))].fg, Color::Red);
    assert_eq!(
        buffer[(2, row("no files in the context"))].fg,
        Color::DarkGray
    );
}

fn finished_stats() -> TurnStats {
    TurnStats {
        tokens: 5,
        time_to_first_token: Duration::from_millis(35),
        decode_tok_s: 23.4,
        context_used: 40,
        kv_bytes: 4096,
        ..turn_stats(StopReason::Eos)
    }
}

const CODE_ANSWER: &[&str] = &[
    "Here is one:\n\n",
    "```python\n",
    "def reverse_string(s):\n",
    "    return s[::-1]\n",
    "```\n\nIt uses **slicing**.",
];

#[test]
fn idle_screen() {
    for (w, h) in [(80, 24), (120, 40)] {
        let mut app = loaded_app();
        let terminal = render(&mut app, w, h);
        insta::assert_snapshot!(format!("idle_{w}x{h}"), terminal.backend());
    }
}

#[test]
fn streaming_with_a_highlighted_code_block() {
    for (w, h) in [(80, 24), (120, 40)] {
        let mut app = loaded_app();
        ask(&mut app, "Reverse a string in Python", CODE_ANSWER);
        let terminal = render(&mut app, w, h);
        insta::assert_snapshot!(format!("streaming_{w}x{h}"), terminal.backend());
        // The code is coloured by syntect: its cells carry several foreground colours.
        let buffer = terminal.backend().buffer();
        let mut colours = std::collections::HashSet::new();
        for y in 0..h {
            let row: String = (0..w)
                .map(|x| buffer[(x, y)].symbol().to_string())
                .collect();
            if row.contains("def reverse_string") {
                for x in 0..w {
                    colours.insert(format!("{:?}", buffer[(x, y)].fg));
                }
            }
        }
        assert!(colours.len() >= 3, "{colours:?}");
    }
}

#[test]
fn a_finished_turn_and_loops_differing_from_trained() {
    let mut app = loaded_app();
    ask(&mut app, "hi", &["Hello", "!"]);
    update(
        &mut app,
        AppEvent::Engine(EngineEvent::Done {
            id: 1,
            stats: TurnStats {
                tokens: 2,
                ..finished_stats()
            },
        }),
    );
    update(&mut app, AppEvent::Engine(EngineEvent::LoopsChanged(3)));
    for (w, h) in [(80, 24), (120, 40)] {
        let terminal = render(&mut app, w, h);
        insta::assert_snapshot!(format!("loops_differ_{w}x{h}"), terminal.backend());
    }
    let status: String = status_text(&app, 200)
        .iter()
        .map(|s| s.content.to_string())
        .collect();
    assert!(status.contains("loops 3/2*"), "{status}");
    assert!(status.contains("23.4 tok/s"), "{status}");
    assert!(status.contains("cached 12"), "{status}");
}

#[test]
fn help_overlay() {
    for (w, h) in [(80, 24), (120, 40)] {
        let mut app = loaded_app();
        app.help = true;
        let terminal = render(&mut app, w, h);
        insta::assert_snapshot!(format!("help_{w}x{h}"), terminal.backend());
    }
}

#[test]
fn too_small_notice() {
    let mut app = loaded_app();
    let terminal = render(&mut app, 30, 8);
    insta::assert_snapshot!("too_small", terminal.backend());
}

#[test]
fn no_color_draws_without_colours() {
    let mut app = loaded_app();
    app.color = false;
    ask(&mut app, "Reverse a string in Python", CODE_ANSWER);
    let terminal = render(&mut app, 80, 24);
    let buffer = terminal.backend().buffer();
    for cell in buffer.content() {
        assert_eq!(cell.fg, Color::Reset);
        assert_eq!(cell.bg, Color::Reset);
    }
}

#[test]
fn diff_pane_with_accepted_and_rejected_hunks() {
    for (w, h) in [(80, 30), (140, 30)] {
        let dir = hello_workspace();
        let mut app = loaded_app();
        ask(&mut app, "tidy hello.py", &[]);
        for text in EDIT_ANSWER {
            let effects = update(
                &mut app,
                AppEvent::Engine(EngineEvent::Token {
                    id: 1,
                    text: text.to_string(),
                    latency: Duration::from_millis(20),
                }),
            );
            run_edit_effects(&mut app, dir.path(), effects);
        }
        let effects = update(
            &mut app,
            AppEvent::Engine(EngineEvent::Done {
                id: 1,
                stats: TurnStats {
                    tokens: 60,
                    reused_tokens: 0,
                    context_used: 200,
                    ..turn_stats(StopReason::Eos)
                },
            }),
        );
        run_edit_effects(&mut app, dir.path(), effects);
        // Focus the pane, reject the first hunk, select the second.
        for code in [
            KeyCode::Tab,
            KeyCode::Tab,
            KeyCode::Char(' '),
            KeyCode::Down,
        ] {
            update(&mut app, AppEvent::Key(KeyEvent::from(code)));
        }
        let terminal = render(&mut app, w, h);
        insta::assert_snapshot!(format!("diff_pane_{w}x{h}"), terminal.backend());
    }
}

#[test]
fn a_remote_answer_with_reasoning_and_a_server_that_fixes_loops() {
    let mut app = loaded_app();
    update(
        &mut app,
        AppEvent::Engine(EngineEvent::Loaded(remote_info(
            crate::engine::LoopControl::Fixed,
        ))),
    );
    ask(&mut app, "Reverse a string in Python", &[]);
    update(
        &mut app,
        AppEvent::Engine(EngineEvent::Reasoning {
            id: 1,
            text: "The user wants a reversal.\nSlicing does it.".into(),
        }),
    );
    for text in CODE_ANSWER {
        update(&mut app, token(text, 20));
    }
    let terminal = render(&mut app, 120, 24);
    insta::assert_snapshot!("remote_reasoning_hidden_120x24", terminal.backend());
    update(
        &mut app,
        AppEvent::Key(KeyEvent::new(KeyCode::Char('r'), KeyModifiers::CONTROL)),
    );
    let terminal = render(&mut app, 120, 24);
    insta::assert_snapshot!("remote_reasoning_shown_120x24", terminal.backend());
}
