//! Our own generators for opaque TCP, where no HTTP tool fits: echo round trips on
//! kept-open connections (closed loop), and the connect → echo → close loop that makes
//! every round trip a new connection — through HAProxy, a new mTLS handshake; through
//! Tessera, a new stream on the pooled mTLS connection between the proxies.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{BenchError, Result};
use crate::load::LoadResult;

/// Bytes per echo round trip.
pub const PAYLOAD_BYTES: usize = 64;

/// Writes `payload` and reads the same number of bytes back.
pub async fn echo_once(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(payload).await?;
    let mut echoed = [0u8; PAYLOAD_BYTES];
    let mut remaining = payload.len();
    while remaining > 0 {
        let chunk = remaining.min(echoed.len());
        let read = stream.read(&mut echoed[..chunk]).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        remaining -= read;
    }
    Ok(())
}

/// `connections` kept-open connections, each echoing as fast as answers come back.
pub async fn closed_loop(
    address: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = TcpStream::connect(address)
            .await
            .map_err(BenchError::io(format!("connect to {address}")))?;
        let _ = stream.set_nodelay(true);
        streams.push(stream);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let payload = [0x5a; PAYLOAD_BYTES];
                let (mut completed, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match echo_once(&mut stream, &payload).await {
                        Ok(()) => completed += 1,
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
                (completed, errors)
            })
        })
        .collect();
    let (completed, errors) = sum(tasks).await?;
    Ok(LoadResult {
        generator: format!(
            "tessera-benches echo closed-loop: {connections} connections, {PAYLOAD_BYTES} B round trips"
        ),
        completed,
        errors,
        elapsed: start.elapsed(),
        latency: None,
    })
}

/// `concurrency` loops of connect → echo → close; `completed` counts connections.
pub async fn connection_rate(
    address: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Result<LoadResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(async move {
                let payload = [0x5a; PAYLOAD_BYTES];
                let (mut completed, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    match connect_echo_close(address, &payload).await {
                        Ok(()) => completed += 1,
                        Err(_) => errors += 1,
                    }
                }
                (completed, errors)
            })
        })
        .collect();
    let (completed, errors) = sum(tasks).await?;
    Ok(LoadResult {
        generator: format!(
            "tessera-benches connect-echo-close loop: {concurrency} concurrent, {PAYLOAD_BYTES} B"
        ),
        completed,
        errors,
        elapsed: start.elapsed(),
        latency: None,
    })
}

async fn connect_echo_close(address: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(address).await?;
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(Duration::from_secs(5), echo_once(&mut stream, payload))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn sum(tasks: Vec<tokio::task::JoinHandle<(u64, u64)>>) -> Result<(u64, u64)> {
    let mut total = (0, 0);
    for task in tasks {
        let (completed, errors) = task
            .await
            .map_err(|e| BenchError::failed("echo load task", e))?;
        total.0 += completed;
        total.1 += errors;
    }
    Ok(total)
}
