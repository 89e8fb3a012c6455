//! Outbound: plaintext from the local application, mTLS to the upstream proxy.
//!
//! The application's bytes are not read until the upstream has proved the SPIFFE ID
//! configured for it; a wrong or untrusted peer gets nothing and the application's
//! connection is closed.

use std::net::SocketAddr;
use std::sync::Arc;

use tessera_proto::tls;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use crate::config::{Limits, OutboundUpstream};
use crate::identity::IdentityManager;
use crate::tcp;
use crate::telemetry::{Direction, DirectionMetrics, Metrics, Refusal};

/// What every outbound connection to one upstream needs.
pub struct Outbound {
    pub upstream: OutboundUpstream,
    /// Built once; verifies exactly `upstream.identity`.
    pub connector: TlsConnector,
    pub identity: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    pub counters: DirectionMetrics,
    pub limits: Limits,
}

impl Outbound {
    /// Serves the local listener until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.limits.max_connections;
        tcp::accept_loop(listener, limit, move |stream, client, permit| {
            let outbound = self.clone();
            async move {
                outbound.handle(stream, client).await;
                drop(permit);
            }
        })
        .await;
    }

    async fn handle(&self, mut app: TcpStream, client: SocketAddr) {
        let upstream = &self.upstream;
        let refuse = |reason: Refusal, detail: &dyn std::fmt::Display| {
            self.metrics.refuse(Direction::Outbound, reason);
            warn!(
                event = "outbound connection refused",
                client_address = %client,
                upstream = %upstream.address,
                expected_identity = %upstream.identity,
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
        let tcp_stream = match tcp::connect(&upstream.address, self.limits.connect_timeout).await {
            Ok(stream) => stream,
            Err(error) => return refuse(Refusal::ConnectFailed, &error),
        };
        let server_name = match tcp_stream.peer_addr() {
            Ok(address) => tls::server_name_for(address),
            Err(error) => return refuse(Refusal::ConnectFailed, &error),
        };
        let handshake = self.connector.connect(server_name, tcp_stream);
        let mut tls_stream =
            match tokio::time::timeout(self.limits.handshake_timeout, handshake).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    return refuse(
                        tcp::classify_handshake_error(&error),
                        &tcp::describe_handshake_error(&error),
                    );
                }
                Err(_) => return refuse(Refusal::HandshakeTimeout, &"TLS handshake timed out"),
            };
        debug!(event = "outbound connection", client_address = %client, peer_identity = %upstream.identity);
        self.metrics
            .connection(Direction::Outbound, &upstream.identity);
        self.counters.active.inc();
        let result = tcp::relay(&mut app, &mut tls_stream).await;
        self.counters.active.dec();
        let (sent, received) = match result {
            Ok(counts) => counts,
            Err(error) => {
                debug!(event = "outbound connection ended with error", client_address = %client, error = %error);
                (0, 0)
            }
        };
        self.counters.sent.inc_by(sent);
        self.counters.received.inc_by(received);
    }
}
