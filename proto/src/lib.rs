//! What the Tessera proxy and control plane share: the gRPC APIs, the SPIFFE identity
//! type, TLS verification of SPIFFE certificates, the configuration resources and the
//! logging setup. Anything both sides must agree on lives here, once.

pub mod api;
pub mod logging;
pub mod mesh;
pub mod policy;
pub mod resources;
pub mod spiffe;
pub mod tls;

pub use spiffe::SpiffeId;
