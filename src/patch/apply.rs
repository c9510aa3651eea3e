//! Applying edits to files under a workspace root, all or nothing, with undo.
//!
//! Everything is checked before anything is written; files are then written
//! through a temporary file in the same directory (fsync, rename), keeping
//! permissions, LF/CRLF line endings and a missing final newline.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::locate::replace_unique;
use super::parse::Edit;
use super::PatchError;

/// 64-bit FNV-1a hash of a file's bytes, recorded when a reply is made.
pub fn content_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One file's state before an apply, for undo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoEntry {
    /// Path as written in the edit.
    pub path: String,
    /// Resolved absolute path that was written.
    pub target: PathBuf,
    /// Previous bytes, or `None` if the file did not exist.
    pub previous: Option<Vec<u8>>,
    /// Hash of what the apply left (`None`: the file was deleted).
    pub written: Option<u64>,
    /// Unix permission bits the file had (`None`: it did not exist, or not on unix).
    pub previous_mode: Option<u32>,
}

/// What `undo` needs to restore every file an apply touched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UndoRecord {
    /// One entry per touched file, in apply order.
    pub entries: Vec<UndoEntry>,
    /// Directories the apply created for new files, deepest first; undo removes those
    /// still empty.
    pub created_dirs: Vec<PathBuf>,
}

/// One file's checked change: what it holds now and what it will hold.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Planned {
    pub(crate) path: String,
    pub(crate) target: PathBuf,
    pub(crate) before: Option<Vec<u8>>,
    pub(crate) after: Option<Vec<u8>>,
    pub(crate) perms: Option<fs::Permissions>,
}

/// Unix permission bits of `perms`; `None` where there are none.
fn mode_bits(perms: &fs::Permissions) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Some(perms.mode() & 0o7777)
    }
    #[cfg(not(unix))]
    {
        let _ = perms;
        None
    }
}

/// Permissions with unix bits `mode`; `None` where there are none.
fn perms_from_mode(mode: u32) -> Option<fs::Permissions> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Some(fs::Permissions::from_mode(mode))
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        None
    }
}

fn io_err(path: &str) -> impl Fn(std::io::Error) -> PatchError + '_ {
    move |source| PatchError::Io {
        path: path.to_string(),
        source,
    }
}

/// Resolve `path` under `root`, refusing absolute paths, `..` and symlink escapes.
fn resolve(root: &Path, path: &str) -> Result<PathBuf, PatchError> {
    let p = Path::new(path);
    let refuse_abs = || PatchError::AbsolutePath {
        path: path.to_string(),
    };
    if p.is_absolute() || path.starts_with('/') || path.starts_with('\\') {
        return Err(refuse_abs());
    }
    let mut rel = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(PatchError::ParentDir {
                    path: path.to_string(),
                })
            }
            Component::RootDir | Component::Prefix(_) => return Err(refuse_abs()),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(PatchError::Invalid {
            path: path.to_string(),
            reason: "empty path".into(),
        });
    }
    let canon_root = fs::canonicalize(root).map_err(io_err(path))?;
    // Canonicalise the deepest existing ancestor (the file itself if it exists).
    let full = canon_root.join(&rel);
    let (existing, rest) = deepest_existing(&full);
    let mut target = fs::canonicalize(existing).map_err(|_| PatchError::OutsideRoot {
        path: path.to_string(),
    })?;
    if !target.starts_with(&canon_root) {
        return Err(PatchError::OutsideRoot {
            path: path.to_string(),
        });
    }
    if !rest.is_empty() && !target.is_dir() {
        return Err(PatchError::Invalid {
            path: path.to_string(),
            reason: format!("{} is not a directory", target.display()),
        });
    }
    for name in rest.iter().rev() {
        target.push(name);
    }
    if target == canon_root {
        return Err(PatchError::Invalid {
            path: path.to_string(),
            reason: "is the workspace root".into(),
        });
    }
    Ok(target)
}

/// The deepest ancestor of `path` that exists (`path` itself if it does), and the names
/// below it, innermost first.
pub(crate) fn deepest_existing(path: &Path) -> (&Path, Vec<&std::ffi::OsStr>) {
    let mut existing = path;
    let mut rest = Vec::new();
    while fs::symlink_metadata(existing).is_err() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            _ => break,
        }
    }
    (existing, rest)
}

/// Apply one edit to the LF text of a file (`None`: the file does not exist).
fn apply_one(path: &str, text: Option<String>, edit: &Edit) -> Result<Option<String>, PatchError> {
    let locate_err = |source| PatchError::Locate {
        path: path.to_string(),
        source,
    };
    let missing = || PatchError::Missing {
        path: path.to_string(),
    };
    match edit {
        Edit::SearchReplace {
            search, replace, ..
        } => {
            if search.trim().is_empty() {
                // Empty SEARCH: create the file, or append to it.
                let mut t = text.unwrap_or_default();
                if !t.is_empty() && !t.ends_with('\n') {
                    t.push('\n');
                }
                t.push_str(&lf(replace));
                return Ok(Some(t));
            }
            let t = text.ok_or_else(missing)?;
            replace_unique(&t, &lf(search), &lf(replace))
                .map(Some)
                .map_err(locate_err)
        }
        Edit::Diff { hunks, .. } => {
            let mut t = text;
            for h in hunks {
                let old = h.old_text();
                let new = h.new_text();
                t =
                    Some(match t {
                        Some(cur) if !old.trim().is_empty() => {
                            replace_unique(&cur, &old, &new).map_err(locate_err)?
                        }
                        None if old.trim().is_empty() => new,
                        Some(cur) if cur.trim().is_empty() => new,
                        None => return Err(missing()),
                        Some(_) => return Err(PatchError::Invalid {
                            path: path.to_string(),
                            reason:
                                "a hunk without context lines cannot be placed in an existing file"
                                    .into(),
                        }),
                    });
            }
            Ok(t)
        }
        Edit::WholeFile { content, .. } => Ok(Some(lf(content))),
        Edit::Delete { .. } => {
            if text.is_none() {
                return Err(missing());
            }
            Ok(None)
        }
    }
}

fn lf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

/// Plan every file's new content, checking everything; writes nothing.
pub(crate) fn plan(
    root: &Path,
    edits: &[Edit],
    expected: &HashMap<String, u64>,
) -> Result<Vec<Planned>, PatchError> {
    let mut order: Vec<PathBuf> = Vec::new();
    let mut groups: HashMap<PathBuf, (String, Vec<&Edit>)> = HashMap::new();
    for e in edits {
        let target = resolve(root, e.path())?;
        if !groups.contains_key(&target) {
            order.push(target.clone());
        }
        groups
            .entry(target)
            .or_insert_with(|| (e.path().to_string(), Vec::new()))
            .1
            .push(e);
    }
    let mut planned = Vec::new();
    for target in order {
        let Some((path, group)) = groups.remove(&target) else {
            continue;
        };
        let (before, perms) = match fs::metadata(&target) {
            Ok(m) if m.is_file() => (
                Some(fs::read(&target).map_err(io_err(&path))?),
                Some(m.permissions()),
            ),
            Ok(_) => {
                return Err(PatchError::Invalid {
                    path,
                    reason: "not a regular file".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let exp = group.iter().find_map(|e| expected.get(e.path()));
        if let Some(exp) = exp {
            if before.as_deref().map(content_hash) != Some(*exp) {
                return Err(PatchError::Changed { path });
            }
        }
        let original = match &before {
            Some(b) => Some(
                std::str::from_utf8(b)
                    .map_err(|_| PatchError::NotUtf8 { path: path.clone() })?
                    .to_string(),
            ),
            None => None,
        };
        let crlf = original.as_deref().is_some_and(|o| o.contains("\r\n"));
        let final_nl = original
            .as_deref()
            .map(|o| o.is_empty() || o.ends_with('\n'));
        let mut text = original.as_deref().map(lf);
        for e in group {
            text = apply_one(&path, text, e)?;
        }
        let after = text.map(|mut t| {
            match final_nl {
                Some(false) if t.ends_with('\n') => {
                    t.pop();
                }
                Some(true) if !t.is_empty() && !t.ends_with('\n') => t.push('\n'),
                _ => {}
            }
            if crlf {
                t = t.replace('\n', "\r\n");
            }
            t.into_bytes()
        });
        if before == after {
            continue;
        }
        planned.push(Planned {
            path,
            target,
            before,
            after,
            perms,
        });
    }
    Ok(planned)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `target` through a fresh temporary file in the same directory (fsync,
/// rename): a reader sees the old file or the new one, never part of it; `path` names it in
/// errors.
pub fn write_atomic(
    path: &str,
    target: &Path,
    bytes: &[u8],
    perms: Option<&fs::Permissions>,
) -> Result<(), PatchError> {
    let err = io_err(path);
    let dir = target.parent().ok_or_else(|| PatchError::Invalid {
        path: path.to_string(),
        reason: "has no parent directory".into(),
    })?;
    fs::create_dir_all(dir).map_err(&err)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.plait-tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if let Some(p) = perms {
            f.set_permissions(p.clone())?;
        }
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, target)?;
        // Make the rename durable; not every platform can open a directory.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Put one file in the given state (`None`: absent).
fn set_state(
    path: &str,
    target: &Path,
    bytes: Option<&[u8]>,
    perms: Option<&fs::Permissions>,
) -> Result<(), PatchError> {
    match bytes {
        Some(b) => write_atomic(path, target, b, perms),
        None => match fs::remove_file(target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path)(e)),
        },
    }
}

/// Write a checked plan; on failure, restore what was already written. Returns the
/// directories it created, deepest first.
pub(crate) fn commit(steps: &[Planned]) -> Result<Vec<PathBuf>, PatchError> {
    let mut created = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        if s.after.is_some() {
            created.extend(missing_dirs(&s.target));
        }
        if let Err(e) = set_state(&s.path, &s.target, s.after.as_deref(), s.perms.as_ref()) {
            for done in steps[..i].iter().rev() {
                let _ = set_state(
                    &done.path,
                    &done.target,
                    done.before.as_deref(),
                    done.perms.as_ref(),
                );
            }
            remove_empty_dirs(&deepest_first(created));
            return Err(e);
        }
    }
    Ok(deepest_first(created))
}

/// The ancestors of `target` that do not exist yet, nearest first.
fn missing_dirs(target: &Path) -> Vec<PathBuf> {
    target
        .ancestors()
        .skip(1)
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect()
}

fn deepest_first(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    // By depth, then by path, so that equal paths sit together for `dedup`.
    dirs.sort_by(|a, b| (b.components().count(), a).cmp(&(a.components().count(), b)));
    dirs.dedup();
    dirs
}

/// Removes each of `dirs` (deepest first) that is empty; one that is not, or is gone, stays
/// as it is.
fn remove_empty_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        // Fails, harmlessly, on a directory that holds something or no longer exists.
        let _ = fs::remove_dir(d);
    }
}

/// Apply `edits` under `root`, all or nothing; `expected` maps an edit path to the file's hash when the reply was made.
pub fn apply_edits(
    root: &Path,
    edits: &[Edit],
    expected: &HashMap<String, u64>,
) -> Result<UndoRecord, PatchError> {
    let steps = plan(root, edits, expected)?;
    let created_dirs = commit(&steps)?;
    Ok(record(steps, created_dirs))
}

/// The undo record of a committed plan that created `created_dirs`.
pub(crate) fn record(steps: Vec<Planned>, created_dirs: Vec<PathBuf>) -> UndoRecord {
    UndoRecord {
        created_dirs,
        entries: steps
            .into_iter()
            .map(|s| UndoEntry {
                written: s.after.as_deref().map(content_hash),
                previous_mode: s.perms.as_ref().and_then(mode_bits),
                path: s.path,
                target: s.target,
                previous: s.before,
            })
            .collect(),
    }
}

/// Restore every file in `record`, all or nothing; refuses if a file changed since the apply.
pub fn undo(record: &UndoRecord) -> Result<(), PatchError> {
    restore(record, false)
}

/// Restore bytes and modes of every file in `record`, all or nothing; with `force`,
/// files changed since the apply are overwritten instead of refused.
pub(super) fn restore(record: &UndoRecord, force: bool) -> Result<(), PatchError> {
    let mut steps = Vec::new();
    for e in record.entries.iter().rev() {
        let (current, perms) = match fs::metadata(&e.target) {
            Ok(m) if m.is_file() => (
                Some(fs::read(&e.target).map_err(io_err(&e.path))?),
                Some(m.permissions()),
            ),
            Ok(_) => {
                return Err(PatchError::Invalid {
                    path: e.path.clone(),
                    reason: "not a regular file".into(),
                })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (None, None),
            Err(err) => return Err(io_err(&e.path)(err)),
        };
        if !force && current.as_deref().map(content_hash) != e.written {
            return Err(PatchError::Changed {
                path: e.path.clone(),
            });
        }
        // The recorded mode wins so that a deleted file comes back as it was; a
        // rollback of this undo then also uses it, which differs from the current
        // mode only if someone changed the mode after the apply.
        let perms = e.previous_mode.and_then(perms_from_mode).or(perms);
        steps.push(Planned {
            path: e.path.clone(),
            target: e.target.clone(),
            before: current,
            after: e.previous.clone(),
            perms,
        });
    }
    commit(&steps)?;
    remove_empty_dirs(&record.created_dirs);
    Ok(())
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sr(path: &str, search: &str, replace: &str) -> Edit {
        Edit::SearchReplace {
            path: path.into(),
            search: search.into(),
            replace: replace.into(),
        }
    }

    fn none() -> HashMap<String, u64> {
        HashMap::new()
    }

    fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    stack.push(p);
                } else if m.is_file() {
                    out.push((p.clone(), fs::read(&p).unwrap()));
                } else {
                    out.push((p, Vec::new()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn crlf_and_missing_final_newline_preserved_and_undo() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a.txt"), b"one\r\ntwo\r\nthree").unwrap();
        let rec = apply_edits(root, &[sr("a.txt", "two\n", "2\nzwei\n")], &none()).unwrap();
        assert_eq!(
            fs::read(root.join("a.txt")).unwrap(),
            b"one\r\n2\r\nzwei\r\nthree"
        );
        let rec2 = apply_edits(root, &[sr("a.txt", "three\n", "3\n")], &none()).unwrap();
        assert_eq!(
            fs::read(root.join("a.txt")).unwrap(),
            b"one\r\n2\r\nzwei\r\n3"
        );
        undo(&rec2).unwrap();
        undo(&rec).unwrap();
        assert_eq!(
            fs::read(root.join("a.txt")).unwrap(),
            b"one\r\ntwo\r\nthree"
        );
    }

    #[test]
    fn permissions_kept() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("run.sh");
        fs::write(&f, "echo hi\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o751)).unwrap();
        apply_edits(
            dir.path(),
            &[sr("run.sh", "echo hi\n", "echo bye\n")],
            &none(),
        )
        .unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "echo bye\n");
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o751
        );
    }

    #[test]
    fn new_file_deletion_and_undo() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("old.rs"), "fn old() {}\n").unwrap();
        let before = snapshot(root);
        let edits = vec![
            sr("src/new/lib.rs", "", "pub fn f() {}\n"),
            Edit::Delete {
                path: "old.rs".into(),
            },
            Edit::WholeFile {
                path: "./notes.md".into(),
                content: "# hi\n".into(),
            },
        ];
        let rec = apply_edits(root, &edits, &none()).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("src/new/lib.rs")).unwrap(),
            "pub fn f() {}\n"
        );
        assert!(!root.join("old.rs").exists());
        assert_eq!(fs::read_to_string(root.join("notes.md")).unwrap(), "# hi\n");
        assert_eq!(rec.entries.len(), 3);
        assert_eq!(rec.entries[0].previous, None);
        assert_eq!(rec.created_dirs, [root.join("src/new"), root.join("src")]);
        undo(&rec).unwrap();
        assert_eq!(snapshot(root), before);
        // The directories the apply made for the new file went with it.
        assert!(!root.join("src").exists());

        // A directory that holds something of the user's by the time of the undo stays.
        let rec = apply_edits(root, &edits[..1], &none()).unwrap();
        fs::write(root.join("src/mine.rs"), "// mine\n").unwrap();
        undo(&rec).unwrap();
        assert!(!root.join("src/new").exists());
        assert_eq!(
            fs::read_to_string(root.join("src/mine.rs")).unwrap(),
            "// mine\n"
        );
    }

    #[test]
    fn diff_edit_applies() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("m.py"), "a = 1\nb = 2\nc = 3\n").unwrap();
        let edits = super::super::parse::parse_edits(
            "```diff\n--- a/m.py\n+++ b/m.py\n@@ -1,3 +1,3 @@\n a = 1\n-b = 2\n+b = 20\n c = 3\n```\n",
        );
        apply_edits(root, &edits, &none()).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("m.py")).unwrap(),
            "a = 1\nb = 20\nc = 3\n"
        );
    }

    fn assert_refused(root: &Path, edits: &[Edit], expected: &HashMap<String, u64>) -> String {
        let before = snapshot(root);
        let err = apply_edits(root, edits, expected).expect_err("must be refused");
        assert_eq!(snapshot(root), before, "something was written");
        err.to_string()
    }

    #[test]
    fn refusals_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("ok.txt"), "x\n").unwrap();
        fs::write(root.join("bin.dat"), [0xff, 0xfe, 0x00, b'\n']).unwrap();
        fs::write(outside.path().join("secret.txt"), "s\n").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        // A valid first edit must not be written when a later one is refused.
        let good = sr("ok.txt", "x\n", "y\n");

        let msg = assert_refused(
            root,
            &[good.clone(), sr("/etc/passwd", "a\n", "b\n")],
            &none(),
        );
        assert!(
            msg.contains("/etc/passwd") && msg.contains("absolute"),
            "{msg}"
        );

        let msg = assert_refused(
            root,
            &[good.clone(), sr("src/../../x.txt", "", "b\n")],
            &none(),
        );
        assert!(
            msg.contains("..") && msg.contains("src/../../x.txt"),
            "{msg}"
        );

        let msg = assert_refused(
            root,
            &[good.clone(), sr("link/secret.txt", "s\n", "t\n")],
            &none(),
        );
        assert!(
            msg.contains("link/secret.txt") && msg.contains("outside"),
            "{msg}"
        );
        let msg = assert_refused(
            root,
            &[good.clone(), sr("link/new.txt", "", "t\n")],
            &none(),
        );
        assert!(msg.contains("outside"), "{msg}");

        let msg = assert_refused(root, &[good.clone(), sr("bin.dat", "a\n", "b\n")], &none());
        assert!(msg.contains("bin.dat") && msg.contains("UTF-8"), "{msg}");

        let mut expected = HashMap::new();
        expected.insert("ok.txt".to_string(), content_hash(b"something else\n"));
        let msg = assert_refused(root, std::slice::from_ref(&good), &expected);
        assert!(msg.contains("ok.txt") && msg.contains("changed"), "{msg}");

        let msg = assert_refused(
            root,
            &[good.clone(), sr("ok.txt", "nope\n", "z\n")],
            &none(),
        );
        assert!(msg.contains("not found"), "{msg}");

        let msg = assert_refused(root, &[sr("missing.txt", "a\n", "b\n")], &none());
        assert!(
            msg.contains("missing.txt") && msg.contains("no such file"),
            "{msg}"
        );

        // The right hash is accepted.
        expected.insert("ok.txt".to_string(), content_hash(b"x\n"));
        apply_edits(root, &[good], &expected).unwrap();
        assert_eq!(fs::read_to_string(root.join("ok.txt")).unwrap(), "y\n");
        assert_eq!(
            fs::read_to_string(outside.path().join("secret.txt")).unwrap(),
            "s\n"
        );
    }

    #[test]
    fn symlink_inside_root_writes_target() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("real")).unwrap();
        fs::write(root.join("real/f.txt"), "a\n").unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("alias")).unwrap();
        apply_edits(root, &[sr("alias/f.txt", "a\n", "b\n")], &none()).unwrap();
        assert_eq!(fs::read_to_string(root.join("real/f.txt")).unwrap(), "b\n");
    }

    #[test]
    fn undo_refuses_if_file_changed_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("a.txt"), "a\n").unwrap();
        fs::write(root.join("b.txt"), "b\n").unwrap();
        let rec = apply_edits(
            root,
            &[sr("a.txt", "a\n", "A\n"), sr("b.txt", "b\n", "B\n")],
            &none(),
        )
        .unwrap();
        fs::write(root.join("b.txt"), "edited by user\n").unwrap();
        let err = undo(&rec).expect_err("must refuse").to_string();
        assert!(err.contains("b.txt"), "{err}");
        assert_eq!(fs::read_to_string(root.join("a.txt")).unwrap(), "A\n");
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(content_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(content_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
