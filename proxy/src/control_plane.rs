//! Connections to the control plane: TLS that verifies the control plane's SPIFFE ID,
//! presenting this proxy's certificate when it has one. Identity renewal and discovery
//! both go through here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tessera_mesh::SpiffeId;
use tessera_mesh::tls::{self, CurrentCert, Trust};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the control plane is and who it must be.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub address: String,
    pub identity: SpiffeId,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("control plane unreachable at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl ControlPlane {
    /// Opens a gRPC channel. `client_cert` authenticates us (renewal, discovery).
    pub async fn connect(
        &self,
        trust: Arc<Trust>,
        client_cert: Option<Arc<CurrentCert>>,
    ) -> Result<Channel, ConnectError> {
        let config = tls::client_config(trust, self.identity.clone(), client_cert, &[b"h2"])
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let connector = TlsConnector::from(Arc::new(config));
        let address = self.address.clone();
        Endpoint::from_static("http://tessera-control-plane")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                let address = address.clone();
                async move {
                    let tcp = TcpStream::connect(address.as_str()).await?;
                    // Small messages each way: no Nagle delay on top of delayed ACKs.
                    tcp.set_nodelay(true)?;
                    let peer: SocketAddr = tcp.peer_addr()?;
                    let tls = connector.connect(tls::server_name_for(peer), tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| ConnectError::Unreachable {
                address: self.address.clone(),
                reason: error_chain(&e),
            })
    }
}

/// An error with its causes, which tonic hides behind "transport error"; each cause
/// once (hyper's connect errors repeat theirs in their own text).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    tessera_mesh::process::error_report(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error: {source}")]
    struct Connect {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Transport {
        #[source]
        source: Connect,
    }

    #[test]
    fn each_cause_is_told_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = Transport {
            source: Connect { source: refused },
        };
        assert_eq!(
            error_chain(&error),
            "transport error: tcp connect error: connection refused"
        );
    }
}
