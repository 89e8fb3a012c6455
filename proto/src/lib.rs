//! The wire API between proxy and control plane: the identity (Certify a CSR) and
//! discovery (stream of snapshots) gRPC services, generated from `proto/*.proto` at
//! build time. What travels inside them — identities, resources, the snapshot — is
//! `tessera-mesh`'s.

// No `unsafe` in the library; its tests count allocations with a global allocator of
// their own (`policy::tests`), which is an unsafe trait to implement.
#![cfg_attr(not(test), forbid(unsafe_code))]
#![cfg_attr(test, deny(unsafe_code))]

pub mod api;
