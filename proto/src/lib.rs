//! The wire API between proxy and control plane: the identity (Certify a CSR) and
//! discovery (stream of snapshots) gRPC services, generated from `proto/*.proto` at
//! build time. What travels inside them — identities, resources, the snapshot — is
//! `tessera-mesh`'s.

#![forbid(unsafe_code)]

pub mod api;
pub mod codec;
