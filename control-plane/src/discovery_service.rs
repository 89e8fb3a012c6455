//! The discovery API: each proxy, authenticated by its mTLS certificate, receives the
//! current configuration snapshot and then every new one.
//!
//! Snapshots come from a `watch` channel, so a slow proxy only ever skips to the newest
//! snapshot; it never makes the control plane queue old ones.

use std::pin::Pin;
use std::sync::Arc;

use tessera_proto::api::discovery::discovery_server::Discovery;
use tessera_proto::api::discovery::{Snapshot, WatchRequest};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::grpc::Caller;
use crate::telemetry::Metrics;

/// Serves `Watch`.
pub(crate) struct DiscoveryService {
    pub snapshots: watch::Receiver<Snapshot>,
    pub metrics: Arc<Metrics>,
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = SnapshotStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = request.extensions().get::<Caller>().cloned();
        let Some(Caller {
            address,
            identity: Some(identity),
        }) = caller
        else {
            return Err(Status::unauthenticated(
                "discovery requires a workload certificate",
            ));
        };
        info!(event = "discovery stream opened", identity = %identity, caller = %address);
        let gauge = self.metrics.discovery_streams.clone();
        gauge.inc();
        let guard = StreamGauge(gauge);
        let pushes = self.metrics.config_pushes.clone();
        let stream = WatchStream::new(self.snapshots.clone()).map(move |snapshot| {
            let _open = &guard;
            pushes.inc();
            Ok(snapshot)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Decrements the open-streams gauge when the stream is dropped.
struct StreamGauge(prometheus_client::metrics::gauge::Gauge);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}
