//! The discovery API: each proxy, authenticated by its mTLS certificate, receives the
//! current configuration snapshot and then every new one.
//!
//! Snapshots come from a `watch` channel, so a slow proxy only ever skips to the newest
//! snapshot; it never makes the control plane queue old ones.
//!
//! Each open stream is a connected proxy: [`ConnectedProxies`] lists them (identity,
//! address, where its admin port is) on the admin port's `/proxies`, so `tessera stat`
//! can find every proxy through the control plane.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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
    pub proxies: Arc<ConnectedProxies>,
}

/// The proxies with an open discovery stream. One small entry per stream, dropped with
/// it: the list grows only as the open streams themselves do.
#[derive(Default)]
pub(crate) struct ConnectedProxies {
    streams: Mutex<BTreeMap<u64, ConnectedProxy>>,
    next: std::sync::atomic::AtomicU64,
}

/// One connected proxy, as `/proxies` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConnectedProxy {
    /// Its SPIFFE ID, from its certificate.
    pub identity: String,
    /// Where its stream comes from.
    pub address: SocketAddr,
    /// Where its admin port can be reached, when known.
    pub admin: Option<SocketAddr>,
    /// Why `admin` is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_unknown: Option<String>,
    /// RFC 3339, UTC.
    pub connected_since: String,
}

impl ConnectedProxies {
    /// Every connected proxy, by identity then address.
    pub(crate) fn list(&self) -> Vec<ConnectedProxy> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut proxies: Vec<ConnectedProxy> = streams.values().cloned().collect();
        proxies.sort_by(|a, b| (&a.identity, a.address).cmp(&(&b.identity, b.address)));
        proxies
    }

    fn add(self: &Arc<Self>, proxy: ConnectedProxy) -> Registration {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(id, proxy);
        Registration {
            proxies: self.clone(),
            id,
        }
    }
}

/// Removes a proxy from the list when its stream ends.
struct Registration {
    proxies: Arc<ConnectedProxies>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut streams = self
            .proxies
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        streams.remove(&self.id);
    }
}

/// Where operators reach a proxy's admin port: the port it reports, at the address its
/// stream comes from. The proxy's word is never taken for the host — a proxy naming
/// another host would send operators' tools there — so an admin port bound to one
/// specific address other than that one (loopback included, from another host) is
/// unknown, and says why.
pub(crate) fn admin_address(reported: &str, caller: SocketAddr) -> Result<SocketAddr, String> {
    if reported.is_empty() {
        return Err("the proxy does not report it (a version that predates it)".into());
    }
    let reported: SocketAddr = reported
        .parse()
        .map_err(|_| "the proxy reported no IP:port".to_string())?;
    let caller_ip = caller.ip().to_canonical();
    let bound = reported.ip().to_canonical();
    let reachable = bound.is_unspecified()
        || bound == caller_ip
        || (bound.is_loopback() && caller_ip.is_loopback());
    if reachable {
        let host = if bound.is_unspecified() {
            caller_ip
        } else {
            bound
        };
        Ok(SocketAddr::new(host, reported.port()))
    } else if bound.is_loopback() {
        Err(format!(
            "it listens on {reported}, reachable only on the proxy's host"
        ))
    } else {
        Err(format!(
            "it listens on {reported}, not on {caller_ip}, where the proxy connects from"
        ))
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
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
        let admin = admin_address(&request.get_ref().admin_address, address);
        let registration = self.proxies.add(ConnectedProxy {
            identity: identity.to_string(),
            address,
            admin_unknown: admin.as_ref().err().cloned(),
            admin: admin.ok(),
            connected_since: rfc3339(SystemTime::now()),
        });
        let pushes = self.metrics.config_pushes.clone();
        let stream = WatchStream::new(self.snapshots.clone()).map(move |snapshot| {
            let _open = (&guard, &registration);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The host is always the stream's: an unspecified bind is reachable there, a bind
    /// to that very address too; loopback only from the same host; any other address a
    /// proxy names is not taken (it would point operators' tools elsewhere).
    #[test]
    fn the_admin_address_is_at_the_callers_address() {
        let caller: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let at = |reported: &str, caller: SocketAddr| admin_address(reported, caller);
        assert_eq!(
            at("0.0.0.0:15020", caller),
            Ok("10.0.0.5:15020".parse().unwrap())
        );
        assert_eq!(
            at("[::]:15020", caller),
            Ok("10.0.0.5:15020".parse().unwrap())
        );
        assert_eq!(
            at("10.0.0.5:15021", caller),
            Ok("10.0.0.5:15021".parse().unwrap())
        );
        // A caller seen as an IPv4-mapped IPv6 address is the same host.
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:40000".parse().unwrap();
        assert_eq!(
            at("10.0.0.5:15020", mapped),
            Ok("10.0.0.5:15020".parse().unwrap())
        );
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(
            at("127.0.0.1:15020", local),
            Ok("127.0.0.1:15020".parse().unwrap())
        );
        for (reported, why) in [
            ("127.0.0.1:15020", "reachable only on the proxy's host"),
            (
                "169.254.169.254:80",
                "not on 10.0.0.5, where the proxy connects from",
            ),
            ("", "predates it"),
            ("localhost:15020", "no IP:port"),
        ] {
            let error = at(reported, caller).unwrap_err();
            assert!(error.contains(why), "{reported}: {error}");
        }
    }

    /// A stream's proxy is listed while the stream is open, and only then.
    #[test]
    fn a_proxy_is_listed_while_its_stream_is_open() {
        let proxies = Arc::new(ConnectedProxies::default());
        let proxy = |identity: &str| ConnectedProxy {
            identity: identity.into(),
            address: "10.0.0.5:40000".parse().unwrap(),
            admin: Some("10.0.0.5:15020".parse().unwrap()),
            admin_unknown: None,
            connected_since: rfc3339(SystemTime::UNIX_EPOCH),
        };
        let web = proxies.add(proxy("spiffe://cluster.local/ns/shop/sa/web"));
        let api = proxies.add(proxy("spiffe://cluster.local/ns/shop/sa/api"));
        let listed: Vec<_> = proxies.list().into_iter().map(|p| p.identity).collect();
        assert_eq!(
            listed,
            [
                "spiffe://cluster.local/ns/shop/sa/api",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
        assert_eq!(proxies.list()[0].connected_since, "1970-01-01T00:00:00Z");
        drop(web);
        assert_eq!(proxies.list().len(), 1);
        drop(api);
        assert!(proxies.list().is_empty());
    }
}
