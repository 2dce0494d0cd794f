//! The crate's one error type.

use std::path::PathBuf;

/// Errors opening, creating or locking disk images, and parsing disk options.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--disk` option (or config/API drive) is malformed.
    #[error("--disk '{spec}': {problem}")]
    Spec {
        /// The option as given.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A system call on an image failed.
    #[error("{what} '{}': {source}", path.display())]
    Io {
        /// What kvmbox was doing.
        what: &'static str,
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image's contents are invalid or unsupported.
    #[error("disk image '{}': {problem}", path.display())]
    Image {
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// Another process holds a lock that conflicts with ours.
    #[error("disk image '{}' is in use{}: {problem} (`--disk ...,lock=off` or the API drive's `\"lock\": false` override it)", path.display(), holder.map(|p| format!(" by process {p}")).unwrap_or_default())]
    Locked {
        /// The image.
        path: PathBuf,
        /// The process holding the conflicting lock, where the kernel tells.
        holder: Option<i32>,
        /// Which access conflicts.
        problem: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] builder for `map_err`.
    pub(crate) fn io(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    }

    /// An [`Error::Image`].
    pub(crate) fn image(path: &std::path::Path, problem: impl Into<String>) -> Self {
        Error::Image {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}
