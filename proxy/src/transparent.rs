//! Transparent mode: the listeners iptables redirects a pod's traffic to
//! (`tessera-proxy init`). Each connection's original destination (SO_ORIGINAL_DST) says
//! where it was going:
//! - outbound (15001): a service VIP and port known to discovery is routed like an
//!   explicit outbound listener for that service (mTLS, balancing, retries, policy);
//!   any other destination passes through as plain TCP, so workloads outside the mesh
//!   stay reachable while a migration is under way. The first connection to an
//!   address asks the control plane about it ([`Destinations`]);
//! - inbound (15006): the local application port the peer asked for (reached over
//!   loopback), with that port's mTLS mode and authorization.
//!
//! The proxy's own connections are exempt from capture (its UID) except those to its own
//! pod address, which go to its inbound side; the inbound side forwards over loopback,
//! which is never captured, so nothing loops. A connection made straight to a
//! transparent listener (no redirect happened) is refused for the same reason.
//!
//! Until a connection is routed its events carry its addresses themselves; once routed,
//! they are logged in the span of its inbound, outbound or passthrough connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{Span, debug, info_span, warn};

use crate::config::InboundPort;
use crate::destinations::Destinations;
use crate::inbound::Inbound;
use crate::listeners::Listeners;
use crate::outbound::Outbound;
use crate::tcp;
use crate::telemetry::{Direction, Refusal};

/// Distinct application ports one proxy serves inbound; a peer probing every port of
/// the pod must not make the proxy build a client per port without bound.
const MAX_INBOUND_PORTS: usize = 256;

/// Where a redirected connection was going before iptables sent it to us. IPv4
/// connections on a dual-stack listener (v4-mapped addresses) carry an IPv4 original
/// destination; only native IPv6 ones ask ip6tables' conntrack.
/// `local` is the connection's own address (canonical: v4-mapped shown as IPv4).
fn original_destination(stream: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let original = if local.is_ipv4() {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    original.as_socket().map(canonical).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an IP address",
        )
    })
}

/// The address with any v4-mapped IPv6 form turned back into IPv4.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// The original destination of a redirected connection, or `None` (logged) when there
/// is none or it is the listener itself — a client that dialled the proxy port directly,
/// which would otherwise make the proxy connect to itself.
fn redirected_destination(
    stream: &TcpStream,
    client: SocketAddr,
    listener: &str,
) -> Option<SocketAddr> {
    let found = stream
        .local_addr()
        .map(canonical)
        .and_then(|local| Ok((local, original_destination(stream, local)?)));
    match found {
        Ok((local, original)) if original == local => {
            warn!(
                event = "connection refused",
                listener,
                client_address = %client,
                reason = "connected to the transparent listener directly, not redirected",
            );
            None
        }
        Ok((_, original)) => Some(original),
        Err(error) => {
            warn!(event = "connection refused", listener, client_address = %client, reason = "no original destination", error = %error);
            None
        }
    }
}

/// The transparent outbound listener.
pub(crate) struct TransparentOutbound {
    shared: Arc<Listeners>,
    /// The virtual IPs and service ports met so far, released when unused.
    destinations: Destinations<Outbound>,
}

impl TransparentOutbound {
    /// Destinations no connection uses are released after `release_unused_after`.
    pub(crate) fn new(shared: Arc<Listeners>, release_unused_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            destinations: Destinations::new(shared.discovery.clone(), release_unused_after),
            shared,
        })
    }

    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.shared.limits.max_connections;
        let drain = self.shared.drain.clone();
        let sweeping = self.clone();
        let accepting = tcp::accept_loop(listener, limit, drain, move |stream, client| {
            let outbound = self.clone();
            async move { outbound.handle(stream, client).await }
        });
        tokio::select! {
            () = accepting => {}
            () = sweeping.destinations.sweep_periodically() => {}
        }
    }

    async fn handle(&self, stream: TcpStream, client: SocketAddr) {
        let Some(original) = redirected_destination(&stream, client, "transparent outbound") else {
            return;
        };
        // A first connection to an address waits for the control plane's answer.
        let Some(view) = self.destinations.view_for(original.ip()).await else {
            // Fail closed: without an answer we cannot tell a mesh service (which must
            // get mTLS) from an outside destination.
            self.shared
                .metrics
                .refuse(Direction::Outbound, Refusal::NoConfiguration);
            return warn!(event = "outbound connection refused", client_address = %client, destination = %original, reason = "no answer from the control plane for this address");
        };
        let client = canonical(client);
        match view.service_at(original) {
            Some(key) => {
                let port = original.port();
                let outbound = self.destinations.service(key, port, || {
                    self.shared
                        .service_outbound(key.to_string(), Some(port), None)
                });
                outbound.handle(stream, client).await;
            }
            None => {
                let span = info_span!("passthrough", client = %client, destination = %original);
                self.passthrough(stream, original, &span).await
            }
        }
    }

    /// A destination outside the mesh: plain TCP, as if there were no proxy.
    async fn passthrough(&self, mut stream: TcpStream, original: SocketAddr, span: &Span) {
        debug!(parent: span, event = "passthrough");
        let counters = self.shared.metrics.direction(Direction::Outbound);
        let _open = counters.open();
        let mut upstream = match tcp::connect(original, self.shared.limits.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                return debug!(parent: span, event = "passthrough destination unreachable", error = %error);
            }
        };
        match tcp::relay(&mut stream, &mut upstream).await {
            Ok((sent, received)) => {
                counters.sent.inc_by(sent);
                counters.received.inc_by(received);
            }
            Err(error) => {
                debug!(parent: span, event = "passthrough ended with error", error = %error)
            }
        }
    }
}

/// The transparent inbound listener.
pub(crate) struct TransparentInbound {
    shared: Arc<Listeners>,
    listen: SocketAddr,
    /// One inbound per application address met so far.
    ports: Mutex<HashMap<SocketAddr, Arc<Inbound>>>,
}

impl TransparentInbound {
    pub(crate) fn new(shared: Arc<Listeners>, listen: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            shared,
            listen,
            ports: Mutex::default(),
        })
    }

    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limit = self.shared.limits.max_connections;
        let drain = self.shared.drain.clone();
        tcp::accept_loop(listener, limit, drain, move |stream, client| {
            let inbound = self.clone();
            async move { inbound.handle(stream, client).await }
        })
        .await;
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) {
        let Some(original) = redirected_destination(&stream, peer, "transparent inbound") else {
            return;
        };
        match self.inbound_for(original) {
            Some(inbound) => inbound.handle(stream, canonical(peer)).await,
            None => {
                self.shared
                    .metrics
                    .refuse(Direction::Inbound, Refusal::ConnectFailed);
                warn!(event = "inbound connection refused", peer_address = %peer, destination = %original, reason = "too many distinct application ports", limit = MAX_INBOUND_PORTS);
            }
        }
    }

    /// The inbound for the application address a peer dialled. The application is
    /// reached over loopback on that port: the proxy's connections to its own pod
    /// address are captured (so a pod calling its own service still passes its inbound
    /// policy), loopback ones are not.
    fn inbound_for(&self, dialled: SocketAddr) -> Option<Arc<Inbound>> {
        let loopback: IpAddr = if dialled.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        };
        let application = SocketAddr::new(loopback, dialled.port());
        let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(inbound) = ports.get(&application) {
            return Some(inbound.clone());
        }
        if ports.len() >= MAX_INBOUND_PORTS {
            return None;
        }
        let inbound = self.shared.inbound(InboundPort {
            listen: self.listen,
            forward_to: application,
        });
        ports.insert(application, inbound.clone());
        Some(inbound)
    }
}
