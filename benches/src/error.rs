//! What can stop a benchmark run, with the context needed to fix it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{binary} not found at {path}: {hint}")]
    MissingBinary {
        binary: String,
        path: PathBuf,
        hint: String,
    },
    #[error("cannot start {label}: {source}")]
    Spawn {
        label: String,
        source: std::io::Error,
    },
    #[error("{label} exited early ({status}); last output:\n{output}")]
    Exited {
        label: String,
        status: String,
        output: String,
    },
    #[error("{label} not ready within {seconds} s; last output:\n{output}")]
    NotReady {
        label: String,
        seconds: u64,
        output: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot read /proc/{pid}/{file}: {reason}")]
    Proc {
        pid: u32,
        file: &'static str,
        reason: String,
    },
    #[error("{tool} output not understood ({reason}):\n{output}")]
    ToolOutput {
        tool: &'static str,
        reason: String,
        output: String,
    },
    #[error("{what} failed: {reason}")]
    Failed { what: String, reason: String },
}

impl BenchError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// Any other failure, with what was being done.
    pub fn failed(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Failed {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
