//! Compiles the test gRPC services: Echo, and the standard health service.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    println!("cargo:rerun-if-changed=proto/health.proto");
    let descriptors = protox::compile(["proto/echo.proto", "proto/health.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
