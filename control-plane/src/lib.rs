//! The Tessera control plane and the `tessera` command line.
//!
//! `ca` signs workload certificates that `identity_service` hands out after checking
//! `token`s or current certificates; `discovery_service` streams configuration; `grpc`
//! terminates TLS for both on one port; `app` wires them; `demo` runs a whole mesh on
//! loopback. `inject` adds the sidecar to Kubernetes objects, for `tessera inject` and
//! for `webhook`, the admission webhook on 15017.

#![forbid(unsafe_code)]
// Modules and items are `pub(crate)` unless another crate (or the binary) uses them.
#![warn(unreachable_pub)]

pub mod app;
pub mod ca;
pub(crate) mod catalog;
pub mod check;
pub mod cli;
pub(crate) mod config;
/// The one part that runs proxies, so the one that depends on `tessera-proxy`.
#[cfg(feature = "demo")]
pub mod demo;
pub(crate) mod discovery_service;
pub(crate) mod grpc;
pub(crate) mod identity_service;
pub mod inject;
pub mod install;
pub mod kubernetes;
pub(crate) mod state;
pub(crate) mod telemetry;
pub mod token;
pub(crate) mod webhook;
