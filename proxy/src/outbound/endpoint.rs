//! How the outbound side reaches an endpoint's proxy: TLS connectors that accept only
//! the endpoint's identity, one per ALPN.

use tessera_mesh::SpiffeId;
use tokio_rustls::TlsConnector;

/// TLS connectors for one peer identity, one per ALPN.
pub(crate) struct Connectors {
    pub h2: TlsConnector,
    pub http1: TlsConnector,
    /// Only for peers that cannot take tunnels.
    pub tcp: TlsConnector,
}

/// Builds the connectors that accept only `identity`.
pub(crate) type ConnectorFactory =
    dyn Fn(&SpiffeId) -> Result<Connectors, tessera_mesh::tls::TlsError> + Send + Sync;
