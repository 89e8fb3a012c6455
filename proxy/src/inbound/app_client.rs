//! The inbound side's client to the local application: pooled HTTP/1.1 connections,
//! one shared HTTP/2 connection, and a connection of its own for an upgrade.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::Either;
use hyper_util::rt::TokioIo;
use tracing::{Span, debug, warn};

use super::app_pool::Http1Pool;
use super::{AppResponse, InboundBody, from_application, refusal};
use crate::config::Limits;
use crate::http::ORIG_PROTO;
use crate::http::{Body, BoxFuture, ProxyError};
use crate::http2::client::{ExchangeError, Sender, SharedH2};
use crate::tcp;

/// Requests to the local application, over pooled connections.
pub struct AppClient {
    address: SocketAddr,
    /// `address` as a URI authority, parsed once.
    authority: http::uri::Authority,
    /// Pooled connections for HTTP/1.1 requests.
    http1: Arc<Http1Pool<InboundBody>>,
    /// One multiplexed HTTP/2 connection to the application, shared by every request:
    /// no pool checkout (and its lock) per request.
    http2: SharedH2,
    connect_timeout: std::time::Duration,
}

impl AppClient {
    pub fn new(address: SocketAddr, limits: &Limits) -> Arc<Self> {
        // Without any IPv6 scope id, "ip:port" / "[ip]:port" is always a valid authority.
        let plain = SocketAddr::new(address.ip(), address.port());
        let authority = http::uri::Authority::try_from(plain.to_string())
            .expect("an IP address and port form a valid URI authority");
        Arc::new(Self {
            address,
            authority,
            http1: Http1Pool::new(address, limits, APP_READ_BUFFER),
            http2: SharedH2::new(ProxyError::AppUnavailable),
            connect_timeout: limits.connect_timeout,
        })
    }

    /// Forwards one request, restoring HTTP/1.1 when the caller spoke it. The request is
    /// put in the application's form first: the future is only the exchange, with no
    /// layer around it keeping room for the request again. A refusal is a gRPC status
    /// when `grpc`. What goes wrong is logged in `log`, the request's span.
    pub fn forward(
        &self,
        request: Request<InboundBody>,
        grpc: bool,
        log: Arc<Span>,
    ) -> BoxFuture<'_, AppResponse> {
        if crate::http::is_upgrade(&request) {
            return Box::pin(async move {
                match self.upgrade(request).await {
                    Ok(response) => response.map(Either::Right),
                    Err(error) => refusal(error, grpc),
                }
            });
        }
        match self.application_form(request) {
            Ok(request) if request.version() == Version::HTTP_11 => {
                Box::pin(crate::assertions::size_between(900, 1200, async move {
                    match self.http1.send(request).await {
                        Ok(response) => from_application(response.map(Either::Left)),
                        Err(error) => refusal(self.http1.refusal(error, &log), grpc),
                    }
                }))
            }
            // The request stays where the future captured it until the stream opens.
            Ok(request) => Box::pin(crate::assertions::size_between(640, 900, async move {
                let opened = match self.http2_sender(&log).await {
                    Ok(sender) => sender
                        .send(request)
                        .map_err(|e| self.stream_failed(&e, &log)),
                    Err(error) => Err(error),
                };
                let answered = match opened {
                    Ok(exchange) => exchange.await.map_err(|error| match error {
                        ExchangeError::Stream(error) => self.stream_failed(&error, &log),
                        ExchangeError::CallerBody(answer) => answer,
                    }),
                    Err(error) => Err(error),
                };
                match answered {
                    Ok(response) => from_application(response.map(Either::Right)),
                    Err(error) => refusal(error, grpc),
                }
            })),
            Err(error) => Box::pin(std::future::ready(refusal(error, grpc))),
        }
    }

    /// The request as the application takes it, in the version to send it in: HTTP/1.1
    /// when a peer proxy says its caller spoke it, or a plaintext caller does.
    fn application_form(
        &self,
        request: Request<InboundBody>,
    ) -> Result<Request<InboundBody>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let http1 = parts.headers.remove(ORIG_PROTO).is_some() || parts.version <= Version::HTTP_11;
        // HTTP/1.1 carries the caller's authority as Host, and requires one even when an
        // HTTP/1.0 caller sent none: then it is the application's address.
        let authority = parts.uri.authority().unwrap_or(&self.authority);
        if http1
            && !parts.headers.contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        crate::http::strip_hop_by_hop(&mut parts.headers, false);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        // Origin form for HTTP/1.1; HTTP/2 carries the caller's authority as a
        // pseudo-header, as HTTP/1.1 carries it in Host.
        parts.uri = if http1 {
            http::Uri::from(path)
        } else {
            let authority = authority.clone();
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(authority);
            uri.path_and_query = Some(path);
            http::Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest)?
        };
        parts.version = if http1 {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        };
        Ok(Request::from_parts(parts, body))
    }

    /// A ready sender on the shared HTTP/2 connection to the application.
    async fn http2_sender(&self, log: &Span) -> Result<Sender, ProxyError> {
        self.http2
            .sender(self.authority.as_str(), || async {
                let app = tcp::connect(self.address, self.connect_timeout)
                    .await
                    .map_err(|error| {
                        warn!(parent: log, event = "application unreachable", application = %self.address, error = %error);
                        ProxyError::AppUnavailable
                    })?;
                Ok((app, false)) // an application never takes tunnels
            })
            .await
    }

    fn stream_failed(&self, error: &h2::Error, log: &Span) -> ProxyError {
        debug!(parent: log, event = "application error", application = %self.address, error = %error);
        crate::http2::client::failure(error)
    }

    async fn upgrade(&self, request: Request<InboundBody>) -> Result<Response<Body>, ProxyError> {
        let app = tcp::connect(self.address, self.connect_timeout)
            .await
            .map_err(|_| ProxyError::AppUnavailable)?;
        crate::upgrade::forward_upgrade(request, TokioIo::new(app)).await
    }
}

/// Most an application connection's read buffer grows to, so also the largest response
/// head an HTTP/1.1 application may send (HAProxy's default buffer; nginx allows 4–8 KiB).
/// Response bodies pass through in chunks of at most this: each chunk waits in the
/// HTTP/2 stream for the peer's window, so with 64 KiB the server side of the benchmark
/// pair peaked at 29.8 MiB under 64 KiB bodies, with 16 KiB at 20.4 MiB, for the same
/// CPU per request.
const APP_READ_BUFFER: usize = 16 * 1024;
