//! Generates the Discovery service with a pure-Rust protobuf compiler, so a fresh clone
//! builds with cargo alone (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/discovery.proto");
    let fds = protox::compile(["proto/discovery.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
