//! Multiplexed HTTP/2 client connections — to a peer proxy, or to the local application.
//!
//! hyper's HTTP/2 client hands every request through a channel to the connection's task,
//! which spawns a task per request to wait for the response (and another to stream the
//! request body). Here the request's own task opens the stream, streams a body that is
//! ready at once (a gRPC message) and waits for the response itself; only a body still
//! streaming when the response arrives gets a task of its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Ping, PingPong, Reason, RecvStream};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::stall::{Reader, Responses};
use super::{BodyPump, PumpError, StreamBody, Tunnel};
use crate::http::{BoxError, BoxFuture, ProxyError};
use crate::limits::{CONNECTION_WINDOW, MAX_HEADER_BYTES, STREAM_WINDOW};
use crate::tcp::Io;

/// An idle connection is pinged this often; one that does not answer within as long is
/// closed, so a vanished peer is noticed before a request waits on it.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Opens a stream on one HTTP/2 connection; [`SharedH2::sender`] hands it out ready,
/// holding the stream's place on its connection.
pub(crate) struct Sender {
    streams: SendRequest<Bytes>,
    lease: Option<Lease>,
}

impl Sender {
    /// Opens the request's stream and sends its head; the exchange then streams the body
    /// and resolves to the response head. Synchronous up to the wait, so a caller's future
    /// keeps only the small exchange across it, not the request.
    pub(crate) fn send<B>(self, request: Request<B>) -> Result<Exchange<B>, h2::Error>
    where
        B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        let Sender { mut streams, lease } = self;
        let (response, stream) =
            streams.send_request(Request::from_parts(parts, ()), end_of_stream)?;
        Ok(Exchange {
            response,
            body: (!end_of_stream).then(|| BodyPump::new(body, stream)),
            caller_failed: None,
            lease,
        })
    }

    /// Opens a `CONNECT` stream to `authority`. The tunnel when the peer answers 200,
    /// its status otherwise.
    pub(crate) async fn connect(
        self,
        authority: http::uri::Authority,
    ) -> Result<Tunnel, ConnectError> {
        let mut request = Request::new(());
        *request.method_mut() = http::Method::CONNECT;
        *request.uri_mut() = http::Uri::from(authority);
        let Sender { mut streams, lease } = self;
        let (response, send) = streams.send_request(request, false)?;
        let response = response.await?;
        if response.status() != StatusCode::OK {
            return Err(ConnectError::Refused(response.status()));
        }
        Ok(Tunnel {
            send,
            recv: response.into_body(),
            _lease: lease,
        })
    }
}

/// Why a tunnel did not open.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The stream failed (connection closed, stream reset).
    Stream(h2::Error),
    /// The peer answered with this status instead of 200.
    Refused(StatusCode),
}

impl From<h2::Error> for ConnectError {
    fn from(error: h2::Error) -> Self {
        ConnectError::Stream(error)
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Stream(error) => error.fmt(f),
            ConnectError::Refused(status) => write!(f, "answered {status}"),
        }
    }
}

/// One request's exchange: waits for the response head while streaming the request
/// body. A body still streaming when the response arrives (a stream both ways) finishes
/// in a task of its own.
pub(crate) struct Exchange<B> {
    response: ResponseFuture,
    body: Option<BodyPump<B>>,
    /// Set when the caller's own body failed (malformed, too slow, or the caller hung
    /// up): the stream was reset for the caller's sake, not the peer's.
    caller_failed: Option<ProxyError>,
    /// Handed to the response body: the stream holds its place until that ends.
    lease: Option<Lease>,
}

/// Why an exchange ended without a response.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// The stream or its connection failed: the peer's side.
    Stream(h2::Error),
    /// The caller's request body failed (a protocol error, too slow, or the caller hung
    /// up mid-body); the stream was reset because of it. Never the peer's fault. Holds
    /// the caller's answer.
    CallerBody(ProxyError),
}

impl ExchangeError {
    /// Whether the peer never processed the request, so sending it again (on another
    /// connection) is safe: a stream above a GOAWAY's last stream id, or refused with
    /// REFUSED_STREAM (RFC 9113 §8.7).
    #[cfg(test)]
    pub(crate) fn unprocessed(&self) -> bool {
        matches!(self, ExchangeError::Stream(error) if unprocessed(error))
    }
}

/// The answer when a stream to the peer failed: refused unprocessed, or reset.
pub(crate) fn failure(error: &h2::Error) -> ProxyError {
    if unprocessed(error) {
        ProxyError::Unprocessed
    } else {
        ProxyError::Reset
    }
}

/// See [`ExchangeError::unprocessed`]. h2 reports the GOAWAY's reason, flagged as the
/// peer's, only to streams above its last stream id (and to streams opened after it);
/// those at or below it end with the connection's own error.
pub(crate) fn unprocessed(error: &h2::Error) -> bool {
    error.is_remote() && (error.is_go_away() || error.reason() == Some(Reason::REFUSED_STREAM))
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Stream(error) => error.fmt(f),
            ExchangeError::CallerBody(error) => {
                write!(f, "the caller's request body failed: {}", error.reason())
            }
        }
    }
}

impl<B> Future for Exchange<B>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<StreamBody>, ExchangeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(body) = &mut self.body
            && let Poll::Ready(sent) = Pin::new(body).poll(cx)
        {
            self.body = None;
            if let Err(error) = sent {
                debug!(event = "request body not sent", error = %error);
                if let PumpError::Body(error) = &error {
                    self.caller_failed = Some(crate::limits::body_rate::answer(error.as_ref()));
                }
            }
        }
        let response = match ready!(Pin::new(&mut self.response).poll(cx)) {
            Ok(response) => Ok(response),
            Err(error) => match self.caller_failed {
                Some(answer) => Err(ExchangeError::CallerBody(answer)),
                None => Err(ExchangeError::Stream(error)),
            },
        };
        // A failed stream takes the rest of the body with it.
        if let Some(body) = self.body.take()
            && response.is_ok()
        {
            tokio::spawn(async move {
                if let Err(error) = body.await {
                    debug!(event = "request body not sent", error = %error);
                }
            });
        }
        let lease = self.lease.take();
        Poll::Ready(response.map(|response| StreamBody::attach(response, lease)))
    }
}

/// Most connections to one peer. Each carries as many streams as the peer allows
/// (`maxConcurrentStreamsPerPeerConnection` between proxies); past them all, a stream
/// waits in h2 on the least busy one.
const MAX_CONNECTIONS_PER_PEER: usize = 16;

/// Whether a stream may have a connection opened for it when the open ones are full.
#[derive(Clone, Copy)]
enum Spread {
    /// Requests: they wait on the least busy connection.
    One,
    /// Tunnels: up to [`MAX_CONNECTIONS_PER_PEER`].
    Many,
}

/// One connection of a [`SharedH2`]: its sender, whether its task has ended, how many
/// streams it carries, and their responses, watched for stalls.
struct Open {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    streams: AtomicUsize,
    responses: Arc<Responses>,
}

impl Open {
    fn has_room(&self) -> bool {
        self.streams.load(Ordering::Relaxed) < self.sender.current_max_send_streams()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A stream's place on its connection, given back when the stream is done with (its
/// response body or tunnel dropped).
pub(crate) struct Lease(Arc<Open>);

impl Lease {
    fn take(open: &Arc<Open>) -> Self {
        open.streams.fetch_add(1, Ordering::Relaxed);
        Lease(open.clone())
    }

    /// The stream's response, read through its connection's stall watch.
    pub(crate) fn watch(&self, response: RecvStream) -> Reader {
        self.0.responses.watch(response)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The multiplexed HTTP/2 client connections to one peer (a remote proxy, or the local
/// application), shared by every request to it: one while the peer's stream limit
/// holds them all, more (up to [`MAX_CONNECTIONS_PER_PEER`]) when it does not, so
/// long-lived tunnels never queue behind a full connection, and a GOAWAY ends only
/// one connection's streams. Established on first use and again after a close.
/// Requests only load a pointer and count a stream; the mutex is held only while
/// connecting.
pub(crate) struct SharedH2 {
    connections: arc_swap::ArcSwap<Vec<Arc<Open>>>,
    /// Whether the peer on the newest connection takes tunnelled TCP connections.
    tunnels: AtomicBool,
    connecting: tokio::sync::Mutex<()>,
    /// The answer when even a fresh connection will not take a request.
    unavailable: ProxyError,
}

impl SharedH2 {
    pub(crate) fn new(unavailable: ProxyError) -> Self {
        Self {
            connections: arc_swap::ArcSwap::from_pointee(Vec::new()),
            tunnels: AtomicBool::new(false),
            connecting: tokio::sync::Mutex::new(()),
            unavailable,
        }
    }

    /// A ready sender on a connection with room for a stream, or on a new one over the
    /// stream `connect` makes (with whether its peer takes tunnels). `peer` names the
    /// other end in logs. A connection that closed under us (the peer restarted, went
    /// away) is replaced once, before any byte of the request was sent.
    pub(crate) async fn sender<S, F, Fut>(
        &self,
        peer: &str,
        connect: F,
    ) -> Result<Sender, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn() -> Fut + Send + Sync,
        Fut: Future<Output = Result<(S, bool), ProxyError>> + Send,
    {
        self.sender_for(peer, connect, Spread::One).await
    }

    /// Like [`SharedH2::sender`], for a tunnel: a stream that may stay open for hours,
    /// so past the peer's stream limit it gets another connection instead of waiting
    /// behind the full ones. Requests do not: a caller holding a peer's streams must not
    /// get more of the peer's application by opening connections (the hostile suite's
    /// zero-window attack starved a well-behaved caller that way).
    pub(crate) async fn tunnel_sender<S, F, Fut>(
        &self,
        peer: &str,
        connect: F,
    ) -> Result<Sender, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn() -> Fut + Send + Sync,
        Fut: Future<Output = Result<(S, bool), ProxyError>> + Send,
    {
        self.sender_for(peer, connect, Spread::Many).await
    }

    async fn sender_for<S, F, Fut>(
        &self,
        peer: &str,
        connect: F,
        spread: Spread,
    ) -> Result<Sender, ProxyError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn() -> Fut + Send + Sync,
        Fut: Future<Output = Result<(S, bool), ProxyError>> + Send,
    {
        for _ in 0..2 {
            let open = match self.with_room(spread) {
                Some(open) => open,
                // Boxed: connecting (TCP, TLS handshake, HTTP/2 handshake) is a large
                // future that every request's future would otherwise carry, and copy,
                // for a path rarely taken.
                None => self.connect_another(peer, &connect, spread).await?,
            };
            let lease = Lease::take(&open);
            if let Ok(streams) = open.sender.clone().ready().await {
                return Ok(Sender {
                    streams,
                    lease: Some(lease),
                });
            }
            self.forget(&open);
        }
        Err(self.unavailable)
    }

    /// The first open connection with room for a stream; when all are full and no more
    /// may be opened for `spread`, the least busy. `None`: open another.
    fn with_room(&self, spread: Spread) -> Option<Arc<Open>> {
        let connections = self.connections.load();
        let mut least: Option<&Arc<Open>> = None;
        let mut live = 0;
        for open in connections.iter().filter(|open| !open.is_closed()) {
            if open.has_room() {
                return Some(open.clone());
            }
            live += 1;
            let streams = open.streams.load(Ordering::Relaxed);
            if least.is_none_or(|least| streams < least.streams.load(Ordering::Relaxed)) {
                least = Some(open);
            }
        }
        let most = match spread {
            Spread::One => 1,
            Spread::Many => MAX_CONNECTIONS_PER_PEER,
        };
        least.filter(|_| live >= most).cloned()
    }

    /// Opens a new connection, unless another task just made room.
    fn connect_another<'a, S, F, Fut>(
        &'a self,
        peer: &'a str,
        connect: &'a F,
        spread: Spread,
    ) -> BoxFuture<'a, Result<Arc<Open>, ProxyError>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn() -> Fut + Send + Sync + 'a,
        Fut: Future<Output = Result<(S, bool), ProxyError>> + Send + 'a,
    {
        Box::pin(async move {
            let _connecting = self.connecting.lock().await;
            if let Some(open) = self.with_room(spread) {
                return Ok(open);
            }
            let (stream, tunnels) = connect().await?;
            let (sender, connection) = client_settings()
                // One IO type for every connection: h2's connection code is compiled
                // once, not once per transport (TLS to peers, TCP to the application).
                .handshake::<Box<dyn Io>, Bytes>(Box::new(stream))
                .await
                .map_err(|error| {
                    debug!(event = "HTTP/2 handshake failed", peer, error = %error);
                    ProxyError::Unreachable
                })?;
            let closed = Arc::new(AtomicBool::new(false));
            let responses = Arc::new(Responses::default());
            tokio::spawn(drive(
                connection,
                closed.clone(),
                responses.clone(),
                peer.to_string(),
            ));
            let open = Arc::new(Open {
                sender,
                closed,
                streams: AtomicUsize::new(0),
                responses,
            });
            self.tunnels.store(tunnels, Ordering::Release);
            let mut connections: Vec<Arc<Open>> = self
                .connections
                .load()
                .iter()
                .filter(|open| !open.is_closed())
                .cloned()
                .collect();
            connections.push(open.clone());
            if connections.len() > 1 {
                debug!(
                    event = "HTTP/2 connection added",
                    peer,
                    connections = connections.len()
                );
            }
            self.connections.store(Arc::new(connections));
            Ok(open)
        })
    }

    /// Whether the peer of the last connection opened takes tunnelled TCP connections.
    pub(crate) fn carries_tunnels(&self) -> bool {
        self.tunnels.load(Ordering::Acquire)
    }

    /// Forgets one connection that will not take streams.
    fn forget(&self, gone: &Arc<Open>) {
        self.connections.rcu(|connections| {
            connections
                .iter()
                .filter(|open| !Arc::ptr_eq(open, gone))
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Forgets every connection: the next request opens a new one.
    pub(crate) fn reset(&self) {
        self.connections.store(Arc::new(Vec::new()));
    }

    /// How many connections are open.
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.connections
            .load()
            .iter()
            .filter(|open| !open.is_closed())
            .count()
    }
}

/// How the proxy's HTTP/2 client connections are set up.
fn client_settings() -> h2::client::Builder {
    let mut settings = h2::client::Builder::new();
    settings
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Response heads as large as the request heads the proxy takes; h2's default
        // (16 MiB) would let one response pin that much.
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    settings
}

/// Runs a connection until it closes or stops answering pings, then marks it closed;
/// meanwhile sheds its stalled responses.
async fn drive(
    mut connection: h2::client::Connection<Box<dyn Io>, Bytes>,
    closed: Arc<AtomicBool>,
    responses: Arc<Responses>,
    peer: String,
) {
    let ping_pong = connection.ping_pong();
    let ended = tokio::select! {
        ended = &mut connection => ended.map_err(|error| error.to_string()),
        silent = keep_alive(ping_pong) => Err(silent.to_string()),
        never = responses.watch_stalls(&peer) => match never {},
    };
    closed.store(true, Ordering::Release);
    if let Err(error) = ended {
        debug!(event = "HTTP/2 connection closed", peer, error);
    }
}

/// Pings every [`KEEP_ALIVE`]; returns once a ping goes unanswered for as long.
/// Without pings (h2 gives them once only), never returns.
async fn keep_alive(ping_pong: Option<PingPong>) -> &'static str {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE).await;
        match tokio::time::timeout(KEEP_ALIVE, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "ping failed",
            Err(_) => return "peer stopped answering pings",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Body;
    use crate::http2::stall::STALL_CHECK;
    use h2::RecvStream;
    use http_body::Body as _;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client on one end of an in-memory pipe and h2's server on the other.
    async fn pair() -> (
        Sender,
        h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(h2::server::handshake(server));
        let (streams, connection) = client_settings().handshake(client).await.unwrap();
        tokio::spawn(connection);
        let sender = Sender {
            streams,
            lease: None,
        };
        (sender, server.await.unwrap().unwrap())
    }

    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// Everything a server receives on a stream, or the stream's error.
    async fn read_all(mut stream: RecvStream) -> Result<Bytes, h2::Error> {
        let mut received = Vec::new();
        while let Some(data) = stream.data().await {
            let data = data?;
            let _ = stream.flow_control().release_capacity(data.len());
            received.extend_from_slice(&data);
        }
        Ok(received.into())
    }

    /// The server's first stream; the connection goes on being served meanwhile.
    async fn first_stream(
        mut server: h2::server::Connection<tokio::io::DuplexStream, Bytes>,
    ) -> (Request<RecvStream>, h2::server::SendResponse<Bytes>) {
        let stream = server.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        stream
    }

    fn post(body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = "http://app/upload".parse().unwrap();
        request
    }

    #[tokio::test]
    async fn a_body_that_fails_resets_the_stream_instead_of_ending_it() {
        let (sender, server) = pair().await;
        let (body, fail) = crate::http::test_bodies::upload(b"first half");
        let body = crate::http::boxed(body);
        let sent = tokio::spawn(sender.send(post(body)).unwrap());
        let (request, _respond) = first_stream(server).await;
        let mut stream = request.into_body();
        let first = stream.data().await.unwrap().unwrap();
        assert_eq!(first, "first half");
        fail.send(()).unwrap();
        let received = read_all(stream).await;
        assert!(received.is_err(), "the server must not see a complete body");
        assert!(sent.await.unwrap().is_err(), "nor the caller a response");
    }

    /// A body of `left` chunks of 1 KiB, always ready, counting those taken from it.
    struct Chunks {
        left: usize,
        taken: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            self.taken
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![7u8; 1024])))))
        }
    }

    #[tokio::test]
    async fn the_peers_window_paces_how_fast_a_body_is_read() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(
            h2::server::Builder::new()
                .initial_window_size(1024)
                .handshake::<_, Bytes>(server),
        );
        let (streams, connection) = client_settings().handshake(client).await.unwrap();
        tokio::spawn(connection);
        let server = server.await.unwrap().unwrap();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = Chunks {
            left: 64,
            taken: taken.clone(),
        };
        let sent = tokio::spawn(
            Sender {
                streams,
                lease: None,
            }
            .send(post(crate::http::boxed(body)))
            .unwrap(),
        );
        let (request, mut respond) = first_stream(server).await;
        // The server reads nothing yet: one chunk fills the stream's window, and at most
        // one more may wait in h2 for it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let early = taken.load(std::sync::atomic::Ordering::Relaxed);
        assert!(early <= 2, "{early} chunks taken with a 1 KiB window");
        let upload = read_all(request.into_body()).await.unwrap();
        assert_eq!(
            upload.len(),
            64 * 1024,
            "the whole body arrives as the window opens"
        );
        respond.send_response(Response::new(()), true).unwrap();
        assert_eq!(sent.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn response_carries_data_trailers_and_length() {
        let (sender, server) = pair().await;
        let body = crate::http::boxed(http_body_util::Full::new(Bytes::from_static(b"ping")));
        let sent = tokio::spawn(sender.send(post(body)).unwrap());
        let (request, mut respond) = first_stream(server).await;
        let upload = read_all(request.into_body()).await.unwrap();
        assert_eq!(upload, "ping");
        let head = Response::builder()
            .header("content-length", "4")
            .body(())
            .unwrap();
        let mut stream = respond.send_response(head, false).unwrap();
        stream
            .send_data(Bytes::from_static(b"pong"), false)
            .unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        stream.send_trailers(trailers).unwrap();

        let response = sent.await.unwrap().unwrap();
        assert_eq!(response.body().size_hint().exact(), Some(4));
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap(), "pong");
        assert_eq!(
            body.size_hint().exact(),
            Some(0),
            "the hint is what remains"
        );
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert!(
            collected.to_bytes().is_empty(),
            "the data came in the first frame"
        );
    }

    #[tokio::test]
    async fn a_response_head_over_the_limit_fails_the_request() {
        let (sender, server) = pair().await;
        let mut request = Request::new(crate::http::empty());
        *request.uri_mut() = "http://app/".parse().unwrap();
        let sent = tokio::spawn(sender.send(request).unwrap());
        let (_request, mut respond) = first_stream(server).await;
        let huge = http::HeaderValue::from_str(&"x".repeat(MAX_HEADER_BYTES + 1)).unwrap();
        let head = Response::builder().header("x-huge", huge).body(()).unwrap();
        let _ = respond.send_response(head, true);
        let outcome = tokio::time::timeout(TEST_TIMEOUT, sent).await.unwrap();
        assert!(
            outcome.unwrap().is_err(),
            "an oversized head must not be accepted"
        );
    }

    #[tokio::test]
    async fn tunnel_carries_bytes_both_ways_and_half_closes() {
        let (sender, server) = pair().await;
        let authority = http::uri::Authority::from_static("10.0.0.1:8080");
        let opened = tokio::spawn(sender.connect(authority));
        let (request, mut respond) = first_stream(server).await;
        assert_eq!(request.method(), http::Method::CONNECT);
        assert_eq!(request.uri().authority().unwrap(), "10.0.0.1:8080");
        let mut to_client = respond.send_response(Response::new(()), false).unwrap();
        let tunnel = opened.await.unwrap().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut proxy_side, _) = listener.accept().await.unwrap();
        let relayed = tokio::spawn(async move { tunnel.relay(&mut proxy_side).await });

        app.write_all(b"hello").await.unwrap();
        app.shutdown().await.unwrap();
        let from_app = tokio::time::timeout(TEST_TIMEOUT, read_all(request.into_body()))
            .await
            .expect("the application's end of file reaches the peer")
            .unwrap();
        assert_eq!(from_app, "hello");

        to_client
            .send_data(Bytes::from_static(b"world"), true)
            .unwrap();
        let mut reply = Vec::new();
        let read = tokio::time::timeout(TEST_TIMEOUT, app.read_to_end(&mut reply)).await;
        read.expect("the peer's END_STREAM reaches the application")
            .unwrap();
        assert_eq!(reply, b"world");
        assert_eq!(relayed.await.unwrap().unwrap(), (5, 5));
    }

    #[tokio::test]
    async fn a_refused_tunnel_reports_the_status() {
        let (sender, server) = pair().await;
        let opened = tokio::spawn(sender.connect(http::uri::Authority::from_static("a:1")));
        let (_request, mut respond) = first_stream(server).await;
        let forbidden = Response::builder().status(403).body(()).unwrap();
        respond.send_response(forbidden, true).unwrap();
        match opened.await.unwrap() {
            Err(ConnectError::Refused(status)) => assert_eq!(status, StatusCode::FORBIDDEN),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced_once() {
        let shared = SharedH2::new(ProxyError::Unreachable);
        let connects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let connect = || {
            let connects = connects.clone();
            async move {
                connects.fetch_add(1, Ordering::SeqCst);
                let (client, server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let mut server = h2::server::handshake(server).await.unwrap();
                    // Serves one request, then closes the connection.
                    if let Some(Ok((_, mut respond))) = server.accept().await {
                        respond.send_response(Response::new(()), true).unwrap();
                    }
                    server.graceful_shutdown();
                    std::future::poll_fn(|cx| server.poll_closed(cx)).await.ok();
                });
                Ok((client, false))
            }
        };
        let get = || {
            let mut request = Request::new(crate::http::empty());
            *request.uri_mut() = "http://app/".parse().unwrap();
            request
        };
        let first = shared.sender("app", connect).await.unwrap();
        assert_eq!(
            first.send(get()).unwrap().await.unwrap().status(),
            StatusCode::OK
        );
        // The server goes away once the first request is served.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = shared.sender("app", connect).await.unwrap();
        assert_eq!(
            second.send(get()).unwrap().await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(connects.load(Ordering::SeqCst), 2);
    }

    /// The server side of a connection written frame by frame, for what h2's server
    /// does not do on request: the client's preface and SETTINGS read, an empty SETTINGS
    /// sent, then every frame up to the HEADERS of the client's first stream read.
    async fn raw_server_until_first_stream(io: &mut tokio::io::DuplexStream) {
        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await.unwrap();
        io.write_all(&frame(4, 0, 0, &[])).await.unwrap();
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; length];
            io.read_exact(&mut payload).await.unwrap();
            if head[3] == 1 {
                return; // HEADERS
            }
        }
    }

    /// One HTTP/2 frame: its type, flags, stream and payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }

    fn go_away(last_stream: u32, reason: Reason) -> Vec<u8> {
        let payload = [last_stream.to_be_bytes(), u32::from(reason).to_be_bytes()].concat();
        frame(7, 0, 0, &payload)
    }

    /// How the client's first request ends when the server, having read its HEADERS,
    /// writes `then` and closes the connection.
    async fn first_request_after(then: Vec<u8>) -> ExchangeError {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let serve = tokio::spawn(async move {
            raw_server_until_first_stream(&mut server).await;
            server.write_all(&then).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        let (streams, connection) = client_settings().handshake(client).await.unwrap();
        tokio::spawn(connection);
        let mut request = Request::new(crate::http::empty());
        *request.uri_mut() = "http://peer/".parse().unwrap();
        let sender = Sender {
            streams,
            lease: None,
        };
        let exchange = sender.send(request).unwrap();
        let ended = tokio::time::timeout(TEST_TIMEOUT, exchange).await.unwrap();
        serve.await.unwrap();
        ended.map(|_| ()).expect_err("no response was sent")
    }

    #[tokio::test]
    async fn only_streams_the_peer_never_processed_may_be_sent_again() {
        // Above the GOAWAY's last stream id (0): never processed.
        let above = first_request_after(go_away(0, Reason::ENHANCE_YOUR_CALM)).await;
        assert!(above.unprocessed(), "{above}");
        // At the last stream id, then the connection closed: perhaps processed.
        let at = first_request_after(go_away(1, Reason::ENHANCE_YOUR_CALM)).await;
        assert!(!at.unprocessed(), "{at}");
        // Refused (RFC 9113 §8.7).
        let refused = u32::from(Reason::REFUSED_STREAM).to_be_bytes();
        let refused = first_request_after(frame(3, 0, 1, &refused)).await;
        assert!(refused.unprocessed(), "{refused}");
        // Reset for another reason: the peer may have acted on it.
        let cancel = u32::from(Reason::CANCEL).to_be_bytes();
        let reset = first_request_after(frame(3, 0, 1, &cancel)).await;
        assert!(!reset.unprocessed(), "{reset}");
    }

    /// Connections made by a [`SharedH2`] test: each an h2 server allowing one stream
    /// at a time, answering a request only once told to.
    struct OneStreamPeers {
        connects: Arc<AtomicUsize>,
        answer: Arc<tokio::sync::Semaphore>,
    }

    impl OneStreamPeers {
        fn new() -> Self {
            Self {
                connects: Arc::new(AtomicUsize::new(0)),
                answer: Arc::new(tokio::sync::Semaphore::new(0)),
            }
        }

        fn connect(
            &self,
        ) -> impl Future<Output = Result<(tokio::io::DuplexStream, bool), ProxyError>> + Send + use<>
        {
            let connects = self.connects.clone();
            let answer = self.answer.clone();
            async move {
                connects.fetch_add(1, Ordering::SeqCst);
                let (client, server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let mut server = h2::server::Builder::new()
                        .max_concurrent_streams(1)
                        .handshake::<_, Bytes>(server)
                        .await
                        .unwrap();
                    while let Some(Ok((_, mut respond))) = server.accept().await {
                        let answer = answer.clone();
                        tokio::spawn(async move {
                            answer.acquire().await.unwrap().forget();
                            let _ = respond.send_response(Response::new(()), true);
                        });
                    }
                });
                Ok((client, true))
            }
        }
    }

    fn get() -> Request<crate::http::Body> {
        let mut request = Request::new(crate::http::empty());
        *request.uri_mut() = "http://peer/".parse().unwrap();
        request
    }

    #[tokio::test]
    async fn a_full_connection_gets_a_second_and_a_finished_stream_makes_room() {
        let shared = SharedH2::new(ProxyError::Unreachable);
        let peers = OneStreamPeers::new();
        // The first exchange waits for its answer, holding the first connection's one
        // stream (the peer's SETTINGS said 1 once the first request went out).
        let first = shared
            .tunnel_sender("peer", || peers.connect())
            .await
            .unwrap();
        let first = tokio::spawn(first.send(get()).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = shared
            .tunnel_sender("peer", || peers.connect())
            .await
            .unwrap();
        let second = tokio::spawn(second.send(get()).unwrap());
        assert_eq!(peers.connects.load(Ordering::SeqCst), 2);
        assert_eq!(shared.connections(), 2);
        peers.answer.add_permits(2);
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        // The second's response body still holds its stream's place ...
        let second = second.await.unwrap().unwrap();
        drop(first);
        // ... the first's is done with: its connection takes the next stream.
        let third = shared
            .tunnel_sender("peer", || peers.connect())
            .await
            .unwrap();
        let third = tokio::spawn(third.send(get()).unwrap());
        peers.answer.add_permits(1);
        assert_eq!(third.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(peers.connects.load(Ordering::SeqCst), 2);
        drop(second);
    }

    #[tokio::test]
    async fn past_the_most_connections_a_stream_waits_on_the_least_busy() {
        let shared = SharedH2::new(ProxyError::Unreachable);
        let peers = OneStreamPeers::new();
        let mut waiting = Vec::new();
        for _ in 0..MAX_CONNECTIONS_PER_PEER + 3 {
            let sender = shared
                .tunnel_sender("peer", || peers.connect())
                .await
                .unwrap();
            waiting.push(tokio::spawn(sender.send(get()).unwrap()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            peers.connects.load(Ordering::SeqCst),
            MAX_CONNECTIONS_PER_PEER
        );
        peers.answer.add_permits(waiting.len());
        for exchange in waiting {
            let response = tokio::time::timeout(TEST_TIMEOUT, exchange).await.unwrap();
            assert_eq!(response.unwrap().unwrap().status(), StatusCode::OK);
        }
    }

    /// A peer answering `GET /N` with N bytes, as fast as its windows allow.
    async fn download_peer() -> Result<(tokio::io::DuplexStream, bool), ProxyError> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server).await.unwrap();
            while let Some(Ok((request, respond))) = server.accept().await {
                let size = request.uri().path()[1..].parse().unwrap();
                tokio::spawn(send_bytes(respond, size));
            }
        });
        Ok((client, false))
    }

    async fn send_bytes(mut respond: h2::server::SendResponse<Bytes>, mut size: usize) {
        let mut stream = respond.send_response(Response::new(()), false).unwrap();
        while size > 0 {
            stream.reserve_capacity(size.min(16 * 1024));
            let Some(Ok(room)) = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await else {
                return;
            };
            let chunk = room.min(size);
            size -= chunk;
            if stream
                .send_data(Bytes::from(vec![7; chunk]), size == 0)
                .is_err()
            {
                return;
            }
        }
    }

    async fn download(shared: &SharedH2, size: usize) -> Response<StreamBody> {
        let sender = shared.sender("peer", download_peer).await.unwrap();
        let mut request = get();
        *request.uri_mut() = format!("http://peer/{size}").parse().unwrap();
        sender.send(request).unwrap().await.unwrap()
    }

    /// Responses nobody reads, each holding a full stream window of the connection's.
    async fn stalled(shared: &SharedH2, count: usize) -> Vec<Response<StreamBody>> {
        let mut stalled = Vec::new();
        for _ in 0..count {
            stalled.push(download(shared, 4 * STREAM_WINDOW as usize).await);
        }
        stalled
    }

    async fn length(response: Response<StreamBody>) -> Result<usize, h2::Error> {
        Ok(response.into_body().collect().await?.to_bytes().len())
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_responses_holding_the_connection_window_are_shed() {
        let shared = SharedH2::new(ProxyError::Unreachable);
        // Four unread responses hold the whole connection window: the next response's
        // data cannot come until they are shed, two checks later.
        let stalled = stalled(&shared, 4).await;
        let next = download(&shared, 1000).await;
        let read = tokio::time::timeout(3 * STALL_CHECK, length(next)).await;
        assert_eq!(read.expect("still waiting").unwrap(), 1000);
        for response in stalled {
            let error = length(response).await.unwrap_err();
            assert_eq!(error.reason(), Some(Reason::CANCEL), "{error}");
        }
        assert_eq!(shared.connections(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_stalled_response_is_left_to_its_reader() {
        let shared = SharedH2::new(ProxyError::Unreachable);
        let mut stalled = stalled(&shared, 1).await;
        tokio::time::sleep(10 * STALL_CHECK).await;
        let response = stalled.pop().unwrap();
        assert_eq!(length(response).await.unwrap(), 4 * STREAM_WINDOW as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_readers_that_keep_reading_are_not_shed() {
        let shared = SharedH2::new(ProxyError::Unreachable);
        let mut readers = Vec::new();
        for response in stalled(&shared, 4).await {
            readers.push(tokio::spawn(async move {
                let mut body = response.into_body();
                let mut read = 0;
                while let Some(frame) = body.frame().await {
                    read += frame?.into_data().map_or(0, |data| data.len());
                    tokio::time::sleep(STALL_CHECK / 2).await;
                }
                Ok::<_, h2::Error>(read)
            }));
        }
        for reader in readers {
            assert_eq!(reader.await.unwrap().unwrap(), 4 * STREAM_WINDOW as usize);
        }
    }
}
