//! Compiles the gRPC APIs with a pure-Rust protobuf compiler, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/identity.proto", "proto/discovery.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBuffers")
        // A resource's body is shared by every stream that sends it, not copied per stream.
        .bytes(".tessera.discovery.v1.Resource.body")
        .compile_fds(descriptors)?;
    Ok(())
}
