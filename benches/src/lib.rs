//! Tessera's benchmarks.
//!
//! The side-by-side harness (`cargo run --release -p tessera-benches -- all`) starts
//! every process itself — servers, a Tessera control plane and proxy pair, an HAProxy
//! pair — and measures the same workloads through each path in one run: `topology`
//! builds the paths, `load` drives them, `proc_stats` reads each proxy's CPU time and
//! memory from /proc, `control_plane` measures certificate signing and configuration
//! push, `report` prints the table and writes JSON, `run_name` names a run's results by
//! date and commit. `scenario` decides what runs in which order. `rate_limit` measures
//! how closely a RateLimitPolicy holds its rate under overload (`rate-limit`).
//!
//! `fleet` measures the control plane at fleet scale — a large simulated mesh, many
//! simulated proxies' discovery streams (`subscriber`), a restart — and one real proxy
//! in that mesh (`tessera-benches fleet`).
//!
//! `rego` puts the cost of a Rego (CUSTOM policy) decision in the proxy next to the same
//! decision asked of an OPA server over loopback REST (`tessera-benches rego`);
//! `authz_paths` does the same side by side, under load, through proxy pairs
//! (`tessera-benches rego-paths`).
//!
//! `benches/hot_paths.rs` measures, with criterion, the pieces of work the proxy does on
//! every connection or request: protocol detection, policy evaluation, path
//! normalization, header propagation and metrics recording. Run them with
//! `cargo bench -p tessera-benches`.

#![forbid(unsafe_code)]

pub mod authz_paths;
pub mod certs;
pub mod control_plane;
pub mod error;
pub mod fleet;
pub mod load;
pub mod proc_stats;
pub mod process;
pub mod rate_limit;
pub mod rego;
pub mod report;
pub mod run_name;
pub mod scenario;
pub mod subscriber;
pub mod topology;

pub use error::BenchError;
