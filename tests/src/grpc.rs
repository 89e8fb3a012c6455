//! A test client for the control plane's identity API, over the same verified TLS the
//! proxies use.

use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, Trust, TrustBundle};
use tessera_proto::api::identity::identity_client::IdentityClient;
use tessera_proto::api::identity::{CertifyRequest, CertifyResponse};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::Endpoint;

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
    let pem = std::fs::read(trust_bundle_file).expect("trust bundle");
    let trust = Trust::new(
        crate::TRUST_DOMAIN,
        TrustBundle::from_pem(&pem).expect("bundle"),
    );
    let expected = SpiffeId::control_plane(crate::TRUST_DOMAIN).expect("cp id");
    let config = tls::client_config(trust, expected, None, &[b"h2"]).expect("client config");
    let connector = TlsConnector::from(Arc::new(config));
    let address = address.to_string();
    let channel = Endpoint::from_static("http://control-plane")
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
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    IdentityClient::new(channel)
        .certify(request)
        .await
        .map(tonic::Response::into_inner)
}
