//! The Tessera control plane and the `tessera` command line.
//!
//! `ca` signs workload certificates that `identity_service` hands out after checking
//! `token`s or current certificates; `discovery_service` streams configuration; `grpc`
//! terminates TLS for both on one port; `app` wires them; `demo` runs a whole mesh on
//! loopback. `inject` adds the sidecar to Kubernetes objects, for `tessera inject` and
//! for `webhook`, the admission webhook on 15017.

#![forbid(unsafe_code)]

pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
/// The one part that runs proxies, so the one that depends on `tessera-proxy`.
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery_service;
pub mod grpc;
pub mod identity_service;
pub mod inject;
pub mod kubernetes;
pub mod state;
pub mod telemetry;
pub mod token;
pub mod webhook;
