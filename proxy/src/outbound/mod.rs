//! Outbound: plaintext from the local application, mTLS to the upstream.
//!
//! Each connection is classified — by the protocol configured or declared for the
//! service port, else by detection — then either relayed as opaque bytes to one endpoint
//! (a `CONNECT` stream on the pooled mTLS connection to its proxy), or served as HTTP/1.1
//! or HTTP/2 with every request forwarded on its own ([`forward`]).
//! Nothing is sent anywhere until the upstream proxy has proved the identity expected of
//! it; a wrong or untrusted peer gets nothing and the application's connection is closed.

pub mod balance;
pub mod endpoint;
pub mod forward;
pub mod retry;

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tessera_mesh::resources::Protocol;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

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
use crate::telemetry::{Direction, DirectionMetrics, Metrics, Refusal};

/// One outbound listener and the upstream it serves.
pub struct Outbound {
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
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.limits.max_connections;
        let drain = self.drain.clone();
        tcp::accept_loop(listener, limit, drain, move |stream, client| {
            let outbound = self.clone();
            async move { outbound.handle(stream, client).await }
        })
        .await;
    }

    /// Serves one accepted connection.
    pub(crate) async fn handle(&self, app: TcpStream, client: SocketAddr) {
        if !self.identity.has_valid_cert() {
            self.metrics
                .refuse(Direction::Outbound, Refusal::NoLocalCertificate);
            return warn!(
                event = "outbound connection refused",
                client_address = %client,
                upstream = %self.upstream.name,
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
        debug!(event = "outbound connection", client_address = %client, upstream = %self.upstream.name, protocol = ?detected);
        let _open = self.counters.open();
        match detected {
            Detected::Opaque => self.relay(app).await,
            Detected::Http1 => self.serve_http1(app, client).await,
            Detected::Http2 => self.serve_http2(app, client).await,
        }
    }

    /// Requests (and upgrades) from an HTTP/1.1 application.
    async fn serve_http1(&self, app: TcpStream, client: SocketAddr) {
        let upstream = self.upstream.clone();
        let min_rate = MinRate::new(&self.limits);
        let service = service_fn(move |request: Request<Incoming>| {
            upstream
                .clone()
                .handle(request.map(|body| Either::Left(Paced::new(body, min_rate))))
        });
        let connection = crate::limits::http1_server(self.limits.header_read_timeout)
            .serve_connection(TokioIo::new(app), service)
            .with_upgrades();
        let served = crate::serve_gracefully!(connection, self.drain);
        if let Err(error) = served {
            debug!(event = "outbound HTTP/1 connection error", client_address = %client, error = %error);
        }
    }

    /// Requests from an HTTP/2 application (gRPC), each stream answered by a task of
    /// its own.
    async fn serve_http2(&self, app: TcpStream, client: SocketAddr) {
        let settings = server::Settings::new(&self.limits);
        // One IO type for every HTTP/2 server connection: h2's server is compiled once.
        let app: Box<dyn Io> = Box::new(app);
        let served = server::serve(app, settings, &self.drain, |request| {
            // The request goes into `handle` now: the task keeps only its future.
            let request = StreamBody::request(request).map(Either::Right);
            let handled = self.upstream.clone().handle(request);
            async move {
                let Ok(response) = handled.await;
                Reply::Response(response)
            }
        })
        .await;
        if let Err(error) = served {
            debug!(event = "outbound HTTP/2 connection error", client_address = %client, error = %error);
        }
    }

    /// Opaque bytes to one endpoint, tunnelled over the pooled connection to its proxy.
    async fn relay(&self, mut app: TcpStream) {
        let balancer = &self.upstream.balancer;
        let now = tokio::time::Instant::now();
        balancer.readmit_expired(now);
        let Some(in_flight) = balancer.pick(now) else {
            return warn!(event = "outbound connection refused", upstream = %self.upstream.name, reason = "no endpoints");
        };
        let endpoint = in_flight.endpoint().clone();
        let relayed = match self.upstream.tunnel(&endpoint).await {
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
            Err(error) => debug!(event = "outbound connection ended with error", error = %error),
        }
    }
}
