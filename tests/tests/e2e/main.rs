//! End-to-end tests: real control-plane and proxy processes on loopback.
//! They need the binaries built first (`cargo build --bins`), which the test script does.

#![forbid(unsafe_code)]

mod authz;
mod cert_manager;
mod churn;
mod dashboards;
mod demo;
mod detection;
mod discovery;
mod grpc;
mod hostile;
mod http;
mod identity_api;
mod images;
mod injected_pods;
mod injection;
mod install;
mod jaeger;
mod kubernetes;
mod lifecycle;
mod migration;
mod mtls;
mod observability;
mod opa;
mod rate_limit;
mod reliability;
mod resilience;
mod rotation;
mod tracing;
mod transparent;
