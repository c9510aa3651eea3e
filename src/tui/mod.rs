//! The terminal UI: the state and its update (a plain function of state and event), the
//! chat's cells, the composer and slash commands, edits under review, drawing, markdown, and
//! the event loop that runs effects and redraws.

pub mod cells;
pub mod commands;
pub mod composer;
mod edits;
pub mod markdown;
pub mod review;
pub mod state;
#[cfg(test)]
mod testing;
mod turns;
pub mod ui;
pub mod update;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
    Event as TermEvent, EventStream,
};
use crossterm::execute;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::engine::{Backend, EventSink, Request};
use crate::patch::{apply_reviewed, prepare, Edit, FileChange, Journal, PatchError};
pub use state::{App, AppEvent, Effect, Settings};
pub use update::update;

/// The system prompt when the config sets none: it teaches the SEARCH/REPLACE edit format.
pub const DEFAULT_SYSTEM_PROMPT: &str = include_str!("../../assets/system-prompt.md");

/// What the TUI starts with.
#[derive(Debug, Clone)]
pub struct TuiOptions {
    /// What the status line names until the backend says what it runs.
    pub model_name: String,
    /// Request settings.
    pub settings: Settings,
    /// Whether colours are allowed (false under NO_COLOR).
    pub color: bool,
    /// Light or dark terminal background.
    pub theme: markdown::Theme,
    /// Where edits apply: the directory plait runs in.
    pub workspace: PathBuf,
    /// Where the undo journal lives (outside the workspace).
    pub state_dir: PathBuf,
}

/// Runs the TUI on the backend `start` returns, given the sink for its events, until the
/// user quits; the terminal is restored on every way out.
pub fn run(
    options: TuiOptions,
    start: impl FnOnce(EventSink) -> std::io::Result<Box<dyn Backend>>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(event_loop(options, start))
}

async fn event_loop(
    options: TuiOptions,
    start: impl FnOnce(EventSink) -> std::io::Result<Box<dyn Backend>>,
) -> std::io::Result<()> {
    let (engine_tx, mut engine_rx) = mpsc::unbounded_channel();
    let mut app = App::new(&options.model_name, options.settings, options.color);
    app.theme = options.theme;
    let files = Files {
        root: options.workspace,
        state_dir: options.state_dir,
    };
    // The UI is up at once; the worker loads the model and reports progress as events.
    let engine = start(Box::new(move |event| {
        // The worker's per-step scheduling report shows nothing here: no redraw for it.
        if matches!(event, crate::engine::Event::Step { .. }) {
            return;
        }
        // The receiver is gone only when the UI has quit: nothing to report to.
        let _ = engine_tx.send(event);
    }))?;
    // ratatui::init enters the alternate screen and raw mode and installs a panic hook
    // that restores the terminal before the panic message prints.
    let mut terminal = ratatui::init();
    execute!(std::io::stdout(), EnableBracketedPaste, EnableMouseCapture)?;
    let result = drive(
        &mut terminal,
        &mut app,
        engine.as_ref(),
        &files,
        &mut engine_rx,
    )
    .await;
    let _ = execute!(
        std::io::stdout(),
        DisableMouseCapture,
        DisableBracketedPaste
    );
    ratatui::restore();
    drop(engine);
    result
}

/// SIGTERM, on Unix; elsewhere nothing arrives (Ctrl+C comes as a key in raw mode).
struct Termination {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Termination {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}

async fn drive(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    engine: &dyn Backend,
    files: &Files,
    engine_rx: &mut mpsc::UnboundedReceiver<crate::engine::Event>,
) -> std::io::Result<()> {
    let size = terminal.size()?;
    update(
        app,
        AppEvent::Resize {
            width: size.width,
            height: size.height,
        },
    );
    let mut terminal_events = EventStream::new();
    let mut terminated = Termination::new()?;
    let mut dirty = true;
    loop {
        if dirty {
            terminal.draw(|frame| ui::draw(frame, app))?;
            dirty = false;
        }
        let event = tokio::select! {
            event = terminal_events.next() => match event {
                Some(Ok(TermEvent::Key(key))) => Some(AppEvent::Key(key)),
                Some(Ok(TermEvent::Paste(text))) => Some(AppEvent::Paste(text)),
                Some(Ok(TermEvent::Mouse(mouse))) => update::wheel(mouse.kind),
                Some(Ok(TermEvent::Resize(width, height))) => Some(AppEvent::Resize { width, height }),
                Some(Ok(_)) => None,
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            event = engine_rx.recv() => event.map(AppEvent::Engine),
            () = terminated.recv() => return Ok(()),
        };
        let Some(event) = event else { continue };
        dirty = true;
        let mut queue = std::collections::VecDeque::from([event]);
        // Drain what the engine has sent meanwhile: one redraw for a burst of tokens.
        while let Ok(more) = engine_rx.try_recv() {
            queue.push_back(AppEvent::Engine(more));
        }
        while let Some(event) = queue.pop_front() {
            for effect in update(app, event) {
                match apply(effect, engine, files) {
                    Some(Followup::Quit) => return Ok(()),
                    Some(Followup::Event(event)) => queue.push_back(event),
                    None => {}
                }
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Followup {
    Quit,
    Event(AppEvent),
}

/// The workspace edits apply to and the state directory of its undo journal.
struct Files {
    root: PathBuf,
    state_dir: PathBuf,
}

impl Files {
    fn journal(&self) -> Result<Journal, PatchError> {
        Journal::open(&self.state_dir, &self.root)
    }

    /// Writes the accepted hunks and records them for undo; the paths written.
    fn apply(&self, selection: &[(FileChange, Vec<bool>)]) -> Result<Vec<String>, String> {
        // Without a journal there is no undo: refuse before writing anything.
        let journal = self
            .journal()
            .map_err(|e| format!("nothing was written: cannot keep undo: {e}"))?;
        let pairs: Vec<(&FileChange, &[bool])> =
            selection.iter().map(|(c, a)| (c, a.as_slice())).collect();
        let record = apply_reviewed(&pairs).map_err(|e| match e {
            PatchError::Changed { .. } => format!(
                "nothing was written: {e}; /retry re-reads the context files and asks again"
            ),
            e => format!("nothing was written: {e}"),
        })?;
        let paths = record.entries.iter().map(|e| e.path.clone()).collect();
        journal
            .push(&record)
            .map_err(|e| format!("the files were written, but undo could not be recorded: {e}"))?;
        Ok(paths)
    }

    /// Reverts the last applied set; the paths restored, `None` when there is nothing to undo.
    fn undo(&self, force: bool) -> Result<Option<Vec<String>>, String> {
        let undone = self.journal().and_then(|j| j.undo_last(force));
        match undone {
            Ok(record) => Ok(record.map(|r| r.entries.into_iter().map(|e| e.path).collect())),
            Err(e @ PatchError::Changed { .. }) => Err(format!(
                "nothing was undone: {e} after the apply; /undo --force overwrites it"
            )),
            Err(e) => Err(format!("nothing was undone: {e}")),
        }
    }
}

/// Checks proposed edits against the workspace at `root`; the event that reports it.
pub(crate) fn prepare_edits(
    root: &Path,
    edits: &[Edit],
    expected: &HashMap<String, u64>,
    complete: bool,
    anchors: Vec<String>,
) -> AppEvent {
    AppEvent::EditsPrepared {
        result: prepare(root, edits, expected).map_err(|e| e.to_string()),
        complete,
        anchors,
    }
}

fn read_all(paths: Vec<PathBuf>) -> Vec<(PathBuf, Result<String, String>)> {
    paths
        .into_iter()
        .map(|path| {
            let result = std::fs::read_to_string(&path).map_err(|e| e.to_string());
            (path, result)
        })
        .collect()
}

/// Carries out an effect; file effects report back as events.
fn apply(effect: Effect, engine: &dyn Backend, files: &Files) -> Option<Followup> {
    match effect {
        Effect::Send(request) => {
            engine.send(request);
            None
        }
        Effect::Quit => {
            // Stops the answer in progress first.
            engine.send(Request::Shutdown);
            Some(Followup::Quit)
        }
        Effect::ReadFile(path) => {
            let result = std::fs::read_to_string(&path).map_err(|e| e.to_string());
            Some(Followup::Event(AppEvent::FileRead { path, result }))
        }
        Effect::ReadAttachments(paths) => {
            Some(Followup::Event(AppEvent::AttachmentsRead(read_all(paths))))
        }
        Effect::RefreshFiles(paths) => {
            Some(Followup::Event(AppEvent::FilesRefreshed(read_all(paths))))
        }
        Effect::PrepareEdits {
            edits,
            expected,
            complete,
            anchors,
        } => Some(Followup::Event(prepare_edits(
            &files.root,
            &edits,
            &expected,
            complete,
            anchors,
        ))),
        Effect::Apply(selection) => {
            Some(Followup::Event(AppEvent::Applied(files.apply(&selection))))
        }
        Effect::Undo { force } => Some(Followup::Event(AppEvent::Undone(files.undo(force)))),
        Effect::Save { path, text } => Some(Followup::Event(AppEvent::Saved(save(&path, &text)))),
    }
}

/// Writes through a temporary file and a rename, so an existing file is never half-written.
fn save(path: &Path, text: &str) -> Result<PathBuf, String> {
    let name = path.display().to_string();
    crate::patch::write_atomic(&name, path, text.as_bytes(), None)
        .map(|()| path.to_path_buf())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod save_tests {
    use super::save;

    #[test]
    fn save_leaves_a_neighbouring_partial_file_alone_and_replaces_the_target_whole() {
        let dir = tempfile::tempdir().unwrap();
        let notes = dir.path().join("notes.md");
        let neighbour = dir.path().join("notes.partial");
        std::fs::write(&neighbour, "keep me").unwrap();
        std::fs::write(&notes, "old").unwrap();
        assert_eq!(save(&notes, "new transcript").unwrap(), notes);
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "new transcript");
        assert_eq!(std::fs::read_to_string(&neighbour).unwrap(), "keep me");
        // A target that itself ends in .partial is written whole too.
        assert_eq!(save(&neighbour, "replaced").unwrap(), neighbour);
        assert_eq!(std::fs::read_to_string(&neighbour).unwrap(), "replaced");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
        // Under a file: an error naming the path, not a panic.
        let err = save(&notes.join("x.md"), "x").unwrap_err();
        assert!(err.contains("notes.md"), "{err}");
    }
}
