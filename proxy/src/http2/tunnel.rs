//! A TCP connection carried on an HTTP/2 `CONNECT` stream.

use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use super::client::Lease;

/// A TCP connection carried on a `CONNECT` stream: bytes both ways, an end of file as
/// END_STREAM and the peer's END_STREAM as end of file.
pub(crate) struct Tunnel {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    pub(crate) _lease: Option<Lease>,
}

/// What the relay reads from the application at most at a time; reads share one
/// buffer of this size until it runs low.
const RELAY_CHUNK: usize = 8 * 1024;

/// A read buffer running lower than this gets a fresh one.
const RELAY_MIN_READ: usize = 1024;

impl Tunnel {
    /// Copies between the application's connection and the tunnel until both directions
    /// are done; an end of file on one side half-closes the other. Bytes read from the
    /// application go into the stream as they are (no zeroed buffer, no second copy).
    /// Returns bytes (application → peer, peer → application).
    pub(crate) async fn relay(
        self,
        app: &mut tokio::net::TcpStream,
    ) -> std::io::Result<(u64, u64)> {
        let Tunnel {
            mut send, mut recv, ..
        } = self;
        let (mut from_app, mut to_app) = app.split();
        tokio::try_join!(
            upload(&mut from_app, &mut send),
            download(&mut recv, &mut to_app)
        )
    }
}

/// Application → peer, paced by the stream's window.
async fn upload<R>(app: &mut R, send: &mut SendStream<Bytes>) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buffer = bytes::BytesMut::new();
    let mut total = 0;
    loop {
        send.reserve_capacity(RELAY_CHUNK);
        std::future::poll_fn(|cx| poll_window(send, cx)).await?;
        if buffer.capacity() < RELAY_MIN_READ {
            buffer = bytes::BytesMut::with_capacity(RELAY_CHUNK);
        }
        let read = app.read_buf(&mut buffer).await?;
        if read == 0 {
            send.send_data(Bytes::new(), true).map_err(io_error)?;
            return Ok(total);
        }
        total += read as u64;
        send.send_data(buffer.split().freeze(), false)
            .map_err(io_error)?;
    }
}

/// Ready once the stream may send at least a byte.
fn poll_window(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
    while send.capacity() == 0 {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(error)) => return Poll::Ready(Err(io_error(error))),
            None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }
    Poll::Ready(Ok(()))
}

/// Peer → application; window is handed back once the application took the bytes.
async fn download<W>(recv: &mut RecvStream, app: &mut W) -> std::io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut total = 0;
    while let Some(data) = std::future::poll_fn(|cx| recv.poll_data(cx)).await {
        let data = data.map_err(io_error)?;
        app.write_all(&data).await?;
        let _ = recv.flow_control().release_capacity(data.len());
        total += data.len() as u64;
    }
    app.shutdown().await?;
    Ok(total)
}

fn io_error(error: h2::Error) -> std::io::Error {
    match error.get_io() {
        Some(io) => std::io::Error::new(io.kind(), error.to_string()),
        None if error.reason() == Some(Reason::NO_ERROR) => {
            std::io::ErrorKind::ConnectionAborted.into()
        }
        None => std::io::Error::new(std::io::ErrorKind::ConnectionReset, error),
    }
}
