//! The shim's library side: a private containerd for its end-to-end tests and benchmarks.
//! The shim itself is the `containerd-shim-msb-v2` binary (`src/main.rs`).

pub mod harness;
