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
pub(crate) fn raise_fd_limit() -> u64 {
    let soft = crate::os::raise_open_files_limit().unwrap_or(0);
    FD_LIMIT.store(soft, Ordering::Relaxed);
    soft
}

/// Descriptors kept back from data-path connections: an eighth of the limit, between
/// 16 and 1024 (32 of 256; 1024 of a million).
pub(crate) fn fd_reserve(limit: u64) -> u64 {
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

pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Accepts connections forever, at most `limit` open at once, and hands each to
/// `handle` in its own task (which holds the connection's permit until it ends).
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limit: usize,
    drain: Drain,
    handle: F,
) where
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
pub(crate) async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER).await
}

/// Connects with a bound on how long it may take.
pub(crate) async fn connect(
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
pub(crate) fn describe_handshake_error(error: &std::io::Error) -> String {
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
pub(crate) fn classify_handshake_error(error: &std::io::Error) -> Refusal {
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
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

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

    /// The two ends of one in-memory connection.
    fn connection() -> (DuplexStream, DuplexStream) {
        tokio::io::duplex(64 * 1024)
    }

    /// A relay between a client and a server, each on its own in-memory connection:
    /// returns (client, server, the relay's task).
    fn relayed() -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
    ) {
        let (client, mut client_side) = connection();
        let (mut server_side, server) = connection();
        let relay = tokio::spawn(async move { relay(&mut client_side, &mut server_side).await });
        (client, server, relay)
    }

    #[tokio::test(start_paused = true)]
    async fn the_relay_carries_bytes_both_ways_and_counts_them() {
        let (mut client, mut server, relay) = relayed();
        client.write_all(b"hello").await.expect("write");
        let mut hello = [0; 5];
        server.read_exact(&mut hello).await.expect("read");
        assert_eq!(&hello, b"hello");

        // More than one copy buffer each way, both directions at once.
        let upload = vec![1u8; 3 * COPY_BUFFER + 5];
        let download = vec![2u8; 2 * COPY_BUFFER + 7];
        let client_side = async {
            client.write_all(&upload).await.expect("upload");
            client.shutdown().await.expect("half-close");
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.expect("download");
            received
        };
        let server_side = async {
            server.write_all(&download).await.expect("download");
            server.shutdown().await.expect("half-close");
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.expect("upload");
            received
        };
        let (at_client, at_server) = tokio::join!(client_side, server_side);
        assert!(at_client == download, "the download arrived whole");
        assert!(at_server == upload, "the upload arrived whole");

        let counted = relay.await.expect("relay task").expect("relay");
        assert_eq!(counted, (5 + upload.len() as u64, download.len() as u64));
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_close_is_passed_on_while_the_answer_still_flows() {
        let (mut client, mut server, relay) = relayed();
        client.write_all(b"request").await.expect("write");
        client.shutdown().await.expect("half-close");

        // The server sees the end of the request...
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.expect("read");
        assert_eq!(request, b"request");
        // ...and its answer still reaches the client after it.
        server.write_all(b"response").await.expect("write");
        assert!(!relay.is_finished(), "one direction is still open");
        server.shutdown().await.expect("close");
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.expect("read");
        assert_eq!(response, b"response");

        assert_eq!(relay.await.expect("relay task").expect("relay"), (7, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_that_closes_early_ends_the_relay_instead_of_hanging_it() {
        let (mut client, server, relay) = relayed();
        drop(server);
        // The client learns the server is gone...
        let mut nothing = Vec::new();
        client.read_to_end(&mut nothing).await.expect("read");
        assert!(nothing.is_empty());
        // ...and what it still sends fails the relay rather than vanishing.
        client
            .write_all(b"too late")
            .await
            .expect("write to the relay");
        let ended = tokio::time::timeout(Duration::from_secs(60), relay)
            .await
            .expect("the relay ends")
            .expect("relay task");
        let error = ended.expect_err("nowhere to deliver the bytes");
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_relay_stays_open() {
        // No idle timeout here: a tunnel is exempt (an idle database connection is
        // normal), and its ends close it.
        let (mut client, mut server, relay) = relayed();
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!relay.is_finished());
        client.write_all(b"still here").await.expect("write");
        let mut received = [0; 10];
        server.read_exact(&mut received).await.expect("read");
        assert_eq!(&received, b"still here");
        drop((client, server));
        assert!(relay.await.expect("relay task").is_ok());
    }

    /// What handlers saw, in order: ("start" | "end", the client's port).
    type Journal = Arc<Mutex<Vec<(&'static str, u16)>>>;

    /// Serves `listener` with handlers that hold their connection until the client
    /// closes it.
    fn serve(
        listener: TcpListener,
        limit: usize,
        drain: Drain,
    ) -> (Journal, tokio::task::JoinHandle<()>) {
        let journal = Journal::default();
        let seen = journal.clone();
        let task = tokio::spawn(accept_loop(
            listener,
            limit,
            drain,
            move |mut stream, peer| {
                let seen = seen.clone();
                async move {
                    seen.lock().expect("journal").push(("start", peer.port()));
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                    seen.lock().expect("journal").push(("end", peer.port()));
                }
            },
        ));
        (journal, task)
    }

    async fn until(journal: &Journal, entries: usize) {
        while journal.lock().expect("journal").len() < entries {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_connection_limit_the_next_connection_waits_its_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (_trigger, drain) = crate::lifecycle::channel();
        let (journal, _accepting) = serve(listener, 1, drain);

        let first = TcpStream::connect(address).await.expect("connect");
        until(&journal, 1).await;
        // The kernel completes the second handshake; the proxy does not take it.
        let second = TcpStream::connect(address).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            journal.lock().expect("journal").len(),
            1,
            "only one at a time"
        );

        let first_port = first.local_addr().expect("address").port();
        let second_port = second.local_addr().expect("address").port();
        drop(first);
        until(&journal, 3).await;
        assert_eq!(
            *journal.lock().expect("journal"),
            [
                ("start", first_port),
                ("end", first_port),
                ("start", second_port)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn draining_stops_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (trigger, drain) = crate::lifecycle::channel();
        let (_journal, accepting) = serve(listener, 10, drain);

        let still_open = trigger.drain(Duration::from_secs(1)).await;
        assert_eq!(still_open, 0);
        tokio::time::timeout(Duration::from_secs(60), accepting)
            .await
            .expect("the accept loop ends")
            .expect("accept task");
        let refused = TcpStream::connect(address).await;
        assert!(refused.is_err(), "the listener is closed");
    }

    fn tls_error(error: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, error)
    }

    fn ours(reason: TlsError) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(reason),
        )))
    }

    #[test]
    fn a_failed_handshake_is_named_for_what_the_operator_can_fix() {
        let orders: tessera_mesh::SpiffeId = "spiffe://cluster.local/ns/shop/sa/orders"
            .parse()
            .expect("a valid identity");
        let payments: tessera_mesh::SpiffeId = "spiffe://cluster.local/ns/shop/sa/payments"
            .parse()
            .expect("a valid identity");
        let wrong_peer = tls_error(ours(TlsError::UnexpectedPeer {
            presented: payments,
            expected: orders,
        }));
        assert_eq!(
            classify_handshake_error(&wrong_peer),
            Refusal::UnexpectedIdentity
        );
        assert_eq!(
            describe_handshake_error(&wrong_peer),
            "invalid peer certificate: peer presented spiffe://cluster.local/ns/shop/sa/payments, \
             but spiffe://cluster.local/ns/shop/sa/orders was expected"
        );

        let cases = [
            (
                tls_error(rustls::Error::NoCertificatesPresented),
                Refusal::NoCertificate,
            ),
            (
                tls_error(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired,
                )),
                Refusal::UntrustedCertificate,
            ),
            (
                tls_error(ours(TlsError::UriSanCount(2))),
                Refusal::UntrustedCertificate,
            ),
            (
                tls_error(rustls::Error::DecryptError),
                Refusal::HandshakeFailed,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                Refusal::HandshakeFailed,
            ),
        ];
        for (error, refusal) in cases {
            assert_eq!(classify_handshake_error(&error), refusal, "{error}");
        }
        assert!(
            describe_handshake_error(&tls_error(ours(TlsError::UriSanCount(2))))
                .contains("2 URI SANs")
        );
    }
}
