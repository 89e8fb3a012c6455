//! The Tessera control plane and the `tessera` command line.
//!
//! `ca` signs workload certificates that `identity_service` hands out after checking
//! `token`s or current certificates; `discovery_service` streams configuration; `grpc`
//! terminates TLS for both on one port; `app` wires them; `demo` runs a whole mesh on
//! loopback.

pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
pub mod demo;
pub mod discovery_service;
pub mod grpc;
pub mod identity_service;
pub mod state;
pub mod telemetry;
pub mod token;
