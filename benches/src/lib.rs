//! Tessera's benchmarks. `benches/hot_paths.rs` measures, with criterion, the pieces of
//! work the proxy does on every connection or request: protocol detection, policy
//! evaluation, path normalization, header propagation and metrics recording.
//! Run them with `cargo bench -p tessera-benches`.
