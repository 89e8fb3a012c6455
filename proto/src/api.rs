//! The gRPC APIs, generated at build time from `proto/*.proto`.

/// Identity API: certificate signing for workloads.
pub mod identity {
    tonic::include_proto!("tessera.identity.v1");
}

/// Discovery API: the resources a proxy uses, subscribed to by name, with deltas.
pub mod discovery {
    tonic::include_proto!("tessera.discovery.v1");
}
