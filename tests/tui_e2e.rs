//! End to end: the real `plait` binary in a pseudo-terminal, its screen read back through a
//! terminal emulator (vt100). Starts the TUI on the tiny fixture model, sends a message, changes
//! the loop count with Alt+Up and F2, presses Esc, quits with Ctrl+C twice, and checks that the
//! terminal is handed back as it was found (main screen, no bracketed paste, no mouse capture,
//! visible cursor). A second session adds a file to the context, asks for a change, applies
//! the inferred edit from the diff pane and undoes it: there the answer is scripted (this
//! test binary runs the TUI over a stand-in backend that streams a fixed reply), since a
//! quantized model's wording differs between CPUs and the engine is tested on its own.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, Child, CommandBuilder, MasterPty, PtySize};

mod common;

const ROWS: u16 = 30;
const COLS: u16 = 100;
/// How often the screen is polled.
const POLL: Duration = Duration::from_millis(50);
/// A step's time limit: generous, since CI is a slow two-core box running the debug build.
const STEP: Duration = Duration::from_secs(30);
/// The time limit for a whole streamed answer.
const ANSWER: Duration = Duration::from_secs(60);
/// How long plait may take to exit after the second Ctrl+C.
const EXIT: Duration = Duration::from_secs(10);
/// crossterm tells a lone Esc from the start of a sequence by a short pause.
const ESC_PAUSE: Duration = Duration::from_millis(300);

/// The repository's tiny two-loop fixture checkpoint.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plt-tiny-2loop")
}

/// plait running in a pseudo-terminal; killed on drop (so on a failed assertion too).
struct Session {
    parser: Arc<Mutex<vt100::Parser>>,
    /// Set by the reader thread once the pty reports end of file (the child is gone).
    reader_done: Arc<AtomicBool>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn Child + Send + Sync>,
    /// Kept open for the session's life: dropping the master hangs up the child's terminal.
    _master: Box<dyn MasterPty + Send>,
    /// Config and state (logs, undo journal), with the workspace `work/`; removed on drop.
    dir: tempfile::TempDir,
}

impl Session {
    /// plait on `model`, in a fresh directory that holds `files` (name, content).
    fn start(model: &Path, files: &[(&str, &str)]) -> Self {
        let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_plait"));
        cmd.arg("--model");
        cmd.arg(model);
        Self::start_command(cmd, files)
    }

    /// `cmd` in a pseudo-terminal, in a fresh directory that holds `files` (name, content).
    fn start_command(mut cmd: CommandBuilder, files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // The workspace is a directory of its own: plait keeps its undo journal out of it.
        let workspace = dir.path().join("work");
        std::fs::create_dir(&workspace).expect("workspace dir");
        for (name, content) in files {
            std::fs::write(workspace.join(name), content).expect("write a workspace file");
        }
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("open a pty");
        for name in ["PLAIT_CONFIG_DIR", "PLAIT_STATE_DIR", "PLAIT_DATA_DIR"] {
            cmd.env(name, dir.path());
        }
        cmd.env("TERM", "xterm-256color");
        cmd.cwd(&workspace);
        let child = pair.slave.spawn_command(cmd).expect("spawn plait");
        // Only the child holds the terminal's slave side, so reads see EOF once it is gone.
        drop(pair.slave);

        let parser = Arc::new(Mutex::new(vt100::Parser::new(
            ROWS.try_into().unwrap(),
            COLS.try_into().unwrap(),
            0,
        )));
        let reader_done = Arc::new(AtomicBool::new(false));
        let mut reader = pair.master.try_clone_reader().expect("pty reader");
        {
            let parser = Arc::clone(&parser);
            let reader_done = Arc::clone(&reader_done);
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => lock(&parser).process(&buf[..n]),
                    }
                }
                reader_done.store(true, Ordering::SeqCst);
            });
        }
        let writer = pair.master.take_writer().expect("pty writer");
        Self {
            parser,
            reader_done,
            writer,
            child,
            _master: pair.master,
            dir,
        }
    }

    /// Types bytes into plait's terminal.
    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to the pty");
        self.writer.flush().expect("flush the pty");
    }

    fn screen(&self) -> MutexGuard<'_, vt100::Parser> {
        lock(&self.parser)
    }

    /// The screen's text, one line per row (so the last line is the status line).
    fn text(&self) -> String {
        screen_text(self.screen().screen())
    }

    /// The screen and plait's log, for failure messages.
    fn dump(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("plait.log")).unwrap_or_default();
        let log_tail: Vec<&str> = log.lines().rev().take(30).collect();
        let log_tail: Vec<&str> = log_tail.into_iter().rev().collect();
        format!(
            "screen:\n{}\n{}\nplait.log (tail):\n{}",
            "-".repeat(COLS as usize),
            self.text(),
            log_tail.join("\n")
        )
    }

    /// Polls the screen until `pred` holds; panics with the screen after `timeout`, or at once
    /// if plait exits meanwhile.
    fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            if pred(&text) {
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader take in the last output before showing the screen.
                self.wait_reader(Duration::from_secs(2));
                panic!(
                    "plait exited ({status:?}) while waiting for {what}\n{}",
                    self.dump()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.dump()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` for the reader thread to have read everything; whether it did.
    fn wait_reader(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while !self.reader_done.load(Ordering::SeqCst) {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(POLL);
        }
        true
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Locks the parser even if a panic elsewhere poisoned it.
fn lock(parser: &Mutex<vt100::Parser>) -> MutexGuard<'_, vt100::Parser> {
    parser.lock().unwrap_or_else(|e| e.into_inner())
}

fn screen_text(screen: &vt100::Screen) -> String {
    screen.rows(0, COLS).collect::<Vec<_>>().join("\n")
}

/// The bottom row: plait's status line.
fn status_line(text: &str) -> &str {
    text.lines().last().unwrap_or_default()
}

fn status_has(text: &str, parts: &[&str]) -> bool {
    let status = status_line(text);
    parts.iter().all(|part| status.contains(part))
}

/// Whether the chat shows a `you` header, then `hello`, then a finished `plait` answer header
/// (no "(failed)" or "(cancelled)" after it), in that order from the top.
fn chat_has_answer(text: &str) -> bool {
    let rows: Vec<&str> = text.lines().map(str::trim).collect();
    if let Some(you) = rows.iter().position(|r| *r == "you") {
        if let Some(hello) = rows[you + 1..].iter().position(|r| *r == "hello") {
            return rows[you + 1 + hello + 1..].contains(&"plait");
        }
    }
    // An answer longer than the pane scrolled the question out of sight: the pane is full
    // of its text down to the message box.
    let Some(message) = rows.iter().position(|r| r.starts_with("┌ message")) else {
        return false;
    };
    !rows.contains(&"you") && message > 2 && !rows[message - 1].is_empty()
}

#[test]
fn tui_chat_loops_and_quit_in_a_pty() {
    let mut s = Session::start(&fixture(), &[]);

    // 1. The UI comes up at once; the worker loads the model, then the status line says idle.
    s.wait_for("the model to load (status: idle)", STEP, |t| {
        status_has(t, &["plt-tiny-2loop", "loops 2/2", "idle"])
    });

    // 2. A message gets a streamed answer.
    s.send(b"hello\r");
    s.wait_for(
        "the answer to finish (status: tok/s and idle, chat: you / hello / plait)",
        ANSWER,
        |t| status_has(t, &["tok/s", "idle"]) && chat_has_answer(t),
    );

    // 3. Alt+Up (xterm's CSI 1;3 A): one more loop than trained, shown as such.
    s.send(b"\x1b[1;3A");
    s.wait_for("Alt+Up to show loops 3/2", STEP, |t| {
        status_has(t, &["loops 3/2"])
    });

    // 4. F2 (SS3 Q): one loop fewer.
    s.send(b"\x1bOQ");
    s.wait_for("F2 to show loops 2/2", STEP, |t| {
        status_has(t, &["loops 2/2"])
    });

    // 5. A lone Esc while idle does nothing.
    s.send(b"\x1b");
    std::thread::sleep(ESC_PAUSE);
    let text = s.wait_for("the status line to still say idle after Esc", STEP, |t| {
        status_has(t, &["idle", "loops 2/2"])
    });
    assert!(chat_has_answer(&text), "Esc changed the chat\n{}", s.dump());

    // 6. Ctrl+C arms the quit; a second one quits, with success.
    s.send(b"\x03");
    s.wait_for("the Ctrl+C notice", STEP, |t| {
        t.contains("press Ctrl+C again to quit")
    });
    s.send(b"\x03");
    let start = Instant::now();
    let status = loop {
        match s.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > EXIT => {
                panic!(
                    "plait did not exit within {EXIT:?} of the second Ctrl+C\n{}",
                    s.dump()
                )
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => panic!("waiting for plait: {e}\n{}", s.dump()),
        }
    };
    // Everything plait wrote, the terminal restore included, must be parsed before the checks.
    assert!(
        s.wait_reader(EXIT),
        "the pty did not reach end of file after plait exited\n{}",
        s.dump()
    );
    assert!(
        status.success(),
        "plait exited with {status:?}\n{}",
        s.dump()
    );

    // 7. The terminal is restored.
    let parser = s.screen();
    let screen = parser.screen();
    let text = screen_text(screen);
    assert!(
        !screen.alternate_screen(),
        "still in the alternate screen after exit\n{text}"
    );
    assert!(
        !screen.bracketed_paste(),
        "bracketed paste still on after exit\n{text}"
    );
    assert_eq!(
        screen.mouse_protocol_mode(),
        vt100::MouseProtocolMode::None,
        "mouse capture still on after exit\n{text}"
    );
    assert_eq!(
        screen.mouse_protocol_encoding(),
        vt100::MouseProtocolEncoding::Default,
        "SGR mouse encoding still on after exit\n{text}"
    );
    assert!(
        !screen.hide_cursor(),
        "cursor still hidden after exit\n{text}"
    );
    // The main screen is as plait found it: blank, no error or panic printed over it.
    assert!(
        text.trim().is_empty(),
        "plait left text on the main screen:\n{text}"
    );
}

/// The scripted answer: the changed function in a plain fence (no path, no SEARCH/REPLACE),
/// as small models answer; plait anchors it at `def greet` and shows an inferred edit.
const REPLY: &str = "Here is the changed function:\n\n```python\ndef greet(name):\n    print(f\"Hi, {name}!\")\n```\n";

/// The environment variable that makes [`scripted_tui_child`] run the TUI.
const SCRIPTED: &str = "PLAIT_E2E_SCRIPTED_REPLY";

/// A stand-in backend: streams `reply` word by word for every message.
struct Scripted {
    requests: std::sync::mpsc::Sender<plait::engine::Request>,
}

impl plait::engine::Backend for Scripted {
    fn send(&self, request: plait::engine::Request) {
        let _ = self.requests.send(request);
    }
}

impl Scripted {
    fn start(sink: plait::engine::EventSink, reply: String) -> Self {
        use plait::engine::{Event, ModelInfo, Request, StopReason, TurnStats};
        let (requests, inbox) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut loops = 1;
            sink(Event::Loaded(ModelInfo {
                name: "scripted".into(),
                path: "scripted".into(),
                parameters: 0,
                quantization: "none".into(),
                trained_loops: 1,
                loops,
                window: 0,
                context_size: 8192,
                supports_tools: false,
                loop_control: plait::engine::LoopControl::Live,
                server: None,
            }));
            while let Ok(request) = inbox.recv() {
                match request {
                    Request::Generate(job) => {
                        let words: Vec<&str> = reply.split_inclusive(' ').collect();
                        for word in &words {
                            sink(Event::Token {
                                id: job.id,
                                text: word.to_string(),
                                latency: Duration::from_millis(2),
                            });
                        }
                        sink(Event::Done {
                            id: job.id,
                            stats: TurnStats {
                                stop_reason: StopReason::Eos,
                                tokens: words.len(),
                                prompt_tokens: 30,
                                prefill_time: Duration::from_millis(30),
                                time_to_first_token: Duration::from_millis(2),
                                decode_tok_s: 500.0,
                                decode_time: Duration::from_millis(40),
                                loops: 2,
                                reused_tokens: 0,
                                context_used: words.len(),
                                kv_bytes: 0,
                                dropped_messages: 0,
                            },
                        });
                    }
                    Request::SetLoops(n) => {
                        loops = n;
                        sink(Event::LoopsChanged(loops));
                    }
                    Request::Reset => sink(Event::ResetDone),
                    Request::Cancel(_) | Request::Tokenize(_) => {}
                    Request::Shutdown => return,
                }
            }
        });
        Self { requests }
    }
}

/// Not a test of its own: the child that [`tui_applies_an_inferred_edit_and_undoes_it`] runs
/// in its pseudo-terminal (this test binary again), the TUI over [`Scripted`].
#[test]
#[ignore = "run by tui_applies_an_inferred_edit_and_undoes_it in a pty"]
fn scripted_tui_child() {
    let reply = std::env::var(SCRIPTED).expect("run by tui_applies_an_inferred_edit_and_undoes_it");
    let options = plait::tui::TuiOptions {
        model_name: "scripted".into(),
        settings: plait::tui::Settings {
            sampling: Default::default(),
            max_tokens: 512,
            system_prompt: Some(plait::tui::DEFAULT_SYSTEM_PROMPT.to_string()),
        },
        color: true,
        theme: Default::default(),
        workspace: std::env::current_dir().unwrap(),
        state_dir: plait::config::state_dir().unwrap(),
    };
    plait::tui::run(options, move |sink| {
        Ok(Box::new(Scripted::start(sink, reply)) as Box<dyn plait::engine::Backend>)
    })
    .unwrap();
}

const HELLO: &str = "def greet(name):\n    print(\"Hello\", name)\n\n\ndef farewell(name):\n    print(\"Goodbye\", name)\n";

#[test]
fn tui_applies_an_inferred_edit_and_undoes_it() {
    let mut cmd = CommandBuilder::new(std::env::current_exe().unwrap());
    for arg in ["scripted_tui_child", "--exact", "--ignored", "--nocapture"] {
        cmd.arg(arg);
    }
    cmd.env(SCRIPTED, REPLY);
    let mut s = Session::start_command(cmd, &[("hello.py", HELLO)]);
    let hello = s.dir.path().join("work/hello.py");
    s.wait_for("the scripted backend to load (status: idle)", ANSWER, |t| {
        status_has(t, &["idle"])
    });
    s.send(b"/add hello.py\r");
    s.wait_for("hello.py in the context", STEP, |t| {
        t.contains("added hello.py")
    });
    s.send(b"Change greet so that it prints Hi, {name}! with an f-string.\r");
    s.wait_for("an inferred edit in the diff pane", ANSWER, |t| {
        t.contains("inferred from a code block at hello.py") && status_has(t, &["idle"])
    });
    assert_eq!(
        std::fs::read_to_string(&hello).unwrap(),
        HELLO,
        "written before review"
    );
    // Tab twice reaches the diff pane; Space accepts the hunk, `a` applies it.
    s.send(b"\t\t ");
    s.wait_for("the hunk accepted", STEP, |t| {
        t.contains("1/1 hunks accepted")
    });
    s.send(b"a");
    s.wait_for("the apply notice", STEP, |t| {
        t.contains("applied: hello.py")
    });
    let changed = std::fs::read_to_string(&hello).unwrap();
    let want = HELLO.replace("print(\"Hello\", name)", "print(f\"Hi, {name}!\")");
    assert_eq!(changed, want, "the applied file\n{}", s.dump());
    s.send(b"/undo\r");
    s.wait_for("the undo notice", STEP, |t| {
        t.contains("undid the last apply")
    });
    assert_eq!(
        std::fs::read_to_string(&hello).unwrap(),
        HELLO,
        "undo did not restore"
    );
}

/// The TUI on `url` with `--remote`, in a pseudo-terminal, in a workspace holding `files`.
fn start_remote(url: &str, files: &[(&str, &str)]) -> Session {
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_plait"));
    // Answers short enough to finish within a step on a slow machine.
    cmd.args(["--remote", url, "-c", "max_tokens=200"]);
    Session::start_command(cmd, files)
}

/// Sends `hello` and waits for the answer with TTFT and tok/s on the status line.
fn answer_hello_with_readout(s: &mut Session) {
    s.send(b"hello\r");
    s.wait_for("the answer with its readout", ANSWER, |t| {
        status_has(t, &["TTFT", "tok/s", "idle"]) && chat_has_answer(t)
    });
}

/// Asks for a long answer and presses Esc while it streams; waits for it marked cancelled.
fn cancel_a_streaming_story(s: &mut Session) {
    s.send(b"Write a long story about a dragon who learns to code.\r");
    s.wait_for("the story to stream", ANSWER, |t| {
        status_has(t, &["generating"])
    });
    s.send(b"\x1b");
    s.wait_for("the cancelled answer", STEP, |t| {
        t.contains("(cancelled)") && status_has(t, &["idle"])
    });
}

/// An answer that edits `greet` in [`HELLO`] with SEARCH/REPLACE.
const EDIT_REPLY: &str = "Changed:\n\nhello.py\n```python\n<<<<<<< SEARCH\ndef greet(name):\n    print(\"Hello\", name)\n=======\ndef greet(name):\n    print(f\"Hi, {name}!\")\n>>>>>>> REPLACE\n```\n";

#[test]
fn tui_remote_edit_reaches_the_diff_pane_and_applies() {
    use common::fake_server::{answer, spawn_fake, Fake};
    let fake = Arc::new(Fake::default());
    let words: Vec<&str> = EDIT_REPLY.split_inclusive(' ').collect();
    fake.replies.lock().unwrap().push_back(answer(&words));
    let url = spawn_fake(Arc::clone(&fake));
    let mut s = start_remote(&url, &[("hello.py", HELLO)]);
    let hello = s.dir.path().join("work/hello.py");
    // The status line names the server and says that it fixes the loop count.
    s.wait_for(
        "the server's model (status: loopcoder @ host, loops: server)",
        STEP,
        |t| status_has(t, &["loopcoder @ 127.0.0.1:", "loops: server", "idle"]),
    );
    s.send(b"/add hello.py\r");
    s.wait_for("hello.py in the context", STEP, |t| {
        t.contains("added hello.py")
    });
    s.send(b"Make greet friendlier.\r");
    s.wait_for("the edit in the diff pane", ANSWER, |t| {
        t.contains("1 hunk in 1 file in the diff pane") && status_has(t, &["idle", "tok/s"])
    });
    // The conversation went to the server with the file, and no plait extension.
    let sent = fake.requests.lock().unwrap()[0].clone();
    assert!(sent["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("print(\"Hello\", name)"));
    assert!(sent.get("plait").is_none(), "{sent}");
    // A loop key says the server fixes the count.
    s.send(b"\x1b[1;3A");
    s.wait_for("the loop key's notice", STEP, |t| {
        t.contains("the server fixes the loop count")
    });
    // Tab twice reaches the diff pane; the explicit edit starts accepted; `a` applies it.
    s.send(b"\t\t");
    s.wait_for("the diff pane focused", STEP, |t| {
        t.contains("1/1 hunks accepted · Space")
    });
    s.send(b"a");
    s.wait_for("the apply notice", STEP, |t| {
        t.contains("applied: hello.py")
    });
    let want = HELLO.replace("print(\"Hello\", name)", "print(f\"Hi, {name}!\")");
    assert_eq!(
        std::fs::read_to_string(&hello).unwrap(),
        want,
        "{}",
        s.dump()
    );
}

#[test]
fn tui_remote_on_plait_serve_streams_changes_loops_per_request_and_cancels() {
    let Some(model) = common::server::default_model_if_installed() else {
        return;
    };
    let served = common::server::Served::start(&common::server::plait_binary(true), &model, &[]);
    let mut s = start_remote(&format!("{}/v1", served.base), &[]);
    s.wait_for(
        "the served model (status: @ host, loops 1/1, idle)",
        STEP,
        |t| status_has(t, &["@ 127.0.0.1:", "loops 1/1", "idle"]),
    );
    answer_hello_with_readout(&mut s);
    assert_eq!(served.metric("plait_answers_total{loops=\"1\"}"), 1.0);
    // Alt+Up: the next request asks the server for two loops.
    s.send(b"\x1b[1;3A");
    s.wait_for("loops 2/1 on the status line", STEP, |t| {
        status_has(t, &["loops 2/1"])
    });
    s.send(b"Say it again.\r");
    let deadline = Instant::now() + ANSWER;
    let answered_with_two_loops = || {
        let metrics = common::server::client()
            .get(served.url("/metrics"))
            .send()
            .and_then(|r| r.text())
            .unwrap_or_default();
        metrics.contains("plait_answers_total{loops=\"2\"} 1")
    };
    while !answered_with_two_loops() {
        assert!(
            Instant::now() < deadline,
            "no two-loop answer\n{}",
            s.dump()
        );
        std::thread::sleep(POLL);
    }
    s.wait_for("the second answer to end", ANSWER, |t| {
        status_has(t, &["idle"])
    });
    // Esc while an answer streams closes its stream: the answer stays, marked cancelled.
    cancel_a_streaming_story(&mut s);
}

#[test]
fn tui_remote_on_llama_server_streams_says_the_server_fixes_loops_and_cancels() {
    let Some(server) = common::server::llama_server_on_default_model(2048) else {
        return;
    };
    let mut s = start_remote(&format!("{}/v1", server.base), &[]);
    s.wait_for(
        "the server's model (loops: server, its context)",
        STEP,
        |t| status_has(t, &["@ 127.0.0.1:", "loops: server", "/2048", "idle"]),
    );
    answer_hello_with_readout(&mut s);
    s.send(b"\x1bOR");
    s.wait_for("F3's notice", STEP, |t| {
        t.contains("the server fixes the loop count")
    });
    cancel_a_streaming_story(&mut s);
}
