//! Outbound HTTP: one request from the local application to an upstream service.
//!
//! The request crosses to the chosen endpoint's proxy on a pooled, multiplexed HTTP/2
//! mTLS connection (HTTP/1.1 requests too, marked so the far side restores them).
//! Timeouts bound the whole request and each attempt; retries replay small bodies on
//! connection failures, 502/503/504 and gRPC UNAVAILABLE, within the retry budget; every
//! outcome feeds the balancer's load estimate and outlier ejection. Upgrades (WebSocket)
//! get a dedicated HTTP/1.1 connection and are spliced once switched.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tessera_proto::resources::{RetrySpec, RoutePolicySpec};
use tessera_proto::tls;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use crate::alpn::ALPN_H2_TUNNELS;
use crate::config::Limits;
use crate::http::{self as proxy_http, Body, BoxFuture, ORIG_PROTO, ProxyError};
use crate::http2::client::{self as multiplex, ConnectError, ExchangeError};
use crate::http2::{StreamBody, Tunnel};
use crate::limits::body_rate::Paced;
use crate::outbound::balance::{Balancer, EndpointState};
use crate::outbound::retry::RetryBudget;
use crate::tcp;
use crate::telemetry::{Direction, Label, Metrics, RequestMeter, RequestSeries};
use crate::trace::{self, TraceContext, Tracer};

/// Bodies up to this size are kept so a request can be retried.
const MAX_REPLAY_BODY: usize = 64 * 1024;

/// Timeouts and retries in force for one upstream.
#[derive(Default)]
struct Policy {
    timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retries: Option<RetrySpec>,
    budget: Option<RetryBudget>,
}

/// An upstream service as the outbound proxy sees it.
pub struct Upstream {
    pub name: String,
    /// The request metrics of this upstream (source: this proxy's identity).
    series: Arc<RequestSeries>,
    pub balancer: Arc<Balancer>,
    policy: ArcSwap<Policy>,
    policy_spec: ArcSwapOption<RoutePolicySpec>,
    metrics: Arc<Metrics>,
    retries: Counter,
    limits: Limits,
    tracer: Arc<Tracer>,
    access_log: bool,
}

impl Upstream {
    pub fn new(
        name: String,
        local_identity: String,
        metrics: Arc<Metrics>,
        limits: Limits,
        tracer: Arc<Tracer>,
        access_log: bool,
    ) -> Arc<Self> {
        let retries = metrics.retries(&name);
        let series = RequestSeries::new(
            metrics.clone(),
            Direction::Outbound,
            Label::new(local_identity),
            Label::new(name.as_str()),
            "mtls",
        );
        Arc::new(Self {
            series,
            tracer,
            access_log,
            balancer: Balancer::new(name.clone()),
            name,
            policy: ArcSwap::from_pointee(Policy::default()),
            policy_spec: ArcSwapOption::empty(),
            metrics,
            retries,
            limits,
        })
    }

    /// Applies a route policy from discovery; an unchanged one keeps its budget window.
    pub fn set_policy(&self, spec: Option<&RoutePolicySpec>) {
        if self.policy_spec.load().as_deref() == spec {
            return;
        }
        let policy = spec.map_or_else(Policy::default, |spec| Policy {
            timeout: spec.timeout,
            per_try_timeout: spec.per_try_timeout,
            budget: spec
                .retries
                .as_ref()
                .map(|r| RetryBudget::new(r.budget.clone())),
            retries: spec.retries.clone(),
        });
        self.policy.store(Arc::new(policy));
        self.policy_spec.store(spec.cloned().map(Arc::new));
    }

    /// Forwards one request; never fails: errors become honest responses.
    ///
    /// Synchronous up to the exchange, which is boxed once: a pointer moves cheaply into
    /// the per-stream task (HTTP/2), the retrying, timing-out exchange would not; and the
    /// future waiting on it keeps only the box and the meter, not the request again.
    pub fn handle(
        self: Arc<Self>,
        request: Request<CallerBody>,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        // The caller's trace, or a new one: every attempt of this request joins it.
        let context = trace::extract(request.headers()).or_else(|| self.tracer.root_context());
        let meter = RequestMeter::start(self.series.clone())
            .with_trace(sampled_trace_id(context.as_ref()))
            .with_access_log(self.access_log, request.method(), request.uri());
        let exchange = if proxy_http::is_upgrade(&request) {
            self.upgrade(request)
        } else {
            self.forward(request, context)
        };
        async move { Ok(meter.finish(exchange.await)) }
    }

    /// The request as the proxy-to-proxy hop carries it, then its attempts. Only what
    /// the attempts need crosses into the future: the head once, the body, the context.
    fn forward(
        self: Arc<Self>,
        request: Request<CallerBody>,
        context: Option<TraceContext>,
    ) -> BoxFuture<'static, Response<UpstreamBody>> {
        let grpc = proxy_http::is_grpc(request.headers());
        let policy = self.policy.load_full();
        let (mut parts, body) = request.into_parts();
        let original_version = parts.version;
        if let Err(error) = to_http2(&mut parts, &self.name) {
            return Box::pin(std::future::ready(self.refusal(error, grpc)));
        }
        Box::pin(crate::assertions::size_between(1024, 1400, async move {
            let replay = match &policy.retries {
                Some(retries) if retryable(&parts.method, retries) => replayable(body).await,
                // A bodiless request can go again if the peer refuses it unprocessed.
                _ if http_body::Body::is_end_stream(&body) => Ok(Replay::Buffered(Bytes::new())),
                _ => Ok(Replay::Once(body)),
            };
            let replay = match replay {
                Ok(replay) => replay,
                Err(error) => return self.refusal(error, grpc),
            };
            let outcome = self
                .attempts(&policy, &mut parts, replay, context.as_ref())
                .await;
            match outcome {
                Ok(mut response) => {
                    proxy_http::strip_hop_by_hop(response.headers_mut(), false);
                    *response.version_mut() = original_version;
                    response.map(Either::Left)
                }
                Err(error) => self.refusal(error, grpc),
            }
        }))
    }

    /// The error as the caller's answer.
    fn refusal(&self, error: ProxyError, grpc: bool) -> Response<UpstreamBody> {
        debug!(event = "request failed", upstream = %self.name, reason = error.reason());
        error.response(grpc).map(Either::Right)
    }

    /// Attempts until one succeeds, the policy allows no more, or the request's deadline
    /// passes. Each attempt runs under one timer: the earlier of the request's deadline
    /// and the attempt's own.
    ///
    /// Not an `async fn`: an async block keeps its captures in place, where an `async fn`
    /// would keep its arguments twice (as passed, and as bound).
    #[allow(clippy::manual_async_fn)] // see above: the future's size is the point
    fn attempts<'a>(
        &'a self,
        policy: &'a Policy,
        parts: &'a mut http::request::Parts,
        mut replay: Replay,
        context: Option<&'a TraceContext>,
    ) -> impl Future<Output = Result<Response<StreamBody>, ProxyError>> + Send + 'a {
        async move {
            let mut max_attempts = match (&replay, &policy.retries) {
                (Replay::Buffered(_), Some(retries)) => 1 + retries.attempts,
                _ => 1,
            };
            // One clock reading serves the original request's budget deposit, its
            // deadline and its first attempt; each later attempt reads it again.
            let mut started = Instant::now();
            if let Some(budget) = &policy.budget {
                budget.deposit(started.into_std());
            }
            let deadline = policy.timeout.map(|limit| started + limit);
            let mut attempt = 1;
            let mut refusals_left = UNPROCESSED_RESENDS;
            loop {
                self.balancer.readmit_expired(started.into_std());
                let in_flight = self
                    .balancer
                    .pick(started.into_std())
                    .ok_or(ProxyError::NoEndpoints)?;
                let endpoint = in_flight.endpoint();
                let Some(body) = replay.next() else {
                    return Err(ProxyError::Reset);
                };
                // A client span per attempt: retries show up as siblings in the trace.
                let span = self
                    .tracer
                    .start_span(context, parts.method.as_str(), trace::SpanKind::Client)
                    .map(|span| AttemptSpan::new(span, parts));
                let timer = earliest(
                    deadline,
                    policy.per_try_timeout.map(|limit| started + limit),
                );
                let resendable = refusals_left > 0 && replay.is_buffered();
                let last = attempt >= max_attempts && !resendable;
                let sent = self.attempt(endpoint, parts, body, last, span.as_deref());
                let outcome = match timer {
                    Some(at) => tokio::time::timeout_at(at, sent)
                        .await
                        .unwrap_or(Err(ProxyError::Timeout)),
                    None => sent.await,
                };
                let finished = Instant::now();
                let verdict = Verdict::of(&outcome);
                match verdict {
                    Verdict::Success => {
                        self.balancer
                            .success(endpoint, finished - started, finished.into_std())
                    }
                    Verdict::Failure | Verdict::Retry => self.balancer.failure(endpoint),
                    Verdict::CallersFault | Verdict::Unprocessed => {}
                }
                let resend = verdict == Verdict::Unprocessed && resendable;
                let retry_worthy = matches!(verdict, Verdict::Retry | Verdict::Unprocessed);
                if let Some(span) = span {
                    self.finish_span(*span, &outcome, endpoint, attempt, retry_worthy);
                }
                drop(in_flight);
                let out_of_time = deadline.is_some_and(|deadline| finished >= deadline);
                let budget_allows = || policy.budget.as_ref().is_some_and(RetryBudget::withdraw);
                if resend && !out_of_time {
                    // Outside the route's attempts and budget: nothing was processed.
                    refusals_left -= 1;
                    max_attempts += 1;
                } else if !retry_worthy || last || out_of_time || !budget_allows() {
                    return outcome;
                }
                self.retries.inc();
                attempt += 1;
                started = Instant::now();
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
            let exchange = opened.map_err(|error| self.stream_failed(endpoint, &error))?;
            exchange.await.map_err(|error| match error {
                ExchangeError::Stream(error) => self.stream_failed(endpoint, &error),
                ExchangeError::CallerBody(answer) => answer,
            })
        }
    }

    fn stream_failed(&self, endpoint: &EndpointState, error: &h2::Error) -> ProxyError {
        debug!(event = "upstream error", upstream = %self.name, address = %endpoint.address, error = %error);
        crate::http2::client::failure(error)
    }

    fn finish_span(
        &self,
        attempt_span: AttemptSpan,
        outcome: &Result<Response<StreamBody>, ProxyError>,
        endpoint: &EndpointState,
        attempt: u32,
        error: bool,
    ) {
        let AttemptSpan {
            span,
            method,
            path,
            host,
        } = attempt_span;
        let status = outcome.as_ref().map_or_else(
            |e| e.reason().to_string(),
            |r| r.status().as_u16().to_string(),
        );
        let attributes = vec![
            ("http.request.method", method),
            ("url.path", path),
            ("server.address", host),
            ("http.response.status_code", status),
            ("tessera.upstream", self.name.clone()),
            ("tessera.peer.identity", endpoint.identity.to_string()),
            ("tessera.attempt", attempt.to_string()),
        ];
        self.tracer.finish(span, attributes, error);
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
    /// predates tunnels: then the connection needs one of its own.
    pub async fn tunnel(&self, endpoint: &EndpointState) -> Result<Option<Tunnel>, ProxyError> {
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
            debug!(event = "tunnel refused", upstream = %self.name, address = %endpoint.address, error = %error);
            match error {
                ConnectError::Refused(StatusCode::FORBIDDEN) => ProxyError::Forbidden,
                ConnectError::Refused(_) => ProxyError::Unreachable,
                ConnectError::Stream(_) => ProxyError::Reset,
            }
        })
    }

    /// Opens an mTLS connection to an endpoint's proxy that must prove its identity.
    pub async fn connect(
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
        self.metrics
            .connection(Direction::Outbound, &endpoint.identity);
        Ok(stream)
    }

    /// An HTTP/1.1 upgrade: its own connection to the endpoint, spliced after 101.
    fn upgrade(
        self: Arc<Self>,
        request: Request<CallerBody>,
    ) -> BoxFuture<'static, Response<UpstreamBody>> {
        let grpc = proxy_http::is_grpc(request.headers());
        Box::pin(async move {
            let upgraded = async {
                let now = std::time::Instant::now();
                self.balancer.readmit_expired(now);
                let in_flight = self.balancer.pick(now).ok_or(ProxyError::NoEndpoints)?;
                let endpoint = in_flight.endpoint().clone();
                let stream = self.connect(&endpoint, &endpoint.connectors.http1).await?;
                crate::upgrade::forward_upgrade(request, TokioIo::new(stream)).await
            };
            match upgraded.await {
                Ok(response) => response.map(Either::Right),
                Err(error) => self.refusal(error, grpc),
            }
        })
    }
}

/// The trace id to attach to latency samples, for sampled requests.
pub fn sampled_trace_id(context: Option<&TraceContext>) -> Option<String> {
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

/// How many times a request the peer refused unprocessed is sent again, on top of the
/// route's retries (RFC 9113 §8.7: safe for any method).
const UNPROCESSED_RESENDS: u32 = 1;

/// Moves the parts out for the last attempt, leaving an empty shell behind.
fn take_parts(parts: &mut http::request::Parts) -> http::request::Parts {
    let (empty, ()) = Request::new(()).into_parts();
    std::mem::replace(parts, empty)
}

/// Idempotent methods may always be retried; others only on routes marked retryable.
fn retryable(method: &Method, retries: &RetrySpec) -> bool {
    retries.retryable
        || matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        )
}

/// 502/503/504, or a gRPC UNAVAILABLE carried in the headers (trailers-only answer).
fn should_retry<B>(response: &Response<B>) -> bool {
    matches!(response.status().as_u16(), 502..=504)
        || response
            .headers()
            .get(&crate::http::GRPC_STATUS)
            .is_some_and(|status| status == "14")
}

/// A response from upstream, or the proxy's own answer (an error, an upgrade).
type UpstreamBody = Either<StreamBody, Body>;

/// An attempt's client span, and what it will record once the attempt ends. Boxed: the
/// request's future carries a pointer, not the span and its strings.
struct AttemptSpan {
    span: trace::ActiveSpan,
    method: String,
    path: String,
    host: String,
}

impl AttemptSpan {
    fn new(span: trace::ActiveSpan, parts: &http::request::Parts) -> Box<Self> {
        Box::new(Self {
            span,
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            host: parts.uri.host().unwrap_or_default().to_string(),
        })
    }
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A caller's request body: over HTTP/1.1 (hyper's server), or an HTTP/2 stream.
pub type CallerBody = Either<Paced<Incoming>, StreamBody>;

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

/// What an attempt's outcome says about the endpoint, and whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Answered, and not with a server error.
    Success,
    /// A server error that is not worth another attempt.
    Failure,
    /// Failed in a way another attempt may not (502/503/504, gRPC UNAVAILABLE, a
    /// connection or stream failure, a timeout).
    Retry,
    /// The caller's own request failed (its body was malformed, cut off or too slow):
    /// nothing counts against the endpoint, and nothing is retried.
    CallersFault,
    /// The peer refused the request before processing it (a GOAWAY below its stream,
    /// REFUSED_STREAM): sent again, once, without a retry policy, and not counted
    /// against the endpoint (a connection going away is not the endpoint failing).
    Unprocessed,
}

impl Verdict {
    fn of<B>(outcome: &Result<Response<B>, ProxyError>) -> Self {
        match outcome {
            Err(ProxyError::BadRequestBody | ProxyError::RequestBodyTimeout) => {
                Verdict::CallersFault
            }
            Err(ProxyError::Unprocessed) => Verdict::Unprocessed,
            Err(_) => Verdict::Retry,
            Ok(response) if should_retry(response) => Verdict::Retry,
            Ok(response) if response.status().is_server_error() => Verdict::Failure,
            Ok(_) => Verdict::Success,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, grpc_status: Option<&str>) -> Result<Response<()>, ProxyError> {
        let mut response = Response::builder().status(status);
        if let Some(code) = grpc_status {
            response = response.header("grpc-status", code);
        }
        Ok(response.body(()).unwrap())
    }

    #[test]
    fn only_the_endpoints_own_failures_count_against_it() {
        assert_eq!(Verdict::of(&answered(200, None)), Verdict::Success);
        assert_eq!(Verdict::of(&answered(404, None)), Verdict::Success);
        assert_eq!(Verdict::of(&answered(500, None)), Verdict::Failure);
        for status in [502, 503, 504] {
            assert_eq!(Verdict::of(&answered(status, None)), Verdict::Retry);
        }
        assert_eq!(Verdict::of(&answered(200, Some("14"))), Verdict::Retry);
        assert_eq!(
            Verdict::of::<()>(&Err(ProxyError::Reset)),
            Verdict::Retry,
            "a reset by the endpoint is its failure"
        );
        assert_eq!(Verdict::of::<()>(&Err(ProxyError::Timeout)), Verdict::Retry);
        assert_eq!(
            Verdict::of::<()>(&Err(ProxyError::BadRequestBody)),
            Verdict::CallersFault,
            "a caller's broken body is never the endpoint's failure"
        );
        assert_eq!(
            Verdict::of::<()>(&Err(ProxyError::RequestBodyTimeout)),
            Verdict::CallersFault,
            "nor is a caller's slow body"
        );
        assert_eq!(
            Verdict::of::<()>(&Err(ProxyError::Unprocessed)),
            Verdict::Unprocessed,
            "a request the peer refused unprocessed is sent again and ejects nothing"
        );
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
