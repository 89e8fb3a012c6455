//! What every Tessera process does the same way, proxy and control plane alike: its log
//! lines, its admin port, how it backs off when `accept` fails, and which signals stop it.

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
