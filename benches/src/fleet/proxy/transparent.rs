//! The client-side proxy in transparent mode: in a network-namespace pod whose outbound
//! TCP `tessera-proxy init` hands to it, the proxy resolves each virtual IP through
//! discovery (`address/IP`) on the first connection made to it. An application in the
//! pod (this binary's hidden `fleet-client` command) makes that first connection to each
//! of the new services' virtual IPs, each one next to a new connection to a virtual IP
//! it already uses, so both see the same conditions. Needs root and the netns tools;
//! says why and measures nothing otherwise.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_tests::netns::{self, Network, Pod};

use super::{
    Latency, MeshShape, ProxyMesh, SERVICE_PORT, SERVICES_USED, called_services, echo_request,
    latency, virtual_ip,
};
use crate::error::{BenchError, Result};
use crate::process::Process;
use crate::topology::tessera::{
    CLIENT_ACCOUNT, NAMESPACE, StartedProxy, TRUST_DOMAIN, proxy_binary, wait_ready,
};

/// The UID `tessera-proxy init` exempts from capture by default: the proxy runs as it.
const PROXY_UID: u32 = 1337;
/// The sidecar's admin port, left out of inbound capture so the bench can ask `/ready`.
const ADMIN_PORT: u16 = 15020;

/// Measured, or why not.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Measured(TransparentFigures),
    Skipped(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct TransparentFigures {
    pub mesh_services: usize,
    pub new_services: usize,
    /// New connection + echo to a virtual IP the proxy has resolved.
    pub known: Latency,
    /// The first connection + echo to each new service's virtual IP, those that worked.
    pub first: Latency,
    /// First connections that failed, and the first failure.
    pub failed: usize,
    pub first_failure: Option<String>,
}

/// What the application in the pod measured, in microseconds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Samples {
    pub known_us: Vec<u64>,
    pub first_us: Vec<u64>,
    /// `address: error` of each first connection that failed.
    pub failures: Vec<String>,
}

/// The pod, its sidecar in `large` plus the called services, and the application's
/// requests; skipped when this machine cannot make network namespaces.
pub async fn measure(large: MeshShape, echo: SocketAddr) -> Result<Outcome> {
    if let Some(reason) = unavailable() {
        eprintln!("fleet: transparent mode skipped: {reason}");
        return Ok(Outcome::Skipped(reason));
    }
    let netns_error = |e: anyhow::Error| BenchError::failed("set up the pod", format!("{e:#}"));
    let Some(mut network) = Network::create().map_err(netns_error)? else {
        return Ok(Outcome::Skipped("network namespaces unavailable".into()));
    };
    let pod = network.add_pod("fleet-client").map_err(netns_error)?;
    let called = called_services();
    let gateway = IpAddr::V4(network.gateway());
    let mesh = ProxyMesh::start(large, &called, echo, gateway).await?;
    eprintln!("fleet: transparent client-side proxy in a pod");
    let _sidecar = start_sidecar(&network, &pod, &mesh).await?;
    let addresses: Vec<SocketAddr> = (0..called.len())
        .map(|index| SocketAddr::new(virtual_ip(index).into(), SERVICE_PORT))
        .collect();
    let (known, new) = addresses.split_at(SERVICES_USED);
    let samples = run_client(&network, &pod, known, new).await?;
    let micros = |samples: &[u64]| -> Vec<Duration> {
        samples
            .iter()
            .map(|&us| Duration::from_micros(us))
            .collect()
    };
    Ok(Outcome::Measured(TransparentFigures {
        mesh_services: mesh.services,
        new_services: new.len(),
        known: latency(&micros(&samples.known_us))?,
        first: latency(&micros(&samples.first_us))?,
        failed: samples.failures.len(),
        first_failure: samples.failures.into_iter().next(),
    }))
}

/// Why the pod cannot be made here, or `None`.
fn unavailable() -> Option<String> {
    netns::unavailable()
        .or_else(|| (!netns::on_path("setpriv")).then(|| "setpriv is not installed".to_string()))
}

/// `tessera-proxy init` in the pod, then the proxy as [`PROXY_UID`], transparent, as the
/// client account; returns once it is ready.
async fn start_sidecar(network: &Network, pod: &Pod, mesh: &ProxyMesh) -> Result<StartedProxy> {
    let proxy = proxy_binary()?;
    let init = network
        .command(pod, &proxy)
        .args(["init", "--exclude-inbound-ports", &ADMIN_PORT.to_string()])
        .output()
        .map_err(BenchError::io("run tessera-proxy init"))?;
    if !init.status.success() {
        return Err(BenchError::failed(
            "tessera-proxy init",
            String::from_utf8_lossy(&init.stderr),
        ));
    }
    // The control plane's state directory is not readable by the proxy's UID.
    let bundle = std::fs::read(mesh.control_plane.trust_bundle_file())
        .map_err(BenchError::io("read the trust bundle"))?;
    let bundle_file = mesh.dir.write("sidecar-root-cert.pem", bundle)?;
    let token_file = mesh
        .dir
        .write("sidecar.token", mesh.control_plane.token(CLIENT_ACCOUNT)?)?;
    let admin = SocketAddr::new(pod.ip.into(), ADMIN_PORT);
    let config = format!(
        "identity:\n  trustDomain: {TRUST_DOMAIN}\n  namespace: {NAMESPACE}\n  serviceAccount: {CLIENT_ACCOUNT}\n  joinTokenFile: {}\ncontrolPlane:\n  address: {}\n  trustBundleFile: {}\nadmin: {admin}\ntransparent: {{}}\n",
        token_file.display(),
        mesh.control_plane.address,
        bundle_file.display(),
    );
    let config_file = mesh.dir.write("sidecar.yaml", config)?;
    let process = Process::spawn(
        "transparent client-side proxy",
        network
            .command_as(pod, PROXY_UID, &proxy)
            .args(["run", "--config"])
            .arg(config_file)
            .env_remove("TESSERA_JOIN_TOKEN")
            .env_remove("RUST_LOG"),
    )?;
    let mut sidecar = StartedProxy { process, admin };
    wait_ready(&mut sidecar).await?;
    Ok(sidecar)
}

/// Runs the application (`tessera-benches fleet-client`) in the pod; what it measured.
async fn run_client(
    network: &Network,
    pod: &Pod,
    known: &[SocketAddr],
    new: &[SocketAddr],
) -> Result<Samples> {
    let exe = std::env::current_exe().map_err(BenchError::io("locate the running executable"))?;
    let list = |addresses: &[SocketAddr]| {
        addresses
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut command: Command = network.command(pod, exe);
    command
        .arg("fleet-client")
        .arg(format!("--known={}", list(known)))
        .arg(format!("--new={}", list(new)));
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .map_err(BenchError::io("run the application in the pod"))?;
    if !output.status.success() {
        return Err(BenchError::failed(
            "the application in the pod",
            String::from_utf8_lossy(&output.stderr),
        ));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| BenchError::failed("read the application's samples", e))
}

/// The application: one connection + echo to each of `known` (resolving them), then,
/// for each of `new`, a new connection + echo to one of `known` and the first to it.
/// A failed first connection is recorded, not fatal: it is what is measured.
pub async fn client(known: &[SocketAddr], new: &[SocketAddr]) -> Result<Samples> {
    if known.is_empty() {
        return Err(BenchError::failed("fleet-client", "no known address given"));
    }
    for &address in known {
        echo_request(address).await?;
    }
    let mut samples = Samples::default();
    for (&used, &address) in known.iter().cycle().zip(new) {
        samples.known_us.push(micros(echo_request(used).await?));
        match echo_request(address).await {
            Ok(took) => samples.first_us.push(micros(took)),
            Err(e) => samples.failures.push(format!("{address}: {e}")),
        }
    }
    Ok(samples)
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros().max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A TCP echo server on loopback; its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.into_split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                    let _ = writer.shutdown().await;
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn a_failed_first_connection_is_recorded_and_the_rest_measured() {
        let echo = echo_server().await;
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let samples = client(&[echo], &[closed, echo]).await.unwrap();
        assert_eq!(samples.known_us.len(), 2);
        assert_eq!(samples.first_us.len(), 1);
        assert_eq!(samples.failures.len(), 1);
        assert!(
            samples.failures[0].starts_with(&closed.to_string()),
            "{:?}",
            samples.failures
        );
    }

    #[tokio::test]
    async fn a_known_address_that_fails_fails_the_run() {
        let echo = echo_server().await;
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        assert!(client(&[closed], &[echo]).await.is_err());
        assert!(client(&[], &[echo]).await.is_err());
    }
}
