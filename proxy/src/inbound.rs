//! Inbound: mTLS from other proxies, plaintext to the local application.
//!
//! ALPN says what the peer proxy carries: multiplexed HTTP/2 (requests forwarded one by
//! one over pooled connections, HTTP/1.1 restored where the caller spoke it), a single
//! HTTP/1.1 connection (upgrades), or opaque bytes.
//!
//! Nothing reaches the application before the peer has completed a TLS 1.3 handshake
//! with a certificate that chains to the trust bundle and names a SPIFFE ID of our trust
//! domain. Plaintext is refused on sight of its first byte.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tessera_proto::tls;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::balance::{ALPN_H2, ALPN_HTTP1};
use crate::http::{Body, ORIG_PROTO, ProxyError, boxed};
use crate::outbound::MAX_HEADER_BYTES;

use crate::config::{InboundPort, Limits};
use crate::identity::IdentityManager;
use crate::tcp;
use crate::telemetry::{Direction, DirectionMetrics, Metrics, Refusal};

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What every inbound connection needs.
pub struct Inbound {
    pub port: InboundPort,
    pub app: Arc<AppClient>,
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
        let tls_stream = match accepted {
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
        debug!(event = "inbound connection", peer_address = %peer, peer_identity = %peer_identity);
        self.metrics.connection(Direction::Inbound, &peer_identity);
        self.counters.active.inc();
        match tls_stream.get_ref().1.alpn_protocol() {
            Some(ALPN_H2) => self.serve_h2(tls_stream, peer).await,
            Some(ALPN_HTTP1) => self.serve_http1(tls_stream, peer).await,
            _ => self.relay(tls_stream, peer).await,
        }
        self.counters.active.dec();
    }

    /// Opaque bytes to the application.
    async fn relay(
        &self,
        mut tls_stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
    ) {
        let forward_to = self.port.forward_to.to_string();
        let mut app = match tcp::connect(&forward_to, self.limits.connect_timeout).await {
            Ok(app) => app,
            Err(error) => {
                self.metrics
                    .refuse(Direction::Inbound, Refusal::ConnectFailed);
                return warn!(event = "application unreachable", application = %forward_to, error = %error);
            }
        };
        match tcp::relay(&mut tls_stream, &mut app).await {
            Ok((received, sent)) => {
                self.counters.received.inc_by(received);
                self.counters.sent.inc_by(sent);
            }
            Err(error) => {
                debug!(event = "inbound connection ended with error", peer_address = %peer, error = %error)
            }
        }
    }

    /// Multiplexed HTTP/2 from another proxy; each request to the application.
    async fn serve_h2(
        &self,
        tls_stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
    ) {
        let app = self.app.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(app.forward(request).await) }
        });
        let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(TokioIo::new(tls_stream), service)
            .await;
        if let Err(error) = served {
            debug!(event = "inbound HTTP/2 connection error", peer_address = %peer, error = %error);
        }
    }

    /// One HTTP/1.1 connection from another proxy: upgrades (WebSocket).
    async fn serve_http1(
        &self,
        tls_stream: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
    ) {
        let app = self.app.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(app.forward(request).await) }
        });
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.handshake_timeout)
            .max_buf_size(MAX_HEADER_BYTES)
            .serve_connection(TokioIo::new(tls_stream), service)
            .with_upgrades()
            .await;
        if let Err(error) = served {
            debug!(event = "inbound HTTP/1 connection error", peer_address = %peer, error = %error);
        }
    }
}

/// Requests to the local application, over pooled connections.
pub struct AppClient {
    address: SocketAddr,
    http1: Client<HttpConnector, Body>,
    http2: Client<HttpConnector, Body>,
    connect_timeout: std::time::Duration,
}

impl AppClient {
    pub fn new(address: SocketAddr, limits: &Limits) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(limits.connect_timeout));
        let builder = || Client::builder(TokioExecutor::new());
        Arc::new(Self {
            address,
            http1: builder().build(connector.clone()),
            http2: builder().http2_only(true).build(connector),
            connect_timeout: limits.connect_timeout,
        })
    }

    /// Forwards one request, restoring HTTP/1.1 when the caller spoke it.
    pub async fn forward(&self, request: Request<Incoming>) -> Response<Body> {
        let grpc = crate::http::is_grpc(request.headers());
        let result = if crate::http::is_upgrade(&request) {
            self.upgrade(request).await
        } else {
            self.request(request).await
        };
        result.unwrap_or_else(|error| error.response(grpc))
    }

    async fn request(&self, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let http1 = parts.headers.remove(ORIG_PROTO).is_some();
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        crate::http::strip_hop_by_hop(&mut parts.headers, false);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = format!("http://{}{path}", self.address)
            .parse()
            .map_err(|_| ProxyError::BadRequest)?;
        let client = if http1 {
            parts.version = Version::HTTP_11;
            &self.http1
        } else {
            parts.version = Version::HTTP_2;
            &self.http2
        };
        let mut response = client
            .request(Request::from_parts(parts, boxed(body)))
            .await
            .map_err(|error| {
                if error.is_connect() {
                    warn!(event = "application unreachable", application = %self.address, error = %error);
                    ProxyError::AppUnavailable
                } else {
                    debug!(event = "application error", application = %self.address, error = %error);
                    ProxyError::Reset
                }
            })?;
        crate::http::strip_hop_by_hop(response.headers_mut(), false);
        Ok(response.map(boxed))
    }

    async fn upgrade(&self, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let app = tcp::connect(&self.address.to_string(), self.connect_timeout)
            .await
            .map_err(|_| ProxyError::AppUnavailable)?;
        crate::router::forward_upgrade(request, TokioIo::new(app)).await
    }
}

/// Concurrent requests one peer proxy may have open on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Waits for the first byte without consuming it. `None` when the peer closed.
async fn first_byte(stream: &TcpStream) -> std::io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    let read = stream.peek(&mut byte).await?;
    Ok((read == 1).then_some(byte[0]))
}
