//! Responses their readers stopped taking, on a client connection that other streams
//! share.
//!
//! A response the proxy does not read (its caller's window is closed, or an HTTP/1.1
//! caller stopped reading) stays in h2's receive buffer, and its unread bytes count
//! against the connection's window as well as the stream's. A few such streams hold the
//! whole connection window, and every other stream on the pooled connection waits for
//! its data until they end. h2 hands back both windows together, so the connection's
//! cannot be released while the stream's is kept. Instead each response is watched:
//! once the responses that took nothing for a whole check together hold half the
//! connection's window, the connection's watcher sheds them. Shedding drops the
//! response's receive half: h2 discards its buffered data and returns it to the
//! connection window, and discards what still arrives for it; its reader gets an error
//! on its next read.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use h2::RecvStream;
use slab::Slab;

use crate::limits::{CONNECTION_WINDOW, STREAM_WINDOW};

/// How often a connection's watcher looks for stalled responses: a response that took
/// no byte between two checks while holding some is stalled.
pub(crate) const STALL_CHECK: Duration = Duration::from_secs(1);

/// Stalled responses are shed once together they hold this much of the connection's
/// window: half of it.
const SHED_AT: u64 = CONNECTION_WINDOW as u64 / 2;

// One slow reader alone, holding at most its stream's window, is never shed.
const _: () = assert!((STREAM_WINDOW as u64) < SHED_AT);

/// The responses on one client connection.
#[derive(Default)]
pub(crate) struct Responses {
    watched: Mutex<Slab<Entry>>,
}

/// A response as its connection's watcher sees it.
struct Entry {
    response: Arc<Watched>,
    /// What the response's reader had taken at the last check; `None` before the first.
    seen: Option<u64>,
}

/// One response's receive half, which the watcher may take from its reader.
struct Watched {
    stream: Mutex<Option<RecvStream>>,
    /// Bytes its reader has taken.
    taken: AtomicU64,
}

impl Watched {
    fn stream(&self) -> MutexGuard<'_, Option<RecvStream>> {
        self.stream.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes received and not yet read.
    fn holding(&self) -> u64 {
        self.stream()
            .as_mut()
            .map_or(0, |stream| stream.flow_control().used_capacity() as u64)
    }
}

/// What one check shed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Shed {
    pub(crate) responses: usize,
    /// Bytes they held, given back to the connection window.
    pub(crate) bytes: u64,
}

impl Responses {
    fn watched(&self) -> MutexGuard<'_, Slab<Entry>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches a response's stream until the returned reader is dropped.
    pub(crate) fn watch(self: &Arc<Self>, stream: RecvStream) -> Reader {
        let response = Arc::new(Watched {
            stream: Mutex::new(Some(stream)),
            taken: AtomicU64::new(0),
        });
        let key = self.watched().insert(Entry {
            response: response.clone(),
            seen: None,
        });
        Reader {
            responses: self.clone(),
            key,
            response,
        }
    }

    /// One check: sheds the stalled responses if together they hold [`SHED_AT`].
    pub(crate) fn shed_stalled(&self) -> Option<Shed> {
        let mut watched = self.watched();
        let mut stalled = Vec::new();
        let mut bytes = 0;
        for (key, entry) in watched.iter_mut() {
            let taken = entry.response.taken.load(Ordering::Relaxed);
            if entry.seen.replace(taken) != Some(taken) {
                continue;
            }
            let holding = entry.response.holding();
            if holding > 0 {
                stalled.push(key);
                bytes += holding;
            }
        }
        if bytes < SHED_AT {
            return None;
        }
        for key in &stalled {
            drop(watched[*key].response.stream().take());
        }
        Some(Shed {
            responses: stalled.len(),
            bytes,
        })
    }

    /// Checks every [`STALL_CHECK`] for as long as the connection runs.
    pub(crate) async fn watch_stalls(&self, peer: &str) -> Infallible {
        loop {
            tokio::time::sleep(STALL_CHECK).await;
            // At most a line a second per connection: an operator sees callers (or an
            // attacker) that stop reading.
            if let Some(shed) = self.shed_stalled() {
                tracing::info!(
                    event = "stalled responses shed",
                    peer,
                    responses = shed.responses,
                    bytes = shed.bytes
                );
            }
        }
    }
}

/// A response's reader: its stream, unless the watcher shed it.
pub(crate) struct Reader {
    responses: Arc<Responses>,
    key: usize,
    response: Arc<Watched>,
}

impl Reader {
    /// Runs `read` on the stream; `None` once it was shed.
    pub(crate) fn with<R>(&self, read: impl FnOnce(&mut RecvStream) -> R) -> Option<R> {
        self.response.stream().as_mut().map(read)
    }

    /// Counts bytes taken: a reader that takes any is not stalled.
    pub(crate) fn took(&self, bytes: usize) {
        self.response
            .taken
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.responses.watched().try_remove(self.key);
    }
}
