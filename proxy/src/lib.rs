//! The Tessera proxy: a per-workload data plane that carries traffic between workloads
//! over mutual TLS, each side proven by a SPIFFE certificate from the control plane.
//!
//! Data flow: `outbound` (local app → mTLS) and `inbound` (mTLS → local app) listeners,
//! sharing `tcp` for the byte relay; `identity` keeps the certificate fresh; `admin`
//! and `telemetry` show what is happening; `app` wires it all from `config`.

pub mod admin;
pub mod allocator;
pub mod app;
pub mod authn;
pub mod authz;
pub mod balance;
pub mod body_rate;
pub mod canonical;
pub mod capture;
pub mod config;
pub mod control_plane;
pub mod detect;
pub mod discovery;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod lifecycle;
pub mod memory;
pub mod migration;
pub mod multiplex;
pub mod outbound;
pub mod pool;
pub mod retry;
pub mod router;
pub mod tcp;
pub mod telemetry;
pub mod trace;
pub mod transparent;

pub use app::{RunningProxy, start};
pub use config::ProxyConfig;
