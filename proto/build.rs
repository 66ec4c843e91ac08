//! Compiles proto/*.proto with protox (pure Rust; no protoc needed) for tonic.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/dataloader.proto", "proto/coordinator.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // Job specs are stored by the coordinator (jobs.json): serde, with absent fields defaulted.
    tonic_prost_build::configure()
        .type_attribute(
            ".taming.coordinator.v1.JobSpec",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
