//! One real proxy in the fleet's mesh: a client-side `tessera-proxy` in front of a
//! server-side one and a TCP echo. In explicit mode (one outbound listener per service
//! it calls): its memory with the services it uses in a small mesh and in the large
//! one, and the latency of a first request to a service it has not called yet, next to
//! a request to a service it already calls. An explicit listener follows its service
//! from the start, so that first request pays for a first connection, not for
//! discovery. In transparent mode (`transparent`, the proxy in a network-namespace pod),
//! the first connection to a virtual IP waits for discovery too: that is the first
//! request to a never-resolved service the target is about.

pub mod transparent;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{LOAD_TIMEOUT, MeshShape, mesh, micros};
use crate::error::{BenchError, Result};
use crate::proc_stats;
use crate::process::ScratchDir;
use crate::topology::backends::Backends;
use crate::topology::tessera::{
    CLIENT_ACCOUNT, ControlPlane, NAMESPACE, SERVER_ACCOUNT, StartedProxy, start_proxy, wait_ready,
};
use crate::topology::{free_port, local};

/// Services the proxy calls in both meshes.
const SERVICES_USED: usize = 10;
/// Services it calls for the first time, one request each.
const NEW_SERVICES: usize = 200;
/// Requests through each used service before memory is read.
const WARM_UP_REQUESTS: usize = 50;
/// Requests to used services timed as the baseline of a first request.
const KNOWN_REQUESTS: usize = 200;
const PAYLOAD: &[u8] = b"tessera fleet bench: one echo";
/// The port of every called service.
const SERVICE_PORT: u16 = 8080;

/// The real proxy's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyFigures {
    pub services_used: usize,
    pub small_mesh_services: usize,
    pub large_mesh_services: usize,
    /// Client-side proxy RSS after calling each used service, in each mesh.
    pub rss_small_mesh: u64,
    pub rss_large_mesh: u64,
    pub new_services: usize,
    /// New connection + echo through a service the proxy already calls.
    pub known: Latency,
    /// The same, the first through each of the new services.
    pub first: Latency,
    /// The client-side proxy in transparent mode, where a first request resolves the
    /// virtual IP it was made to.
    pub transparent: transparent::Outcome,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The proxy's RSS in a mesh of only the services it uses and in `large` plus those
/// (and the new ones), then first requests in the large one.
pub async fn measure(large: MeshShape) -> Result<ProxyFigures> {
    let backends = Backends::start(false).await?;
    let echo = backends.entry.tcp;
    let nothing_else = MeshShape {
        services: 0,
        endpoints_per_service: 0,
    };
    let loopback = local(0).ip();
    let small_mesh = ProxyMesh::start(nothing_else, &used_services(), echo, loopback).await?;
    let rss_small_mesh = small_mesh.client_rss(&used_services()).await?;
    let small_mesh_services = small_mesh.services;
    drop(small_mesh);
    let large_mesh = ProxyMesh::start(large, &called_services(), echo, loopback).await?;
    let rss_large_mesh = large_mesh.client_rss(&used_services()).await?;
    let (known, first) = large_mesh.first_requests().await?;
    let large_mesh_services = large_mesh.services;
    drop(large_mesh);
    let transparent = transparent::measure(large, echo).await?;
    Ok(ProxyFigures {
        services_used: SERVICES_USED,
        small_mesh_services,
        large_mesh_services,
        rss_small_mesh,
        rss_large_mesh,
        new_services: NEW_SERVICES,
        known,
        first,
        transparent,
    })
}

fn used_services() -> Vec<String> {
    (0..SERVICES_USED).map(|i| format!("used-{i:02}")).collect()
}

fn new_services() -> Vec<String> {
    (0..NEW_SERVICES).map(|i| format!("new-{i:03}")).collect()
}

/// The used services, then the new ones.
fn called_services() -> Vec<String> {
    used_services().into_iter().chain(new_services()).collect()
}

/// The virtual IP of the `index`th called service, in 10.97.0.0/16 (the simulated
/// mesh's are in 10.96.0.0/16).
fn virtual_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 97, (index / 256) as u8, (index % 256) as u8)
}

/// A control plane with the simulated mesh plus the services the proxy may call, and
/// the server-side proxy those all end at.
struct ProxyMesh {
    control_plane: ControlPlane,
    services: usize,
    _server: StartedProxy,
    dir: ScratchDir,
}

impl ProxyMesh {
    /// The control plane and the server-side proxy's inbound listener on `host`.
    async fn start(
        shape: MeshShape,
        called: &[String],
        echo: SocketAddr,
        host: IpAddr,
    ) -> Result<Self> {
        let dir = ScratchDir::new("fleet-proxy")?;
        mesh::write(&dir.path().join("config"), shape)?;
        let inbound = SocketAddr::new(host, free_port());
        dir.write("config/called.yaml", called_services_yaml(called, inbound))?;
        let control_plane = ControlPlane::start_on(&dir, host, LOAD_TIMEOUT).await?;
        let listeners = format!("inbound:\n  - listen: {inbound}\n    forwardTo: {echo}\n");
        let mut server = start_proxy(&dir, &control_plane, SERVER_ACCOUNT, &listeners)?;
        wait_ready(&mut server).await?;
        Ok(Self {
            control_plane,
            services: shape.services + called.len(),
            _server: server,
            dir,
        })
    }

    /// A client-side proxy with a listener per service; the addresses, in order.
    async fn client(&self, services: &[String]) -> Result<(StartedProxy, Vec<SocketAddr>)> {
        let entries: Vec<SocketAddr> = services.iter().map(|_| local(free_port())).collect();
        let mut listeners = String::from("outbound:\n");
        for (service, entry) in services.iter().zip(&entries) {
            let _ = writeln!(
                listeners,
                "  - listen: {entry}\n    service: {service}.{NAMESPACE}"
            );
        }
        let mut client = start_proxy(&self.dir, &self.control_plane, CLIENT_ACCOUNT, &listeners)?;
        wait_ready(&mut client).await?;
        Ok((client, entries))
    }

    /// The RSS of a client that has called each of `services` a few times.
    async fn client_rss(&self, services: &[String]) -> Result<u64> {
        let (client, entries) = self.client(services).await?;
        for _ in 0..WARM_UP_REQUESTS {
            for &entry in &entries {
                echo_request(entry).await?;
            }
        }
        // Let idle connections and buffers be released before reading memory.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(proc_stats::memory(client.process.pid())?.rss)
    }

    /// Requests to services in use, then a first request to each new service.
    async fn first_requests(&self) -> Result<(Latency, Latency)> {
        let (_client, entries) = self.client(&called_services()).await?;
        let (used, new) = entries.split_at(SERVICES_USED);
        for &entry in used {
            echo_request(entry).await?;
        }
        let mut known = Vec::with_capacity(KNOWN_REQUESTS);
        for &entry in used.iter().cycle().take(KNOWN_REQUESTS) {
            known.push(echo_request(entry).await?);
        }
        let mut first = Vec::with_capacity(new.len());
        for &entry in new {
            first.push(echo_request(entry).await?);
        }
        Ok((latency(&known)?, latency(&first)?))
    }
}

/// Opaque services of the bench namespace, each with a virtual IP ([`virtual_ip`]) and
/// one workload: the server-side proxy's inbound listener.
fn called_services_yaml(services: &[String], inbound: SocketAddr) -> String {
    services
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let address = virtual_ip(index);
            format!(
                "apiVersion: tessera.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec:\n  addresses: [{address}]\n  ports: [{{port: {SERVICE_PORT}, protocol: opaque}}]\n---\napiVersion: tessera.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}-0, namespace: {NAMESPACE}}}\nspec: {{service: {name}, serviceAccount: {SERVER_ACCOUNT}, address: \"{inbound}\"}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Connect, send a line, read it back: how long it took.
async fn echo_request(entry: SocketAddr) -> Result<Duration> {
    let started = Instant::now();
    let echoed = tessera_tests::echo_roundtrip(entry, PAYLOAD)
        .await
        .map_err(|e| BenchError::failed(format!("echo through {entry}"), e))?;
    if echoed != PAYLOAD {
        return Err(BenchError::failed(
            format!("echo through {entry}"),
            "the echo differs from what was sent",
        ));
    }
    Ok(started.elapsed())
}

fn latency(samples: &[Duration]) -> Result<Latency> {
    let histogram = micros(samples.iter().copied())?;
    Ok(Latency {
        p50_us: histogram.value_at_quantile(0.50) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
    })
}
