//! The edit pipeline: parse edits out of a model reply, locate them in files,
//! and apply them to a workspace all or nothing, with undo.
//!
//! This module is self-contained: it knows nothing of the rest of plait.

pub mod apply;
pub mod infer;
pub mod journal;
pub mod locate;
pub mod parse;
#[cfg(all(test, unix))]
mod proptests;
pub mod review;

pub use apply::{apply_edits, content_hash, undo, write_atomic, UndoEntry, UndoRecord};
pub use infer::{infer_edits, Inference, InferredEdit};
pub use journal::{workspace_key, Journal};
pub use locate::{locate, replace_unique, LocateError, Located, MatchLevel};
pub use parse::{parse_edits, Edit, Hunk, HunkLine};
pub use review::{apply_reviewed, prepare, ChangeKind, DiffLine, FileChange, ReviewHunk};

/// Why a set of edits (or an undo) was refused or failed; names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The path is absolute.
    #[error("{path}: absolute paths are not allowed")]
    AbsolutePath {
        /// The offending path.
        path: String,
    },
    /// The path climbs out with `..`.
    #[error("{path}: paths containing `..` are not allowed")]
    ParentDir {
        /// The offending path.
        path: String,
    },
    /// The path resolves (through a symlink) outside the workspace root.
    #[error("{path}: resolves outside the workspace")]
    OutsideRoot {
        /// The offending path.
        path: String,
    },
    /// The file is not valid UTF-8.
    #[error("{path}: not a UTF-8 text file")]
    NotUtf8 {
        /// The offending path.
        path: String,
    },
    /// The file changed since the reply was made.
    #[error("{path}: the file changed since the edit was proposed")]
    Changed {
        /// The offending path.
        path: String,
    },
    /// The file does not exist (or is not a regular file) but the edit needs it.
    #[error("{path}: no such file")]
    Missing {
        /// The offending path.
        path: String,
    },
    /// The edit cannot be applied to the file's content.
    #[error("{path}: {reason}")]
    Invalid {
        /// The offending path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The SEARCH text (or a hunk) could not be located.
    #[error("{path}: {source}")]
    Locate {
        /// The offending path.
        path: String,
        /// Why it was not found.
        source: LocateError,
    },
    /// An I/O error while reading or writing.
    #[error("{path}: {source}")]
    Io {
        /// The offending path.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}
