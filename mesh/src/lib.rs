//! What every Tessera process knows of the mesh, and does the same way.
//!
//! The mesh's model, shared by the proxy (which enforces it) and the control plane
//! (which builds and checks it): SPIFFE identities ([`spiffe`]), TLS that accepts only
//! them ([`tls`]), the `tessera.dev/v1alpha1` resources operators write ([`resources`],
//! [`policy`], [`rate_limit`]), the snapshot the control plane builds ([`snapshot`]) and what proxies subscribe to of it ([`discovery`]) and the migration report a
//! proxy gives ([`migration`]). Beside it, [`process`]: logging, the admin port, accept
//! back-off and signals. The wire API that carries all this is `tessera-proto`'s.

// No `unsafe` in the library; its tests count allocations with a global allocator of
// their own (`policy::tests`), which is an unsafe trait to implement.
#![cfg_attr(not(test), forbid(unsafe_code))]
#![cfg_attr(test, deny(unsafe_code))]
#![warn(unreachable_pub)]

pub mod discovery;
pub mod migration;
pub mod policy;
pub mod process;
pub mod rate_limit;
pub mod resources;
pub mod snapshot;
pub mod spiffe;
pub mod tls;

pub use spiffe::SpiffeId;
