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
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are not what was expected.
    #[error("{path}: {message}")]
    Format {
        /// The file (or, for an embedded model, what stands in for it).
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A configuration field has a value that cannot be used. `field` is its path in the
    /// configuration handed to the library: a field of [`TrainConfig`](crate::es2::TrainConfig)
    /// (`harmful_batch`, `model`), of one of its parts (`objective.temperature`, `lora.rank`,
    /// `optimizer.lr`), or of another options struct (`sampling.top_p`, `gpu.backends`). An
    /// application can point its user at the setting; the command line names its flag instead.
    #[error("invalid {field}: {message}")]
    Config {
        /// The field's path, e.g. `objective.temperature`.
        field: &'static str,
        /// What is wrong with the value and what is allowed.
        message: String,
    },
    /// The output folder of a new training run already holds another run's results.
    #[error(
        "{} already holds a run ({found}); choose another output folder, resume that run, or \
         set `overwrite` to replace it",
        out.display()
    )]
    RunExists {
        /// The output folder.
        out: PathBuf,
        /// The file there that marks the earlier run.
        found: &'static str,
    },
    /// An argument has a value that cannot be used (for settings that are not configuration
    /// fields).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A training run's memory plan does not fit the GPU: the message shows the plan and the
    /// settings that would make it fit (see [`MemoryPlan`](crate::es2::plan::MemoryPlan)).
    #[error("{message}")]
    DoesNotFit {
        /// The problems, the plan's table and the settings to change.
        message: String,
    },
    /// Training diverged or produced a non-finite value.
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// The GPU reported a fault while running recorded work: out of memory, a validation error
    /// (a buffer or binding beyond the adapter's limits, among others), an internal error, or a
    /// lost device. What ran before the fault is unaffected on disk; the device should not be
    /// used for more work after `Lost`.
    #[error("GPU {kind}: {message}")]
    Device {
        /// Which kind of fault.
        kind: DeviceFault,
        /// The driver's or wgpu's description, which names the resource or pipeline.
        message: String,
    },
}

/// The kinds of [`Error::Device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFault {
    /// An allocation failed.
    OutOfMemory,
    /// Work broke a rule of the API or a limit of the adapter.
    Validation,
    /// The implementation failed for a reason of its own.
    Internal,
    /// The device was lost (a driver reset, a removed GPU).
    Lost,
}

impl std::fmt::Display for DeviceFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceFault::OutOfMemory => "out of memory",
            DeviceFault::Validation => "validation error",
            DeviceFault::Internal => "internal error",
            DeviceFault::Lost => "device lost",
        })
    }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An invalid value of configuration field `field` (see [`Error::Config`]).
    pub fn config(field: &'static str, message: impl Into<String>) -> Self {
        Error::Config {
            field,
            message: message.into(),
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
