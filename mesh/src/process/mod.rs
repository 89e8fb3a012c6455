//! What every Tessera process does the same way, proxy and control plane alike: its log
//! lines, its admin port, how it backs off when `accept` fails, which signals stop it,
//! and how a fatal error is told.

pub mod accept;
pub mod admin;
pub mod logging;

/// Resolves on SIGTERM (what Kubernetes and systemd send) or Ctrl-C.
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => Ok(()),
        result = tokio::signal::ctrl_c() => result,
    }
}

/// A fatal error as one line: the error and each cause that says something new (many of
/// our errors already name their cause, and a cause repeated reads as a second failure).
/// No backtrace: it speaks to developers, not to the operator reading it.
pub fn error_report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut report = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if !report.contains(&text) {
            report.push_str(": ");
            report.push_str(&text);
        }
        cause = current.source();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot listen on 10.0.0.1:80: {source}")]
    struct Repeats {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("start failed")]
    struct Hides {
        #[source]
        source: Repeats,
    }

    #[test]
    fn a_cause_is_told_once() {
        let denied = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let repeats = Repeats { source: denied() };
        assert_eq!(
            error_report(&repeats),
            "cannot listen on 10.0.0.1:80: permission denied"
        );
        let hides = Hides {
            source: Repeats { source: denied() },
        };
        assert_eq!(
            error_report(&hides),
            "start failed: cannot listen on 10.0.0.1:80: permission denied"
        );
    }
}
