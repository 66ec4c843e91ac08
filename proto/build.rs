//! Compiles proto/*.proto with protox (pure Rust; no protoc needed) for tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/dataloader.proto", "proto/coordinator.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
