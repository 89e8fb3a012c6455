//! Outbound: plaintext from the local application, mTLS to the upstream.
//!
//! Each connection is classified — by the protocol configured or declared for the
//! service port, else by detection — then either relayed as opaque bytes to one endpoint
//! (a `CONNECT` stream on the pooled mTLS connection to its proxy), or served as HTTP/1.1
//! or HTTP/2 with every request forwarded on its own ([`forward`]).
//! Nothing is sent anywhere until the upstream proxy has proved the identity expected of
//! it; a wrong or untrusted peer gets nothing and the application's connection is closed.
//!
//! Each connection has a log span (the local client's address, the upstream service),
//! named as the parent of every event about the connection and its requests. A pooled
//! connection to an upstream proxy serves every client, so what opening one logs names
//! the upstream and endpoint itself.

pub(crate) mod balance;
pub(crate) mod endpoint;
pub(crate) mod forward;
pub(crate) mod retry;

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tessera_mesh::resources::Protocol;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Span, debug, info_span, warn};

use crate::config::Limits;
use crate::detect::{self, Detected};
use crate::http::ProxyError;
use crate::http2::StreamBody;
use crate::http2::server::{self, Reply};
use crate::identity::IdentityManager;
use crate::lifecycle::Drain;
use crate::limits::body_rate::{MinRate, Paced};
use crate::outbound::forward::Upstream;
use crate::tcp::{self, Io};
use crate::telemetry::{Direction, DirectionMetrics, Metrics, Refusal, request_span};

/// One outbound listener and the upstream it serves.
pub(crate) struct Outbound {
    pub upstream: Arc<Upstream>,
    /// The protocol to assume; `Detect` sniffs each connection.
    pub protocol: Arc<arc_swap::ArcSwap<Protocol>>,
    pub identity: Arc<IdentityManager>,
    pub metrics: Arc<Metrics>,
    pub counters: DirectionMetrics,
    pub limits: Limits,
    pub drain: Drain,
}

impl Outbound {
    /// Serves the local listener until the task is dropped.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.limits.max_connections;
        let drain = self.drain.clone();
        tcp::accept_loop(listener, limit, drain, move |stream, client| {
            let outbound = self.clone();
            async move { outbound.handle(stream, client).await }
        })
        .await;
    }

    /// Serves one accepted connection, in a log span of its own.
    pub(crate) async fn handle(&self, app: TcpStream, client: SocketAddr) {
        let span =
            Arc::new(info_span!("outbound", client = %client, upstream = %self.upstream.name));
        if !self.identity.has_valid_cert() {
            self.metrics
                .refuse(Direction::Outbound, Refusal::NoLocalCertificate);
            return warn!(
                parent: span.as_ref(),
                event = "outbound connection refused",
                reason = ?Refusal::NoLocalCertificate,
                detail = "this proxy holds no valid certificate",
            );
        }
        let detected = match **self.protocol.load() {
            Protocol::Opaque => Detected::Opaque,
            Protocol::Http => Detected::Http1,
            Protocol::Http2 => Detected::Http2,
            Protocol::Detect => match detect::detect(&app, self.limits.detect_timeout).await {
                Ok(detected) => detected,
                Err(_) => return,
            },
        };
        debug!(parent: span.as_ref(), event = "outbound connection", protocol = ?detected);
        let _open = self.counters.open();
        match detected {
            Detected::Opaque => self.relay(app, &span).await,
            Detected::Http1 => self.serve_http1(app, span).await,
            Detected::Http2 => self.serve_http2(app, span).await,
        }
    }

    /// Requests (and upgrades) from an HTTP/1.1 application.
    async fn serve_http1(&self, app: TcpStream, span: Arc<Span>) {
        let upstream = self.upstream.clone();
        let min_rate = MinRate::new(&self.limits);
        let connection_span = span.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let log = request_span(&connection_span, &request);
            let request = request.map(|body| Either::Left(Paced::new(body, min_rate)));
            upstream.clone().handle(request, log)
        });
        let connection = crate::limits::http1_server(self.limits.header_read_timeout)
            .serve_connection(TokioIo::new(app), service)
            .with_upgrades();
        let served = crate::serve_gracefully!(connection, self.drain);
        if let Err(error) = served {
            debug!(parent: span.as_ref(), event = "outbound HTTP/1 connection error", error = %error);
        }
    }

    /// Requests from an HTTP/2 application (gRPC), each stream answered by a task of
    /// its own.
    async fn serve_http2(&self, app: TcpStream, span: Arc<Span>) {
        let settings = server::Settings::new(&self.limits);
        // One IO type for every HTTP/2 server connection: h2's server is compiled once.
        let app: Box<dyn Io> = Box::new(app);
        let served = server::serve(app, settings, &self.drain, &span, |request| {
            // The request goes into `handle` now: the task keeps only its future.
            let log = request_span(&span, &request);
            let request = StreamBody::request(request).map(Either::Right);
            let handled = self.upstream.clone().handle(request, log);
            async move {
                let Ok(response) = handled.await;
                Reply::Response(response)
            }
        })
        .await;
        if let Err(error) = served {
            debug!(parent: span.as_ref(), event = "outbound HTTP/2 connection error", error = %error);
        }
    }

    /// Opaque bytes to one endpoint, tunnelled over the pooled connection to its proxy.
    async fn relay(&self, mut app: TcpStream, span: &Span) {
        let balancer = &self.upstream.balancer;
        let now = tokio::time::Instant::now();
        balancer.readmit_expired(now);
        let Some(in_flight) = balancer.pick(now) else {
            return warn!(parent: span, event = "outbound connection refused", reason = "no endpoints");
        };
        let endpoint = in_flight.endpoint().clone();
        let relayed = match self.upstream.tunnel(&endpoint, span).await {
            Ok(Some(tunnel)) => tunnel.relay(&mut app).await,
            // A peer from before tunnels: a connection of its own.
            Ok(None) => {
                let connector = &endpoint.connectors.tcp;
                let Ok(mut stream) = self.upstream.connect(&endpoint, connector).await else {
                    return balancer.failure(&endpoint, tokio::time::Instant::now());
                };
                tcp::relay(&mut app, &mut stream).await
            }
            // The peer's policy said no: the endpoint is healthy.
            Err(ProxyError::Forbidden) => return,
            Err(_) => return balancer.failure(&endpoint, tokio::time::Instant::now()),
        };
        match relayed {
            Ok((sent, received)) => {
                self.counters.sent.inc_by(sent);
                self.counters.received.inc_by(received);
            }
            Err(error) => {
                debug!(parent: span, event = "outbound connection ended with error", error = %error)
            }
        }
    }
}
