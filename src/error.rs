//! The library's error type: every bad input gets a message that says what was expected.

use std::path::PathBuf;

/// Errors the library reports. Messages name the file, tensor or line at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}:{line}: {msg}")]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: corrupt or truncated safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("token id {id} is out of range: the model's embedding has {rows} rows")]
    TokenOutOfRange { id: u32, rows: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("{path}: the file holds no examples")]
    EmptyData { path: PathBuf },
    /// A NaN or infinite loss or gradient: the run stops before the bad update is applied.
    #[error("non-finite {what} at step {step}; the run stopped. {kept}")]
    NonFinite {
        what: String,
        step: u64,
        /// Which checkpoint survives, phrased for the user.
        kept: String,
    },
    /// A run directory that cannot be used as asked (an existing run without `--resume`,
    /// nothing to resume, a configuration that would not resume exactly).
    #[error("{path}: {msg}")]
    Run { path: PathBuf, msg: String },
    /// A reward source that cannot be built or that failed to score: a bad `--reward` spec,
    /// a crashed or hung reward command, a reward model that does not fit the policy. The
    /// message names the source.
    #[error("{0}")]
    Reward(String),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error tagged with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
