//! Compiles sluice's `proto/echo.proto` (the service every sluice test and demo backend speaks)
//! with the pure-Rust `protox`: no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/echo.proto");
    let descriptors = protox::compile(["../proto/echo.proto"], ["../proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
