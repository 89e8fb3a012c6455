//! What inbound and outbound share: accepting under a connection limit, copying bytes
//! both ways with half-close, and naming why a TLS handshake failed.
//!
//! Descriptors are the one resource every part of the proxy draws on. At start the
//! soft `RLIMIT_NOFILE` is raised to the hard one; data-path listeners then close at
//! once any connection whose descriptor falls in the top [`fd_reserve`] of that limit,
//! so the admin port (`/live`, `/ready`) and the application's connections still find
//! descriptors when a flood has taken the rest. Accept failures back off and are logged
//! at most once per [`ACCEPT_LOG_EVERY`], with the count of those not logged, and are
//! counted in `tessera_accept_errors_total{kind}`.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_proto::tls::TlsError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::lifecycle::Drain;
use crate::telemetry::{ACCEPT_ERRORS, AcceptErrorLabels, Refusal};

/// At most one "accept failed" line per listener this often.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// The pause after a failed accept doubles from the first to the last.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_LAST: Duration = Duration::from_secs(1);

/// The soft descriptor limit, as raised at start (0: not known, no reserve kept).
static FD_LIMIT: AtomicU64 = AtomicU64::new(0);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and remembers it; returns the
/// limit in force. Called once at start.
pub fn raise_fd_limit() -> u64 {
    let soft = crate::os::raise_open_files_limit().unwrap_or(0);
    FD_LIMIT.store(soft, Ordering::Relaxed);
    soft
}

/// Descriptors kept back from data-path connections: an eighth of the limit, between
/// 16 and 1024 (32 of 256; 1024 of a million).
pub fn fd_reserve(limit: u64) -> u64 {
    (limit / 8).clamp(16, 1024)
}

/// Whether a connection on descriptor `fd` eats into the reserve.
fn in_reserve(fd: u64) -> bool {
    in_reserve_of(fd, FD_LIMIT.load(Ordering::Relaxed))
}

/// [`in_reserve`] under `limit` (0: not known, no reserve).
fn in_reserve_of(fd: u64, limit: u64) -> bool {
    limit != 0 && fd.saturating_add(fd_reserve(limit)) >= limit
}

/// The metric label for an accept error.
pub fn accept_error_kind(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "descriptors",
        Some(libc::ENOBUFS | libc::ENOMEM) => "memory",
        _ => "other",
    }
}

/// One log line per period for a repeating event, with how many were not logged.
#[derive(Debug)]
pub struct RateLimitedLog {
    every: Duration,
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when this occurrence is to be logged.
    pub fn admit(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(last) if now < last + self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// What a listener does after a failed accept: count it, log it (rate-limited) and
/// pause, longer each time in a row.
#[derive(Debug)]
pub struct AcceptBackoff {
    log: RateLimitedLog,
    pause: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            log: RateLimitedLog::new(ACCEPT_LOG_EVERY),
            pause: ACCEPT_BACKOFF_FIRST,
        }
    }
}

impl AcceptBackoff {
    pub async fn failed(&mut self, error: &std::io::Error) {
        let kind = accept_error_kind(error);
        ACCEPT_ERRORS
            .get_or_create(&AcceptErrorLabels { kind })
            .inc();
        if let Some(suppressed) = self.log.admit() {
            warn!(event = "accept failed", error = %error, kind, suppressed, pause_ms = self.pause.as_millis() as u64);
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_LAST);
    }

    /// A connection refused to keep the reserve: counted by the caller, logged like a
    /// failure.
    pub async fn failed_quietly(&mut self) {
        if let Some(suppressed) = self.log.admit() {
            warn!(
                event = "connection refused",
                reason = "descriptors kept in reserve",
                suppressed
            );
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_LAST);
    }

    pub fn succeeded(&mut self) {
        self.pause = ACCEPT_BACKOFF_FIRST;
    }
}

/// Buffer per direction per connection (allocated and zeroed for every connection, and
/// held while it is open): tokio's default, half a TLS record or HTTP/2 frame.
const COPY_BUFFER: usize = 8 * 1024;

/// A connection's transport, whatever it is (TLS or plain TCP). Protocol code that takes
/// `Box<dyn Io>` is compiled once instead of once per transport.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Accepts connections forever, at most `limit` open at once, and hands each to
/// `handle` in its own task (which holds the connection's permit until it ends).
pub async fn accept_loop<F, Fut>(listener: TcpListener, limit: usize, drain: Drain, handle: F)
where
    F: Fn(TcpStream, std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limit));
    let mut backoff = AcceptBackoff::default();
    // One wait for the whole loop, not one registered and dropped per connection.
    let signaled = drain.signaled();
    tokio::pin!(signaled);
    loop {
        // Waiting for a permit before accepting leaves excess connections in the
        // kernel's backlog instead of in our memory.
        let accepted = tokio::select! {
            () = &mut signaled => return, // drops the listener: no new connections
            accepted = async {
                let permit = permits.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => accepted,
        };
        let (Ok(permit), accepted) = accepted else {
            return;
        };
        match accepted {
            Ok((stream, _)) if in_reserve(stream.as_raw_fd() as u64) => {
                // Closed at once: the last descriptors are for /ready and the app.
                ACCEPT_ERRORS
                    .get_or_create(&AcceptErrorLabels { kind: "reserve" })
                    .inc();
                drop((stream, permit));
                backoff.failed_quietly().await;
            }
            Ok((stream, peer)) => {
                backoff.succeeded();
                let _ = stream.set_nodelay(true);
                let in_flight = drain.track();
                // Boxed: a connection's future is kilobytes; tokio copies a task's
                // future into place at spawn and its stage again when it completes.
                let work = Box::pin(handle(stream, peer));
                tokio::spawn(async move {
                    work.await;
                    drop((permit, in_flight));
                });
            }
            // Out of file descriptors and the like: pause instead of spinning.
            Err(error) => backoff.failed(&error).await,
        }
    }
}

/// Copies both ways until both sides are done; a half-close on one side is passed on
/// while the other direction keeps flowing. Returns bytes (a→b, b→a).
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// Connects with a bound on how long it may take.
pub async fn connect(
    address: impl tokio::net::ToSocketAddrs,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Says why a handshake failed in words an operator can act on: our own verifier's
/// reason when it refused, rustls' otherwise.
pub fn describe_handshake_error(error: &std::io::Error) -> String {
    let tls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            match other.0.downcast_ref::<TlsError>() {
                Some(reason) => format!("invalid peer certificate: {reason}"),
                None => error.to_string(),
            }
        }
        _ => error.to_string(),
    }
}

/// Names the reason a handshake failed, for the metric label.
pub fn classify_handshake_error(error: &std::io::Error) -> Refusal {
    let Some(tls_error) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return Refusal::HandshakeFailed;
    };
    match tls_error {
        rustls::Error::NoCertificatesPresented => Refusal::NoCertificate,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            match other.0.downcast_ref::<TlsError>() {
                Some(TlsError::UnexpectedPeer { .. }) => Refusal::UnexpectedIdentity,
                _ => Refusal::UntrustedCertificate,
            }
        }
        rustls::Error::InvalidCertificate(_) => Refusal::UntrustedCertificate,
        _ => Refusal::HandshakeFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_accept_errors_is_one_line_per_period_with_a_count() {
        let mut log = RateLimitedLog::new(ACCEPT_LOG_EVERY);
        let mut lines = Vec::new();
        // 387 failures 50 ms apart (19 s): the flood the issue saw.
        for _ in 0..387 {
            if let Some(suppressed) = log.admit() {
                lines.push(suppressed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(lines, vec![0, 199], "a line at 0 s and at 10 s, not 387");
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_are_counted_and_reset_on_success() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let counter = ACCEPT_ERRORS.get_or_create(&AcceptErrorLabels {
            kind: "descriptors",
        });
        let before = counter.get();
        let mut backoff = AcceptBackoff::default();
        let started = tokio::time::Instant::now();
        for _ in 0..10 {
            backoff.failed(&emfile).await;
        }
        // 50 + 100 + 200 + 400 + 800 ms, then 1 s each: 6.55 s, not 10 × 50 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(6550));
        assert_eq!(counter.get() - before, 10);
        backoff.succeeded();
        let again = tokio::time::Instant::now();
        backoff.failed(&emfile).await;
        assert_eq!(again.elapsed(), ACCEPT_BACKOFF_FIRST);
    }

    #[test]
    fn the_reserve_is_the_top_of_the_descriptor_limit() {
        assert_eq!(fd_reserve(256), 32);
        assert_eq!(fd_reserve(64), 16);
        assert_eq!(fd_reserve(1 << 20), 1024);
        assert!(!in_reserve_of(223, 256));
        assert!(in_reserve_of(224, 256));
        assert!(!in_reserve_of(100_000, 0), "no limit known, no reserve");
    }
}
