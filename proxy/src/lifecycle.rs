//! Graceful shutdown: on SIGTERM the proxy turns not-ready, stops accepting, lets
//! in-flight work finish within a bound, then exits.
//!
//! Every connection holds a [`Drain`] guard. When draining starts, accept loops return
//! (closing their listeners), HTTP connections are asked to finish gracefully (HTTP/1
//! closes after the current request, HTTP/2 sends GOAWAY and completes open streams) and
//! opaque relays run to their natural end — until the bound, when the process exits anyway.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Shared by everything that must stop when the proxy drains.
#[derive(Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

/// Starts the drain; kept by whoever handles signals.
pub(crate) struct DrainTrigger {
    shared: Arc<Shared>,
}

struct Shared {
    draining: AtomicBool,
    /// The tasks waiting for the drain to start.
    waiting: Mutex<Waiting>,
    /// Connections in flight, and the notice that the last one finished.
    active: AtomicUsize,
    idle: Notify,
    /// Requests (HTTP/2 streams) the proxy takes in flight at once.
    requests: Arc<Semaphore>,
}

#[derive(Default)]
struct Waiting {
    next_key: u64,
    wakers: HashMap<u64, Waker>,
}

/// Counts one connection as in flight until dropped.
pub struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One request in flight, until dropped.
pub(crate) type Admitted = OwnedSemaphorePermit;

/// A drain with no bound on requests in flight (tests).
#[cfg(test)]
pub(crate) fn channel() -> (DrainTrigger, Drain) {
    channel_with_budget(Semaphore::MAX_PERMITS)
}

/// A drain whose [`Drain::admit`] lets at most `max_requests` requests in flight.
pub(crate) fn channel_with_budget(max_requests: usize) -> (DrainTrigger, Drain) {
    let shared = Arc::new(Shared {
        draining: AtomicBool::new(false),
        waiting: Mutex::new(Waiting::default()),
        active: AtomicUsize::new(0),
        idle: Notify::new(),
        requests: Arc::new(Semaphore::new(max_requests.min(Semaphore::MAX_PERMITS))),
    });
    (
        DrainTrigger {
            shared: shared.clone(),
        },
        Drain { shared },
    )
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire)
    }

    /// Resolves once draining has started.
    pub fn signaled(&self) -> Signaled<'_> {
        Signaled {
            shared: &self.shared,
            registered: None,
        }
    }

    /// One more request in flight, or `None` when the proxy holds its maximum: the
    /// caller refuses that request instead of letting memory grow.
    pub fn admit(&self) -> Option<Admitted> {
        self.shared.requests.clone().try_acquire_owned().ok()
    }

    /// Connections in flight now (what [`Drain::track`] counts).
    pub fn open_connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Marks one connection in flight.
    pub fn track(&self) -> InFlight {
        self.shared.active.fetch_add(1, Ordering::AcqRel);
        InFlight(self.shared.clone())
    }
}

/// Waits for the drain to start. Every connection polls one each time its task wakes
/// (it is a branch of the connection's `select!`): once its task is registered, a poll
/// is one atomic load — no lock, no allocation, unlike a `watch` or `Notify` wait.
pub struct Signaled<'a> {
    shared: &'a Shared,
    /// The registration's key, and the waker it holds.
    registered: Option<(u64, Waker)>,
}

impl Future for Signaled<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.shared.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if let Some((_, waker)) = &self.registered
            && waker.will_wake(cx.waker())
        {
            return Poll::Pending;
        }
        let shared = self.shared;
        let mut waiting = shared
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Again under the lock: the trigger sets the flag before it takes the wakers.
        if shared.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let key = match &self.registered {
            Some((key, _)) => *key,
            None => {
                waiting.next_key += 1;
                waiting.next_key
            }
        };
        waiting.wakers.insert(key, cx.waker().clone());
        drop(waiting);
        self.registered = Some((key, cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for Signaled<'_> {
    fn drop(&mut self) {
        if let Some((key, _)) = self.registered.take() {
            let mut waiting = self
                .shared
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            waiting.wakers.remove(&key);
        }
    }
}

impl DrainTrigger {
    /// Starts draining and waits until every tracked connection is done, or `bound`
    /// passed. Returns how many were still open at the end.
    pub(crate) async fn drain(self, bound: Duration) -> usize {
        self.shared.draining.store(true, Ordering::Release);
        let wakers: Vec<Waker> = {
            let mut waiting = self
                .shared
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            waiting.wakers.drain().map(|(_, waker)| waker).collect()
        };
        wakers.into_iter().for_each(Waker::wake);
        let wait = async {
            loop {
                let idle = self.shared.idle.notified();
                if self.shared.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(bound, wait).await;
        self.shared.active.load(Ordering::Acquire)
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

    #[tokio::test]
    async fn every_waiting_task_is_woken_and_a_late_one_sees_the_drain() {
        let (trigger, drain) = channel();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let drain = drain.clone();
                tokio::spawn(async move { drain.signaled().await })
            })
            .collect();
        // A waiter that gave up before the drain leaves no registration behind.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), drain.signaled()).await;
        assert!(gave_up.is_err());
        tokio::task::yield_now().await;
        assert_eq!(trigger.shared.waiting.lock().unwrap().wakers.len(), 3);
        assert_eq!(trigger.drain(Duration::from_secs(1)).await, 0);
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("a waiting task is woken")
                .unwrap();
        }
        drain.signaled().await;
    }
}
