//! Multiplexed HTTP/2 server connections — from peer proxies, and from plaintext HTTP/2
//! callers on a permissive port — served on `h2` directly.
//!
//! hyper's HTTP/2 server runs every stream through its own service wrapper and hands
//! tunnels (`CONNECT`) out through its upgrade machinery, after which a copy loop moves
//! every byte through a zeroed buffer on each side. Here each stream's task answers the
//! stream itself: a response body goes into the stream as it arrives, and a tunnel moves
//! bytes between the application's socket and the stream without an intermediate copy.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{BodyPump, Tunnel};
use crate::http::{Body, BoxFuture, CONNECTION_WINDOW, STREAM_WINDOW};
use crate::lifecycle::Drain;
use crate::outbound::MAX_HEADER_BYTES;

/// What a stream's handler answers.
pub enum Reply {
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
pub struct Settings {
    /// Streams open at once (requests and tunnels alike).
    pub max_streams: u32,
    /// How long the peer may take to send its connection preface.
    pub handshake_timeout: Duration,
}

/// Why a connection ended early.
#[derive(Debug)]
pub enum ServeError {
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
/// its own running `handle`; a stream the peer resets stops its handler.
pub async fn serve<T, H, F>(
    io: T,
    settings: Settings,
    drain: &Drain,
    handle: H,
) -> Result<(), ServeError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<RecvStream>) -> F,
    F: Future<Output = Reply> + Send + 'static,
{
    let handshake = server_settings(settings.max_streams).handshake::<T, Bytes>(io);
    let mut connection = tokio::time::timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout)?
        .map_err(ServeError::Connection)?;
    // Created once: every stream accepted would otherwise set up a new wait.
    let signaled = drain.signaled();
    tokio::pin!(signaled);
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = connection.accept() => accepted,
            () = &mut signaled, if !draining => {
                connection.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            Some(Ok((request, respond))) => {
                // Boxed: tokio copies a task's future into place at spawn.
                tokio::spawn(Box::pin(Answer::new(handle(request), respond)));
            }
            Some(Err(error)) if is_clean_close(&error) => return Ok(()),
            Some(Err(error)) => return Err(ServeError::Connection(error)),
            None => return Ok(()),
        }
    }
}

/// How the proxy's HTTP/2 server connections are set up.
fn server_settings(max_streams: u32) -> h2::server::Builder {
    let mut settings = h2::server::Builder::new();
    settings
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    settings
}

/// A peer that went away between requests, or said goodbye, ended nothing early.
fn is_clean_close(error: &h2::Error) -> bool {
    error.is_go_away() && error.reason() == Some(h2::Reason::NO_ERROR)
        || error
            .get_io()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
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
        },
        /// The response body streams into the stream as the peer's window allows.
        Sending { pump: BodyPump<Body> },
        /// The stream carries a tunnel.
        Relaying { relay: BoxFuture<'static, ()> },
        Done,
    }
}

impl<F> Answer<F> {
    fn new(reply: F, respond: SendResponse<Bytes>) -> Self {
        Answer::Waiting {
            reply,
            respond: Some(respond),
        }
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Reply>,
{
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let next = match self.as_mut().project() {
                AnswerProjection::Waiting { reply, respond } => {
                    let Some(sender) = respond else {
                        return Poll::Ready(());
                    };
                    match reply.poll(cx) {
                        Poll::Ready(reply) => match respond.take() {
                            Some(respond) => start_reply(respond, reply),
                            None => Answer::Done,
                        },
                        Poll::Pending if sender.poll_reset(cx).is_ready() => Answer::Done,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                AnswerProjection::Sending { pump } => {
                    if let Err(error) = ready!(Pin::new(pump).poll(cx)) {
                        debug!(event = "response body not sent", error = %error);
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
fn start_reply<F>(mut respond: SendResponse<Bytes>, reply: Reply) -> Answer<F> {
    match reply {
        Reply::Response(response) => match send_head(respond, response) {
            Some(pump) => Answer::Sending { pump },
            None => Answer::Done,
        },
        Reply::Tunnel { recv, relay } => match respond.send_response(Response::new(()), false) {
            Ok(send) => Answer::Relaying {
                relay: relay(Tunnel { send, recv }),
            },
            Err(error) => {
                debug!(event = "tunnel not opened", error = %error);
                Answer::Done
            }
        },
    }
}

/// Sends the response head; its body, if any, to pump into the stream.
fn send_head(mut respond: SendResponse<Bytes>, response: Response<Body>) -> Option<BodyPump<Body>> {
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
            debug!(event = "response not sent", error = %error);
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
        let (client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(async move { serve(server, settings(), &drain, handle).await });
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
        };
        let served = serve(server, settings, &drain, |_request| async {
            Reply::Response(Response::new(crate::http::empty()))
        });
        let outcome = tokio::time::timeout(TEST_TIMEOUT, served).await.unwrap();
        assert!(matches!(outcome, Err(ServeError::HandshakeTimeout)));
    }
}
