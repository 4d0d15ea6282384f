//! The library's error type. Every variant that concerns a file names it, so a user can see
//! *which* file is wrong and *what* is wrong with it. The binary adds context with `anyhow`.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named file or directory.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is wrong (malformed JSON, bad header, lying offsets, ...).
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    /// A model/dataset/tokenizer could not be found where it was looked for.
    #[error("{0}")]
    NotFound(String),
    /// A configuration or model we understand but do not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tensor the model needs is absent from the checkpoint.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor has the wrong shape or dtype.
    #[error("{path}: tensor `{name}`: {msg}")]
    BadTensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    /// Dataset problems: empty dataset, malformed line, missing field. `line` is 1-based when known.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Dataset {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },
    /// Hugging Face Hub resolution or download failure.
    #[error("hub: {0}")]
    Hub(String),
    /// Tokenizer or chat-template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A backend (device) failure, or a backend that is not available in this build.
    #[error("backend: {0}")]
    Backend(String),
    /// Invalid user-supplied argument values.
    #[error("invalid argument: {0}")]
    InvalidArg(String),
    /// Training stopped (diverged: non-finite loss or gradients).
    #[error("training: {0}")]
    Training(String),
}

impl Error {
    /// Wraps an `std::io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed-file error naming the file.
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
