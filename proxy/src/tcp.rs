//! What inbound and outbound share: accepting under a connection limit, copying bytes
//! both ways with half-close, and naming why a TLS handshake failed.
//!
//! Descriptors are the one resource every part of the proxy draws on. At start the
//! soft `RLIMIT_NOFILE` is raised to the hard one; data-path listeners then close at
//! once any connection whose descriptor falls in the top [`fd_reserve`] of that limit,
//! so the admin port (`/live`, `/ready`) and the application's connections still find
//! descriptors when a flood has taken the rest. Accept failures back off as in every
//! Tessera listener (`tessera_mesh::process::accept`).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_mesh::tls::TlsError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::lifecycle::Drain;
use tessera_mesh::process::accept::{ACCEPT_ERRORS, AcceptBackoff, AcceptErrorLabels};

use crate::telemetry::Refusal;

/// The soft descriptor limit, as raised at start (0: not known, no reserve kept).
static FD_LIMIT: AtomicU64 = AtomicU64::new(0);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and remembers it; returns the
/// limit in force. Called once at start.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    #[allow(unsafe_code)]
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    // `rlim_t` is u64 on Linux.
    #[allow(clippy::useless_conversion)]
    let soft = u64::from(soft);
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

/// Buffer per direction per connection (allocated and zeroed for every connection, and
/// held while it is open): tokio's default, half a TLS record or HTTP/2 frame.
const COPY_BUFFER: usize = 8 * 1024;

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
