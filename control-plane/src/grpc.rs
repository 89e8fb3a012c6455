//! The control plane's gRPC endpoint (port 15012): TLS terminated here with our own
//! SPIFFE verifier, then handed to tonic. Client certificates are optional at the TLS
//! layer — a proxy's first call has none and authenticates with a join token — and each
//! service decides what it requires from the [`Caller`] attached to every request.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tessera_mesh::SpiffeId;
use tessera_mesh::tls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, Router};
use tracing::warn;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) use tessera_mesh::discovery::MAX_REQUEST_BYTES;
/// Handshakes in progress at once; more wait in the backlog. This paces a fleet
/// reconnecting at once (a control-plane restart): each handshake gets the CPU it needs
/// and finishes, instead of every one of them timing out together.
const MAX_PENDING_HANDSHAKES: usize = 256;
/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`). A
/// queue too short for a fleet reconnecting at once drops SYNs, and the kernel retries
/// those only after 1, 3, 7 s: proxies would wait seconds for an idle control plane.
const LISTEN_BACKLOG: u32 = 4096;

/// Who is calling: their address, and their SPIFFE ID if they presented a certificate.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub address: SocketAddr,
    pub identity: Option<SpiffeId>,
}

/// A TLS connection that tells tonic who is on the other end.
struct CallerStream {
    stream: TlsStream<TcpStream>,
    caller: Caller,
}

impl Connected for CallerStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for CallerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The gRPC listener, with a backlog long enough for a fleet reconnecting at once.
pub(crate) fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` over TLS on `listener` until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, acceptor: TlsAcceptor, router: Router) {
    let (connections, incoming) = mpsc::channel(64);
    let accepting = tokio::spawn(accept(listener, acceptor, connections));
    let served = router
        .serve_with_incoming(ReceiverStream::new(incoming))
        .await;
    accepting.abort();
    if let Err(error) = served {
        warn!(event = "gRPC server stopped", error = %error);
    }
}

async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    connections: mpsc::Sender<Result<CallerStream, std::io::Error>>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let (stream, address) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(event = "accept failed", error = %error);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small request/response messages: Nagle plus delayed ACKs would add ~40 ms.
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            drop(permit);
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    return warn!(event = "control plane TLS handshake refused", caller = %address, reason = %error);
                }
                Err(_) => {
                    return warn!(event = "control plane TLS handshake refused", caller = %address, reason = "timed out");
                }
            };
            let identity = tls::peer_identity(stream.get_ref().1);
            let caller = Caller { address, identity };
            let _ = connections.send(Ok(CallerStream { stream, caller })).await;
        });
    }
}
