//! Outbound HTTP: one request from the local application to an upstream service.
//!
//! The request crosses to the chosen endpoint's proxy on a pooled, multiplexed HTTP/2
//! mTLS connection (HTTP/1.1 requests too, marked so the far side restores them).
//! Timeouts bound the whole request and each attempt; retries replay small bodies on
//! connection failures, 502/503/504 and gRPC UNAVAILABLE, within the retry budget; every
//! outcome feeds the balancer's load estimate and outlier ejection. What each outcome
//! means and whether another attempt follows is decided in [`super::retry`]; this module
//! acts on it. Upgrades (WebSocket) get a dedicated HTTP/1.1 connection and are spliced
//! once switched.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tessera_mesh::SpiffeId;
use tessera_mesh::resources::RoutePolicySpec;
use tessera_mesh::tls;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tracing::{Span, debug, warn};

use crate::alpn::ALPN_H2_TUNNELS;
use crate::config::Limits;
use crate::http::{self as proxy_http, Body, BoxFuture, ORIG_PROTO, ProxyError};
use crate::http2::client::{self as multiplex, ConnectError, ExchangeError};
use crate::http2::{StreamBody, Tunnel};
use crate::limits::body_rate::Paced;
use crate::outbound::balance::{Balancer, EndpointState};
use crate::outbound::retry::{Next, RoutePolicy, Verdict};
use crate::tcp;
use crate::telemetry::{
    Direction, EdgeLabels, Label, Metrics, RequestMeter, RequestSeries, Workload,
};
use crate::trace::{self, TraceContext, Tracer};

/// Bodies up to this size are kept so a request can be retried.
const MAX_REPLAY_BODY: usize = 64 * 1024;

/// An upstream service as the outbound proxy sees it.
pub(crate) struct Upstream {
    pub name: String,
    /// This proxy's workload: the source of its requests and connections.
    local_identity: SpiffeId,
    local: Workload,
    /// `name` as a label value.
    service: Label,
    /// The request metrics of requests that reached no endpoint (no identity verified:
    /// the destination is unknown); each endpoint keeps the series of its identity.
    unanswered: Arc<RequestSeries>,
    pub balancer: Arc<Balancer>,
    policy: ArcSwap<RoutePolicy>,
    policy_spec: ArcSwapOption<RoutePolicySpec>,
    metrics: Arc<Metrics>,
    retries: Counter,
    limits: Limits,
    tracer: Arc<Tracer>,
    access_log: bool,
    /// Tests reach endpoints over in-memory pipes instead of TCP and TLS.
    #[cfg(test)]
    in_memory: Option<tests::MemoryPeers>,
}

impl Upstream {
    pub(crate) fn new(
        name: String,
        local_identity: SpiffeId,
        metrics: Arc<Metrics>,
        limits: Limits,
        tracer: Arc<Tracer>,
        access_log: bool,
    ) -> Arc<Self> {
        let retries = metrics.retries(&name);
        let local = Workload::of(&local_identity);
        let service = Label::new(name.as_str());
        let unanswered = RequestSeries::new(
            metrics.clone(),
            EdgeLabels::outbound(&local, &Workload::unknown(), service.clone()),
        );
        Arc::new(Self {
            local_identity,
            local,
            service,
            unanswered,
            tracer,
            access_log,
            balancer: Balancer::new(name.clone()),
            name,
            policy: ArcSwap::from_pointee(RoutePolicy::default()),
            policy_spec: ArcSwapOption::empty(),
            metrics,
            retries,
            limits,
            #[cfg(test)]
            in_memory: None,
        })
    }

    /// The request metrics of the requests `endpoint` answers, resolved at its first:
    /// later requests pay an atomic load and a reference count.
    fn series(&self, endpoint: &EndpointState) -> Arc<RequestSeries> {
        endpoint
            .series
            .get_or_init(|| {
                let destination = Workload::of(&endpoint.identity);
                let labels = EdgeLabels::outbound(&self.local, &destination, self.service.clone());
                RequestSeries::new(self.metrics.clone(), labels)
            })
            .clone()
    }

    /// Applies a route policy from discovery; an unchanged one keeps its budget window.
    pub(crate) fn set_policy(&self, spec: Option<&RoutePolicySpec>) {
        if self.policy_spec.load().as_deref() == spec {
            return;
        }
        let policy = spec.map_or_else(RoutePolicy::default, RoutePolicy::new);
        self.policy.store(Arc::new(policy));
        self.policy_spec.store(spec.cloned().map(Arc::new));
    }

    /// Forwards one request; never fails: errors become honest responses, logged in
    /// `log`, the request's span.
    ///
    /// Synchronous up to the exchange, which is boxed once: a pointer moves cheaply into
    /// the per-stream task (HTTP/2), the retrying, timing-out exchange would not; and the
    /// future waiting on it keeps only the box and the meter, not the request again.
    pub(crate) fn handle(
        self: Arc<Self>,
        request: Request<CallerBody>,
        log: Arc<Span>,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        // The caller's trace, or a new one: every attempt of this request joins it.
        let context = trace::extract(request.headers()).or_else(|| self.tracer.root_context());
        let meter = RequestMeter::start()
            .with_trace(sampled_trace_id(context.as_ref()))
            .with_access_log(self.access_log, request.method(), request.uri());
        let exchange = if proxy_http::is_upgrade(&request) {
            self.upgrade(request, log)
        } else {
            self.forward(request, context, log)
        };
        async move {
            let Answered {
                response,
                series,
                span,
            } = exchange.await;
            Ok(meter.finish(series, span, response))
        }
    }

    /// The request as the proxy-to-proxy hop carries it, then its attempts. Only what
    /// the attempts need crosses into the future: the head once, the body, the context.
    /// The answer comes with the series it counts in: the answering endpoint's.
    fn forward(
        self: Arc<Self>,
        request: Request<CallerBody>,
        context: Option<TraceContext>,
        log: Arc<Span>,
    ) -> BoxFuture<'static, Answered> {
        let grpc = proxy_http::is_grpc(request.headers());
        let policy = self.policy.load_full();
        let (mut parts, body) = request.into_parts();
        let original_version = parts.version;
        if let Err(error) = to_http2(&mut parts, &self.name) {
            let refused = self.unanswered(self.refusal(error, grpc, &log));
            return Box::pin(std::future::ready(refused));
        }
        Box::pin(crate::assertions::size_between(1024, 1400, async move {
            let replay = if policy.may_retry(&parts.method) {
                replayable(body).await
            } else if http_body::Body::is_end_stream(&body) {
                // A bodiless request can go again if the peer refuses it unprocessed.
                Ok(Replay::Buffered(Bytes::new()))
            } else {
                Ok(Replay::Once(body))
            };
            let replay = match replay {
                Ok(replay) => replay,
                Err(error) => return self.unanswered(self.refusal(error, grpc, &log)),
            };
            let (outcome, series, span) = self
                .attempts(&policy, &mut parts, replay, context.as_ref(), &log)
                .await;
            let response = match outcome {
                Ok(mut response) => {
                    proxy_http::strip_hop_by_hop(response.headers_mut(), false);
                    *response.version_mut() = original_version;
                    response.map(Either::Left)
                }
                Err(error) => self.refusal(error, grpc, &log),
            };
            Answered {
                response,
                series,
                span,
            }
        }))
    }

    /// The error as the caller's answer.
    fn refusal(&self, error: ProxyError, grpc: bool, log: &Span) -> Response<UpstreamBody> {
        debug!(parent: log, event = "request failed", reason = error.reason());
        error.response(grpc).map(Either::Right)
    }

    /// Attempts until one succeeds, the policy allows no more, or the request's deadline
    /// passes ([`retry::Attempts`](super::retry::Attempts) decides which). Each attempt
    /// runs under one timer: the earlier of the request's deadline and the attempt's own.
    /// The outcome comes with the series of the endpoint of the last attempt, and that
    /// attempt's span, which ends with the answer's body.
    ///
    /// Not an `async fn`: an async block keeps its captures in place, where an `async fn`
    /// would keep its arguments twice (as passed, and as bound).
    #[allow(clippy::manual_async_fn)] // see above: the future's size is the point
    fn attempts<'a>(
        &'a self,
        policy: &'a RoutePolicy,
        parts: &'a mut http::request::Parts,
        mut replay: Replay,
        context: Option<&'a TraceContext>,
        log: &'a Span,
    ) -> impl Future<Output = Attempted> + Send + 'a {
        async move {
            // One clock reading serves the original request's budget deposit, its
            // deadline and its first attempt; each later attempt reads it again.
            let mut began = Instant::now();
            let mut attempts = policy.attempts(&parts.method, replay.is_buffered(), began);
            loop {
                self.balancer.readmit_expired(began);
                let Some(in_flight) = self.balancer.pick(began) else {
                    return (Err(ProxyError::NoEndpoints), self.unanswered.clone(), None);
                };
                let endpoint = in_flight.endpoint();
                let Some(body) = replay.next() else {
                    return (Err(ProxyError::Reset), self.series(endpoint), None);
                };
                // A client span per attempt: retries show up as siblings in the trace.
                let span = self
                    .tracer
                    .start_span(context, &parts.method, trace::SpanKind::Client)
                    .map(|span| AttemptSpan::new(span, parts));
                let sent = self.attempt(
                    endpoint,
                    parts,
                    body,
                    attempts.is_last(),
                    span.as_deref(),
                    log,
                );
                let outcome = match attempts.cut_off(began) {
                    Some(at) => tokio::time::timeout_at(at, sent)
                        .await
                        .unwrap_or(Err(ProxyError::Timeout)),
                    None => sent.await,
                };
                let ended = Instant::now();
                let verdict = Verdict::of(&outcome);
                match verdict {
                    Verdict::Success => self.balancer.success(endpoint, ended - began, ended),
                    Verdict::Failure | Verdict::Retry => self.balancer.failure(endpoint, ended),
                    Verdict::CallersFault | Verdict::Unprocessed => {}
                }
                let span = span
                    .map(|span| self.span_ending(*span, &outcome, endpoint, attempts.current()));
                match attempts.after(verdict, ended) {
                    Next::Answer(_) => return (outcome, self.series(endpoint), span),
                    Next::Retry | Next::Resend => {
                        if let Some(span) = span {
                            (*span).end(None);
                        }
                        self.retries.inc();
                    }
                };
                drop(in_flight);
                began = Instant::now();
            }
        }
    }

    /// One attempt: a ready stream on the endpoint's pooled connection, the request's
    /// head (a copy while another attempt may follow), then the exchange. Not an
    /// `async fn`, for the same reason as `attempts`.
    #[allow(clippy::manual_async_fn)] // see above: the future's size is the point
    fn attempt<'a>(
        &'a self,
        endpoint: &'a EndpointState,
        parts: &'a mut http::request::Parts,
        body: RequestBody,
        last: bool,
        span: Option<&'a AttemptSpan>,
        log: &'a Span,
    ) -> impl Future<Output = Result<Response<StreamBody>, ProxyError>> + Send + 'a {
        async move {
            let sender = self.h2_sender(endpoint).await?;
            // In a block of its own: the head is borrowed, and a borrowed local keeps its
            // room in the future until its scope ends.
            let opened = {
                let mut head = if last {
                    take_parts(parts)
                } else {
                    parts.clone()
                };
                if let Some(span) = span {
                    span.span.inject(&mut head.headers);
                }
                sender.send(Request::from_parts(head, body))
            };
            let exchange = opened.map_err(|error| self.stream_failed(endpoint, &error, log))?;
            exchange.await.map_err(|error| match error {
                ExchangeError::Stream(error) => self.stream_failed(endpoint, &error, log),
                ExchangeError::CallerBody(answer) => answer,
            })
        }
    }

    fn stream_failed(&self, endpoint: &EndpointState, error: &h2::Error, log: &Span) -> ProxyError {
        debug!(parent: log, event = "upstream error", address = %endpoint.address, error = %error);
        crate::http2::client::failure(error)
    }

    /// What an attempt's client span records: the request, the answer or the proxy's
    /// error (`error.type`), the endpoint's verified identity, and on a retry or resend
    /// how many attempts came before. Per the conventions a client span is an error from
    /// 400 on.
    fn span_ending(
        &self,
        attempt_span: AttemptSpan,
        outcome: &Result<Response<StreamBody>, ProxyError>,
        endpoint: &EndpointState,
        attempt: u32,
    ) -> Box<trace::PendingSpan> {
        let AttemptSpan { span, request } = attempt_span;
        let mut attributes = Vec::with_capacity(16);
        request.record(&mut attributes);
        let status = match outcome {
            Ok(response) => trace::response_attributes(
                response.status(),
                response.headers(),
                400,
                &mut attributes,
            ),
            Err(error) => {
                attributes.push(("error.type", error.reason().into()));
                trace::SpanStatus::Error(error.reason().into())
            }
        };
        if attempt > 1 {
            attributes.push(("http.request.resend_count", (attempt - 1).into()));
        }
        attributes.push(("tessera.destination_service", self.name.clone().into()));
        attributes.push((
            "tessera.peer.identity",
            endpoint.identity.to_string().into(),
        ));
        let kind = trace::SpanKind::Client;
        trace::PendingSpan::new(self.tracer.clone(), span, kind, attributes, status)
    }

    /// An answer that reached no endpoint.
    fn unanswered(&self, response: Response<UpstreamBody>) -> Answered {
        Answered {
            response,
            series: self.unanswered.clone(),
            span: None,
        }
    }

    /// A ready sender on the endpoint's pooled HTTP/2 connection, opened if needed.
    async fn h2_sender(&self, endpoint: &EndpointState) -> Result<multiplex::Sender, ProxyError> {
        self.pooled_sender(endpoint, false).await
    }

    /// A ready sender on one of the endpoint's pooled HTTP/2 connections, opened if
    /// needed; a tunnel gets another connection rather than a wait when they are full.
    async fn pooled_sender(
        &self,
        endpoint: &EndpointState,
        tunnel: bool,
    ) -> Result<multiplex::Sender, ProxyError> {
        #[cfg(test)]
        if let Some(peers) = &self.in_memory {
            // Boxed: the test's connections leave the request's future as it is.
            return Box::pin(peers.sender(endpoint, tunnel)).await;
        }
        let connect = || async {
            let stream = self.connect(endpoint, &endpoint.connectors.h2).await?;
            let tunnels = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2_TUNNELS);
            Ok((stream, tunnels))
        };
        if tunnel {
            endpoint.h2.tunnel_sender(&endpoint.address, connect).await
        } else {
            endpoint.h2.sender(&endpoint.address, connect).await
        }
    }

    /// Opens a tunnel for one opaque TCP connection: a `CONNECT` stream on the pooled
    /// HTTP/2 connection to the endpoint's proxy, so a new application connection
    /// costs one stream instead of one TLS handshake. The peer answers 200 only once it
    /// has authorized the connection and reached its application. `None` when the peer
    /// predates tunnels: then the connection needs one of its own. A refusal is logged in
    /// `log`, the connection's span.
    pub(crate) async fn tunnel(
        &self,
        endpoint: &EndpointState,
        log: &Span,
    ) -> Result<Option<Tunnel>, ProxyError> {
        // The authority names the endpoint the peer was dialled at (RFC 9113 §8.5).
        let authority =
            Authority::try_from(endpoint.address.as_str()).map_err(|_| ProxyError::BadRequest)?;
        let sender = self.pooled_sender(endpoint, true).await?;
        if !endpoint.h2.carries_tunnels() {
            return Ok(None);
        }
        let opened = tokio::time::timeout(self.limits.handshake_timeout, sender.connect(authority))
            .await
            .map_err(|_| ProxyError::Timeout)?;
        opened.map(Some).map_err(|error| {
            debug!(parent: log, event = "tunnel refused", address = %endpoint.address, error = %error);
            match error {
                ConnectError::Refused(StatusCode::FORBIDDEN) => ProxyError::Forbidden,
                ConnectError::Refused(_) => ProxyError::Unreachable,
                ConnectError::Stream(_) => ProxyError::Reset,
            }
        })
    }

    /// Opens an mTLS connection to an endpoint's proxy that must prove its identity.
    pub(crate) async fn connect(
        &self,
        endpoint: &EndpointState,
        connector: &tokio_rustls::TlsConnector,
    ) -> Result<TlsStream<tokio::net::TcpStream>, ProxyError> {
        let tcp = tcp::connect(&endpoint.address, self.limits.connect_timeout)
            .await
            .map_err(|error| {
                warn!(event = "upstream unreachable", upstream = %self.name, address = %endpoint.address, error = %error);
                self.metrics.refuse(Direction::Outbound, crate::telemetry::Refusal::ConnectFailed);
                ProxyError::Unreachable
            })?;
        let peer = tcp.peer_addr().map_err(|_| ProxyError::Unreachable)?;
        let handshake = connector.connect(tls::server_name_for(peer), tcp);
        let stream = match tokio::time::timeout(self.limits.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                let reason = tcp::classify_handshake_error(&error);
                self.metrics.refuse(Direction::Outbound, reason);
                warn!(
                    event = "outbound connection refused",
                    upstream = %self.name,
                    address = %endpoint.address,
                    expected_identity = %endpoint.identity,
                    reason = ?reason,
                    detail = %tcp::describe_handshake_error(&error),
                );
                return Err(ProxyError::Unreachable);
            }
            Err(_) => {
                self.metrics.refuse(
                    Direction::Outbound,
                    crate::telemetry::Refusal::HandshakeTimeout,
                );
                return Err(ProxyError::Unreachable);
            }
        };
        self.metrics.connection(
            Direction::Outbound,
            &self.local_identity,
            &endpoint.identity,
        );
        Ok(stream)
    }

    /// An HTTP/1.1 upgrade: its own connection to the endpoint, spliced after 101.
    fn upgrade(
        self: Arc<Self>,
        request: Request<CallerBody>,
        log: Arc<Span>,
    ) -> BoxFuture<'static, Answered> {
        let grpc = proxy_http::is_grpc(request.headers());
        Box::pin(async move {
            let now = Instant::now();
            self.balancer.readmit_expired(now);
            let Some(in_flight) = self.balancer.pick(now) else {
                return self.unanswered(self.refusal(ProxyError::NoEndpoints, grpc, &log));
            };
            let endpoint = in_flight.endpoint().clone();
            let upgraded = async {
                let stream = self.connect(&endpoint, &endpoint.connectors.http1).await?;
                crate::upgrade::forward_upgrade(request, TokioIo::new(stream)).await
            };
            let response = match upgraded.await {
                Ok(response) => response.map(Either::Right),
                Err(error) => self.refusal(error, grpc, &log),
            };
            Answered {
                response,
                series: self.series(&endpoint),
                span: None,
            }
        })
    }
}

/// The trace id to attach to latency samples, for sampled requests.
pub(crate) fn sampled_trace_id(context: Option<&TraceContext>) -> Option<String> {
    context
        .filter(|c| c.sampled)
        .map(|c| crate::trace::hex(&c.trace_id))
}

/// Prepares a request for the proxy-to-proxy HTTP/2 hop: absolute URI (the authority
/// from `Host` for HTTP/1.1 callers, the service's name for an HTTP/1.0 caller that sent
/// none), no `Host`, no hop-by-hop headers. The path is shared with the incoming URI, not
/// copied. The authority is the one the far side will authorize: a request that could
/// be read with two ([`crate::inbound::canonical`]) is refused here already.
fn to_http2(parts: &mut http::request::Parts, service: &str) -> Result<(), ProxyError> {
    if parts.version <= Version::HTTP_11 {
        parts
            .headers
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    proxy_http::strip_hop_by_hop(&mut parts.headers, false);
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest);
    }
    if parts.uri.scheme().is_none() || parts.uri.authority().is_none() {
        let authority = match (parts.uri.authority(), host) {
            (Some(authority), _) => authority.clone(),
            (None, Some(host)) => {
                Authority::try_from(host.as_bytes()).map_err(|_| ProxyError::BadRequest)?
            }
            (None, None) if parts.version == Version::HTTP_11 => {
                return Err(ProxyError::BadRequest);
            }
            (None, None) => Authority::try_from(service).map_err(|_| ProxyError::BadRequest)?,
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(authority);
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest)?;
    }
    if let Some(authority) = parts.uri.authority() {
        crate::inbound::canonical::check_authority(authority.as_str().as_bytes())
            .map_err(|_| ProxyError::BadRequest)?;
    }
    parts.headers.remove(header::HOST);
    parts.version = Version::HTTP_2;
    Ok(())
}

/// Moves the parts out for the last attempt, leaving an empty shell behind.
fn take_parts(parts: &mut http::request::Parts) -> http::request::Parts {
    let (empty, ()) = Request::new(()).into_parts();
    std::mem::replace(parts, empty)
}

/// A response from upstream, or the proxy's own answer (an error, an upgrade).
type UpstreamBody = Either<StreamBody, Body>;

/// The caller's answer, the request series it counts in, and the span of the attempt
/// that answered it (when traced), which ends with the answer's body.
struct Answered {
    response: Response<UpstreamBody>,
    series: Arc<RequestSeries>,
    span: Option<Box<trace::PendingSpan>>,
}

/// The last attempt's outcome, series and span.
type Attempted = (
    Result<Response<StreamBody>, ProxyError>,
    Arc<RequestSeries>,
    Option<Box<trace::PendingSpan>>,
);

/// An attempt's client span, and what it will record once the attempt ends. Boxed: the
/// request's future carries a pointer, not the span and its strings.
struct AttemptSpan {
    span: trace::ActiveSpan,
    request: trace::RequestAttributes,
}

impl AttemptSpan {
    /// The span of an attempt sent as `parts` (the proxy-to-proxy hop: HTTP/2, the
    /// authority in the URI).
    fn new(span: trace::ActiveSpan, parts: &http::request::Parts) -> Box<Self> {
        let request = trace::RequestAttributes::new(
            &parts.method,
            &parts.uri,
            parts.uri.authority().map(Authority::as_str),
            parts.version,
            proxy_http::is_grpc(&parts.headers),
        );
        Box::new(Self { span, request })
    }
}

/// A caller's request body: over HTTP/1.1 (hyper's server), or an HTTP/2 stream.
pub(crate) type CallerBody = Either<Paced<Incoming>, StreamBody>;

/// What an attempt sends: a kept copy of a small body, or the caller's body itself.
type RequestBody = Either<Full<Bytes>, CallerBody>;

/// A request body: replayable when small, else streamed once.
enum Replay {
    Buffered(Bytes),
    Once(CallerBody),
    Spent,
}

impl Replay {
    fn is_buffered(&self) -> bool {
        matches!(self, Replay::Buffered(_))
    }

    fn next(&mut self) -> Option<RequestBody> {
        match std::mem::replace(self, Replay::Spent) {
            Replay::Buffered(bytes) => {
                *self = Replay::Buffered(bytes.clone());
                Some(Either::Left(Full::new(bytes)))
            }
            Replay::Once(body) => Some(Either::Right(body)),
            Replay::Spent => None,
        }
    }
}

/// Buffers a body for replay when it is known to be small; otherwise leaves it streaming.
/// A body that fails while being read (malformed, cut off, longer than it said) is the
/// caller's error: nothing is sent upstream for it.
async fn replayable(body: CallerBody) -> Result<Replay, ProxyError> {
    use http_body::Body as _;
    let small = body.is_end_stream()
        || body
            .size_hint()
            .upper()
            .is_some_and(|upper| upper <= MAX_REPLAY_BODY as u64);
    if !small {
        return Ok(Replay::Once(body));
    }
    match Limited::new(body, MAX_REPLAY_BODY).collect().await {
        Ok(collected) => Ok(Replay::Buffered(collected.to_bytes())),
        Err(error) => Err(crate::limits::body_rate::answer(error.as_ref())),
    }
}

#[cfg(test)]
mod tests {
    //! The attempts loop in paused time, over endpoints that are h2 servers on in-memory
    //! pipes: every duration and attempt count is exact.

    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use h2::Reason;
    use http::Method;
    use hyper::service::service_fn;
    use tessera_mesh::resources::{OutlierDetectionSpec, RetryBudgetSpec, RetrySpec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use opentelemetry_proto::tonic::trace::v1 as trace_proto;

    use super::*;
    use crate::limits::body_rate::MinRate;
    use crate::outbound::balance::tests::{connectors, endpoints};

    /// What an in-memory endpoint does with one request, once it has read its body.
    #[derive(Clone, Copy, Debug)]
    enum Act {
        /// Answers with this status, after this long.
        Answer(u16, Duration),
        /// Resets the stream: the endpoint failed.
        Reset,
        /// Refuses the stream unprocessed (REFUSED_STREAM).
        Refuse,
    }

    const OK: Act = Act::Answer(200, Duration::ZERO);
    const UNAVAILABLE: Act = Act::Answer(503, Duration::ZERO);

    fn slow(millis: u64) -> Act {
        Act::Answer(200, Duration::from_millis(millis))
    }

    /// An endpoint's proxy: acts on each request as its script says, then as `otherwise`;
    /// its name is every answer's body.
    struct Peer {
        name: &'static str,
        script: Mutex<VecDeque<Act>>,
        otherwise: Mutex<Act>,
        requests: AtomicUsize,
        bodies: Mutex<Vec<Bytes>>,
    }

    impl Peer {
        fn new(name: &'static str, otherwise: Act) -> Arc<Self> {
            Arc::new(Self {
                name,
                script: Mutex::default(),
                otherwise: Mutex::new(otherwise),
                requests: AtomicUsize::new(0),
                bodies: Mutex::default(),
            })
        }

        /// The next requests get `acts`, in order.
        fn script(&self, acts: &[Act]) {
            self.script.lock().unwrap().extend(acts);
        }

        fn then(&self, act: Act) {
            *self.otherwise.lock().unwrap() = act;
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn bodies(&self) -> Vec<Bytes> {
            self.bodies.lock().unwrap().clone()
        }

        async fn serve(self: Arc<Self>, io: DuplexStream) {
            let Ok(mut connection) = h2::server::handshake(io).await else {
                return;
            };
            while let Some(Ok((request, respond))) = connection.accept().await {
                self.requests.fetch_add(1, Ordering::SeqCst);
                let act = self.script.lock().unwrap().pop_front();
                let act = act.unwrap_or(*self.otherwise.lock().unwrap());
                tokio::spawn(self.clone().act(request.into_body(), respond, act));
            }
        }

        async fn act(
            self: Arc<Self>,
            mut body: h2::RecvStream,
            mut respond: h2::server::SendResponse<Bytes>,
            act: Act,
        ) {
            let mut received = Vec::new();
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
                received.extend_from_slice(&data);
            }
            self.bodies.lock().unwrap().push(received.into());
            match act {
                Act::Answer(status, after) => {
                    tokio::time::sleep(after).await;
                    let head = Response::builder().status(status).body(()).unwrap();
                    if let Ok(mut stream) = respond.send_response(head, false) {
                        let _ = stream.send_data(Bytes::from_static(self.name.as_bytes()), true);
                    }
                }
                Act::Reset => respond.send_reset(Reason::INTERNAL_ERROR),
                Act::Refuse => respond.send_reset(Reason::REFUSED_STREAM),
            }
        }
    }

    /// The endpoints a test's upstream reaches, by address (their names).
    pub(super) struct MemoryPeers(HashMap<&'static str, Arc<Peer>>);

    impl MemoryPeers {
        pub(super) async fn sender(
            &self,
            endpoint: &EndpointState,
            tunnel: bool,
        ) -> Result<multiplex::Sender, ProxyError> {
            assert!(!tunnel, "no tunnels in these tests");
            let peer = self.0.get(endpoint.address.as_str()).cloned();
            let connect = || {
                let peer = peer.clone();
                async move {
                    let peer = peer.ok_or(ProxyError::Unreachable)?;
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(peer.serve(server));
                    Ok((client, false))
                }
            };
            endpoint.h2.sender(&endpoint.address, connect).await
        }
    }

    /// An upstream that can reach `peers` and lists them in this order, with `policy` in
    /// force.
    fn upstream(peers: &[&Arc<Peer>], policy: RoutePolicySpec) -> Arc<Upstream> {
        upstream_tracing(peers, policy, Tracer::disabled(Counter::default()))
    }

    /// Like [`upstream`], with `tracer`.
    fn upstream_tracing(
        peers: &[&Arc<Peer>],
        policy: RoutePolicySpec,
        tracer: Tracer,
    ) -> Arc<Upstream> {
        let metrics = Arc::new(Metrics::new());
        let tracer = Arc::new(tracer);
        let mut upstream = Upstream::new(
            "backend.shop".into(),
            "spiffe://td/ns/shop/sa/client".parse().unwrap(),
            metrics,
            Limits::default(),
            tracer,
            false,
        );
        let reachable = peers.iter().map(|peer| (peer.name, Arc::clone(peer)));
        Arc::get_mut(&mut upstream).unwrap().in_memory = Some(MemoryPeers(reachable.collect()));
        let names: Vec<_> = peers.iter().map(|peer| peer.name).collect();
        upstream.balancer.update(
            &endpoints(&names),
            policy.outlier_detection.clone(),
            &connectors(),
        );
        upstream.set_policy(Some(&policy));
        upstream
    }

    fn retries(attempts: u32, ratio: f64, min_per_second: u32) -> Option<RetrySpec> {
        Some(RetrySpec {
            attempts,
            retryable: false,
            budget: RetryBudgetSpec {
                ratio,
                min_per_second,
            },
        })
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Serves one application connection as the outbound HTTP/1.1 server does, in the
    /// same log spans.
    async fn serve_http1(upstream: Arc<Upstream>, app: DuplexStream) {
        let min_rate = MinRate::new(&upstream.limits);
        let connection = Arc::new(tracing::info_span!(
            "outbound",
            client = "127.0.0.1:40000",
            upstream = %upstream.name
        ));
        let service = service_fn(move |request: Request<Incoming>| {
            let log = crate::telemetry::request_span(&connection, &request);
            let request = request.map(|body| Either::Left(Paced::new(body, min_rate)));
            upstream.clone().handle(request, log)
        });
        let _ = crate::limits::http1_server(Duration::from_secs(10))
            .serve_connection(TokioIo::new(app), service)
            .await;
    }

    /// The answer an application got.
    #[derive(Debug)]
    struct Answer {
        status: StatusCode,
        /// `tessera-proxy-error`, when the proxy answered itself.
        error: Option<String>,
        body: Bytes,
    }

    /// Sends `request` from an HTTP/1.1 application, on a connection of its own.
    async fn send(upstream: &Arc<Upstream>, request: Request<Full<Bytes>>) -> Answer {
        let (app, proxy) = tokio::io::duplex(64 * 1024);
        tokio::spawn(serve_http1(upstream.clone(), proxy));
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(app))
            .await
            .unwrap();
        tokio::spawn(connection);
        let response = sender.send_request(request).await.unwrap();
        let error = response.headers().get("tessera-proxy-error");
        let error = error.map(|value| value.to_str().unwrap().to_string());
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            error,
            body,
        }
    }

    fn request(method: Method, body: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri("/orders")
            .header(header::HOST, "backend.shop")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    fn get() -> Request<Full<Bytes>> {
        request(Method::GET, "")
    }

    #[tokio::test(start_paused = true)]
    async fn a_retryable_request_is_retried_on_503_and_others_are_not() {
        let peer = Peer::new("a", OK);
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                retries: retries(2, 1.0, 100),
                ..RoutePolicySpec::default()
            },
        );
        peer.script(&[UNAVAILABLE]);
        let answer = send(&upstream, request(Method::PUT, "order 1")).await;
        assert_eq!((answer.status, peer.requests()), (StatusCode::OK, 2));
        assert_eq!(peer.bodies(), ["order 1", "order 1"], "the body replayed");
        assert_eq!(upstream.retries.get(), 1);

        peer.script(&[UNAVAILABLE]);
        let answer = send(&upstream, request(Method::POST, "order 2")).await;
        assert_eq!(
            (answer.status, peer.requests()),
            (StatusCode::SERVICE_UNAVAILABLE, 3),
            "POST is not idempotent"
        );
        peer.script(&[UNAVAILABLE]);
        let answer = send(&upstream, request(Method::POST, "")).await;
        assert_eq!(
            (answer.status, peer.requests()),
            (StatusCode::SERVICE_UNAVAILABLE, 4),
            "nor is a POST without a body"
        );
        assert_eq!(upstream.retries.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn each_attempt_is_a_client_span_that_says_how_many_came_before() {
        let (tracer, mut spans) = Tracer::capturing();
        let peer = Peer::new("a", OK);
        let policy = RoutePolicySpec {
            retries: retries(2, 1.0, 100),
            ..RoutePolicySpec::default()
        };
        let upstream = upstream_tracing(&[&peer], policy, tracer);
        peer.script(&[UNAVAILABLE, Act::Reset]);
        assert_eq!(send(&upstream, get()).await.status, StatusCode::OK);
        let mut attempts = Vec::new();
        while let Ok(span) = spans.try_recv() {
            attempts.push(span);
        }
        assert_eq!(attempts.len(), 3, "{attempts:?}");
        let value = |span: &trace_proto::Span, key: &str| {
            let kv = span.attributes.iter().find(|kv| kv.key == key)?;
            kv.value.clone()?.value
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value::{IntValue, StringValue};
        let trace_id = &attempts[0].trace_id;
        for (index, span) in attempts.iter().enumerate() {
            assert_eq!(&span.trace_id, trace_id, "one trace");
            assert_eq!(span.kind, trace::SpanKind::Client as i32);
            let resends = (index > 0).then_some(IntValue(index as i64));
            assert_eq!(value(span, "http.request.resend_count"), resends);
            assert_eq!(
                value(span, "tessera.destination_service"),
                Some(StringValue("backend.shop".into()))
            );
            assert_eq!(
                value(span, "tessera.peer.identity"),
                Some(StringValue("spiffe://td/ns/a/sa/b".into()))
            );
            assert_eq!(value(span, "url.path"), Some(StringValue("/orders".into())));
        }
        assert_eq!(
            value(&attempts[0], "http.response.status_code"),
            Some(IntValue(503))
        );
        assert_eq!(value(&attempts[1], "http.response.status_code"), None);
        assert_eq!(
            value(&attempts[1], "error.type"),
            Some(StringValue("upstream-reset".into()))
        );
        assert_eq!(
            value(&attempts[2], "http.response.status_code"),
            Some(IntValue(200))
        );
        let errors: Vec<bool> = attempts.iter().map(|span| span.status.is_some()).collect();
        assert_eq!(errors, [true, true, false]);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_count_under_the_identity_of_the_endpoint_that_answered() {
        let peer = Peer::new("a", OK);
        let upstream = upstream(&[&peer], RoutePolicySpec::default());
        assert_eq!(send(&upstream, get()).await.status, StatusCode::OK);
        upstream.balancer.update(&[], None, &connectors());
        let answer = send(&upstream, get()).await;
        assert_eq!(answer.error.as_deref(), Some("no-healthy-endpoints"));
        let text = upstream.metrics.encode();
        let count = |destination: &str| {
            text.lines()
                .filter(|line| {
                    line.starts_with("tessera_requests_total{direction=\"outbound\",source_workload=\"client\",source_namespace=\"shop\",source_identity=\"spiffe://td/ns/shop/sa/client\",")
                        && line.contains(destination)
                        && line.contains("destination_service=\"backend.shop\"")
                })
                .count()
        };
        let answered = "destination_workload=\"b\",destination_namespace=\"a\",destination_identity=\"spiffe://td/ns/a/sa/b\"";
        let unanswered = "destination_workload=\"unknown\",destination_namespace=\"unknown\",destination_identity=\"\"";
        assert_eq!((count(answered), count(unanswered)), (1, 1), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_request_logs_in_its_span_inside_its_connections() {
        use tessera_mesh::process::logging::{self, CapturedLogs, LogFormat};
        // The test's runtime has one thread: the connection's task logs to this subscriber.
        let logs = CapturedLogs::default();
        let dispatch = logging::subscriber(LogFormat::Json, "debug", false, logs.clone());
        let _subscriber = tracing::dispatcher::set_default(&dispatch);
        let peer = Peer::new("a", Act::Reset);
        let upstream = upstream(&[&peer], RoutePolicySpec::default());
        let answer = send(&upstream, get()).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);

        let lines = logs.lines();
        let line = lines
            .iter()
            .find(|line| line.contains("upstream error"))
            .unwrap_or_else(|| panic!("no upstream error logged: {lines:?}"));
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let spans = entry["spans"].as_array().expect("a span list");
        assert_eq!(spans.len(), 2, "{line}");
        assert_eq!(spans[0]["name"], "outbound", "{line}");
        assert_eq!(spans[0]["client"], "127.0.0.1:40000", "{line}");
        assert_eq!(spans[0]["upstream"], "backend.shop", "{line}");
        assert_eq!(spans[1]["name"], "request", "{line}");
        assert_eq!(spans[1]["method"], "GET", "{line}");
        assert_eq!(spans[1]["path"], "/orders", "{line}");
        assert_eq!(entry["address"], "a", "{line}");
        assert!(entry.get("upstream").is_none(), "repeated: {line}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_marked_retryable_retries_any_method() {
        let peer = Peer::new("a", OK);
        let mut retries = retries(2, 1.0, 100);
        if let Some(retries) = &mut retries {
            retries.retryable = true;
        }
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                retries,
                ..RoutePolicySpec::default()
            },
        );
        peer.script(&[UNAVAILABLE, Act::Reset]);
        let answer = send(&upstream, request(Method::POST, "order")).await;
        assert_eq!((answer.status, peer.requests()), (StatusCode::OK, 3));
        assert_eq!(peer.bodies(), ["order", "order", "order"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_is_retried_a_500_is_not_and_attempts_run_out() {
        let peer = Peer::new("a", OK);
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                retries: retries(2, 1.0, 100),
                ..RoutePolicySpec::default()
            },
        );
        peer.script(&[Act::Reset]);
        assert_eq!(send(&upstream, get()).await.status, StatusCode::OK);
        assert_eq!(peer.requests(), 2);
        peer.script(&[Act::Answer(500, Duration::ZERO)]);
        assert_eq!(
            send(&upstream, get()).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(peer.requests(), 3);
        peer.script(&[Act::Reset, Act::Reset, Act::Reset]);
        let answer = send(&upstream, get()).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        assert_eq!(answer.error.as_deref(), Some("upstream-reset"));
        assert_eq!(peer.requests(), 6, "one attempt and two retries");
        assert_eq!(upstream.retries.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stay_within_the_budget_when_everything_fails() {
        let peer = Peer::new("down", UNAVAILABLE);
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                retries: retries(3, 0.2, 1),
                ..RoutePolicySpec::default()
            },
        );
        for _ in 0..100 {
            let answer = send(&upstream, get()).await;
            assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(answer.error, None, "the application's own 503");
        }
        // 20 % of 100 requests, plus 1/s over the 10 s window; without a budget, 300.
        assert_eq!(upstream.retries.get(), 30);
        assert_eq!(peer.requests(), 130);
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_try_timeout_retries_on_a_faster_endpoint() {
        let slow = Peer::new("slow", slow(2_000));
        let fast = Peer::new("fast", OK);
        let upstream = upstream(
            &[&slow, &fast],
            RoutePolicySpec {
                timeout: Some(ms(1_000)),
                per_try_timeout: Some(ms(100)),
                retries: retries(2, 1.0, 100),
                ..RoutePolicySpec::default()
            },
        );
        // Both unknown: the tie goes to the first listed, the slow one.
        let started = Instant::now();
        let answer = send(&upstream, get()).await;
        assert_eq!(
            (answer.status, &answer.body[..]),
            (StatusCode::OK, &b"fast"[..])
        );
        assert_eq!(
            started.elapsed(),
            ms(100),
            "one per-try timeout, then the answer"
        );
        assert_eq!((slow.requests(), fast.requests()), (1, 1));
        // The timeout counted against the slow one: the fast one takes the rest.
        for _ in 0..10 {
            let started = Instant::now();
            assert_eq!(&send(&upstream, get()).await.body[..], b"fast");
            assert_eq!(started.elapsed(), Duration::ZERO);
        }
        assert_eq!(slow.requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_timeout_answers_504_on_time() {
        let peer = Peer::new("slow", slow(2_000));
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                timeout: Some(ms(200)),
                ..RoutePolicySpec::default()
            },
        );
        for _ in 0..3 {
            let started = Instant::now();
            let answer = send(&upstream, get()).await;
            assert_eq!(started.elapsed(), ms(200));
            assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(answer.error.as_deref(), Some("timeout"));
        }
        assert_eq!(peer.requests(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_request_deadline_ends_retries_that_per_try_timeouts_would_continue() {
        let peer = Peer::new("slow", slow(2_000));
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                timeout: Some(ms(400)),
                per_try_timeout: Some(ms(150)),
                retries: retries(5, 1.0, 100),
                ..RoutePolicySpec::default()
            },
        );
        let started = Instant::now();
        let answer = send(&upstream, get()).await;
        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(answer.error.as_deref(), Some("timeout"));
        // Attempts at 0, 150 and 300 ms; the third is cut at 400 ms and no fourth
        // starts, though six were allowed.
        assert_eq!(started.elapsed(), ms(400));
        assert_eq!(peer.requests(), 3);
        assert_eq!(upstream.retries.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_failing_in_a_row_is_ejected_then_readmitted_after_its_ejection() {
        let bad = Peer::new("bad", Act::Reset);
        // Not instant: its latency estimate must not decay to nothing in paused time.
        let good = Peer::new("good", slow(1));
        let outlier = OutlierDetectionSpec {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 100,
        };
        let upstream = upstream(
            &[&bad, &good],
            RoutePolicySpec {
                outlier_detection: Some(outlier.clone()),
                ..RoutePolicySpec::default()
            },
        );
        // Alone at first: with a choice, P2C steers around an endpoint that fails before
        // its third failure in a row, and that is not what this test is about.
        let listed = |names: &[&str]| {
            let outlier = Some(outlier.clone());
            upstream
                .balancer
                .update(&endpoints(names), outlier, &connectors());
        };
        listed(&["bad"]);
        let started = Instant::now();
        for failures in 1..=3 {
            assert_eq!(upstream.balancer.ejected(started), [] as [&str; 0]);
            let answer = send(&upstream, get()).await;
            assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "failure {failures}");
        }
        assert_eq!(upstream.balancer.ejected(started), ["bad"]);
        listed(&["bad", "good"]);
        bad.then(OK);
        // Ejected for the base ejection time: until then, only the other one serves.
        for millis in (0..10).map(|second| second * 1_000).chain([9_999]) {
            tokio::time::sleep_until(started + ms(millis)).await;
            assert_eq!(
                &send(&upstream, get()).await.body[..],
                b"good",
                "at {millis} ms"
            );
        }
        assert_eq!(bad.requests(), 3);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Re-admitted; its failures long decayed, it looks the faster one.
        assert_eq!(&send(&upstream, get()).await.body[..], b"bad");
        assert_eq!(upstream.balancer.ejected(Instant::now()), [] as [&str; 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_malformed_body_is_its_own_error_and_ejects_nothing() {
        let peer = Peer::new("healthy", OK);
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                retries: retries(2, 1.0, 100),
                outlier_detection: Some(OutlierDetectionSpec {
                    consecutive_failures: 1,
                    base_ejection_time: Duration::from_secs(30),
                    max_ejection_percent: 100,
                }),
                ..RoutePolicySpec::default()
            },
        );
        let chunked = |method: &str, chunk: &str| {
            format!(
                "{method} /upload HTTP/1.1\r\nHost: backend.shop\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}"
            )
        };
        let requests = [
            // Streamed as it comes: the endpoint sees the head, then a reset.
            chunked("POST", "5\r\nhello\r\nzz\r\n"),
            chunked("POST", "-4\r\nhello\r\n0\r\n\r\n"),
            // Kept for retries: refused before any attempt.
            chunked("PUT", "zz\r\nhello\r\n0\r\n\r\n"),
            // A caller that hangs up mid-body.
            "POST /upload HTTP/1.1\r\nHost: backend.shop\r\nContent-Length: 100000\r\n\r\npartial"
                .to_string(),
        ];
        let mut answered_400 = 0;
        for request in &requests {
            let (mut app, proxy) = tokio::io::duplex(64 * 1024);
            tokio::spawn(serve_http1(upstream.clone(), proxy));
            app.write_all(request.as_bytes()).await.unwrap();
            let head = if request.ends_with("partial") {
                tokio::time::sleep(ms(50)).await;
                drop(app);
                String::new()
            } else {
                let mut answer = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(60), app.read_to_end(&mut answer));
                let _ = read.await;
                String::from_utf8_lossy(&answer).into_owned()
            };
            assert!(
                head.is_empty() || head.starts_with("HTTP/1.1 400"),
                "{request:?}: {head}"
            );
            answered_400 += usize::from(head.contains("bad-request"));
        }
        assert!(
            answered_400 >= 2,
            "{answered_400} malformed bodies answered 400"
        );
        tokio::time::sleep(ms(100)).await;
        assert_eq!(upstream.balancer.ejected(Instant::now()), [] as [&str; 0]);
        assert_eq!(upstream.retries.get(), 0, "a caller's error was retried");
        assert_eq!(send(&upstream, get()).await.status, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_refused_unprocessed_is_sent_again_once_without_a_retry_policy() {
        let peer = Peer::new("a", OK);
        let upstream = upstream(
            &[&peer],
            RoutePolicySpec {
                outlier_detection: Some(OutlierDetectionSpec {
                    consecutive_failures: 1,
                    base_ejection_time: Duration::from_secs(30),
                    max_ejection_percent: 100,
                }),
                ..RoutePolicySpec::default()
            },
        );
        peer.script(&[Act::Refuse]);
        assert_eq!(
            send(&upstream, request(Method::POST, "")).await.status,
            StatusCode::OK
        );
        assert_eq!(peer.requests(), 2);
        peer.script(&[Act::Refuse, Act::Refuse]);
        let answer = send(&upstream, request(Method::POST, "")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.error.as_deref(), Some("upstream-refused"));
        assert_eq!(peer.requests(), 4, "sent again once only");
        // A body streamed once cannot be sent again.
        peer.script(&[Act::Refuse]);
        let answer = send(&upstream, request(Method::POST, "order")).await;
        assert_eq!(answer.error.as_deref(), Some("upstream-refused"));
        assert_eq!(peer.requests(), 5);
        assert_eq!(
            upstream.balancer.ejected(Instant::now()),
            [] as [&str; 0],
            "a refusal is not the endpoint failing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_removed_under_load_finish_their_requests() {
        let peers = [
            Peer::new("one", slow(100)),
            Peer::new("two", slow(100)),
            Peer::new("three", slow(100)),
        ];
        let upstream = upstream(
            &[&peers[0], &peers[1], &peers[2]],
            RoutePolicySpec::default(),
        );
        let listed = |names: &[&str]| {
            upstream
                .balancer
                .update(&endpoints(names), None, &connectors())
        };
        listed(&["one", "two"]);
        let mut in_flight = Vec::new();
        for _ in 0..20 {
            let upstream = upstream.clone();
            in_flight.push(tokio::spawn(async move { send(&upstream, get()).await }));
        }
        tokio::time::sleep(ms(10)).await;
        let on_one = peers[0].requests();
        assert!(on_one > 0 && peers[1].requests() > 0, "both serve");
        listed(&["two", "three"]);
        for _ in 0..20 {
            let upstream = upstream.clone();
            in_flight.push(tokio::spawn(async move { send(&upstream, get()).await }));
        }
        for answer in in_flight {
            assert_eq!(answer.await.unwrap().status, StatusCode::OK);
        }
        assert_eq!(
            peers[0].requests(),
            on_one,
            "the removed one got nothing new"
        );
        assert!(peers[2].requests() > 0, "the added one serves");
        assert_eq!(peers.iter().map(|peer| peer.requests()).sum::<usize>(), 40);
    }

    fn parts(version: Version, target: &str, hosts: &[&str]) -> http::request::Parts {
        crate::inbound::canonical::tests::request(version, target, hosts)
            .into_parts()
            .0
    }

    #[test]
    fn the_outbound_side_takes_one_authority_or_refuses() {
        let mut two = parts(Version::HTTP_11, "/", &["evil", "orders"]);
        assert_eq!(
            to_http2(&mut two, "backend.shop"),
            Err(ProxyError::BadRequest)
        );
        let mut none = parts(Version::HTTP_11, "/", &[]);
        assert_eq!(
            to_http2(&mut none, "backend.shop"),
            Err(ProxyError::BadRequest)
        );
        let mut userinfo = parts(Version::HTTP_11, "http://x@evil/", &[]);
        assert_eq!(
            to_http2(&mut userinfo, "backend.shop"),
            Err(ProxyError::BadRequest)
        );
        let mut escaped = parts(Version::HTTP_11, "/", &["ev%69l"]);
        assert_eq!(
            to_http2(&mut escaped, "backend.shop"),
            Err(ProxyError::BadRequest)
        );

        let mut old = parts(Version::HTTP_10, "/x", &[]);
        assert_eq!(to_http2(&mut old, "backend.shop"), Ok(()));
        assert_eq!(old.uri, "http://backend.shop/x");
        let mut absolute = parts(Version::HTTP_11, "http://orders/x", &["evil"]);
        assert_eq!(to_http2(&mut absolute, "backend.shop"), Ok(()));
        assert_eq!(absolute.uri.authority().unwrap(), "orders");
        assert!(absolute.headers.get(header::HOST).is_none());
    }
}
