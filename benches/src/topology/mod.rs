//! The paths under test, each started from nothing: the servers (`backends`), and the
//! two proxy pairs in front of them (`tessera`, `haproxy`). A [`Path`] is what the load
//! generators see — one local address per workload — plus the proxy processes whose
//! CPU and memory the run reads.

pub mod backends;
pub mod haproxy;
pub mod tessera;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::process::Process;

/// Which way requests travel from the client to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Client → server.
    Direct,
    /// Client → tessera-proxy outbound → mTLS → tessera-proxy inbound → server.
    Tessera,
    /// Client → HAProxy → mTLS → HAProxy → server.
    Haproxy,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Tessera => "tessera",
            Self::Haproxy => "haproxy",
        }
    }
}

/// Where a client connects for each workload.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// HTTP/1.1: `/small` and `/64k` (nginx).
    pub http1: SocketAddr,
    /// HTTP/2 with prior knowledge: gRPC `Echo/Unary` (tonic).
    pub grpc: SocketAddr,
    /// Opaque TCP: an echo server.
    pub tcp: SocketAddr,
}

/// A proxy process of a pair, by the side of the mTLS hop it sits on.
#[derive(Debug, Clone, Copy)]
pub struct ProxyProcess {
    /// `client-side` or `server-side`.
    pub side: &'static str,
    pub pid: u32,
}

/// One path, ready for load.
#[derive(Debug, Clone)]
pub struct Path {
    pub kind: PathKind,
    pub entry: Entry,
    /// Empty for the direct path.
    pub proxies: Vec<ProxyProcess>,
}

/// A free loopback port, below the ephemeral range so no outgoing connection takes it
/// before the process that is told to bind it does.
pub fn free_port() -> u16 {
    tessera_tests::free_port()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until something accepts connections at `address`, failing early if `process`
/// exits.
pub async fn wait_listening(
    process: &mut Process,
    address: SocketAddr,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        process.ensure_running()?;
        if Instant::now() > deadline {
            return Err(process.not_ready(timeout));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
