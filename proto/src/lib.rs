//! What the Tessera proxy and control plane share: the gRPC APIs, the SPIFFE identity
//! type, TLS verification of SPIFFE certificates, the configuration resources and the
//! logging setup. Anything both sides must agree on lives here, once.

// No `unsafe` in the library; its tests count allocations with a global allocator of
// their own (`policy::tests`), which is an unsafe trait to implement.
#![cfg_attr(not(test), forbid(unsafe_code))]
#![cfg_attr(test, deny(unsafe_code))]

pub mod api;
pub mod logging;
pub mod mesh;
pub mod policy;
pub mod resources;
pub mod spiffe;
pub mod tls;

pub use spiffe::SpiffeId;
