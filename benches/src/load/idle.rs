//! Idle connections: `count` HTTP/1.1 connections, each having served one request,
//! then held open doing nothing — what a proxy keeps per connection a client forgets
//! to close.

use std::net::SocketAddr;

use crate::error::{BenchError, Result};
use crate::load::HttpRequest;
use crate::load::http_client::Sender;

/// Connections opened at once while building up.
const BATCH: usize = 50;

/// The open connections; dropping this closes them.
pub struct IdleConnections {
    senders: Vec<Sender>,
}

impl IdleConnections {
    pub async fn open(address: SocketAddr, path: &str, count: usize) -> Result<Self> {
        let request = HttpRequest::get(address, path);
        let mut senders = Vec::with_capacity(count);
        while senders.len() < count {
            let batch = BATCH.min(count - senders.len());
            let tasks: Vec<_> = (0..batch)
                .map(|_| {
                    let request = request.clone();
                    tokio::spawn(async move {
                        let mut sender = Sender::connect(&request).await?;
                        if sender.send(&request).await {
                            Ok(sender)
                        } else {
                            Err(BenchError::failed(
                                "first request of an idle connection",
                                request.address,
                            ))
                        }
                    })
                })
                .collect();
            for task in tasks {
                let sender = task
                    .await
                    .map_err(|e| BenchError::failed("open idle connections", e))??;
                senders.push(sender);
            }
        }
        Ok(Self { senders })
    }

    /// How many are still open (a proxy may have closed some).
    pub fn open_count(&self) -> usize {
        self.senders.iter().filter(|s| !s.is_closed()).count()
    }
}
