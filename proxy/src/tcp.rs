//! What inbound and outbound share: accepting under a connection limit, copying bytes
//! both ways with half-close, and naming why a TLS handshake failed.

use std::sync::Arc;
use std::time::Duration;

use tessera_proto::tls::TlsError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::lifecycle::Drain;
use crate::telemetry::Refusal;

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
            Ok((stream, peer)) => {
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
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!(event = "accept failed", error = %error);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
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
