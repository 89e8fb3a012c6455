//! Inbound: mTLS from other proxies, plaintext to the local application.
//!
//! Nothing reaches the application before the peer has completed a TLS 1.3 handshake
//! with a certificate that chains to the trust bundle and names a SPIFFE ID of our trust
//! domain. Plaintext is refused on sight of its first byte.

use std::net::SocketAddr;
use std::sync::Arc;

use tessera_proto::tls;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::config::{InboundPort, Limits};
use crate::identity::IdentityManager;
use crate::tcp;
use crate::telemetry::{Direction, DirectionMetrics, Metrics, Refusal};

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What every inbound connection needs.
pub struct Inbound {
    pub port: InboundPort,
    pub acceptor: TlsAcceptor,
    pub identity: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    pub counters: DirectionMetrics,
    pub limits: Limits,
}

impl Inbound {
    /// Serves the port until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.limits.max_connections;
        tcp::accept_loop(listener, limit, move |stream, peer, permit| {
            let inbound = self.clone();
            async move {
                inbound.handle(stream, peer).await;
                drop(permit);
            }
        })
        .await;
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) {
        let refuse = |reason: Refusal, detail: &dyn std::fmt::Display| {
            self.metrics.refuse(Direction::Inbound, reason);
            warn!(
                event = "inbound connection refused",
                peer_address = %peer,
                port = self.port.listen.port(),
                reason = ?reason,
                detail = %detail,
            );
        };
        if !self.identity.has_valid_cert() {
            return refuse(
                Refusal::NoLocalCertificate,
                &"this proxy holds no valid certificate",
            );
        }
        match tokio::time::timeout(self.limits.handshake_timeout, first_byte(&stream)).await {
            Ok(Ok(Some(TLS_HANDSHAKE_RECORD))) => {}
            Ok(Ok(Some(_))) => return refuse(Refusal::Plaintext, &"plaintext on an mTLS port"),
            Ok(Ok(None)) | Ok(Err(_)) => return, // closed before saying anything
            Err(_) => return refuse(Refusal::HandshakeTimeout, &"no TLS ClientHello in time"),
        }
        let accepted =
            tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(stream)).await;
        let mut tls_stream = match accepted {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(error)) => {
                return refuse(
                    tcp::classify_handshake_error(&error),
                    &tcp::describe_handshake_error(&error),
                );
            }
            Err(_) => return refuse(Refusal::HandshakeTimeout, &"TLS handshake timed out"),
        };
        let Some(peer_identity) = tls::peer_identity(tls_stream.get_ref().1) else {
            // The verifier demands a SPIFFE certificate, so this is unreachable in
            // practice; refuse rather than forward an unnamed peer.
            return refuse(Refusal::NoCertificate, &"no peer identity after handshake");
        };
        let forward_to = self.port.forward_to.to_string();
        let mut app = match tcp::connect(&forward_to, self.limits.connect_timeout).await {
            Ok(app) => app,
            Err(error) => {
                return refuse(
                    Refusal::ConnectFailed,
                    &format!("application at {forward_to}: {error}"),
                );
            }
        };
        debug!(event = "inbound connection", peer_address = %peer, peer_identity = %peer_identity);
        self.metrics.connection(Direction::Inbound, &peer_identity);
        self.counters.active.inc();
        let result = tcp::relay(&mut tls_stream, &mut app).await;
        self.counters.active.dec();
        let (received, sent) = match result {
            Ok(counts) => counts,
            Err(error) => {
                debug!(event = "inbound connection ended with error", peer_address = %peer, error = %error);
                (0, 0)
            }
        };
        self.counters.received.inc_by(received);
        self.counters.sent.inc_by(sent);
    }
}

/// Waits for the first byte without consuming it. `None` when the peer closed.
async fn first_byte(stream: &TcpStream) -> std::io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    let read = stream.peek(&mut byte).await?;
    Ok((read == 1).then_some(byte[0]))
}
