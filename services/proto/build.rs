//! Generates the controller⇄worker gRPC code from `proto/lathe/v1/worker.proto`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../../proto";
    let descriptors = protox::compile(["lathe/v1/worker.proto"], [proto_root])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed={proto_root}");
    Ok(())
}
