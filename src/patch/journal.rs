//! A persistent undo stack per workspace, kept outside the workspace.
//!
//! Layout: `<state_dir>/undo/<key>/` holds `workspace` (the canonical root, so
//! that a key collision is caught instead of mixing two workspaces) and one
//! directory per applied set, named by its zero-padded sequence number, with a
//! `manifest.json` and one blob per file's previous bytes. A level is written in
//! a hidden temporary directory and renamed into place, so a crash leaves either
//! the whole level or none of it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::apply::{content_hash, deepest_existing, restore, write_atomic, UndoEntry, UndoRecord};
use super::PatchError;

const MANIFEST: &str = "manifest.json";
const WORKSPACE_FILE: &str = "workspace";
const FORMAT_VERSION: u32 = 1;
/// Longest readable part of a workspace key.
const KEY_NAME_MAX: usize = 32;
/// Hidden leftovers older than this come from a crashed process and are removed.
const STALE_AFTER: Duration = Duration::from_secs(3600);
/// How often `push` retries when another process took the same sequence number.
const PUBLISH_TRIES: usize = 16;

static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Serialize, Deserialize)]
struct Manifest {
    version: u32,
    entries: Vec<ManifestEntry>,
    /// Absent in levels written before plait recorded created directories.
    #[serde(default)]
    created_dirs: Vec<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct ManifestEntry {
    path: String,
    target: PathBuf,
    /// Blob holding the previous bytes; `None`: the file did not exist.
    blob: Option<String>,
    /// Hash of the blob, checked on load to catch a damaged journal.
    blob_hash: Option<u64>,
    previous_mode: Option<u32>,
    written: Option<u64>,
}

/// The undo journal of one workspace.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> PatchError + '_ {
    move |source| PatchError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> PatchError {
    PatchError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// The bytes that identify a canonical path.
fn path_bytes(path: &Path) -> Vec<u8> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        path.as_os_str().as_bytes().to_vec()
    }
    #[cfg(not(unix))]
    {
        path.to_string_lossy().into_owned().into_bytes()
    }
}

fn key_of_canonical(canon: &Path) -> String {
    let name: String = canon
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(KEY_NAME_MAX)
        .collect();
    // A leading dot would hide the journal and collide with scratch names.
    let name = name.trim_start_matches('.');
    let name = if name.is_empty() { "root" } else { name };
    format!("{name}-{:016x}", content_hash(&path_bytes(canon)))
}

/// The journal directory name of workspace `root`: its sanitized basename plus a hash of its canonical path.
pub fn workspace_key(root: &Path) -> Result<String, PatchError> {
    let canon = fs::canonicalize(root).map_err(io_at(root))?;
    Ok(key_of_canonical(&canon))
}

/// `path` with its deepest existing ancestor canonicalized (symlinks resolved) and the
/// rest appended as given.
fn canonical_prefix(path: &Path) -> std::io::Result<PathBuf> {
    let (existing, rest) = deepest_existing(path);
    let base = if existing.as_os_str().is_empty() {
        std::env::current_dir()?
    } else {
        fs::canonicalize(existing)?
    };
    Ok(rest.iter().rev().fold(base, |p, name| p.join(name)))
}

fn scratch_name(kind: &str) -> String {
    format!(
        ".{kind}-{}-{}",
        std::process::id(),
        SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn sync_dir(dir: &Path) {
    // Makes renames durable; not every platform can open a directory.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl Journal {
    /// Opens (creating if needed) the journal of workspace `root` under `state_dir`.
    pub fn open(state_dir: &Path, root: &Path) -> Result<Journal, PatchError> {
        let canon_root = fs::canonicalize(root).map_err(io_at(root))?;
        let dir = state_dir.join("undo").join(key_of_canonical(&canon_root));
        // Edits could otherwise target the journal itself. Checked before anything is
        // created, so that a refusal leaves the workspace as it was.
        if canonical_prefix(&dir)
            .map_err(io_at(&dir))?
            .starts_with(&canon_root)
        {
            return Err(invalid(
                &dir,
                format!(
                    "the undo journal would be inside the workspace {}; set PLAIT_STATE_DIR elsewhere",
                    canon_root.display()
                ),
            ));
        }
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let id_file = dir.join(WORKSPACE_FILE);
        let id = path_bytes(&canon_root);
        match fs::read(&id_file) {
            Ok(found) if found == id => {}
            Ok(_) => {
                return Err(invalid(
                    &dir,
                    format!(
                        "this undo journal belongs to another workspace than {}",
                        canon_root.display()
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomic(&id_file.display().to_string(), &id_file, &id, None)?;
            }
            Err(e) => return Err(io_at(&id_file)(e)),
        }
        let journal = Journal { dir };
        journal.remove_stale();
        Ok(journal)
    }

    /// The directory holding this workspace's journal.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records an applied set as the newest level (an empty set records nothing).
    pub fn push(&self, record: &UndoRecord) -> Result<(), PatchError> {
        if record.entries.is_empty() {
            return Ok(());
        }
        let scratch = self.dir.join(scratch_name("tmp"));
        fs::create_dir(&scratch).map_err(io_at(&scratch))?;
        let result = self
            .write_level(&scratch, record)
            .and_then(|()| self.publish(&scratch));
        if result.is_err() {
            let _ = fs::remove_dir_all(&scratch);
        }
        result
    }

    fn write_level(&self, dir: &Path, record: &UndoRecord) -> Result<(), PatchError> {
        let mut entries = Vec::with_capacity(record.entries.len());
        for (i, e) in record.entries.iter().enumerate() {
            let blob = match &e.previous {
                Some(bytes) => {
                    let name = format!("blob-{i}");
                    let file = dir.join(&name);
                    write_atomic(&file.display().to_string(), &file, bytes, None)?;
                    Some(name)
                }
                None => None,
            };
            entries.push(ManifestEntry {
                path: e.path.clone(),
                target: e.target.clone(),
                blob,
                blob_hash: e.previous.as_deref().map(content_hash),
                previous_mode: e.previous_mode,
                written: e.written,
            });
        }
        let manifest = Manifest {
            version: FORMAT_VERSION,
            entries,
            created_dirs: record.created_dirs.clone(),
        };
        let file = dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| {
            invalid(
                &file,
                format!("cannot record the set for undo (non-UTF-8 path?): {e}"),
            )
        })?;
        write_atomic(&file.display().to_string(), &file, &json, None)
    }

    /// Renames a fully written level into place as the newest one.
    fn publish(&self, scratch: &Path) -> Result<(), PatchError> {
        for _ in 0..PUBLISH_TRIES {
            let seq = self.levels()?.last().map_or(1, |s| s + 1);
            let level = self.level_dir(seq);
            match fs::rename(scratch, &level) {
                Ok(()) => {
                    sync_dir(&self.dir);
                    return Ok(());
                }
                // Another process published this number first: take the next.
                Err(_) if level.exists() => continue,
                Err(e) => return Err(io_at(&level)(e)),
            }
        }
        Err(invalid(
            &self.dir,
            "cannot record the set for undo: the journal keeps changing",
        ))
    }

    /// How many sets can be undone.
    pub fn depth(&self) -> Result<usize, PatchError> {
        Ok(self.levels()?.len())
    }

    /// Reverts the newest set and drops it; Ok(None) when there is nothing to undo. Without `force`, refuses (PatchError::Changed, nothing written) when a file changed after the apply.
    pub fn undo_last(&self, force: bool) -> Result<Option<UndoRecord>, PatchError> {
        let Some(&seq) = self.levels()?.last() else {
            return Ok(None);
        };
        let level = self.level_dir(seq);
        let record = load_level(&level)?;
        restore(&record, force)?;
        // Renamed away first so that a half-removed level is never read as one.
        let trash = self.dir.join(scratch_name("drop"));
        fs::rename(&level, &trash).map_err(io_at(&level))?;
        sync_dir(&self.dir);
        let _ = fs::remove_dir_all(&trash);
        Ok(Some(record))
    }

    fn level_dir(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}"))
    }

    /// Sequence numbers of the complete levels, oldest first.
    fn levels(&self) -> Result<Vec<u64>, PatchError> {
        let mut seqs = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let entry = entry.map_err(io_at(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(seq) = name.parse::<u64>() {
                    seqs.push(seq);
                }
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Removes scratch directories a crashed process left behind.
    fn remove_stale(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let scratch = name
                .to_str()
                .is_some_and(|n| n.starts_with(".tmp-") || n.starts_with(".drop-"));
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_AFTER);
            if scratch && old {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn load_level(level: &Path) -> Result<UndoRecord, PatchError> {
    let file = level.join(MANIFEST);
    let bytes = fs::read(&file).map_err(io_at(&file))?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(&file, format!("damaged undo manifest: {e}")))?;
    if manifest.version != FORMAT_VERSION {
        return Err(invalid(
            &file,
            format!("unknown undo journal version {}", manifest.version),
        ));
    }
    let mut entries = Vec::with_capacity(manifest.entries.len());
    for m in manifest.entries {
        let previous = match &m.blob {
            Some(name) => {
                // A blob name is one plain component; anything else is damage.
                if name.contains(['/', '\\']) || name.starts_with('.') {
                    return Err(invalid(&file, format!("bad blob name {name:?}")));
                }
                let blob = level.join(name);
                let bytes = fs::read(&blob).map_err(io_at(&blob))?;
                if Some(content_hash(&bytes)) != m.blob_hash {
                    return Err(invalid(&blob, "damaged undo blob (hash mismatch)"));
                }
                Some(bytes)
            }
            None => None,
        };
        entries.push(UndoEntry {
            path: m.path,
            target: m.target,
            previous,
            written: m.written,
            previous_mode: m.previous_mode,
        });
    }
    Ok(UndoRecord {
        entries,
        created_dirs: manifest.created_dirs,
    })
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use crate::patch::{apply_edits, Edit};
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    /// SEARCH/REPLACE edits from (path, search, replace) triples.
    fn edits(triples: &[(&str, &str, &str)]) -> Vec<Edit> {
        let edit = |&(path, search, replace): &(&str, &str, &str)| Edit::SearchReplace {
            path: path.into(),
            search: search.into(),
            replace: replace.into(),
        };
        triples.iter().map(edit).collect()
    }

    fn apply(root: &Path, edits: &[Edit]) -> UndoRecord {
        apply_edits(root, edits, &HashMap::new()).unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    struct Fixture {
        ws: tempfile::TempDir,
        state: tempfile::TempDir,
    }

    /// A workspace holding `files` (path, content) and an empty state directory.
    fn fixture(files: &[(&str, &str)]) -> Fixture {
        let f = Fixture {
            ws: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
        };
        for (path, content) in files {
            fs::write(f.root().join(path), content).unwrap();
        }
        f
    }

    impl Fixture {
        fn root(&self) -> &Path {
            self.ws.path()
        }
        fn journal(&self) -> Journal {
            Journal::open(self.state.path(), self.root()).unwrap()
        }
    }

    #[test]
    fn several_levels_survive_reopen_and_restore_bytes_and_modes() {
        let f = fixture(&[("a.txt", "one\n"), ("run.sh", "echo hi\n")]);
        let root = f.root();
        fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o750)).unwrap();

        let j = f.journal();
        assert_eq!(j.depth().unwrap(), 0);
        j.push(&apply(root, &edits(&[("a.txt", "one\n", "two\n")])))
            .unwrap();
        let mut second = edits(&[("a.txt", "two\n", "three\n"), ("new/b.txt", "", "b\n")]);
        second.push(Edit::Delete {
            path: "run.sh".into(),
        });
        j.push(&apply(root, &second)).unwrap();
        // An apply that changed nothing leaves no level.
        j.push(&UndoRecord::default()).unwrap();
        assert!(!root.join("run.sh").exists());

        // A new process sees the same stack.
        let j = f.journal();
        assert_eq!(j.depth().unwrap(), 2);
        let rec = j.undo_last(false).unwrap().unwrap();
        assert_eq!(rec.entries.len(), 3);
        assert_eq!(fs::read_to_string(root.join("a.txt")).unwrap(), "two\n");
        assert!(!root.join("new/b.txt").exists());
        // The directory made for it is gone too, also through a reopened journal.
        assert!(!root.join("new").exists());
        assert_eq!(
            fs::read_to_string(root.join("run.sh")).unwrap(),
            "echo hi\n"
        );
        assert_eq!(mode(&root.join("run.sh")), 0o750);
        assert_eq!(j.depth().unwrap(), 1);

        j.undo_last(false).unwrap().unwrap();
        assert_eq!(fs::read_to_string(root.join("a.txt")).unwrap(), "one\n");
        assert_eq!(j.depth().unwrap(), 0);
        assert!(j.undo_last(false).unwrap().is_none());
    }

    #[test]
    fn a_level_from_before_created_dirs_still_loads() {
        let m: Manifest = serde_json::from_str(&format!(
            r#"{{"version": {FORMAT_VERSION}, "entries": []}}"#
        ))
        .unwrap();
        assert!(m.created_dirs.is_empty());
    }

    #[test]
    fn changed_file_refused_unless_forced() {
        let f = fixture(&[("a.txt", "a\n"), ("b.txt", "b\n")]);
        let root = f.root();
        let j = f.journal();
        j.push(&apply(
            root,
            &edits(&[("a.txt", "a\n", "A\n"), ("b.txt", "b\n", "B\n")]),
        ))
        .unwrap();
        fs::write(root.join("b.txt"), "user edit\n").unwrap();
        let err = j.undo_last(false).unwrap_err();
        assert!(
            matches!(&err, PatchError::Changed { path } if path == "b.txt"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(root.join("a.txt")).unwrap(), "A\n");
        assert_eq!(j.depth().unwrap(), 1);

        j.undo_last(true).unwrap().unwrap();
        assert_eq!(fs::read_to_string(root.join("a.txt")).unwrap(), "a\n");
        assert_eq!(fs::read_to_string(root.join("b.txt")).unwrap(), "b\n");
        assert_eq!(j.depth().unwrap(), 0);
    }

    #[test]
    fn keys_separate_workspaces_and_read_well() {
        let state = tempfile::tempdir().unwrap();
        let parent = tempfile::tempdir().unwrap();
        let a = parent.path().join("my project!");
        let b = parent.path().join("other");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(b.join("my project!")).unwrap();
        let ka = workspace_key(&a).unwrap();
        let kb = workspace_key(&b.join("my project!")).unwrap();
        assert!(ka.starts_with("my_project_-"), "{ka}");
        assert_ne!(ka, kb);
        // Another spelling of the same root is the same workspace.
        assert_eq!(workspace_key(&a.join("../my project!/.")).unwrap(), ka);

        let ja = Journal::open(state.path(), &a).unwrap();
        let jb = Journal::open(state.path(), &b.join("my project!")).unwrap();
        assert_ne!(ja.dir(), jb.dir());
        assert!(ja.dir().starts_with(state.path().join("undo")));
        fs::write(a.join("x.txt"), "x\n").unwrap();
        ja.push(&apply(&a, &edits(&[("x.txt", "x\n", "y\n")])))
            .unwrap();
        assert_eq!((ja.depth().unwrap(), jb.depth().unwrap()), (1, 0));

        // A journal directory claimed by another root is refused, not shared.
        fs::write(ja.dir().join(WORKSPACE_FILE), b"/somewhere/else").unwrap();
        let err = Journal::open(state.path(), &a).unwrap_err().to_string();
        assert!(err.contains("another workspace"), "{err}");
    }

    #[test]
    fn journal_inside_workspace_refused() {
        let ws = tempfile::tempdir().unwrap();
        let err = Journal::open(&ws.path().join(".state"), ws.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the workspace"), "{err}");
        // The refusal wrote nothing there.
        assert!(!ws.path().join(".state").exists());
        // Also through a symlink to a directory in the workspace, not yet holding a journal.
        #[cfg(unix)]
        {
            fs::create_dir(ws.path().join("inner")).unwrap();
            let outside = tempfile::tempdir().unwrap();
            let link = outside.path().join("state");
            std::os::unix::fs::symlink(ws.path().join("inner"), &link).unwrap();
            let err = Journal::open(&link.join("deeper"), ws.path())
                .unwrap_err()
                .to_string();
            assert!(err.contains("inside the workspace"), "{err}");
            assert_eq!(fs::read_dir(ws.path().join("inner")).unwrap().count(), 0);
        }
    }

    #[test]
    fn half_written_level_is_ignored_and_damage_is_reported() {
        let f = fixture(&[("a.txt", "a\n")]);
        let root = f.root();
        let j = f.journal();
        // What a crash during push leaves: a scratch directory, never a level.
        fs::create_dir(j.dir().join(".tmp-1-0")).unwrap();
        fs::write(j.dir().join(".tmp-1-0").join("blob-0"), "partial").unwrap();
        assert_eq!(j.depth().unwrap(), 0);

        j.push(&apply(root, &edits(&[("a.txt", "a\n", "b\n")])))
            .unwrap();
        let level = j.level_dir(j.levels().unwrap()[0]);
        fs::write(level.join("blob-0"), "tampered\n").unwrap();
        let err = j.undo_last(false).unwrap_err().to_string();
        assert!(err.contains("blob-0") && err.contains("damaged"), "{err}");
        assert_eq!(fs::read_to_string(root.join("a.txt")).unwrap(), "b\n");
    }
}
