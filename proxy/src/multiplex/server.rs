//! Multiplexed HTTP/2 server connections — from peer proxies, and from plaintext HTTP/2
//! callers on a permissive port — served on `h2` directly.
//!
//! hyper's HTTP/2 server runs every stream through its own service wrapper and hands
//! tunnels (`CONNECT`) out through its upgrade machinery, after which a copy loop moves
//! every byte through a zeroed buffer on each side. Here each stream's task answers the
//! stream itself: a response body goes into the stream as it arrives, and a tunnel moves
//! bytes between the application's socket and the stream without an intermediate copy.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
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
                tokio::spawn(Box::pin(answer(handle(request), respond)));
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

/// Runs a stream's handler, unless the peer resets the stream first (its caller gave
/// up: the application's work for it is dropped), and sends what it replies.
async fn answer<F>(reply: F, mut respond: SendResponse<Bytes>)
where
    F: Future<Output = Reply>,
{
    let reply = tokio::select! {
        reply = reply => reply,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    match reply {
        Reply::Response(response) => send(respond, response).await,
        Reply::Tunnel { recv, relay } => match respond.send_response(Response::new(()), false) {
            Ok(send) => relay(Tunnel { send, recv }).await,
            Err(error) => debug!(event = "tunnel not opened", error = %error),
        },
    }
}

/// Sends the response head, then its body as the peer's window allows.
async fn send(mut respond: SendResponse<Bytes>, response: Response<Body>) {
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
    let stream = match respond.send_response(Response::from_parts(head, ()), end_of_stream) {
        Ok(stream) => stream,
        Err(error) => {
            // A head HTTP/2 cannot carry (a connection-specific field) leaves the stream
            // open: the peer gets a bad gateway instead. On a stream already gone this
            // fails too, harmlessly.
            debug!(event = "response not sent", error = %error);
            let mut refusal = Response::new(());
            *refusal.status_mut() = StatusCode::BAD_GATEWAY;
            let _ = respond.send_response(refusal, true);
            return;
        }
    };
    if end_of_stream {
        return;
    }
    if let Err(error) = (BodyPump { body, stream }).await {
        debug!(event = "response body not sent", error = %error);
    }
}

/// Whether a response with this status has a body (RFC 9110 §6.4.1).
fn carries_content(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}
