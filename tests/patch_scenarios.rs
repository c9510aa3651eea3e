//! Runs every scenario under `tests/scenarios/` through the real `plait apply` and
//! `plait undo` binary and compares the trees byte for byte (and mode for mode).
//!
//! A scenario is a `before/` tree, a `reply.md`, and either an `after/` tree or an
//! `error.txt` (a substring of the expected error output; the tree must then be left
//! as it was). Optional: `args.txt` (more `plait apply` arguments), `symlinks.txt`
//! (`NAME -> TARGET` lines, `$OUTSIDE` standing for a directory outside the
//! workspace that gets the scenario's `outside/` tree), and `hashes-from/` (the files
//! as the model saw them; their hashes are passed to the library as the expected ones,
//! since a reply file carries none).
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use plait::patch::{apply_edits, content_hash, parse_edits, undo};

/// One entry of a tree: a file's bytes and mode, or a symlink's target.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    File { bytes: Vec<u8>, mode: u32 },
    Link(PathBuf),
}

type Tree = BTreeMap<PathBuf, Node>;

type Check = Result<(), String>;

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Check {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

/// Files and symlinks below `root`; directories only through their contents, as in git.
fn snapshot(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, Node::Link(fs::read_link(&path).unwrap()));
            } else if meta.is_dir() {
                stack.push(path);
            } else {
                let mode = meta.permissions().mode() & 0o7777;
                out.insert(
                    rel,
                    Node::File {
                        bytes: fs::read(&path).unwrap(),
                        mode,
                    },
                );
            }
        }
    }
    out
}

/// Copies files (with their modes) from `from` into `to`.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_tree(&path, &dest);
        } else {
            fs::copy(&path, &dest).unwrap();
        }
    }
}

/// Lays `scenario/<tree>` out in `dest`, with the scenario's symlinks.
fn materialize(scenario: &Path, tree: &str, dest: &Path, outside: &Path) {
    copy_tree(&scenario.join(tree), dest);
    let Ok(list) = fs::read_to_string(scenario.join("symlinks.txt")) else {
        return;
    };
    for line in list.lines().filter(|l| !l.trim().is_empty()) {
        let (name, target) = line.split_once(" -> ").expect("NAME -> TARGET");
        let target = target.trim().replace("$OUTSIDE", outside.to_str().unwrap());
        std::os::unix::fs::symlink(target, dest.join(name.trim())).unwrap();
    }
}

fn plait(args: &[&str], state: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plait"))
        .args(args)
        .env("PLAIT_STATE_DIR", state)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn same_tree(got: &Tree, want: &Tree, when: &str) -> Check {
    ensure(got == want, || {
        let keys = |t: &Tree| t.keys().cloned().collect::<Vec<_>>();
        let differing: Vec<_> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        format!(
            "{when}: tree differs; expected paths {:?}, found {:?}; differing: {differing:?}",
            keys(want),
            keys(got)
        )
    })
}

/// Everything one scenario needs: its directory and fresh temporary directories.
struct Run {
    dir: PathBuf,
    reply: String,
    ws: tempfile::TempDir,
    outside: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Run {
    fn new(dir: &Path) -> Run {
        let run = Run {
            dir: dir.to_path_buf(),
            reply: dir.join("reply.md").to_str().unwrap().to_string(),
            ws: tempfile::tempdir().unwrap(),
            outside: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
        };
        if dir.join("outside").is_dir() {
            copy_tree(&dir.join("outside"), run.outside.path());
        }
        materialize(dir, "before", run.root(), run.outside.path());
        run
    }

    fn root(&self) -> &Path {
        self.ws.path()
    }

    /// The tree `name` of the scenario as it should look, symlinks included.
    fn expected(&self, name: &str) -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        materialize(&self.dir, name, tmp.path(), self.outside.path());
        snapshot(tmp.path())
    }

    fn plait(&self, args: &[&str]) -> Output {
        plait(args, self.state.path())
    }

    fn apply_args<'a>(&'a self, extra: &'a [String], check: bool) -> Vec<&'a str> {
        let mut args = vec!["apply"];
        if check {
            args.push("--check");
        }
        args.extend(["--root", self.root().to_str().unwrap()]);
        args.extend(extra.iter().map(String::as_str));
        args.push(self.reply());
        args
    }

    fn reply(&self) -> &str {
        &self.reply
    }
}

fn expected_error(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join("error.txt"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Through the binary: `--check`, apply, compare, undo, compare.
fn run_cli(dir: &Path) -> Check {
    let run = Run::new(dir);
    let before = snapshot(run.root());
    let outside_before = snapshot(run.outside.path());
    let extra: Vec<String> = fs::read_to_string(dir.join("args.txt"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();

    if let Some(error) = expected_error(dir) {
        let out = run.plait(&run.apply_args(&extra, false));
        ensure(!out.status.success(), || {
            format!("apply succeeded but should fail\n{}", text(&out))
        })?;
        ensure(text(&out).contains(&error), || {
            format!("error output lacks {error:?}\n{}", text(&out))
        })?;
        same_tree(&snapshot(run.root()), &before, "after a refused apply")?;
        same_tree(
            &snapshot(run.outside.path()),
            &outside_before,
            "outside the workspace",
        )?;
        let out = run.plait(&["undo", "--root", run.root().to_str().unwrap()]);
        return ensure(text(&out).contains("nothing to undo"), || {
            format!("a refused apply left something to undo\n{}", text(&out))
        });
    }

    let out = run.plait(&run.apply_args(&extra, true));
    ensure(out.status.success(), || {
        format!("apply --check failed\n{}", text(&out))
    })?;
    ensure(
        String::from_utf8_lossy(&out.stdout).contains("would"),
        || {
            format!(
                "apply --check says nothing of what would happen\n{}",
                text(&out)
            )
        },
    )?;
    same_tree(&snapshot(run.root()), &before, "after apply --check")?;

    let out = run.plait(&run.apply_args(&extra, false));
    ensure(out.status.success(), || {
        format!("apply failed\n{}", text(&out))
    })?;
    ensure(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .all(|l| l.starts_with("applied ")),
        || format!("every line should be `applied PATH`\n{}", text(&out)),
    )?;
    same_tree(&snapshot(run.root()), &run.expected("after"), "after apply")?;

    let out = run.plait(&["undo", "--root", run.root().to_str().unwrap()]);
    ensure(out.status.success(), || {
        format!("undo failed\n{}", text(&out))
    })?;
    same_tree(&snapshot(run.root()), &before, "after undo")?;
    let out = run.plait(&["undo", "--root", run.root().to_str().unwrap()]);
    ensure(
        !out.status.success() && text(&out).contains("nothing to undo"),
        || format!("a second undo should find nothing\n{}", text(&out)),
    )
}

/// Through the library, with the expected hashes taken from `hashes-from/`.
fn run_library(dir: &Path) -> Check {
    let run = Run::new(dir);
    let before = snapshot(run.root());
    let seen = dir.join("hashes-from");
    let expected: HashMap<String, u64> = snapshot(&seen)
        .into_iter()
        .filter_map(|(rel, node)| match node {
            Node::File { bytes, .. } => Some((rel.to_str()?.to_string(), content_hash(&bytes))),
            Node::Link(_) => None,
        })
        .collect();
    let edits = parse_edits(&fs::read_to_string(dir.join("reply.md")).unwrap());
    let result = apply_edits(run.root(), &edits, &expected);
    match (expected_error(dir), result) {
        (Some(error), Err(e)) => {
            ensure(e.to_string().contains(&error), || {
                format!("error {e} lacks {error:?}")
            })?;
            same_tree(&snapshot(run.root()), &before, "after a refused apply")
        }
        (Some(_), Ok(_)) => Err("apply succeeded but should fail".into()),
        (None, Err(e)) => Err(format!("apply failed: {e}")),
        (None, Ok(record)) => {
            same_tree(&snapshot(run.root()), &run.expected("after"), "after apply")?;
            undo(&record).map_err(|e| format!("undo failed: {e}"))?;
            same_tree(&snapshot(run.root()), &before, "after undo")
        }
    }
}

fn scenario_dirs() -> Vec<PathBuf> {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut dirs: Vec<PathBuf> = fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn scenarios() {
    let dirs = scenario_dirs();
    assert!(dirs.len() >= 25, "only {} scenarios", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let shape = ensure(
            dir.join("before").is_dir()
                && dir.join("reply.md").is_file()
                && (dir.join("after").is_dir() != dir.join("error.txt").is_file()),
            || "needs before/, reply.md, and either after/ or error.txt".into(),
        );
        let result = shape.and_then(|()| {
            if dir.join("hashes-from").is_dir() {
                run_library(dir)
            } else {
                run_cli(dir)
            }
        });
        if let Err(why) = result {
            failures.push(format!("scenario `{name}` failed: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n\n")
    );
}

#[test]
fn root_defaults_to_the_current_directory() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/search-replace-basic");
    let run = Run::new(&dir);
    let before = snapshot(run.root());
    let status = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_plait"))
            .args(args)
            .current_dir(run.root())
            .env("PLAIT_STATE_DIR", run.state.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    status(&["apply", run.reply()]);
    assert_eq!(snapshot(run.root()), run.expected("after"));
    status(&["undo"]);
    assert_eq!(snapshot(run.root()), before);
}

#[test]
fn undo_refuses_a_changed_file_unless_forced() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/three-formats-one-reply");
    let run = Run::new(&dir);
    let before = snapshot(run.root());
    let root = run.root().to_str().unwrap();
    let out = run.plait(&["apply", "--root", root, run.reply()]);
    assert!(out.status.success(), "{}", text(&out));
    fs::write(run.root().join("b.py"), "edited by hand\n").unwrap();
    let edited = snapshot(run.root());

    let out = run.plait(&["undo", "--root", root]);
    assert!(!out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("b.py: changed after the apply"), "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    assert_eq!(
        snapshot(run.root()),
        edited,
        "a refused undo wrote something"
    );

    let out = run.plait(&["undo", "--root", root, "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(snapshot(run.root()), before);
}

#[test]
fn several_applies_undo_in_reverse_order() {
    let first =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/dependent-blocks-one-file");
    let run = Run::new(&first);
    let root = run.root().to_str().unwrap();
    let before = snapshot(run.root());
    let out = run.plait(&["apply", "--root", root, run.reply()]);
    assert!(out.status.success(), "{}", text(&out));
    let after_first = snapshot(run.root());
    let replies = tempfile::tempdir().unwrap();
    let second = replies.path().join("second-reply.md");
    fs::write(
        &second,
        "lib.rs\n```\n<<<<<<< SEARCH\n    helper();\n=======\n    helper2();\n>>>>>>> REPLACE\n```\n",
    )
    .unwrap();
    let out = run.plait(&["apply", "--root", root, second.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(snapshot(run.root()), after_first);

    let out = run.plait(&["undo", "--root", root]);
    assert!(text(&out).contains("1 more set(s)"), "{}", text(&out));
    assert_eq!(snapshot(run.root()), after_first);
    let out = run.plait(&["undo", "--root", root]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(snapshot(run.root()), before);
}

#[test]
fn a_user_given_context_path_may_be_absolute_inside_the_root_but_not_outside() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/infer-issue-reply");
    let run = Run::new(&dir);
    let root = run.root().to_str().unwrap();
    let inside = run.root().join("hello.py");
    let out = run.plait(&[
        "apply",
        "--root",
        root,
        "--context",
        inside.to_str().unwrap(),
        run.reply(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(snapshot(run.root()), run.expected("after"));

    let run = Run::new(&dir);
    let root = run.root().to_str().unwrap();
    let outside = run.outside.path().join("hello.py");
    fs::write(&outside, "def hello():\n    pass\n").unwrap();
    let before = snapshot(run.root());
    let out = run.plait(&[
        "apply",
        "--root",
        root,
        "--context",
        outside.to_str().unwrap(),
        run.reply(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("outside") && stderr.contains("hello.py"),
        "{stderr}"
    );
    assert_eq!(snapshot(run.root()), before, "nothing written");
}
