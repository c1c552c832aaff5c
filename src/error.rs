//! The crate's error type: every failure a user can cause names what went wrong and where.

use std::path::PathBuf;

/// Errors returned by es2-wgpu's public API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable GPU adapter, or the device could not be created.
    #[error("GPU: {0}")]
    Gpu(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are not what was expected.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// An option or argument has a value that cannot be used.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Training diverged or produced a non-finite value.
    #[error("numerical failure: {0}")]
    Numerical(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-contents error on `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
