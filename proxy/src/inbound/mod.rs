//! Inbound: traffic for the local application, from other proxies (mTLS) or — where a
//! PeerAuthentication allows it — from plaintext callers still outside the mesh.
//!
//! The first byte tells them apart (a TLS handshake record or not). STRICT ports refuse
//! plaintext on sight. Over mTLS, ALPN says what the peer proxy carries: multiplexed
//! HTTP/2 (`tessera/h2` or `h2`: requests forwarded one by one, HTTP/1.1 restored where
//! the caller spoke it, and opaque TCP connections tunnelled as `CONNECT` streams), one
//! HTTP/1.1 connection (upgrades), or opaque bytes (`tessera/tcp`, from proxies that
//! predate tunnelling); plaintext is detected like outbound traffic. Every HTTP request
//! passes JWT validation, authorization and then its rate limits before it is forwarded;
//! an opaque connection is authorized and counted against its connection rate limits
//! before the application's connection is even opened, so a denied or limited peer
//! never gets a byte to it.
//!
//! Each connection has a log span (peer address, peer identity once verified, this
//! workload, the application port), named as the parent of every event about the
//! connection and its requests, so none of them repeats who and where.

pub mod app_client;
pub mod app_pool;
pub mod authn;
pub mod authorize;
pub mod canonical;
pub mod rate_limit;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use h2::RecvStream;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tessera_mesh::SpiffeId;
use tessera_mesh::policy::{self, MtlsMode};
use tessera_mesh::tls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::field::{Empty, display};
use tracing::{Span, debug, info_span, warn};

use self::app_client::AppClient;
use self::app_pool::PooledBody;
use self::authn::JwtOutcome;
use self::authorize::InboundPolicy;
use self::canonical::Malformed;
use self::rate_limit::{Caller, RateLimited};
use crate::alpn::{ALPN_H2, ALPN_H2_TUNNELS, ALPN_HTTP1};
use crate::config::{InboundPort, Limits};
use crate::detect::{self, Detected};
use crate::http::{Body, BoxFuture, ORIG_PROTO, ProxyError};
use crate::http2::server::{self, Reply, ServeError};
use crate::http2::{StreamBody, Tunnel};
use crate::identity::IdentityManager;
use crate::lifecycle::Drain;
use crate::limits::body_rate::{MinRate, Paced};
use crate::migration::SourceLog;
use crate::tcp::{self, Io};
use crate::telemetry::{
    Direction, DirectionMetrics, EdgeLabels, Metrics, Refusal, RequestMeter, RequestSeries,
    Workload, request_span,
};
use crate::trace::{self, Tracer};

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What every inbound connection needs.
pub struct Inbound {
    pub port: InboundPort,
    /// This workload as metric labels (the destination of every request).
    pub workload: Workload,
    pub app: Arc<AppClient>,
    pub acceptor: TlsAcceptor,
    pub identity: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    pub counters: DirectionMetrics,
    pub limits: Limits,
    /// `None` until the first configuration: then every connection is refused.
    pub policy: ArcSwapOption<InboundPolicy>,
    pub sources: SourceLog,
    pub tracer: Arc<Tracer>,
    pub access_log: bool,
    pub drain: Drain,
}

/// Every inbound port the proxy serves. Explicit ports are known at start; transparent
/// mode adds one per application port as its first connection arrives. Readers (policy
/// updates, the admin endpoint) take a snapshot without locking.
#[derive(Default)]
pub struct InboundSet(arc_swap::ArcSwap<Vec<Arc<Inbound>>>);

impl InboundSet {
    pub fn add(&self, inbound: Arc<Inbound>) {
        self.0.rcu(|all| {
            let mut all = Vec::clone(all);
            all.push(inbound.clone());
            all
        });
    }

    pub fn all(&self) -> Arc<Vec<Arc<Inbound>>> {
        self.0.load_full()
    }
}

/// Who is on the other end of one connection.
struct Peer {
    address: SocketAddr,
    /// Verified SPIFFE ID; `None` for plaintext.
    identity: Option<SpiffeId>,
    /// The request metrics of this connection, resolved once.
    series: Arc<RequestSeries>,
    /// The connection's log span.
    span: Arc<Span>,
}

impl Inbound {
    fn peer(&self, address: SocketAddr, identity: Option<SpiffeId>, span: Span) -> Peer {
        let series = RequestSeries::new(
            self.metrics.clone(),
            EdgeLabels::inbound(identity.as_ref(), &self.workload),
        );
        Peer {
            address,
            identity,
            series,
            span: Arc::new(span),
        }
    }

    /// The application port policies are written against.
    pub fn app_port(&self) -> u16 {
        self.port.forward_to.port()
    }

    /// Serves the port until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.limits.max_connections;
        let drain = self.drain.clone();
        tcp::accept_loop(listener, limit, drain, move |stream, peer| {
            let inbound = self.clone();
            async move { inbound.handle(stream, peer).await }
        })
        .await;
    }

    fn refuse(&self, span: &Span, reason: Refusal, detail: &dyn std::fmt::Display) {
        self.metrics.refuse(Direction::Inbound, reason);
        warn!(
            parent: span,
            event = "inbound connection refused",
            listener = self.port.listen.port(),
            reason = ?reason,
            detail = %detail,
        );
    }

    /// Serves one accepted connection, in a log span of its own.
    pub(crate) async fn handle(self: Arc<Self>, stream: TcpStream, address: SocketAddr) {
        let span = info_span!(
            "inbound",
            peer = %address,
            peer_identity = Empty,
            destination = %self.workload.identity,
            port = self.app_port(),
        );
        if !self.identity.has_valid_cert() {
            return self.refuse(
                &span,
                Refusal::NoLocalCertificate,
                &"this proxy holds no valid certificate",
            );
        }
        let Some(policy) = self.policy.load_full() else {
            return self.refuse(
                &span,
                Refusal::NoConfiguration,
                &"no configuration from the control plane yet",
            );
        };
        match tokio::time::timeout(self.limits.handshake_timeout, first_byte(&stream)).await {
            Ok(Ok(Some(TLS_HANDSHAKE_RECORD))) => self.mtls(stream, address, span).await,
            Ok(Ok(Some(_))) if policy.mode == MtlsMode::Strict => {
                let by = policy.mode_policy.as_deref().unwrap_or("default");
                self.refuse(
                    &span,
                    Refusal::Plaintext,
                    &format!("plaintext on a STRICT mTLS port (PeerAuthentication {by})"),
                )
            }
            Ok(Ok(Some(_))) => self.plaintext(stream, address, span).await,
            Ok(Ok(None)) | Ok(Err(_)) => {} // closed before saying anything
            Err(_) => self.refuse(
                &span,
                Refusal::HandshakeTimeout,
                &"nothing received in time",
            ),
        }
    }

    async fn mtls(self: Arc<Self>, stream: TcpStream, address: SocketAddr, span: Span) {
        let accepted =
            tokio::time::timeout(self.limits.handshake_timeout, self.acceptor.accept(stream)).await;
        let tls_stream = match accepted {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(error)) => {
                return self.refuse(
                    &span,
                    tcp::classify_handshake_error(&error),
                    &tcp::describe_handshake_error(&error),
                );
            }
            Err(_) => {
                return self.refuse(&span, Refusal::HandshakeTimeout, &"TLS handshake timed out");
            }
        };
        let Some(identity) = tls::peer_identity(tls_stream.get_ref().1) else {
            // The verifier demands a SPIFFE certificate, so this is unreachable in
            // practice; refuse rather than forward an unnamed peer.
            return self.refuse(
                &span,
                Refusal::NoCertificate,
                &"no peer identity after handshake",
            );
        };
        span.record("peer_identity", display(&identity));
        debug!(parent: &span, event = "inbound connection");
        self.metrics
            .connection(Direction::Inbound, self.identity.identity(), &identity);
        self.sources.mtls(identity.as_str());
        let alpn = tls_stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let peer = self.peer(address, Some(identity), span);
        let _open = self.counters.open();
        match alpn.as_deref() {
            Some(ALPN_H2 | ALPN_H2_TUNNELS) => {
                self.serve_http(Box::new(tls_stream), peer, Detected::Http2)
                    .await
            }
            Some(ALPN_HTTP1) => {
                self.serve_http(Box::new(tls_stream), peer, Detected::Http1)
                    .await
            }
            _ => self.relay(tls_stream, peer).await,
        }
    }

    /// A caller outside the mesh, on a PERMISSIVE or DISABLE port.
    async fn plaintext(self: Arc<Self>, stream: TcpStream, address: SocketAddr, span: Span) {
        self.metrics.plaintext_connection(self.identity.identity());
        self.sources.plaintext(address.ip());
        let detected = detect::detect(&stream, self.limits.detect_timeout)
            .await
            .unwrap_or(Detected::Opaque);
        let peer = self.peer(address, None, span);
        let _open = self.counters.open();
        match detected {
            Detected::Opaque => self.relay(stream, peer).await,
            http => self.serve_http(Box::new(stream), peer, http).await,
        }
    }

    /// Opaque bytes to the application, once authorized.
    async fn relay<S>(&self, mut stream: S, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Ok(mut app) = self.open_opaque(&peer).await else {
            return;
        };
        self.splice(&mut stream, &mut app, &peer.span).await;
    }

    /// One opaque connection tunnelled by a peer proxy (a `CONNECT` stream on its pooled
    /// HTTP/2 connection): authorized and connected to the application exactly like a
    /// connection of its own, and only then answered 200 and spliced.
    async fn tunnel(self: Arc<Self>, recv: RecvStream, peer: Arc<Peer>) -> Reply {
        let mut app = match self.open_opaque(&peer).await {
            Ok(app) => app,
            Err(error) => return Reply::Response(error.response(false)),
        };
        let relay = move |tunnel: Tunnel| -> BoxFuture<'static, ()> {
            Box::pin(crate::assertions::size_between(480, 700, async move {
                let _open = self.counters.open();
                match tunnel.relay(&mut app).await {
                    Ok((sent, received)) => {
                        self.counters.received.inc_by(received);
                        self.counters.sent.inc_by(sent);
                    }
                    Err(error) => {
                        debug!(parent: peer.span.as_ref(), event = "inbound connection ended with error", error = %error)
                    }
                }
            }))
        };
        Reply::Tunnel {
            recv,
            relay: Box::new(relay),
        }
    }

    /// Boxed: the tunnel's setup (authorizing, connecting) stays out of every request's
    /// per-stream task.
    fn boxed_tunnel(
        self: Arc<Self>,
        recv: RecvStream,
        peer: Arc<Peer>,
    ) -> BoxFuture<'static, Reply> {
        Box::pin(crate::assertions::size_between(
            480,
            700,
            self.tunnel(recv, peer),
        ))
    }

    /// Authorizes an opaque connection and connects to the application for it.
    async fn open_opaque(&self, peer: &Peer) -> Result<TcpStream, ProxyError> {
        let policy = self.policy.load_full().ok_or(ProxyError::Forbidden)?;
        let decision = policy.authorize(
            &policy::Request {
                source: peer.identity.as_ref(),
                destination: Some(self.identity.identity()),
                request_principal: None,
                jwt_claims: None,
                port: self.app_port(),
                http: None,
            },
            &self.metrics,
        );
        if !decision.allowed {
            self.log_denial(&peer.span, &policy, &decision, None, "connection denied");
            return Err(ProxyError::Forbidden);
        }
        let caller = Caller {
            identity: peer.identity.as_ref(),
            headers: None,
        };
        policy
            .rate_limits
            .check_connection(self.app_port(), &caller, &self.metrics)
            .map_err(|limited| rate_limited(&peer.span, &limited, "connection rate limited"))?;
        let forward_to = self.port.forward_to;
        tcp::connect(forward_to, self.limits.connect_timeout)
            .await
            .map_err(|error| {
                self.metrics
                    .refuse(Direction::Inbound, Refusal::ConnectFailed);
                warn!(parent: peer.span.as_ref(), event = "application unreachable", application = %forward_to, error = %error);
                ProxyError::AppUnavailable
            })
    }

    /// Copies both ways between a peer's connection (or tunnel) and the application.
    async fn splice<S>(&self, stream: &mut S, app: &mut TcpStream, span: &Span)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tcp::relay(stream, app).await {
            Ok((received, sent)) => {
                self.counters.received.inc_by(received);
                self.counters.sent.inc_by(sent);
            }
            Err(error) => {
                debug!(parent: span, event = "inbound connection ended with error", error = %error)
            }
        }
    }

    /// HTTP/1.1 or HTTP/2, each request authorized on its own.
    ///
    /// One transport type (TLS from peers, plain TCP from callers in PERMISSIVE mode):
    /// the servers are compiled once.
    async fn serve_http(self: &Arc<Self>, stream: Box<dyn Io>, peer: Peer, protocol: Detected) {
        // Shared by every request of the connection: a clone per request is a count.
        let peer = Arc::new(peer);
        let served = match protocol {
            Detected::Http2 => self
                .serve_http2(stream, &peer)
                .await
                .map_err(|e| e.to_string()),
            _ => self
                .serve_http1(stream, &peer)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(error) = served {
            debug!(parent: peer.span.as_ref(), event = "inbound HTTP connection error", error);
        }
    }

    /// Requests and tunnels as HTTP/2 streams, each answered by a task of its own.
    async fn serve_http2(
        self: &Arc<Self>,
        stream: Box<dyn Io>,
        peer: &Arc<Peer>,
    ) -> Result<(), ServeError> {
        // A verified peer proxy multiplexes all its callers on this one connection.
        let settings = if peer.identity.is_some() {
            server::Settings::for_peer(&self.limits)
        } else {
            server::Settings::new(&self.limits)
        };
        server::serve(stream, settings, &self.drain, &peer.span, |request| {
            let inbound = self.clone();
            let peer = peer.clone();
            async move {
                if is_tunnel(&request, &peer) {
                    inbound.boxed_tunnel(request.into_body(), peer).await
                } else {
                    let request = StreamBody::request(request).map(Either::Right);
                    Reply::Response(inbound.request(request, &peer).await)
                }
            }
        })
        .await
    }

    /// Requests (and upgrades) over HTTP/1.1: from plaintext callers, or on a peer
    /// proxy's connection of its own (`http/1.1` ALPN, for an upgrade).
    async fn serve_http1(
        self: &Arc<Self>,
        stream: Box<dyn Io>,
        peer: &Arc<Peer>,
    ) -> Result<(), hyper::Error> {
        let inbound = self.clone();
        let peer = peer.clone();
        let min_rate = MinRate::new(&self.limits);
        let service = service_fn(move |request: Request<Incoming>| {
            let inbound = inbound.clone();
            let peer = peer.clone();
            async move {
                let request = request.map(|body| Either::Left(Paced::new(body, min_rate)));
                let response = inbound.request(request, &peer).await;
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let connection = crate::limits::http1_server(self.limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        crate::serve_gracefully!(connection, self.drain)
    }

    /// Measures and traces one request end to end.
    ///
    /// Synchronous up to the application's exchange (boxed): the future that waits on
    /// it keeps the meter and, when tracing, a pointer to the span; not the request.
    fn request<'a>(
        &'a self,
        mut request: Request<InboundBody>,
        peer: &'a Peer,
    ) -> impl Future<Output = Response<Body>> + Send + 'a {
        let canonical = canonicalize(&mut request, peer.identity.is_some());
        let log = request_span(&peer.span, &request);
        let parent = trace::extract(request.headers());
        let span =
            self.tracer
                .start_span(parent.as_ref(), request.method(), trace::SpanKind::Server);
        if let Some(span) = &span {
            span.inject(request.headers_mut());
        }
        let trace_id = span
            .as_ref()
            .filter(|s| s.sampled)
            .map(|s| s.trace_id_hex());
        let mut span = span.map(|span| ServerSpan::new(span, &request));
        let meter = RequestMeter::start().with_trace(trace_id).with_access_log(
            self.access_log,
            request.method(),
            request.uri(),
        );
        let exchange = match canonical {
            Ok(()) => self.boxed_authorized_request(request, peer, log, span.as_deref_mut()),
            Err(malformed) => self.malformed(&request, &log, &malformed),
        };
        async move {
            let response = exchange.await;
            let span = span.map(|span| self.span_ending(*span, &response, peer));
            meter.finish(peer.series.clone(), span, response)
        }
    }

    /// What a request's server span records: the request, the answer (an error from 500
    /// on, as the conventions ask of server spans), the verified peer, and a policy's
    /// denial as an error whose message is the reason. The span ends with the answer's
    /// body, when a gRPC status in its trailers is known.
    fn span_ending(
        &self,
        server_span: ServerSpan,
        response: &AppResponse,
        peer: &Peer,
    ) -> Box<trace::PendingSpan> {
        let ServerSpan {
            span,
            request,
            denial,
        } = server_span;
        let (attributes, status) = server_span_ending(
            request,
            denial,
            response.status(),
            response.headers(),
            peer.address,
            peer.identity.as_ref(),
        );
        let kind = trace::SpanKind::Server;
        trace::PendingSpan::new(self.tracer.clone(), span, kind, attributes, status)
    }

    /// Authorizes the request, then forwards it. Authorization is synchronous: the
    /// boxed future is only the forwarding, not a layer holding the request besides.
    /// A denial is noted in the request's server span, when it is traced.
    fn boxed_authorized_request<'a>(
        &'a self,
        request: Request<InboundBody>,
        peer: &'a Peer,
        log: Arc<Span>,
        span: Option<&mut ServerSpan>,
    ) -> BoxFuture<'a, AppResponse> {
        // Read once: a refusal from either step answers a gRPC caller in gRPC.
        let grpc = crate::http::is_grpc(request.headers());
        match self.authorize(request, peer, grpc, &log, span) {
            Ok(request) => self.app.forward(request, grpc, log),
            Err(refused) => Box::pin(std::future::ready(refused)),
        }
    }

    /// A request with no canonical form: refused before policy or application see it.
    fn malformed(
        &self,
        request: &Request<InboundBody>,
        log: &Span,
        malformed: &Malformed,
    ) -> BoxFuture<'static, AppResponse> {
        debug!(parent: log, event = "request refused", reason = %malformed);
        let grpc = crate::http::is_grpc(request.headers());
        Box::pin(std::future::ready(refusal(ProxyError::BadRequest, grpc)))
    }

    /// Authenticates and authorizes one request: the request to forward, or the refusal.
    /// A denial is noted in `span` (only traced requests have one: nothing is allocated
    /// for the others).
    #[allow(clippy::result_large_err)] // the refusal is the response, moved once
    fn authorize(
        &self,
        request: Request<InboundBody>,
        peer: &Peer,
        grpc: bool,
        log: &Span,
        span: Option<&mut ServerSpan>,
    ) -> Result<Request<InboundBody>, AppResponse> {
        let Some(policy) = self.policy.load_full() else {
            return Err(refusal(ProxyError::Forbidden, grpc));
        };
        if peer.identity.is_none() && policy.mode == MtlsMode::Strict {
            // The port went STRICT while this plaintext connection was open.
            const REASON: &str = "plaintext on a STRICT mTLS port";
            warn!(parent: log, event = "request refused", reason = REASON);
            if let Some(span) = span {
                let by = policy.mode_policy.as_deref().unwrap_or("none");
                span.denial = Some(Denial::new(by, REASON));
            }
            return Err(refusal(ProxyError::Forbidden, grpc));
        }
        let jwt = match &policy.jwt {
            Some(validator) => validator.check(request.headers(), request.uri()),
            None => JwtOutcome::Absent,
        };
        let (request_principal, jwt_claims) = match &jwt {
            JwtOutcome::Invalid(reason) => {
                warn!(
                    parent: log,
                    event = "request refused",
                    method = %request.method(),
                    path = request.uri().path(),
                    reason,
                );
                return Err(refusal(ProxyError::Unauthenticated(reason), grpc));
            }
            JwtOutcome::Valid(token) => (Some(token.principal.as_str()), Some(&token.claims)),
            JwtOutcome::Absent => (None, None),
        };
        let decision = {
            let header =
                |name: &http::HeaderName| crate::inbound::canonical::header(&request, name);
            let attributes = policy::Request {
                source: peer.identity.as_ref(),
                destination: Some(self.identity.identity()),
                request_principal,
                jwt_claims,
                port: self.app_port(),
                http: Some(policy::HttpRequest {
                    method: request.method().as_str(),
                    path: request.uri().path(),
                    query: request.uri().query(),
                    host: crate::inbound::canonical::host(&request),
                    scheme: request.uri().scheme_str().unwrap_or("http"),
                    protocol: protocol_name(request.version()),
                    header: &header,
                    headers: Some(request.headers()),
                }),
            };
            policy.authorize(&attributes, &self.metrics)
        };
        if !decision.allowed {
            let target = format!("{} {}", request.method(), request.uri().path());
            self.log_denial(log, &policy, &decision, Some(&target), "request denied");
            if let Some(span) = span {
                let by = policy.deciding_policy(&decision).unwrap_or("none");
                span.denial = Some(Denial::new(by, decision.reason));
            }
            return Err(refusal(ProxyError::Forbidden, grpc));
        }
        let caller = Caller {
            identity: peer.identity.as_ref(),
            headers: Some(request.headers()),
        };
        policy
            .rate_limits
            .check_request(
                self.app_port(),
                request.method().as_str(),
                request.uri().path(),
                &caller,
                &self.metrics,
            )
            .map_err(|limited| {
                refusal(rate_limited(log, &limited, "request rate limited"), grpc)
            })?;
        Ok(request)
    }

    fn log_denial(
        &self,
        span: &Span,
        policy: &InboundPolicy,
        decision: &policy::Decision,
        target: Option<&str>,
        event: &str,
    ) {
        warn!(
            parent: span,
            event,
            target,
            policy = policy.deciding_policy(decision).unwrap_or("none"),
            rule = decision.rule,
            reason = decision.reason,
            rego = decision.rego.as_ref().map(|verdict| verdict.reason.as_str()),
        );
    }
}

/// The refusal of what a rate limit refused. Logged at debug level only: a caller over
/// its limit would otherwise write a line per attempt; the metric counts them.
fn rate_limited(span: &Span, limited: &RateLimited<'_>, event: &str) -> ProxyError {
    debug!(
        parent: span,
        event,
        policy = limited.policy,
        limit = limited.limit,
        retry_after_ms = limited.retry_after.as_millis() as u64,
    );
    ProxyError::RateLimited {
        retry_after_seconds: limited.retry_after_seconds(),
    }
}

/// How OPA-Envoy's input names a request's protocol.
fn protocol_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// A request's body: from a plaintext HTTP/1.1 caller, or an HTTP/2 stream.
pub(crate) type InboundBody = Either<Paced<Incoming>, StreamBody>;

/// What the application answers, over HTTP/1.1 or HTTP/2.
pub(crate) type AppBody = Either<PooledBody<InboundBody>, StreamBody>;

/// The application's answer or the proxy's own (a refusal); boxed once, when metered.
pub(crate) type AppResponse = Response<Either<AppBody, Body>>;

/// A request's server span, and what it will record once the request is answered.
/// Boxed: the request's future carries a pointer, not the span and its strings.
struct ServerSpan {
    span: trace::ActiveSpan,
    request: trace::RequestAttributes,
    /// Set when the request was denied.
    denial: Option<Denial>,
}

/// Why a request was denied: the deciding policy (`namespace/name`, or "none" when no
/// policy allowed it) and the reason.
struct Denial {
    policy: String,
    reason: &'static str,
}

impl Denial {
    fn new(policy: &str, reason: &'static str) -> Self {
        Self {
            policy: policy.to_string(),
            reason,
        }
    }
}

/// What a server span records once its request is answered, and its status.
fn server_span_ending(
    request: trace::RequestAttributes,
    denial: Option<Denial>,
    status: http::StatusCode,
    headers: &http::HeaderMap,
    peer_address: SocketAddr,
    peer_identity: Option<&SpiffeId>,
) -> (trace::Attributes, trace::SpanStatus) {
    let mut attributes = Vec::with_capacity(16);
    request.record(&mut attributes);
    let mut span_status = trace::response_attributes(status, headers, 500, &mut attributes);
    attributes.push(("client.address", peer_address.ip().to_string().into()));
    if let Some(identity) = peer_identity {
        attributes.push(("tessera.peer.identity", identity.to_string().into()));
    }
    if let Some(Denial { policy, reason }) = denial {
        attributes.push(("tessera.authz.decision", "deny".into()));
        attributes.push(("tessera.authz.policy", policy.into()));
        span_status = trace::SpanStatus::Error(reason.into());
    }
    (attributes, span_status)
}

impl ServerSpan {
    /// The span of a request as it arrived (canonical: one authority).
    fn new(span: trace::ActiveSpan, request: &Request<InboundBody>) -> Box<Self> {
        let request = trace::RequestAttributes::new(
            request.method(),
            request.uri(),
            Some(crate::inbound::canonical::host(request)).filter(|host| !host.is_empty()),
            request.version(),
            crate::http::is_grpc(request.headers()),
        );
        Box::new(Self {
            span,
            request,
            denial: None,
        })
    }
}

/// The application's response without its hop-by-hop headers.
pub(crate) fn from_application(mut response: Response<AppBody>) -> AppResponse {
    crate::http::strip_hop_by_hop(response.headers_mut(), false);
    response.map(Either::Left)
}

/// The proxy's answer instead of the application's.
pub(crate) fn refusal(error: ProxyError, grpc: bool) -> AppResponse {
    error.response(grpc).map(Either::Right)
}

/// A tunnelled opaque connection: `CONNECT` over HTTP/2, which only a peer proxy sends
/// (an application's own CONNECT never reaches here as HTTP/2: outbound proxies forward
/// requests with a path, and plaintext callers are not peers).
fn is_tunnel<B>(request: &Request<B>, peer: &Peer) -> bool {
    request.method() == http::Method::CONNECT
        && request.version() == Version::HTTP_2
        && peer.identity.is_some()
}

/// Puts a request in the one form that is both authorized and forwarded
/// ([`crate::inbound::canonical`]), honours the HTTP/1.1 marker only from peer proxies, and joins
/// repeated fields so conditions read what the application will read.
fn canonicalize<B>(request: &mut Request<B>, from_peer_proxy: bool) -> Result<(), Malformed> {
    if !from_peer_proxy {
        request.headers_mut().remove(ORIG_PROTO);
    }
    crate::inbound::canonical::canonicalize(request)?;
    merge_repeated_headers(request.headers_mut());
    Ok(())
}

/// Joins repeated headers into one value (RFC 9110 §5.3; cookies with "; "), so policy
/// conditions see every value the application will see.
fn merge_repeated_headers(headers: &mut http::HeaderMap) {
    // As many values as names: nothing repeats, and no name needs looking up.
    if headers.len() == headers.keys_len() {
        return;
    }
    let repeated: Vec<header::HeaderName> = headers
        .keys()
        .filter(|name| headers.get_all(*name).iter().nth(1).is_some())
        .cloned()
        .collect();
    for name in repeated {
        let joined: Vec<&[u8]> = headers
            .get_all(&name)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        // HTTP/2 splits cookies into several fields; they rejoin with "; " (RFC 9113).
        let separator: &[u8] = if name == header::COOKIE { b"; " } else { b", " };
        if let Ok(value) = HeaderValue::from_bytes(&joined.join(separator)) {
            headers.insert(name, value);
        }
    }
}

/// Waits for the first byte without consuming it. `None` when the peer closed.
async fn first_byte(stream: &TcpStream) -> std::io::Result<Option<u8>> {
    let mut byte = [0u8; 1];
    let read = stream.peek(&mut byte).await?;
    Ok((read == 1).then_some(byte[0]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{SpanStatus, Value};

    fn ended(
        status: u16,
        headers: &[(&'static str, &'static str)],
        denial: Option<Denial>,
    ) -> (trace::Attributes, SpanStatus) {
        let request = Request::builder()
            .method("POST")
            .uri("http://orders.shop/orders/42?card=4111")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let request = trace::RequestAttributes::new(
            request.method(),
            request.uri(),
            Some("orders.shop"),
            request.version(),
            false,
        );
        let mut head = http::HeaderMap::new();
        for (name, value) in headers {
            head.insert(*name, HeaderValue::from_static(value));
        }
        let caller: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        server_span_ending(
            request,
            denial,
            http::StatusCode::from_u16(status).unwrap(),
            &head,
            "10.0.0.7:40000".parse().unwrap(),
            Some(&caller),
        )
    }

    fn value<'a>(attributes: &'a trace::Attributes, key: &str) -> Option<&'a Value> {
        attributes.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    #[test]
    fn a_server_span_records_the_request_and_errs_from_500() {
        let (attributes, status) = ended(200, &[], None);
        assert_eq!(status, SpanStatus::Unset);
        assert_eq!(
            value(&attributes, "http.response.status_code"),
            Some(&Value::Int(200))
        );
        assert_eq!(value(&attributes, "server.port"), Some(&Value::Int(80)));
        assert_eq!(value(&attributes, "url.path"), Some(&"/orders/42".into()));
        assert_eq!(
            value(&attributes, "tessera.peer.identity"),
            Some(&"spiffe://cluster.local/ns/shop/sa/web".into())
        );
        assert_eq!(
            value(&attributes, "client.address"),
            Some(&"10.0.0.7".into())
        );
        assert!(!format!("{attributes:?}").contains("4111"), "no query");
        // A server span leaves 4xx to the client.
        assert_eq!(ended(404, &[], None).1, SpanStatus::Unset);
        let (attributes, status) = ended(503, &[("tessera-proxy-error", "app-unavailable")], None);
        assert_eq!(status, SpanStatus::Error("".into()));
        assert_eq!(
            value(&attributes, "error.type"),
            Some(&"app-unavailable".into())
        );
        let (attributes, _) = ended(500, &[], None);
        assert_eq!(value(&attributes, "error.type"), Some(&"500".into()));
    }

    #[test]
    fn a_denied_request_is_an_error_with_the_reason_and_the_policy() {
        let denial = Denial::new("shop/no-cancel", "matched a DENY policy");
        let (attributes, status) = ended(403, &[], Some(denial));
        assert_eq!(status, SpanStatus::Error("matched a DENY policy".into()));
        assert_eq!(
            value(&attributes, "tessera.authz.decision"),
            Some(&"deny".into())
        );
        assert_eq!(
            value(&attributes, "tessera.authz.policy"),
            Some(&"shop/no-cancel".into())
        );
        assert_eq!(
            value(&attributes, "http.response.status_code"),
            Some(&Value::Int(403))
        );
    }

    #[test]
    fn repeated_headers_are_joined_and_single_ones_left_alone() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-single", HeaderValue::from_static("a"));
        headers.append("x-role", HeaderValue::from_static("reader"));
        headers.append("x-role", HeaderValue::from_static("admin"));
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        merge_repeated_headers(&mut headers);
        assert_eq!(headers.len(), 3, "one value per name: {headers:?}");
        assert_eq!(headers["x-role"], "reader, admin");
        assert_eq!(headers[header::COOKIE], "a=1; b=2");
        assert_eq!(headers["x-single"], "a");

        let mut single = http::HeaderMap::new();
        single.insert("x-single", HeaderValue::from_static("a"));
        single.insert(header::HOST, HeaderValue::from_static("svc"));
        let before = single.clone();
        merge_repeated_headers(&mut single);
        assert_eq!(single, before);
    }
}
