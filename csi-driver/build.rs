//! Generates the CSI gRPC code (messages, `Identity`/`Node` servers and clients) from
//! `proto/csi.proto` at build time. `protox` parses the file in pure Rust, so no system
//! `protoc` is needed; `tonic-prost-build` turns the descriptors into Rust in `OUT_DIR`,
//! included by `src/csi_proto.rs`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let csi_proto = proto_dir.join("csi.proto");
    println!("cargo:rerun-if-changed={}", csi_proto.display());

    // `google/protobuf/wrappers.proto` (imported by csi.proto) is built into protox.
    let descriptors = protox::compile([&csi_proto], [&proto_dir])?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // No `connect(uri)` helpers: the CSI socket is a Unix socket, connected with
        // `Endpoint::connect_with_connector`.
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
