//! The `/migration` report: who reaches each inbound port of a proxy, over mTLS and in
//! plaintext, and under which mode. The proxy serves it on its admin port; `tessera
//! check migration` reads it to tell whether switching a port to STRICT would break a
//! flow that is still live. One definition, so the two sides cannot drift apart.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    /// The proxy's own SPIFFE ID.
    pub workload: String,
    pub ports: Vec<PortReport>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PortReport {
    pub listen: std::net::SocketAddr,
    pub application_port: u16,
    /// `STRICT`, `PERMISSIVE`, `DISABLE`, or `unknown` before the first policy.
    pub mode: String,
    /// The PeerAuthentication that set the mode; none: the default.
    pub mode_policy: Option<String>,
    pub mtls: Vec<SourceReport>,
    pub plaintext: Vec<SourceReport>,
}

/// One source of connections to a port: a SPIFFE ID (mTLS) or an address (plaintext).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceReport {
    pub source: String,
    pub connections: u64,
    pub last_seen_seconds_ago: u64,
}
