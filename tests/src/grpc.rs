//! A test client for the control plane's identity and discovery APIs, over the same
//! verified TLS the proxies use.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, CurrentCert, Trust, TrustBundle};
use tessera_proto::api::discovery::discovery_client::DiscoveryClient;
use tessera_proto::api::discovery::{DiscoveryRequest, DiscoveryResponse};
use tessera_proto::api::identity::identity_client::IdentityClient;
use tessera_proto::api::identity::{CertifyRequest, CertifyResponse};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint};

use crate::certs::TestCa;

/// Calls `Certify` once without a client certificate, with a join token.
pub async fn certify(
    address: &str,
    trust_bundle_file: &Path,
    csr_der: Vec<u8>,
    join_token: &str,
) -> Result<CertifyResponse, tonic::Status> {
    let request = CertifyRequest {
        csr_der,
        join_token: join_token.to_string(),
        ..Default::default()
    };
    certify_request(address, trust_bundle_file, request).await
}

/// Calls `Certify` once without a client certificate.
pub async fn certify_request(
    address: &str,
    trust_bundle_file: &Path,
    request: CertifyRequest,
) -> Result<CertifyResponse, tonic::Status> {
    let channel = channel(address, trust_bundle_file, None).await?;
    IdentityClient::new(channel)
        .certify(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Opens `Discover` as the workload `spiffe_id` (a certificate from the development root
/// in the control plane's state directory), sends `request`, and returns the first
/// answer, or the status the call or stream ended with.
pub async fn discover_once(
    control_plane: &crate::ControlPlane,
    spiffe_id: &str,
    request: DiscoveryRequest,
) -> Result<DiscoveryResponse, tonic::Status> {
    let leaf = TestCa::from_state_dir(&control_plane.state_dir()).leaf(
        spiffe_id,
        Duration::from_secs(60),
        Duration::from_secs(3600),
        false,
    );
    let cert = CurrentCert::new();
    cert.set(
        rustls::sign::CertifiedKey::from_der(leaf.chain, leaf.key, &tls::crypto_provider())
            .expect("workload certificate"),
    );
    let channel = channel(
        &control_plane.address(),
        &control_plane.trust_bundle_file(),
        Some(cert),
    )
    .await?;
    let mut responses = DiscoveryClient::new(channel)
        .discover(tokio_stream::iter([request]).chain(tokio_stream::pending()))
        .await?
        .into_inner();
    match responses.message().await? {
        Some(response) => Ok(response),
        None => Err(tonic::Status::unknown("the stream ended without an answer")),
    }
}

/// A channel to the control plane over verified TLS, presenting `cert` if given.
async fn channel(
    address: &str,
    trust_bundle_file: &Path,
    cert: Option<Arc<CurrentCert>>,
) -> Result<Channel, tonic::Status> {
    let pem = std::fs::read(trust_bundle_file).expect("trust bundle");
    let trust = Trust::new(
        crate::TRUST_DOMAIN,
        TrustBundle::from_pem(&pem).expect("bundle"),
    );
    let expected = SpiffeId::control_plane(crate::TRUST_DOMAIN).expect("cp id");
    let config = tls::client_config(trust, expected, cert, &[b"h2"]).expect("client config");
    let connector = TlsConnector::from(Arc::new(config));
    let address = address.to_string();
    Endpoint::from_static("http://control-plane")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, address) = (connector.clone(), address.clone());
            async move {
                let tcp = TcpStream::connect(address.as_str()).await?;
                let peer = tcp.peer_addr()?;
                let stream = connector.connect(tls::server_name_for(peer), tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))
}
