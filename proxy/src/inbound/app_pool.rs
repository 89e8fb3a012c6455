//! HTTP/1.1 connections to the local application, kept open and reused.
//!
//! hyper-util's pooled client serves any number of hosts: a checkout future racing a
//! connect, a keyed map behind a lock and a task per request to notice when the
//! connection is free again. The proxy talks to one address, so a stack of idle
//! connections is enough. A connection goes back on the stack once its response body
//! has been read to the end; one whose body was abandoned is closed by hyper (HTTP/1.1
//! cannot cancel a single response) and simply dropped here.
//!
//! Connections are capped (`limits.maxAppConnections`): every descriptor the pool opens
//! is one the process cannot use to accept, so callers that never read their responses
//! must not be able to open one each without end. At the cap a request waits briefly for
//! a connection to come free, then is answered 503 (`proxy-overloaded`); a caller's
//! share is already bounded by its streams per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{Span, debug, warn};

use crate::config::Limits;
use crate::http::{BoxError, ProxyError};
use crate::tcp;

/// How long a request waits for a connection when the pool is at its cap.
pub const APP_CONNECTION_WAIT: Duration = Duration::from_secs(1);

/// A connection unused this long is closed (hyper-util's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often idle connections are looked over.
const EVICT_EVERY: Duration = Duration::from_secs(30);

/// Idle HTTP/1.1 connections to one address, for requests with bodies of type `B`.
pub struct Http1Pool<B> {
    address: SocketAddr,
    connect_timeout: Duration,
    /// Largest response head, and read chunk, per connection.
    max_read_buffer: usize,
    /// Most recently used last: reused first, so the oldest idle out.
    idle: Mutex<Vec<Idle<B>>>,
    /// One per open connection, held until it closes.
    permits: Arc<Semaphore>,
    /// Signaled when a connection comes back idle or closes.
    freed: Arc<Notify>,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

impl<B> Http1Pool<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    pub fn new(address: SocketAddr, limits: &Limits, max_read_buffer: usize) -> Arc<Self> {
        let pool = Arc::new(Self {
            address,
            connect_timeout: limits.connect_timeout,
            max_read_buffer,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(limits.max_app_connections)),
            freed: Arc::new(Notify::new()),
        });
        tokio::spawn(evict_idle(Arc::downgrade(&pool)));
        pool
    }

    /// Sends a request (its URI in origin form, with a `Host` header) on an idle
    /// connection, or a new one. A request that an idle connection could not take
    /// because it had closed meanwhile goes on the next one.
    ///
    /// Not an `async fn`: an async block keeps the request once, where an `async fn`
    /// keeps its arguments twice (as passed, and as bound).
    #[allow(clippy::manual_async_fn)] // see above: the future's size is the point
    pub fn send(
        self: &Arc<Self>,
        mut request: Request<B>,
    ) -> impl Future<Output = Result<Response<PooledBody<B>>, SendError>> + Send + '_ {
        async move {
            loop {
                let (mut sender, reused) = match self.checkout() {
                    Some(sender) => (sender, true),
                    // Boxed: connecting is a large future, and rare.
                    None => Box::pin(self.connection()).await?,
                };
                if sender.ready().await.is_err() {
                    if reused {
                        continue;
                    }
                    return Err(SendError::Closed);
                }
                match sender.try_send_request(request).await {
                    Ok(response) => {
                        let pool = Some((Arc::clone(self), sender));
                        return Ok(response.map(|body| PooledBody::new(body, pool)));
                    }
                    Err(mut error) => match error.take_message() {
                        // Never written: the connection closed before it could be.
                        Some(unsent) if reused => request = unsent,
                        _ => return Err(SendError::Request(error.into_error())),
                    },
                }
            }
        }
    }

    /// The most recently used connection that can take a request now. One whose response
    /// has ended may still be sending its request's body (an application can answer
    /// before reading an upload): it stays for later rather than hold this request up.
    fn checkout(&self) -> Option<SendRequest<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut index = idle.len();
        while index > 0 {
            index -= 1;
            let sender = &idle[index].sender;
            if sender.is_closed() {
                idle.remove(index);
            } else if sender.is_ready() {
                return Some(idle.remove(index).sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let entry = Idle {
            sender,
            since: Instant::now(),
        };
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
        self.freed.notify_waiters();
    }

    /// A new connection while under the cap; at the cap, the first idle connection or
    /// free slot within [`APP_CONNECTION_WAIT`], else [`SendError::Overloaded`]. Whether
    /// the connection was reused.
    async fn connection(&self) -> Result<(SendRequest<B>, bool), SendError> {
        let deadline = tokio::time::Instant::now() + APP_CONNECTION_WAIT;
        loop {
            // Registered before looking: a connection freed in between still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return Ok((self.connect(permit).await?, false));
            }
            if let Some(sender) = self.checkout() {
                return Ok((sender, true));
            }
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(deadline) => return Err(SendError::Overloaded),
            }
        }
    }

    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<SendRequest<B>, SendError> {
        let stream = tcp::connect(self.address, self.connect_timeout)
            .await
            .map_err(SendError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(self.max_read_buffer)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Request)?;
        let address = self.address;
        let freed = self.freed.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(event = "application connection closed", application = %address, error = %error);
            }
            drop(permit);
            freed.notify_waiters();
        });
        Ok(sender)
    }

    /// Closes connections idle for longer than [`IDLE_TIMEOUT`].
    fn evict(&self, now: Instant) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|entry| {
                !entry.sender.is_closed() && now.duration_since(entry.since) < IDLE_TIMEOUT
            });
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// Every [`EVICT_EVERY`], until the pool is gone.
async fn evict_idle<B>(pool: Weak<Http1Pool<B>>)
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut ticker = tokio::time::interval(EVICT_EVERY);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.evict(Instant::now());
    }
}

/// Why a request did not get a response.
#[derive(Debug)]
pub enum SendError {
    /// No connection to the application.
    Connect(std::io::Error),
    /// A new connection closed before it took the request.
    Closed,
    /// The connection failed while sending or receiving.
    Request(hyper::Error),
    /// Every connection the pool may open is busy, and none came free in time.
    Overloaded,
}

impl<B> Http1Pool<B> {
    /// The answer for the caller when `send` failed; logs what the operator needs, in
    /// the request's span `log`.
    pub fn refusal(&self, error: SendError, log: &Span) -> ProxyError {
        let application = self.address;
        match error {
            SendError::Connect(error) => {
                warn!(parent: log, event = "application unreachable", %application, error = %error);
                ProxyError::AppUnavailable
            }
            SendError::Request(error) if error.is_parse_too_large() => {
                warn!(
                    parent: log,
                    event = "application response refused",
                    %application,
                    reason = "response headers exceed the limit",
                    limit_bytes = self.max_read_buffer,
                );
                ProxyError::ResponseHeadTooLarge
            }
            // The caller's body failed while it was being sent: the caller's error.
            SendError::Request(error) if error.is_user() => {
                debug!(parent: log, event = "request body failed", %application, error = %error);
                crate::limits::body_rate::answer(&error)
            }
            SendError::Request(error) => {
                debug!(parent: log, event = "application error", %application, error = %error);
                ProxyError::Reset
            }
            SendError::Closed => {
                debug!(parent: log, event = "application error", %application, error = "connection closed");
                ProxyError::Reset
            }
            SendError::Overloaded => {
                debug!(parent: log, event = "application connections exhausted", %application);
                ProxyError::Overloaded
            }
        }
    }
}

/// A response body from a pooled connection: the connection goes back to the pool
/// once the body has been read to its end.
pub struct PooledBody<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body: Incoming,
    /// Until the body ends.
    pool: Option<(Arc<Http1Pool<B>>, SendRequest<B>)>,
}

impl<B> PooledBody<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn new(body: Incoming, pool: Option<(Arc<Http1Pool<B>>, SendRequest<B>)>) -> Self {
        let mut body = Self { body, pool };
        if body.body.is_end_stream() {
            // No body to read (204, HEAD, empty): the connection is free now; a caller
            // need not poll an empty body at all.
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some((pool, sender)) = self.pool.take() {
            pool.checkin(sender);
        }
    }
}

impl<B> http_body::Body for PooledBody<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.release(),
            // The connection is in an unknown state: hyper closes it.
            Some(Err(_)) => self.pool = None,
            Some(Ok(_)) if self.body.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Body;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering each request on a connection with `body`, counting connections.
    async fn server(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = hyper::service::service_fn(move |_request| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(crate::http::boxed(
                        http_body_util::Full::new(Bytes::from_static(body.as_bytes())),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (address, accepted)
    }

    fn get() -> Request<Body> {
        let mut request = Request::new(crate::http::empty());
        *request.uri_mut() = "/".parse().unwrap();
        request
            .headers_mut()
            .insert(http::header::HOST, "app".parse().unwrap());
        request
    }

    #[tokio::test]
    async fn a_read_response_frees_its_connection_for_the_next_request() {
        let (address, accepted) = server("hello").await;
        let pool = Http1Pool::new(address, &Limits::default(), 16 * 1024);
        for _ in 0..5 {
            let response = pool.send(get()).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "hello");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_unread_body_keeps_its_connection_busy() {
        let (address, accepted) = server("hello").await;
        let pool = Http1Pool::new(address, &Limits::default(), 16 * 1024);
        let first = pool.send(get()).await.unwrap();
        let second = pool.send(get()).await.unwrap();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        drop((first, second)); // abandoned mid-body: those connections are not reused
        assert_eq!(pool.idle_count(), 0);
        let third = pool.send(get()).await.unwrap();
        assert_eq!(
            third.into_body().collect().await.unwrap().to_bytes(),
            "hello"
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_the_application_closed_is_not_used_again() {
        // Answers one request per connection, then closes it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // Dropping the stream closes the connection.
            }
        });
        let pool = Http1Pool::new(address, &Limits::default(), 16 * 1024);
        for _ in 0..3 {
            let response = pool.send(get()).await.expect("a fresh connection");
            assert_eq!(
                response.into_body().collect().await.unwrap().to_bytes(),
                "ok"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_still_sending_an_upload_does_not_hold_up_the_next_request() {
        // Answers each request head at once with 204, never reading an upload, and keeps
        // every connection open.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    while let Ok(read) = stream.read(&mut head).await {
                        if read == 0 {
                            break;
                        }
                        if head[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                        }
                    }
                });
            }
        });
        let pool = Http1Pool::new(address, &Limits::default(), 16 * 1024);
        // Its teller is kept: the upload never ends.
        let (stalled, _keep_stalled) = crate::http::test_bodies::upload(b"first part");
        let mut upload = Request::new(crate::http::boxed(stalled));
        *upload.method_mut() = http::Method::POST;
        *upload.uri_mut() = "/upload".parse().unwrap();
        upload
            .headers_mut()
            .insert(http::header::HOST, "app".parse().unwrap());
        let answered = pool.send(upload).await.unwrap();
        assert!(answered.body().is_end_stream());
        let next = tokio::time::timeout(Duration::from_secs(5), pool.send(get()))
            .await
            .expect("the next request must not wait for the stalled upload")
            .unwrap();
        assert_eq!(next.status(), http::StatusCode::NO_CONTENT);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_timeout() {
        let (address, _) = server("hello").await;
        let pool = Http1Pool::new(address, &Limits::default(), 16 * 1024);
        let response = pool.send(get()).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        pool.evict(Instant::now() + IDLE_TIMEOUT - Duration::from_secs(1));
        assert_eq!(pool.idle_count(), 1);
        pool.evict(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_a_request_waits_for_a_connection_then_is_refused() {
        let (address, accepted) = server("hello").await;
        let limits = Limits {
            max_app_connections: 1,
            ..Limits::default()
        };
        let pool = Http1Pool::new(address, &limits, 16 * 1024);
        // A caller that never reads its response holds the only connection.
        let held = pool.send(get()).await.unwrap();
        let started = tokio::time::Instant::now();
        let refused = pool.send(get()).await;
        assert!(matches!(refused, Err(SendError::Overloaded)));
        assert_eq!(started.elapsed(), APP_CONNECTION_WAIT);
        assert_eq!(
            pool.refusal(SendError::Overloaded, &Span::none()).status(),
            503
        );
        // Once it is read, the next request gets the connection.
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.send(get()).await.map(|r| r.status()) }
        });
        tokio::task::yield_now().await;
        held.into_body().collect().await.unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), http::StatusCode::OK);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_application_is_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let pool = Http1Pool::new(address, &Limits::default(), 16 * 1024);
        assert!(matches!(pool.send(get()).await, Err(SendError::Connect(_))));
    }

    /// A server that reads each request's body before it answers.
    async fn reading_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        Ok::<_, hyper::Error>(Response::new(http_body_util::Full::new(body)))
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        address
    }

    /// A request body that sends a chunk, then fails with its error.
    struct Failing(Option<Bytes>, Option<BoxError>);

    impl http_body::Body for Failing {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            let next = match self.0.take() {
                Some(chunk) => Some(Ok(http_body::Frame::data(chunk))),
                None => self.1.take().map(Err),
            };
            std::task::Poll::Ready(next)
        }
    }

    fn failing_upload(error: BoxError) -> Request<Body> {
        let body = Failing(Some(Bytes::from_static(b"part")), Some(error));
        let mut request = Request::new(crate::http::boxed(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = "/upload".parse().unwrap();
        request
            .headers_mut()
            .insert(http::header::HOST, "app".parse().unwrap());
        request
    }

    #[tokio::test]
    async fn a_callers_failing_body_is_the_callers_error_not_the_applications() {
        let pool = Http1Pool::new(reading_server().await, &Limits::default(), 16 * 1024);
        let Err(broken) = pool.send(failing_upload("invalid chunk size".into())).await else {
            panic!("a failed body got an answer");
        };
        assert_eq!(
            pool.refusal(broken, &Span::none()),
            ProxyError::BadRequestBody
        );
        let slow = crate::limits::body_rate::BodyTooSlow {
            brought: 1,
            window: std::time::Duration::from_secs(60),
        };
        let Err(slow) = pool.send(failing_upload(slow.into())).await else {
            panic!("a failed body got an answer");
        };
        assert_eq!(
            pool.refusal(slow, &Span::none()),
            ProxyError::RequestBodyTimeout
        );
    }
}
