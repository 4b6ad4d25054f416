//! Compiles the Talos API subset in `proto/` with protox: no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "machine/machine.proto",
            "machine/image.proto",
            "machine/lifecycle.proto",
        ],
        ["proto"],
    )?;
    // Snapshot chunks are bytes::Bytes: no copy between the gRPC frame and the upload.
    tonic_prost_build::configure()
        .bytes(".common.Data")
        .compile_fds(fds)?;
    Ok(())
}
