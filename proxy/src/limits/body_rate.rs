//! A caller's HTTP/1.1 request body held to `limits.requestBodyMinRate`: each
//! `limits.requestBodyTimeout` the proxy spends waiting for the body must bring the
//! rate × the window's seconds (at least a byte), else the body fails with
//! [`BodyTooSlow`] and the caller is answered 408.
//!
//! Only time the proxy spends waiting on the caller counts: while the application (or a
//! peer proxy's window) holds the body back, the proxy does not read it, and the clock
//! stands still. HTTP/2 request streams are timed by their server
//! ([`crate::http2::server`]).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::config::Limits;
use crate::http::{BoxError, ProxyError};

/// What each window of waiting must bring.
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
    window: Duration,
    /// Bytes per window; at least 1, so silence for a whole window fails too.
    min_bytes: u64,
}

impl MinRate {
    pub fn new(limits: &Limits) -> Self {
        let window = limits.request_body_timeout;
        let min_bytes = (limits.request_body_min_rate as f64 * window.as_secs_f64()).ceil() as u64;
        Self {
            window,
            min_bytes: min_bytes.max(1),
        }
    }
}

/// The caller's body came slower than [`MinRate`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooSlow {
    pub brought: u64,
    pub window: Duration,
}

impl std::fmt::Display for BodyTooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "request body brought {} bytes in {:?} of waiting",
            self.brought, self.window
        )
    }
}

impl std::error::Error for BodyTooSlow {}

/// Whether a body's error (as the client that sent it reports it) is [`BodyTooSlow`].
pub fn is_too_slow(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<BodyTooSlow>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The caller's answer when its own request body failed (the error as the client that
/// sent it reports it): too slow, or malformed or cut off.
pub fn answer(error: &(dyn std::error::Error + 'static)) -> ProxyError {
    if is_too_slow(error) {
        ProxyError::RequestBodyTimeout
    } else {
        ProxyError::BadRequestBody
    }
}

pin_project! {
    /// A request body under [`MinRate`].
    pub struct Paced<B> {
        #[pin]
        body: B,
        rule: MinRate,
        // The current window: time spent waiting, and bytes brought.
        waited: Duration,
        brought: u64,
        // When the proxy began waiting, while it is.
        waiting_since: Option<Instant>,
        // Made the first time the body keeps the proxy waiting: a body that arrives
        // with its head never needs one.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> Paced<B> {
    pub fn new(body: B, rule: MinRate) -> Self {
        Self {
            body,
            rule,
            waited: Duration::ZERO,
            brought: 0,
            waiting_since: None,
            timer: None,
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        loop {
            let polled = this.body.as_mut().poll_frame(cx);
            let now = this.waiting_since.map(|_| Instant::now());
            if let Poll::Ready(frame) = polled {
                if let Some(Ok(frame)) = &frame
                    && let Some(data) = frame.data_ref()
                {
                    *this.brought += data.remaining() as u64;
                }
                if let (Some(since), Some(now)) = (this.waiting_since.take(), now) {
                    *this.waited += now - since;
                    judge(this.rule, this.waited, this.brought)?;
                }
                return Poll::Ready(frame.map(|result| result.map_err(Into::into)));
            }
            let now = now.unwrap_or_else(Instant::now);
            if this.timer.is_none() {
                // The first wait starts the first window: what came with the head does
                // not pay for silence after it.
                *this.brought = 0;
            }
            let since = *this.waiting_since.get_or_insert(now);
            *this.waited += now - since;
            *this.waiting_since = Some(now);
            judge(this.rule, this.waited, this.brought)?;
            let window_ends = now + (this.rule.window - *this.waited);
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(window_ends)));
            timer.as_mut().reset(window_ends);
            ready!(timer.as_mut().poll(cx));
            // The window ended while waiting: judged on the next turn.
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// At a window's end, the body fails unless it brought enough; otherwise the next
/// window starts.
fn judge(rule: &MinRate, waited: &mut Duration, brought: &mut u64) -> Result<(), BoxError> {
    if *waited < rule.window {
        return Ok(());
    }
    if *brought < rule.min_bytes {
        return Err(BodyTooSlow {
            brought: *brought,
            window: rule.window,
        }
        .into());
    }
    *waited = Duration::ZERO;
    *brought = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body of the chunks a test sends; ends when the sender is dropped.
    struct Chunks(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    /// A body the test feeds chunk by chunk, under a 10 s window asking 10 B/s.
    fn body() -> (Paced<Chunks>, mpsc::Sender<Result<Frame<Bytes>, BoxError>>) {
        let (send, receive) = mpsc::channel(16);
        let rule = MinRate {
            window: Duration::from_secs(10),
            min_bytes: 100,
        };
        (Paced::new(Chunks(receive), rule), send)
    }

    fn chunk(bytes: usize) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from(vec![b'x'; bytes])))
    }

    /// Reads the body to its end, or its error.
    async fn read(mut body: Paced<Chunks>) -> Result<u64, BoxError> {
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            total += frame?.data_ref().map_or(0, |data| data.len() as u64);
        }
        Ok(total)
    }

    /// Sends `bytes` every `every`, `times` times, then ends the body.
    async fn drip(
        send: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        bytes: usize,
        every: Duration,
        times: usize,
    ) {
        for _ in 0..times {
            tokio::time::sleep(every).await;
            if send.send(chunk(bytes)).await.is_err() {
                return;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_rate_is_read_whole() {
        let (body, send) = body();
        tokio::spawn(drip(send, 10, Duration::from_millis(500), 60));
        assert_eq!(read(body).await.unwrap(), 600);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drip_below_the_rate_fails_at_the_first_window() {
        let (body, send) = body();
        tokio::spawn(drip(send, 1, Duration::from_secs(1), 1000));
        let started = Instant::now();
        let error = read(body).await.unwrap_err();
        assert!(is_too_slow(error.as_ref()), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_fails_at_the_windows_end() {
        let (body, send) = body();
        send.send(chunk(500)).await.unwrap();
        let started = Instant::now();
        let error = read(body).await.unwrap_err();
        assert!(is_too_slow(error.as_ref()), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop(send);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_made_up_within_the_window_is_fine() {
        let (body, send) = body();
        tokio::spawn(async move {
            send.send(chunk(10)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(9)).await;
            send.send(chunk(200)).await.unwrap();
            drip(send, 10, Duration::from_secs(1), 30).await;
        });
        assert_eq!(read(body).await.unwrap(), 510);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_holds_the_body_back_is_not_the_callers() {
        let (mut body, send) = body();
        send.send(chunk(1)).await.unwrap();
        assert!(body.frame().await.is_some());
        // The reader stops reading for a minute (the application is slow), then the
        // caller's next bytes are there.
        tokio::time::sleep(Duration::from_secs(60)).await;
        send.send(chunk(1)).await.unwrap();
        drop(send);
        assert_eq!(read(body).await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_arrived_whole_never_starts_a_timer() {
        let (mut body, send) = body();
        send.send(chunk(5)).await.unwrap();
        drop(send);
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.is_none());
        assert!(body.timer.is_none());
    }

    #[test]
    fn the_rule_asks_at_least_a_byte_per_window() {
        let mut limits = Limits {
            request_body_min_rate: 0,
            ..Limits::default()
        };
        assert_eq!(MinRate::new(&limits).min_bytes, 1);
        limits.request_body_min_rate = 32;
        limits.request_body_timeout = Duration::from_secs(60);
        assert_eq!(MinRate::new(&limits).min_bytes, 1920);
    }
}
