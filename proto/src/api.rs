//! The gRPC APIs, generated at build time from `proto/*.proto`.

/// Identity API: certificate signing for workloads.
pub mod identity {
    tonic::include_proto!("tessera.identity.v1");
}

/// Discovery API: configuration snapshots streamed to proxies.
pub mod discovery {
    tonic::include_proto!("tessera.discovery.v1");
}
