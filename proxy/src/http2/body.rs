//! Bodies on HTTP/2 streams: a request body pumped into a stream as the peer's window
//! allows, and a body arriving on a stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Frame, SizeHint};

use super::client::Lease;
use super::server;
use super::stall::Reader;
use crate::http::BoxError;

/// Why a body stopped short.
#[derive(Debug)]
pub(crate) enum PumpError {
    /// The body being sent failed (its sender's fault).
    Body(BoxError),
    /// The stream failed or was reset (the receiver's side).
    Stream(BoxError),
}

impl std::fmt::Display for PumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PumpError::Body(error) => write!(f, "body: {error}"),
            PumpError::Stream(error) => write!(f, "stream: {error}"),
        }
    }
}

impl From<h2::Error> for PumpError {
    fn from(error: h2::Error) -> Self {
        PumpError::Stream(error.into())
    }
}

/// Streams a request body into its HTTP/2 stream as the peer's window allows; a body
/// that fails resets the stream, so the peer never takes a truncated body as whole.
pub(crate) struct BodyPump<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// Told of every chunk sent, when a server stream's timeouts watch it.
    progress: Option<Arc<server::Progress>>,
    /// Whether a chunk went out already. The first is taken without asking for window
    /// (h2 holds it until the window opens: at most one chunk ahead); each later one
    /// waits for room first. Spares a small body three stream-state round trips.
    started: bool,
}

impl<B> BodyPump<B> {
    pub(crate) fn new(body: B, stream: SendStream<Bytes>) -> Self {
        BodyPump {
            body,
            stream,
            progress: None,
            started: false,
        }
    }

    /// The pump, reporting each chunk it sends to `progress`.
    pub(crate) fn with_progress(mut self, progress: Option<Arc<server::Progress>>) -> Self {
        self.progress = progress;
        self
    }

    /// Ends the stream with `reason` instead of the body's end.
    pub(crate) fn reset(&mut self, reason: Reason) {
        self.stream.send_reset(reason);
    }
}

impl<B> Future for BodyPump<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), PumpError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let pump = &mut *self;
        loop {
            if pump.started {
                // Room for at least a byte before taking the next chunk: the peer's
                // window paces how fast the body is read.
                pump.stream.reserve_capacity(1);
                while pump.stream.capacity() == 0 {
                    match ready!(pump.stream.poll_capacity(cx)) {
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return Poll::Ready(Err(error.into())),
                        None => return Poll::Ready(Err(PumpError::Stream("stream closed".into()))),
                    }
                }
            }
            let frame = match Pin::new(&mut pump.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(error))) => {
                    pump.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(Err(PumpError::Body(error.into())));
                }
                Poll::Ready(None) => {
                    pump.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
                // Waiting for the body: a reset from the peer must still end the pump
                // (a chunk sent to a reset stream fails by itself).
                Poll::Pending => {
                    if let Poll::Ready(reason) = pump.stream.poll_reset(cx) {
                        let reason = reason?;
                        let reset = format!("peer reset the stream: {reason}");
                        return Poll::Ready(Err(PumpError::Stream(reset.into())));
                    }
                    return Poll::Pending;
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let end_of_stream = pump.body.is_end_stream();
                    pump.stream.send_data(data, end_of_stream)?;
                    if let Some(progress) = &pump.progress {
                        progress.moved();
                    }
                    if end_of_stream {
                        return Poll::Ready(Ok(()));
                    }
                    pump.started = true;
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        pump.stream.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

/// A body arriving on an HTTP/2 stream (a response to the client, a request to the
/// server). What is read is handed back to the peer's flow-control window at once: the
/// proxy passes bytes on, it does not keep them.
pub struct StreamBody {
    source: Source,
    /// A server stream's progress, told of every chunk and of the end.
    progress: Option<Arc<server::Progress>>,
    data_done: bool,
    /// What `content-length` says is still to come, so an HTTP/1.1 caller gets a
    /// length instead of chunks.
    remaining: Option<u64>,
}

/// Where a body's bytes come from.
enum Source {
    /// A request's stream, on the caller's own connection.
    Own(RecvStream),
    /// A response's stream on a pooled client connection: its place there is held until
    /// the body is done with, and a stalled response may be shed ([`super::stall`]).
    Pooled { reader: Reader, _lease: Lease },
}

impl Source {
    /// Runs `read` on the stream; `None` once the response was shed.
    fn with<R>(&mut self, read: impl FnOnce(&mut RecvStream) -> R) -> Option<R> {
        match self {
            Source::Own(stream) => Some(read(stream)),
            Source::Pooled { reader, .. } => reader.with(read),
        }
    }

    /// Whether the stream ended; a shed one has an error still to give.
    fn is_end_stream(&self) -> bool {
        match self {
            Source::Own(stream) => stream.is_end_stream(),
            Source::Pooled { reader, .. } => reader
                .with(|stream| stream.is_end_stream())
                .unwrap_or(false),
        }
    }

    fn took(&self, bytes: usize) {
        if let Source::Pooled { reader, .. } = self {
            reader.took(bytes);
        }
    }
}

/// What the reader of a shed response gets: the proxy reset the stream.
fn shed() -> h2::Error {
    h2::Error::from(Reason::CANCEL)
}

impl StreamBody {
    /// The response with its body.
    pub(crate) fn attach(
        response: Response<RecvStream>,
        lease: Option<Lease>,
    ) -> Response<StreamBody> {
        let (head, stream) = response.into_parts();
        let source = match lease {
            Some(lease) => Source::Pooled {
                reader: lease.watch(stream),
                _lease: lease,
            },
            None => Source::Own(stream),
        };
        let body = Self::new(source, &head.headers);
        Response::from_parts(head, body)
    }

    /// The request with its body.
    pub fn request(request: Request<RecvStream>) -> Request<StreamBody> {
        let (head, stream) = request.into_parts();
        let mut body = Self::new(Source::Own(stream), &head.headers);
        body.progress = head.extensions.get::<Arc<server::Progress>>().cloned();
        Request::from_parts(head, body)
    }

    /// The length comes from `content-length` when the message has one.
    fn new(source: Source, headers: &http::HeaderMap) -> Self {
        let length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok());
        StreamBody {
            source,
            progress: None,
            data_done: false,
            remaining: length,
        }
    }
}

impl StreamBody {
    fn end_progress(&self) {
        if let Some(progress) = &self.progress {
            progress.body_ended();
        }
    }
}

/// The next chunk of a stream's data, its capacity handed back to the peer at once.
fn poll_released(
    stream: &mut RecvStream,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, h2::Error>>> {
    let polled = ready!(stream.poll_data(cx));
    if let Some(Ok(data)) = &polled {
        let _ = stream.flow_control().release_capacity(data.len());
    }
    Poll::Ready(polled)
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            let Some(polled) = self.source.with(|stream| poll_released(stream, cx)) else {
                self.end_progress();
                return Poll::Ready(Some(Err(shed())));
            };
            let Poll::Ready(polled) = polled else {
                // Waiting on the caller: a slow body is now the caller's doing.
                if let Some(progress) = &self.progress {
                    progress.awaiting_body();
                }
                return Poll::Pending;
            };
            match polled {
                Some(Ok(data)) => {
                    self.source.took(data.len());
                    if let Some(remaining) = &mut self.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    if let Some(progress) = &self.progress {
                        progress.received(data.len());
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => {
                    self.end_progress();
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    self.data_done = true;
                    self.end_progress();
                }
            }
        }
        let Some(trailers) = self.source.with(|stream| stream.poll_trailers(cx)) else {
            return Poll::Ready(Some(Err(shed())));
        };
        match ready!(trailers) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.source.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None if self.is_end_stream() => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}
