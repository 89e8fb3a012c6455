//! Multiplexed HTTP/2 server connections — from peer proxies, and from plaintext HTTP/2
//! callers on a permissive port — served on `h2` directly.
//!
//! hyper's HTTP/2 server runs every stream through its own service wrapper and hands
//! tunnels (`CONNECT`) out through its upgrade machinery, after which a copy loop moves
//! every byte through a zeroed buffer on each side. Here each stream's task answers the
//! stream itself: a response body goes into the stream as it arrives, and a tunnel moves
//! bytes between the application's socket and the stream without an intermediate copy.
//!
//! Every connection is bounded ([`Settings`], from `limits`): streams open at once
//! (SETTINGS_MAX_CONCURRENT_STREAMS, so a peer beyond it gets REFUSED_STREAM), streams
//! in flight in the whole proxy (a stream beyond the budget is answered 503), the first
//! request head after the handshake, a connection with no stream open, a request body
//! that stops sending or brings too few bytes per window, and a stream on which nothing
//! moves either way. An authenticated peer proxy, whose one pooled connection carries all
//! its callers' requests and tunnels, gets a higher stream limit ([`Settings::for_peer`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tracing::{Span, debug};

use super::{BodyPump, Tunnel};
use crate::config::Limits;
use crate::http::{Body, BoxFuture, PROXY_ERROR, ProxyError};
use crate::lifecycle::{Admitted, Drain};
use crate::limits::MAX_HEADER_BYTES;
use crate::limits::{CONNECTION_WINDOW, STREAM_WINDOW};

/// What a stream's handler answers.
pub(crate) enum Reply {
    /// A response, its body streamed into the stream.
    Response(Response<Body>),
    /// `200`, then the stream carries a TCP connection: the request's body (the bytes
    /// from the peer) and the response stream go to `relay` as one tunnel.
    Tunnel {
        recv: RecvStream,
        relay: Box<dyn FnOnce(Tunnel) -> BoxFuture<'static, ()> + Send>,
    },
}

/// Limits of one server connection.
pub(crate) struct Settings {
    /// Streams open at once (requests and tunnels alike).
    pub max_streams: u32,
    /// How long the peer may take to send its connection preface.
    pub handshake_timeout: Duration,
    /// How long after the handshake the first request head must be complete.
    pub header_read_timeout: Duration,
    /// A connection with no stream open this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// A stream on which no byte moves either way this long is ended.
    pub stream_idle_timeout: Duration,
    /// A request body silent this long before the response began is answered 408.
    pub request_body_timeout: Duration,
    /// Bytes per second a request body must bring, measured over each
    /// `request_body_timeout` window before the response began; 0: no such rule.
    pub request_body_min_rate: u64,
}

impl Settings {
    /// The server settings the configured limits call for, for an application or a
    /// caller that is not an authenticated peer proxy.
    pub(crate) fn new(limits: &Limits) -> Self {
        Self {
            max_streams: limits.max_concurrent_streams_per_connection,
            handshake_timeout: limits.handshake_timeout,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.connection_idle_timeout,
            stream_idle_timeout: limits.stream_idle_timeout,
            request_body_timeout: limits.request_body_timeout,
            request_body_min_rate: limits.request_body_min_rate,
        }
    }

    /// For a connection from an authenticated peer proxy (inbound mTLS with a verified
    /// identity). It is the one pooled connection its proxy has to this one, carrying
    /// every caller's requests and tunnels, so it may hold more streams.
    ///
    /// It keeps h2's rapid-reset protection (GOAWAY ENHANCE_YOUR_CALM after 20 streams
    /// reset before they were accepted), though its proxy relays its callers'
    /// cancellations: with 200 or 1,000 allowed, a hostile peer holding a valid
    /// certificate (the hostile-peer suite's inbound rapid reset) made other callers'
    /// requests fail (5–11 % of them), and with h2's 20 none did.
    pub(crate) fn for_peer(limits: &Limits) -> Self {
        Self {
            max_streams: limits.max_concurrent_streams_per_peer_connection,
            ..Self::new(limits)
        }
    }
}

/// After a GOAWAY for idleness, how long the peer has to take it in before the
/// connection is dropped (a silent peer never answers the GOAWAY's PING).
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// When a stream last moved a byte, how many request body bytes came and whether the
/// body has ended: shared by the stream's task (which enforces the timeouts) and the
/// request body (which reads the bytes, wherever the handler passes it). Put in the
/// request's extensions.
#[derive(Debug)]
pub(crate) struct Progress {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    last: AtomicU64,
    body_done: AtomicBool,
    /// Request body bytes read so far.
    received: AtomicU64,
    /// Whether the body's reader is waiting for the caller's next bytes (rather than
    /// not reading, as when the application is slow): only then is a slow body the
    /// caller's.
    awaiting: AtomicBool,
}

impl Progress {
    fn new(body_done: bool) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            body_done: AtomicBool::new(body_done),
            received: AtomicU64::new(0),
            awaiting: AtomicBool::new(false),
        })
    }

    /// `bytes` of the request body were read now.
    pub(crate) fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
        self.awaiting.store(false, Ordering::Relaxed);
        self.moved();
    }

    /// The body's reader waits for the caller to send more.
    pub(crate) fn awaiting_body(&self) {
        self.awaiting.store(true, Ordering::Relaxed);
    }

    /// A byte moved now.
    pub(crate) fn moved(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// The request body has ended (or failed): its silence is no longer the caller's.
    pub(crate) fn body_ended(&self) {
        self.body_done.store(true, Ordering::Relaxed);
    }

    fn last_moved(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// The streams open on one connection, and when the last one ended; the connection's
/// log span, which every stream's task names as the parent of its events.
struct OpenStreams {
    span: Span,
    epoch: Instant,
    count: AtomicUsize,
    /// Milliseconds since `epoch` when the count last fell to zero.
    idle_since: AtomicU64,
}

/// Counts one stream open until dropped.
struct OpenStream(Arc<OpenStreams>);

impl OpenStreams {
    fn open(self: &Arc<Self>) -> OpenStream {
        self.count.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.clone())
    }

    /// When the connection went idle; `None` while a stream is open.
    fn idle_since(&self) -> Option<Instant> {
        (self.count.load(Ordering::Acquire) == 0)
            .then(|| self.epoch + Duration::from_millis(self.idle_since.load(Ordering::Acquire)))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        self.0.idle_since.store(now, Ordering::Release);
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the connection's timer is waiting for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first request head after the handshake.
    FirstRequest,
    /// A stream, once none is open.
    Idle,
    /// The peer to go after a GOAWAY.
    Closing,
}

/// Why a connection ended early.
#[derive(Debug)]
pub(crate) enum ServeError {
    /// No connection preface in time.
    HandshakeTimeout,
    /// The connection failed (protocol error, I/O error, a reset).
    Connection(h2::Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::HandshakeTimeout => f.write_str("no HTTP/2 preface in time"),
            ServeError::Connection(error) => error.fmt(f),
        }
    }
}

/// Serves one connection until the peer closes it, or until draining starts and its
/// open streams are done (the peer is told with a GOAWAY). Every stream gets a task of
/// its own running `handle`; a stream the peer resets stops its handler. What the
/// connection and its streams log is logged in `span`, the connection's.
pub(crate) async fn serve<T, H, F>(
    io: T,
    settings: Settings,
    drain: &Drain,
    span: &Span,
    handle: H,
) -> Result<(), ServeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<RecvStream>) -> F,
    F: Future<Output = Reply> + Send + 'static,
{
    let handshake = server_settings(&settings).handshake::<T, Bytes>(io);
    let mut connection = tokio::time::timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout)?
        .map_err(ServeError::Connection)?;
    // Created once: every stream accepted would otherwise set up a new wait.
    let signaled = drain.signaled();
    tokio::pin!(signaled);
    let mut draining = false;
    let streams = Arc::new(OpenStreams {
        span: span.clone(),
        epoch: Instant::now(),
        count: AtomicUsize::new(0),
        idle_since: AtomicU64::new(0),
    });
    // One timer for the connection: the first request, then idleness, then the
    // GOAWAY's grace. It fires at most once per idle timeout while streams are open.
    let mut phase = Phase::FirstRequest;
    let timer = tokio::time::sleep(settings.header_read_timeout);
    tokio::pin!(timer);
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = connection.accept() => accepted,
            () = &mut signaled, if !draining => {
                connection.graceful_shutdown();
                draining = true;
                continue;
            }
            () = &mut timer => {
                let now = Instant::now();
                match (phase, streams.idle_since()) {
                    (Phase::Closing, _) => return Ok(()),
                    (Phase::Idle, None) => timer.as_mut().reset(now + settings.idle_timeout),
                    (Phase::Idle, Some(since)) if now < since + settings.idle_timeout => {
                        timer.as_mut().reset(since + settings.idle_timeout);
                    }
                    (Phase::FirstRequest | Phase::Idle, _) => {
                        debug!(
                            parent: span,
                            event = "HTTP/2 connection closed",
                            reason = if phase == Phase::Idle {
                                "idle"
                            } else {
                                "no request head in time"
                            },
                        );
                        connection.graceful_shutdown();
                        phase = Phase::Closing;
                        timer.as_mut().reset(now + GOAWAY_GRACE);
                    }
                }
                continue;
            }
        };
        match accepted {
            Some(Ok((mut request, respond))) => {
                if phase == Phase::FirstRequest {
                    phase = Phase::Idle;
                    timer.as_mut().reset(Instant::now() + settings.idle_timeout);
                }
                let open = streams.open();
                let Some(admitted) = drain.admit() else {
                    // Over the proxy's budget: this stream is refused, others go on.
                    refuse_overloaded(respond);
                    drop(open);
                    continue;
                };
                let progress = Progress::new(request.body().is_end_stream());
                request.extensions_mut().insert(progress.clone());
                let task = StreamTask {
                    answer: Answer::new(handle(request), respond, progress.clone()),
                    timer: tokio::time::sleep(
                        settings
                            .request_body_timeout
                            .min(settings.stream_idle_timeout),
                    ),
                    progress,
                    replied: false,
                    body_timeout: settings.request_body_timeout,
                    idle_timeout: settings.stream_idle_timeout,
                    window: BodyWindow::new(&settings),
                    open: (open, admitted),
                };
                // Boxed: tokio copies a task's future into place at spawn.
                tokio::spawn(Box::pin(crate::assertions::size_between(0, 832, task)));
            }
            // After our GOAWAY, a peer hanging up is what was asked of it.
            Some(Err(error)) if is_clean_close(&error) || phase == Phase::Closing => {
                return Ok(());
            }
            Some(Err(error)) => return Err(ServeError::Connection(error)),
            None => return Ok(()),
        }
    }
}

/// A stream beyond the proxy's in-flight budget: 503, said by the proxy.
fn refuse_overloaded(mut respond: SendResponse<Bytes>) {
    let mut refusal = Response::new(());
    *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    refusal.headers_mut().insert(
        PROXY_ERROR,
        HeaderValue::from_static(ProxyError::Overloaded.reason()),
    );
    let _ = respond.send_response(refusal, true);
}

/// How the proxy's HTTP/2 server connections are set up.
fn server_settings(limits: &Settings) -> h2::server::Builder {
    let mut settings = h2::server::Builder::new();
    settings
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    settings
}

/// The request body's progress rule: each window of `request_body_timeout` must bring
/// `request_body_min_rate` × the window's seconds. A gap alone cannot catch a body
/// dripped a byte at a time; a rate over a window can, and a window (rather than a
/// rate over the whole body) lets a body pause, then catch up.
struct BodyWindow {
    length: Duration,
    /// Bytes each window must bring; 0: no rule.
    min_bytes: u64,
    start: Instant,
    /// The body's bytes read when the window began.
    received_at_start: u64,
}

impl BodyWindow {
    fn new(settings: &Settings) -> Self {
        let seconds = settings.request_body_timeout.as_secs_f64();
        Self {
            length: settings.request_body_timeout,
            min_bytes: (settings.request_body_min_rate as f64 * seconds).ceil() as u64,
            start: Instant::now(),
            received_at_start: 0,
        }
    }

    /// When the current window ends, if the rule applies.
    fn end(&self) -> Option<Instant> {
        (self.min_bytes > 0).then(|| self.start + self.length)
    }

    /// At `now`: whether a window ended with too few bytes from a caller the proxy was
    /// waiting for. A window that ended starts the next.
    fn too_slow(&mut self, now: Instant, progress: &Progress) -> bool {
        match self.end() {
            Some(end) if now >= end => {
                let received = progress.received.load(Ordering::Relaxed);
                let brought = received.saturating_sub(self.received_at_start);
                self.start = now;
                self.received_at_start = received;
                brought < self.min_bytes && progress.awaiting.load(Ordering::Relaxed)
            }
            _ => false,
        }
    }
}

/// A peer that went away between requests, or said goodbye, ended nothing early.
fn is_clean_close(error: &h2::Error) -> bool {
    error.is_go_away() && error.reason() == Some(h2::Reason::NO_ERROR)
        || error
            .get_io()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
}

pin_project! {
    /// One stream's task: its answer, under the stream's timeouts. Nothing moving on
    /// the stream for too long ends it: 408 before the response began (the caller's
    /// body or the whole exchange stalled), a reset after.
    struct StreamTask<F> {
        #[pin]
        answer: Answer<F>,
        #[pin]
        timer: Sleep,
        progress: Arc<Progress>,
        // Whether the response head went out (it counts as a byte moving).
        replied: bool,
        body_timeout: Duration,
        idle_timeout: Duration,
        window: BodyWindow,
        // Counted among the connection's streams (which holds its log span) and the proxy's.
        open: (OpenStream, Admitted),
    }
}

impl<F> Future for StreamTask<F>
where
    F: Future<Output = Reply>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let span = &this.open.0.0.span;
        loop {
            if this.answer.as_mut().poll_answer(cx, span).is_ready() {
                return Poll::Ready(());
            }
            if !*this.replied && !matches!(*this.answer, Answer::Waiting { .. }) {
                *this.replied = true;
                this.progress.moved();
            }
            ready!(this.timer.as_mut().poll(cx));
            let now = Instant::now();
            let last = this.progress.last_moved();
            let waiting = matches!(*this.answer, Answer::Waiting { .. });
            let body_open = waiting && !this.progress.body_done.load(Ordering::Relaxed);
            let too_slow = body_open && this.window.too_slow(now, this.progress);
            let deadline = if body_open {
                let silent = last + (*this.body_timeout).min(*this.idle_timeout);
                this.window.end().map_or(silent, |end| end.min(silent))
            } else {
                last + *this.idle_timeout
            };
            if !too_slow && now < deadline {
                this.timer.as_mut().reset(deadline);
                continue;
            }
            let next = match this.answer.as_mut().project() {
                AnswerProjection::Waiting { respond, .. } => {
                    if let Some(respond) = respond.take() {
                        debug!(parent: span, event = "stream timed out", body_open, too_slow);
                        request_timeout(respond);
                    }
                    Answer::Done
                }
                AnswerProjection::Sending { pump } => {
                    debug!(parent: span, event = "stream timed out", sending = true);
                    pump.reset(h2::Reason::CANCEL);
                    Answer::Done
                }
                // A tunnel is a TCP connection: it may rest as long as its ends like.
                AnswerProjection::Relaying { .. } | AnswerProjection::Done => {
                    return this.answer.poll_answer(cx, span);
                }
            };
            this.answer.set(next);
            return Poll::Ready(());
        }
    }
}

/// 408, said by the proxy: the request did not move in time.
fn request_timeout(mut respond: SendResponse<Bytes>) {
    let mut refusal = Response::new(());
    *refusal.status_mut() = StatusCode::REQUEST_TIMEOUT;
    refusal
        .headers_mut()
        .insert(PROXY_ERROR, HeaderValue::from_static("request-timeout"));
    let _ = respond.send_response(refusal, true);
}

pin_project! {
    /// One stream's task: runs the handler, unless the peer resets the stream first (its
    /// caller gave up: the application's work for it is dropped), then sends what it
    /// replies. Written out by hand, not as an `async fn`: that would keep the handler's
    /// future twice (as its argument, and again inside the race with the reset), so the
    /// boxed task would outgrow the allocator's per-thread cache.
    #[project = AnswerProjection]
    enum Answer<F> {
        Waiting {
            #[pin]
            reply: F,
            respond: Option<SendResponse<Bytes>>,
            // Handed to the response body's pump, which reports its bytes.
            progress: Option<Arc<Progress>>,
        },
        /// The response body streams into the stream as the peer's window allows.
        Sending { pump: BodyPump<Body> },
        /// The stream carries a tunnel.
        Relaying { relay: BoxFuture<'static, ()> },
        Done,
    }
}

impl<F> Answer<F> {
    fn new(reply: F, respond: SendResponse<Bytes>, progress: Arc<Progress>) -> Self {
        Answer::Waiting {
            reply,
            respond: Some(respond),
            progress: Some(progress),
        }
    }
}

impl<F> Answer<F>
where
    F: Future<Output = Reply>,
{
    /// Polls the answer as a future; what goes wrong is logged in `span`, the
    /// connection's.
    fn poll_answer(mut self: Pin<&mut Self>, cx: &mut Context<'_>, span: &Span) -> Poll<()> {
        loop {
            let next = match self.as_mut().project() {
                AnswerProjection::Waiting {
                    reply,
                    respond,
                    progress,
                } => {
                    let Some(sender) = respond else {
                        return Poll::Ready(());
                    };
                    match reply.poll(cx) {
                        Poll::Ready(reply) => match respond.take() {
                            Some(respond) => start_reply(respond, reply, progress.take(), span),
                            None => Answer::Done,
                        },
                        Poll::Pending if sender.poll_reset(cx).is_ready() => Answer::Done,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                AnswerProjection::Sending { pump } => {
                    if let Err(error) = ready!(Pin::new(pump).poll(cx)) {
                        debug!(parent: span, event = "response body not sent", error = %error);
                    }
                    Answer::Done
                }
                AnswerProjection::Relaying { relay } => {
                    ready!(relay.as_mut().poll(cx));
                    Answer::Done
                }
                AnswerProjection::Done => return Poll::Ready(()),
            };
            self.set(next);
        }
    }
}

/// What follows a reply: its body to send, a tunnel to relay, or nothing.
fn start_reply<F>(
    mut respond: SendResponse<Bytes>,
    reply: Reply,
    progress: Option<Arc<Progress>>,
    span: &Span,
) -> Answer<F> {
    match reply {
        Reply::Response(response) => match send_head(respond, response, span) {
            Some(pump) => Answer::Sending {
                pump: pump.with_progress(progress),
            },
            None => Answer::Done,
        },
        Reply::Tunnel { recv, relay } => match respond.send_response(Response::new(()), false) {
            Ok(send) => Answer::Relaying {
                relay: relay(Tunnel {
                    send,
                    recv,
                    _lease: None,
                }),
            },
            Err(error) => {
                debug!(parent: span, event = "tunnel not opened", error = %error);
                Answer::Done
            }
        },
    }
}

/// Sends the response head; its body, if any, to pump into the stream.
fn send_head(
    mut respond: SendResponse<Bytes>,
    response: Response<Body>,
    span: &Span,
) -> Option<BodyPump<Body>> {
    let (mut head, body) = response.into_parts();
    let end_of_stream = body.is_end_stream();
    // A body of known length announces it, so the peer's caller is told a length when
    // it speaks HTTP/1.1 (the proxy's own answers carry none).
    if !end_of_stream
        && carries_content(head.status)
        && !head.headers.contains_key(header::CONTENT_LENGTH)
        && let Some(length) = body.size_hint().exact()
    {
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    match respond.send_response(Response::from_parts(head, ()), end_of_stream) {
        Ok(stream) => (!end_of_stream).then(|| BodyPump::new(body, stream)),
        Err(error) => {
            // A head HTTP/2 cannot carry (a connection-specific field) leaves the stream
            // open: the peer gets a bad gateway instead. On a stream already gone this
            // fails too, harmlessly.
            debug!(parent: span, event = "response not sent", error = %error);
            let mut refusal = Response::new(());
            *refusal.status_mut() = StatusCode::BAD_GATEWAY;
            let _ = respond.send_response(refusal, true);
            None
        }
    }
}

/// Whether a response with this status has a body (RFC 9110 §6.4.1).
fn carries_content(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    fn settings() -> Settings {
        Settings {
            max_streams: 16,
            handshake_timeout: TEST_TIMEOUT,
            ..Settings::new(&Limits::default())
        }
    }

    /// A client connection to `serve` over an in-memory pipe; the server's outcome.
    async fn client<H, F>(
        drain: lifecycle::Drain,
        handle: H,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    )
    where
        H: Fn(Request<RecvStream>) -> F + Send + 'static,
        F: Future<Output = Reply> + Send + 'static,
    {
        client_with(settings(), drain, handle).await
    }

    /// Waits, in paused time, for the server to end the connection without an error.
    async fn closed_cleanly(served: tokio::task::JoinHandle<Result<(), ServeError>>) {
        let outcome = tokio::time::timeout(Duration::from_secs(3600), served)
            .await
            .expect("closed, not left open")
            .unwrap();
        assert!(
            outcome.is_ok(),
            "{:?}",
            outcome.err().map(|e| e.to_string())
        );
    }

    /// Waits, in paused time, for the answer, which must be 408.
    async fn timed_out(response: h2::client::ResponseFuture) -> Response<RecvStream> {
        let response = tokio::time::timeout(Duration::from_secs(3600), response)
            .await
            .expect("answered, not left open")
            .unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        response
    }

    async fn client_with<H, F>(
        settings: Settings,
        drain: lifecycle::Drain,
        handle: H,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    )
    where
        H: Fn(Request<RecvStream>) -> F + Send + 'static,
        F: Future<Output = Reply> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let served =
            tokio::spawn(
                async move { serve(server, settings, &drain, &Span::none(), handle).await },
            );
        let (streams, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        (streams, served)
    }

    fn request(method: http::Method, uri: &str) -> Request<()> {
        let mut request = Request::new(());
        *request.method_mut() = method;
        *request.uri_mut() = uri.parse().unwrap();
        request
    }

    async fn read_all(mut stream: RecvStream) -> Bytes {
        let mut received = Vec::new();
        while let Some(data) = stream.data().await {
            let data = data.unwrap();
            let _ = stream.flow_control().release_capacity(data.len());
            received.extend_from_slice(&data);
        }
        received.into()
    }

    /// Answers `/hold` never (a caller that never reads), anything else at once.
    fn hold_or_answer(request: Request<RecvStream>) -> impl Future<Output = Reply> + Send {
        let hold = request.uri().path() == "/hold";
        async move {
            if hold {
                std::future::pending::<()>().await;
            }
            Reply::Response(Response::new(crate::http::empty()))
        }
    }

    /// One HTTP/2 frame, as bytes.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = (payload.len() as u32).to_be_bytes();
        let mut frame = vec![length[1], length[2], length[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// Frames read until `stop` says so: (type, stream, payload).
    async fn read_frames(
        io: &mut tokio::io::DuplexStream,
        stop: impl Fn(&[(u8, u32, Vec<u8>)]) -> bool,
    ) -> Vec<(u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        while !stop(&frames) {
            let mut head = [0u8; 9];
            if io.read_exact(&mut head).await.is_err() {
                break;
            }
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; length];
            io.read_exact(&mut payload).await.unwrap();
            frames.push((head[3], stream, payload));
        }
        frames
    }

    #[tokio::test]
    async fn a_connection_cannot_open_more_streams_than_the_limit() {
        let (_trigger, drain) = lifecycle::channel();
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let settings = Settings {
            max_streams: 4,
            ..settings()
        };
        tokio::spawn(async move {
            serve(server, settings, &drain, &Span::none(), hold_or_answer).await
        });
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // GET http://a/hold, HPACK without the dynamic table; END_HEADERS, no END_STREAM.
        let block = [
            0x82, 0x86, 0x01, 0x01, b'a', 0x04, 0x05, b'/', b'h', b'o', b'l', b'd',
        ];
        for stream in [1u32, 3, 5, 7, 9] {
            bytes.extend(frame(0x1, 0x4, stream, &block));
        }
        client.write_all(&bytes).await.unwrap();
        let frames = tokio::time::timeout(
            TEST_TIMEOUT,
            read_frames(&mut client, |frames| {
                frames.iter().any(|(kind, _, _)| *kind == 0x3)
            }),
        )
        .await
        .expect("the fifth stream is refused");
        let (_, _, server_settings) = frames
            .iter()
            .find(|(kind, stream, _)| *kind == 0x4 && *stream == 0)
            .expect("the server's SETTINGS");
        let announced: Vec<(u16, u32)> = server_settings
            .chunks(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect();
        assert!(
            announced.contains(&(0x3, 4)),
            "SETTINGS_MAX_CONCURRENT_STREAMS = 4 announced: {announced:?}"
        );
        let resets: Vec<(u32, u32)> = frames
            .iter()
            .filter(|(kind, _, _)| *kind == 0x3)
            .map(|(_, stream, payload)| {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                (*stream, code)
            })
            .collect();
        assert_eq!(resets, vec![(9, 0x7)], "only the fifth: REFUSED_STREAM");
    }

    #[tokio::test]
    async fn the_default_stream_limit_is_what_a_client_sees() {
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (mut streams, _served) = client_with(settings, drain, hold_or_answer).await;
        let response = streams
            .send_request(request(http::Method::GET, "http://app/"), true)
            .unwrap()
            .0;
        tokio::time::timeout(TEST_TIMEOUT, response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(streams.current_max_send_streams(), 100);
    }

    #[tokio::test]
    async fn with_one_connection_at_its_maximum_another_is_still_served() {
        let (_trigger, drain) = lifecycle::channel_with_budget(6);
        let limited = || Settings {
            max_streams: 4,
            ..settings()
        };
        let (mut greedy, _served) = client_with(limited(), drain.clone(), hold_or_answer).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            let (response, _) = greedy
                .send_request(request(http::Method::GET, "http://app/hold"), true)
                .unwrap();
            held.push(response);
        }
        // Its fifth waits in its own client for a stream to end: it gets no answer.
        let (fifth, _) = greedy
            .send_request(request(http::Method::GET, "http://app/"), true)
            .unwrap();
        let (mut other, _served) = client_with(limited(), drain, hold_or_answer).await;
        let (response, _) = other
            .send_request(request(http::Method::GET, "http://app/"), true)
            .unwrap();
        let response = tokio::time::timeout(TEST_TIMEOUT, response)
            .await
            .expect("the other connection is answered")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), fifth)
                .await
                .is_err(),
            "the greedy connection's fifth stream waits"
        );
    }

    #[tokio::test]
    async fn streams_beyond_the_proxys_budget_are_answered_503() {
        let (_trigger, drain) = lifecycle::channel_with_budget(2);
        let (mut first, _served) = client_with(settings(), drain.clone(), hold_or_answer).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(
                first
                    .send_request(request(http::Method::GET, "http://app/hold"), true)
                    .unwrap(),
            );
        }
        tokio::task::yield_now().await;
        let (mut second, _served) = client_with(settings(), drain, hold_or_answer).await;
        let (response, _) = second
            .send_request(request(http::Method::GET, "http://app/"), true)
            .unwrap();
        let response = tokio::time::timeout(TEST_TIMEOUT, response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[PROXY_ERROR], "proxy-overloaded");
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_a_request_is_closed() {
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (_streams, served) = client_with(settings, drain, hold_or_answer).await;
        let started = Instant::now();
        closed_cleanly(served).await;
        let after = started.elapsed();
        assert!(
            after >= Duration::from_secs(10) && after <= Duration::from_secs(12),
            "closed after the header-read timeout, not {after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_between_requests_is_closed_after_the_idle_timeout() {
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (mut streams, served) = client_with(settings, drain, hold_or_answer).await;
        let (response, _) = streams
            .send_request(request(http::Method::GET, "http://app/"), true)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), StatusCode::OK);
        let answered = Instant::now();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!served.is_finished(), "a minute idle is allowed");
        closed_cleanly(served).await;
        let after = answered.elapsed();
        assert!(
            after >= Duration::from_secs(300) && after <= Duration::from_secs(302),
            "closed after the idle timeout, not {after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_that_stops_sending_is_answered_408() {
        let (_trigger, drain) = lifecycle::channel();
        // The silence rule alone: without a minimum rate.
        let settings = Settings {
            request_body_min_rate: 0,
            ..Settings::new(&Limits::default())
        };
        // The handler reads the whole body before answering, as forwarding does.
        let (mut streams, _served) = client_with(settings, drain, |request| async move {
            let body = super::super::StreamBody::request(request).into_body();
            let _ = body.collect().await;
            Reply::Response(Response::new(crate::http::empty()))
        })
        .await;
        let (response, mut upload) = streams
            .send_request(request(http::Method::POST, "http://app/upload"), false)
            .unwrap();
        let started = Instant::now();
        // A byte every 30 s keeps it going; then silence.
        for _ in 0..4 {
            upload.send_data(Bytes::from_static(b"x"), false).unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let response = timed_out(response).await;
        assert_eq!(response.headers()[PROXY_ERROR], "request-timeout");
        let after = started.elapsed();
        assert!(
            after >= Duration::from_secs(150) && after <= Duration::from_secs(152),
            "60 s after the last byte (at 90 s), not {after:?}"
        );
    }

    /// A handler that reads the whole body, then answers with its length.
    async fn count_body(request: Request<RecvStream>) -> Reply {
        let body = super::super::StreamBody::request(request).into_body();
        let length = match body.collect().await {
            Ok(body) => body.to_bytes().len(),
            Err(_) => return Reply::Response(Response::new(crate::http::empty())),
        };
        Reply::Response(Response::new(crate::http::boxed(Full::new(Bytes::from(
            length.to_string(),
        )))))
    }

    /// Sends `chunks` chunks of `size` bytes, `every` apart, then ends the body.
    fn drip(
        mut upload: h2::SendStream<Bytes>,
        chunks: usize,
        size: usize,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for _ in 0..chunks {
                upload.reserve_capacity(size);
                if upload
                    .send_data(Bytes::from(vec![b'x'; size]), false)
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(every).await;
            }
            let _ = upload.send_data(Bytes::new(), true);
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_dripped_a_byte_a_second_is_answered_408() {
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (mut streams, _served) = client_with(settings, drain, count_body).await;
        let (response, upload) = streams
            .send_request(request(http::Method::POST, "http://app/upload"), false)
            .unwrap();
        let started = Instant::now();
        // Never silent for a second, but 60 bytes a minute (issue 21: open at 150 s).
        let _drip = drip(upload, 3600, 1, Duration::from_secs(1));
        let response = timed_out(response).await;
        assert_eq!(response.headers()[PROXY_ERROR], "request-timeout");
        let after = started.elapsed();
        assert!(
            after >= Duration::from_secs(60) && after <= Duration::from_secs(61),
            "at the end of the first 60 s window, not {after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_at_normal_speed_is_never_cut() {
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (mut streams, _served) = client_with(settings, drain, count_body).await;
        let (response, upload) = streams
            .send_request(request(http::Method::POST, "http://app/upload"), false)
            .unwrap();
        // 64 KiB a second for twenty minutes: 75 MiB, far beyond any one window.
        let _drip = drip(upload, 1200, 64 * 1024, Duration::from_secs(1));
        let response = tokio::time::timeout(Duration::from_secs(3600), response)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            read_all(response.into_body()).await,
            (1200 * 64 * 1024).to_string()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_body_passes_and_a_pause_within_a_window_is_allowed() {
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (mut streams, _served) = client_with(settings, drain, count_body).await;
        let (response, upload) = streams
            .send_request(request(http::Method::POST, "http://app/upload"), false)
            .unwrap();
        // 2 KiB every 50 s: a long pause, yet more than 32 B/s over every 60 s window.
        let _drip = drip(upload, 10, 2048, Duration::from_secs(50));
        let response = tokio::time::timeout(Duration::from_secs(3600), response)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_peer_proxy_connection_advertises_the_peer_stream_limit() {
        let (_trigger, drain) = lifecycle::channel();
        let limits = Limits::default();
        let (mut streams, _served) =
            client_with(Settings::for_peer(&limits), drain, hold_or_answer).await;
        let response = streams
            .send_request(request(http::Method::GET, "http://app/"), true)
            .unwrap()
            .0;
        tokio::time::timeout(TEST_TIMEOUT, response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            streams.current_max_send_streams(),
            limits.max_concurrent_streams_per_peer_connection as usize
        );
        assert!(limits.max_concurrent_streams_per_peer_connection > 100);
    }

    /// Opens `count` streams and resets each before the server can accept it (the
    /// frames reach the server in one read), then asks once more: the answer's status,
    /// or `None` when the connection was ended.
    async fn cancel_many_then_ask(settings: Settings, count: usize) -> Option<StatusCode> {
        let (_trigger, drain) = lifecycle::channel();
        let (mut streams, _served) = client_with(settings, drain, hold_or_answer).await;
        for _ in 0..count {
            let (_response, mut upload) = streams
                .send_request(request(http::Method::GET, "http://app/hold"), false)
                .ok()?;
            upload.send_reset(h2::Reason::CANCEL);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (response, _) = streams
            .send_request(request(http::Method::GET, "http://app/"), true)
            .ok()?;
        let response = tokio::time::timeout(TEST_TIMEOUT, response).await.ok()?;
        response.ok().map(|response| response.status())
    }

    #[tokio::test]
    async fn a_rapid_reset_ends_the_connection_of_a_peer_proxy_too() {
        let limits = Limits::default();
        assert_eq!(
            cancel_many_then_ask(Settings::for_peer(&limits), 10).await,
            Some(StatusCode::OK),
            "a few cancellations are nothing"
        );
        assert_eq!(
            cancel_many_then_ask(Settings::for_peer(&limits), 60).await,
            None
        );
        assert_eq!(cancel_many_then_ask(Settings::new(&limits), 60).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_with_no_answer_is_ended_after_the_stream_idle_timeout() {
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (mut streams, _served) = client_with(settings, drain, hold_or_answer).await;
        let (response, _) = streams
            .send_request(request(http::Method::GET, "http://app/hold"), true)
            .unwrap();
        let started = Instant::now();
        timed_out(response).await;
        let after = started.elapsed();
        assert!(
            after >= Duration::from_secs(300) && after <= Duration::from_secs(301),
            "{after:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_streams_events_are_logged_in_its_connections_span() {
        use tessera_mesh::process::logging::{self, CapturedLogs, LogFormat};
        // The test's runtime has one thread: the stream's task logs to this subscriber.
        let logs = CapturedLogs::default();
        let dispatch = logging::subscriber(LogFormat::Json, "debug", false, logs.clone());
        let _subscriber = tracing::dispatcher::set_default(&dispatch);
        let connection = tracing::info_span!("inbound", peer = "10.0.0.7:40000");
        let (_trigger, drain) = lifecycle::channel();
        let settings = Settings::new(&Limits::default());
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(
            async move { serve(server, settings, &drain, &connection, hold_or_answer).await },
        );
        let (mut streams, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        let (response, _) = streams
            .send_request(request(http::Method::GET, "http://app/hold"), true)
            .unwrap();
        timed_out(response).await;

        let lines = logs.lines();
        let line = lines
            .iter()
            .find(|line| line.contains("stream timed out"))
            .unwrap_or_else(|| panic!("no timeout logged: {lines:?}"));
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(entry["spans"][0]["name"], "inbound", "{line}");
        assert_eq!(entry["spans"][0]["peer"], "10.0.0.7:40000", "{line}");
    }

    #[tokio::test]
    async fn a_request_gets_its_response_with_a_length() {
        let (_trigger, drain) = lifecycle::channel();
        let (mut streams, _served) = client(drain, |request| async move {
            let body = super::super::StreamBody::request(request).into_body();
            let upload = body.collect().await.unwrap().to_bytes();
            let answer = format!("got {}", String::from_utf8_lossy(&upload));
            Reply::Response(Response::new(crate::http::boxed(Full::new(Bytes::from(
                answer,
            )))))
        })
        .await;
        let (response, mut upload) = streams
            .send_request(request(http::Method::POST, "http://app/echo"), false)
            .unwrap();
        upload.send_data(Bytes::from_static(b"ping"), true).unwrap();
        let response = tokio::time::timeout(TEST_TIMEOUT, response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-length"], "8");
        assert_eq!(read_all(response.into_body()).await, "got ping");
    }

    #[tokio::test]
    async fn a_stream_the_peer_resets_drops_its_handler() {
        let (_trigger, drain) = lifecycle::channel();
        let (dropped_tx, dropped) = oneshot::channel::<()>();
        let dropped_tx = std::sync::Mutex::new(Some(dropped_tx));
        let (mut streams, _served) = client(drain, move |_request| {
            // Dropped with the handler's future: the sender closes the channel.
            let guard = dropped_tx.lock().unwrap().take();
            async move {
                let _guard = guard;
                std::future::pending::<Reply>().await
            }
        })
        .await;
        let (_response, mut upload) = streams
            .send_request(request(http::Method::GET, "http://app/slow"), false)
            .unwrap();
        tokio::task::yield_now().await;
        upload.send_reset(h2::Reason::CANCEL);
        let outcome = tokio::time::timeout(TEST_TIMEOUT, dropped).await;
        assert!(
            matches!(outcome, Ok(Err(_))),
            "the handler must be dropped, not left waiting"
        );
    }

    #[tokio::test]
    async fn a_tunnel_carries_bytes_both_ways_and_the_end() {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_address = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = echo.accept().await.unwrap();
            let mut received = Vec::new();
            socket.read_to_end(&mut received).await.unwrap();
            socket.write_all(&received).await.unwrap();
        });
        let (_trigger, drain) = lifecycle::channel();
        let (mut streams, _served) = client(drain, move |request| async move {
            let mut app = tokio::net::TcpStream::connect(echo_address).await.unwrap();
            Reply::Tunnel {
                recv: request.into_body(),
                relay: Box::new(move |tunnel: Tunnel| -> BoxFuture<'static, ()> {
                    Box::pin(async move {
                        tunnel.relay(&mut app).await.unwrap();
                    })
                }),
            }
        })
        .await;
        let mut connect = request(http::Method::CONNECT, "app:9000");
        *connect.uri_mut() = http::Uri::from_static("app:9000");
        let (response, mut upload) = streams.send_request(connect, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        upload
            .send_data(Bytes::from_static(b"opaque bytes"), true)
            .unwrap();
        let echoed = tokio::time::timeout(TEST_TIMEOUT, read_all(response.into_body()))
            .await
            .unwrap();
        assert_eq!(
            echoed, "opaque bytes",
            "echoed, then ended with the app's close"
        );
    }

    #[tokio::test]
    async fn draining_lets_open_streams_finish_then_ends_the_connection() {
        let (trigger, drain) = lifecycle::channel();
        let (release_tx, release) = oneshot::channel::<()>();
        let release = std::sync::Mutex::new(Some(release));
        let (mut streams, served) = client(drain, move |_request| {
            let release = release.lock().unwrap().take();
            async move {
                if let Some(release) = release {
                    let _ = release.await;
                }
                Reply::Response(Response::new(crate::http::empty()))
            }
        })
        .await;
        let (response, _upload) = streams
            .send_request(request(http::Method::GET, "http://app/"), true)
            .unwrap();
        tokio::task::yield_now().await;
        tokio::spawn(trigger.drain(TEST_TIMEOUT));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!served.is_finished(), "an open stream keeps the connection");
        release_tx.send(()).unwrap();
        let response = tokio::time::timeout(TEST_TIMEOUT, response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let served = tokio::time::timeout(TEST_TIMEOUT, served).await.unwrap();
        assert!(served.unwrap().is_ok());
        let refused = streams.send_request(request(http::Method::GET, "http://app/"), true);
        assert!(
            refused.is_err() || refused.unwrap().0.await.is_err(),
            "no new stream after the GOAWAY"
        );
    }

    #[tokio::test]
    async fn a_peer_silent_after_connecting_is_dropped() {
        let (_trigger, drain) = lifecycle::channel();
        let (_client, server) = tokio::io::duplex(1024);
        let settings = Settings {
            max_streams: 1,
            handshake_timeout: Duration::from_millis(50),
            ..Settings::new(&Limits::default())
        };
        let span = Span::none();
        let served = serve(server, settings, &drain, &span, |_request| async {
            Reply::Response(Response::new(crate::http::empty()))
        });
        let outcome = tokio::time::timeout(TEST_TIMEOUT, served).await.unwrap();
        assert!(matches!(outcome, Err(ServeError::HandshakeTimeout)));
    }
}
