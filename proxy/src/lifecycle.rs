//! Graceful shutdown: on SIGTERM the proxy turns not-ready, stops accepting, lets
//! in-flight work finish within a bound, then exits.
//!
//! Every connection holds a [`Drain`] guard. When draining starts, accept loops return
//! (closing their listeners), HTTP connections are asked to finish gracefully (HTTP/1
//! closes after the current request, HTTP/2 sends GOAWAY and completes open streams) and
//! opaque relays run to their natural end — until the bound, when the process exits anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// Shared by everything that must stop when the proxy drains.
#[derive(Clone)]
pub struct Drain {
    signal: watch::Receiver<bool>,
    active: Arc<(AtomicUsize, Notify)>,
}

/// Starts the drain; kept by whoever handles signals.
pub struct DrainTrigger {
    signal: watch::Sender<bool>,
    active: Arc<(AtomicUsize, Notify)>,
}

/// Counts one connection as in flight until dropped.
pub struct InFlight(Arc<(AtomicUsize, Notify)>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.1.notify_waiters();
        }
    }
}

pub fn channel() -> (DrainTrigger, Drain) {
    let (signal, watcher) = watch::channel(false);
    let active = Arc::new((AtomicUsize::new(0), Notify::new()));
    (
        DrainTrigger {
            signal,
            active: active.clone(),
        },
        Drain {
            signal: watcher,
            active,
        },
    )
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining has started.
    pub async fn signaled(&self) {
        let mut signal = self.signal.clone();
        // An error means the trigger is gone, which only happens at exit.
        let _ = signal.wait_for(|draining| *draining).await;
    }

    /// Marks one connection in flight.
    pub fn track(&self) -> InFlight {
        self.active.0.fetch_add(1, Ordering::AcqRel);
        InFlight(self.active.clone())
    }
}

impl DrainTrigger {
    /// Starts draining and waits until every tracked connection is done, or `bound`
    /// passed. Returns how many were still open at the end.
    pub async fn drain(self, bound: Duration) -> usize {
        self.signal.send_replace(true);
        let wait = async {
            loop {
                let notified = self.active.1.notified();
                if self.active.0.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(bound, wait).await;
        self.active.0.load(Ordering::Acquire)
    }
}

/// Serves a hyper connection, asking it to finish gracefully once draining starts.
#[macro_export]
macro_rules! serve_gracefully {
    ($connection:expr, $drain:expr) => {{
        let connection = $connection;
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => result,
            () = $drain.signaled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_in_flight_work_within_the_bound() {
        let (trigger, drain) = channel();
        let held = drain.track();
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        });
        assert_eq!(trigger.drain(Duration::from_secs(5)).await, 0);
        releaser.await.unwrap();
        assert!(drain.is_draining());

        let (trigger, drain) = channel();
        let _stuck = drain.track();
        let started = std::time::Instant::now();
        assert_eq!(trigger.drain(Duration::from_millis(100)).await, 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
