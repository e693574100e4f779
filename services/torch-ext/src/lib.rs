//! What `tch` lacks, and what a person debugging a GPU node needs to see. It sits under the
//! trainer (device choice, peak device memory) and `lathe doctor`:
//!
//! ```text
//! cpp/shim.cpp ──extern "C"──▶ ffi ──▶ backend (is the GPU backend linked, libtorch version)
//!                                  └─▶ memory  (CUDA caching allocator: peak bytes per device)
//! cpp/dist.cpp ──extern "C"──▶ ffi ──▶ dist    (c10d: TCPStore + ProcessGroupGloo collectives)
//! cpp/nf4.cpp  ──extern "C"──▶ ffi ──▶ nf4     (NF4 dequantization, the QLoRA linear)
//! cpp/profile.cpp ─extern "C"─▶ ffi ──▶ profile (libtorch's op profiler, Chrome trace)
//! cpp/fused.cpp ──extern "C"──▶ ffi ──▶ fused   (one-pass RMSNorm and SwiGLU on the CPU)
//! cpp/rotary.cpp ─extern "C"──▶ ffi ──▶ fused   (one-pass rotary embedding on the CPU)
//! cpp/loss.cpp ──extern "C"──▶ ffi ──▶ loss    (cross-entropy over the head, in chunks)
//! /proc/self/maps ───────────────────▶ libraries (which libtorch / CUDA libraries are loaded)
//! libcuda.so.1 (dlopen) ─────────────▶ driver  (driver version, device names, memory, capability)
//! ```
//!
//! The shim is compiled by `build.rs` against the headers of the very libtorch that tch links.
//! That build script is also what makes binaries load libtorch's GPU backend at all: read its
//! header before touching how this crate is linked. One shim crate for everything tch lacks.

pub mod backend;
pub mod dist;
pub mod driver;
mod ffi;
pub mod fused;
pub mod libraries;
pub mod loss;
pub mod memory;
pub mod nf4;
pub mod profile;
