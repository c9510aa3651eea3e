//! The slash commands: one table that parsing, the help overlay and completion all read.

use std::path::PathBuf;

use crate::engine::{LoopControl, Request, MAX_LOOPS};

use super::edits::apply_accepted;
use super::state::{App, Effect, Focus};
use super::turns::retry;
use super::update::set_loops;

/// What a command does, given the app, its argument (trimmed, maybe empty) and whether a
/// deletion waits for this action to confirm it.
type Run = fn(&mut App, &str, bool) -> Vec<Effect>;

/// One slash command.
pub struct SlashCommand {
    /// What is typed, with the slash.
    pub name: &'static str,
    /// Its argument as the help writes it: empty for none, in brackets when optional.
    pub args: &'static str,
    /// What it does, in one line.
    pub help: &'static str,
    run: Run,
}

impl SlashCommand {
    /// The name with its argument, as the help and completion show it.
    pub fn usage(&self) -> String {
        if self.args.is_empty() {
            self.name.to_string()
        } else {
            format!("{} {}", self.name, self.args)
        }
    }

    /// Whether the command cannot run without an argument.
    fn needs_arg(&self) -> bool {
        !self.args.is_empty() && !self.args.starts_with('[')
    }
}

/// Every command, in the order the help lists them.
pub const COMMANDS: &[SlashCommand] = &[
    SlashCommand {
        name: "/help",
        args: "",
        help: "show keys and commands",
        run: |app, _, _| {
            app.help = true;
            Vec::new()
        },
    },
    SlashCommand {
        name: "/loops",
        args: "N",
        help: "run with N loops (1..=8)",
        run: loops,
    },
    SlashCommand {
        name: "/clear",
        args: "",
        help: "start a new conversation (resets the cache)",
        run: |app, _, _| {
            app.cells.clear();
            app.scroll_from_bottom = 0;
            app.readout.context_used = 0;
            app.readout.cached_tokens = 0;
            vec![Effect::Send(Request::Reset)]
        },
    },
    SlashCommand {
        name: "/add",
        args: "PATH",
        help: "put a file's contents in the context",
        run: |_, arg, _| vec![Effect::ReadFile(PathBuf::from(arg))],
    },
    SlashCommand {
        name: "/drop",
        args: "PATH",
        help: "take a file out of the context",
        run: drop_file,
    },
    SlashCommand {
        name: "/files",
        args: "",
        help: "list the files in the context",
        run: files,
    },
    SlashCommand {
        name: "/model",
        args: "",
        help: "show the model's path, size and settings",
        run: model,
    },
    SlashCommand {
        name: "/save",
        args: "FILE",
        help: "save the transcript as markdown",
        run: |app, arg, _| {
            vec![Effect::Save {
                path: PathBuf::from(arg),
                text: app.transcript(),
            }]
        },
    },
    SlashCommand {
        name: "/diff",
        args: "",
        help: "show the edits of the last answer in the diff pane",
        run: |app, _, _| {
            if app.review.is_some() {
                app.focus = Focus::Diff;
            } else {
                app.notice("no edits to review");
            }
            Vec::new()
        },
    },
    SlashCommand {
        name: "/apply",
        args: "",
        help: "write the accepted hunks to the files",
        run: |app, _, confirming| apply_accepted(app, confirming),
    },
    SlashCommand {
        name: "/undo",
        args: "",
        help: "revert the last applied edits (--force: even if changed since)",
        run: undo,
    },
    SlashCommand {
        name: "/retry",
        args: "",
        help: "re-read the context files and answer the last message again",
        run: |app, _, _| retry(app),
    },
    SlashCommand {
        name: "/quit",
        args: "",
        help: "leave plait",
        run: |_, _, _| vec![Effect::Quit],
    },
];

/// Other names a command answers to.
const ALIASES: &[(&str, &str)] = &[("/exit", "/quit")];

/// Runs the command `line` (`/name arg`); an unknown name or a missing argument is a
/// one-line notice.
pub fn run_command(app: &mut App, line: &str, confirming: bool) -> Vec<Effect> {
    let mut parts = line.splitn(2, char::is_whitespace);
    let typed = parts.next().unwrap_or_default();
    let arg = parts.next().map(str::trim).unwrap_or_default();
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == typed)
        .map_or(typed, |(_, name)| name);
    let Some(command) = COMMANDS.iter().find(|c| c.name == name) else {
        app.notice(format!("unknown command {typed}: /help lists the commands"));
        return Vec::new();
    };
    if command.needs_arg() && arg.is_empty() {
        app.notice(format!("usage: {}", command.usage()));
        return Vec::new();
    }
    (command.run)(app, arg, confirming)
}

fn loops(app: &mut App, arg: &str, _: bool) -> Vec<Effect> {
    match arg.parse::<usize>() {
        Ok(n) if (1..=MAX_LOOPS).contains(&n) => set_loops(app, n),
        _ => {
            app.notice(format!(
                "/loops takes a number from 1 to {MAX_LOOPS}, not `{arg}`"
            ));
            Vec::new()
        }
    }
}

fn drop_file(app: &mut App, arg: &str, _: bool) -> Vec<Effect> {
    let path = PathBuf::from(arg);
    let before = app.files.len();
    app.files.retain(|(p, _)| p != &path);
    if app.files.len() == before {
        app.notice(format!("{arg} is not in the context"));
    } else {
        app.notice(format!("dropped {arg} from the context"));
    }
    Vec::new()
}

fn files(app: &mut App, _: &str, _: bool) -> Vec<Effect> {
    if app.files.is_empty() {
        app.notice("no files in the context (add one with /add PATH)");
    } else {
        let list: Vec<String> = app
            .files
            .iter()
            .map(|(p, t)| format!("{} ({} lines)", p.display(), t.lines().count()))
            .collect();
        app.notice(format!("files in the context: {}", list.join(", ")));
    }
    Vec::new()
}

fn model(app: &mut App, _: &str, _: bool) -> Vec<Effect> {
    let text = match &app.model_info {
        None => "the model is not loaded yet".to_string(),
        Some(m) if m.server.is_some() => format!(
            "{} — served by {}\ncontext {} tokens, loops {}",
            m.name,
            m.path.display(),
            m.context_size,
            match m.loop_control {
                LoopControl::Fixed => "fixed by the server".to_string(),
                _ => format!("{} (trained {})", app.readout.loops, m.trained_loops),
            }
        ),
        Some(m) => format!(
            "{} — {}\n{:.1}M parameters, {}, trained loops {}, running {}, window {}, context {} tokens, KV cache {:.1} MiB",
            m.name,
            m.path.display(),
            m.parameters as f64 / 1e6,
            m.quantization,
            m.trained_loops,
            app.readout.loops,
            m.window,
            m.context_size,
            app.kv_bytes as f64 / (1024.0 * 1024.0)
        ),
    };
    app.notice(text);
    Vec::new()
}

fn undo(app: &mut App, arg: &str, _: bool) -> Vec<Effect> {
    match arg {
        "" => vec![Effect::Undo { force: false }],
        "--force" => vec![Effect::Undo { force: true }],
        _ => {
            app.notice("usage: /undo [--force]");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use crossterm::event::KeyCode;

    use super::*;
    use crate::tui::state::AppEvent;
    use crate::tui::testing::{key, last_notice, loaded_app, type_text};
    use crate::tui::update::update;

    #[test]
    fn commands_run_and_bad_ones_get_a_one_line_error() {
        let mut app = loaded_app();
        type_text(&mut app, "/loops 3");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::Send(Request::SetLoops(3))]
        );
        type_text(&mut app, "/loops 9");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        assert!(app.cells.last().unwrap().text().contains("1 to 8"));
        type_text(&mut app, "/frobnicate");
        update(&mut app, key(KeyCode::Enter));
        assert!(last_notice(&app).contains("unknown command /frobnicate"));
        type_text(&mut app, "/add src/main.rs");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::ReadFile("src/main.rs".into())]
        );
        update(
            &mut app,
            AppEvent::FileRead {
                path: "src/main.rs".into(),
                result: Ok("fn main() {}\n".into()),
            },
        );
        assert_eq!(app.messages()[0].role, "system");
        assert!(app.messages()[0].content.contains("fn main() {}"));
        type_text(&mut app, "/drop src/main.rs");
        update(&mut app, key(KeyCode::Enter));
        assert!(app.files.is_empty());
        type_text(&mut app, "/save");
        update(&mut app, key(KeyCode::Enter));
        assert!(app
            .cells
            .last()
            .unwrap()
            .text()
            .contains("usage: /save FILE"));
        type_text(&mut app, "/clear");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::Send(Request::Reset)]
        );
        assert!(app.cells.is_empty());
        type_text(&mut app, "/quit");
        assert_eq!(update(&mut app, key(KeyCode::Enter)), vec![Effect::Quit]);
    }
}
