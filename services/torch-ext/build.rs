//! Compiles `cpp/shim.cpp` against the headers of the libtorch that tch links, and makes every
//! binary that uses this crate load libtorch's GPU backend.
//!
//! Why the backend needs help: libtorch registers CUDA (or HIP) from the static initialisers of
//! `libtorch_cuda.so` (`libtorch_hip.so`). Rust code calls nothing in that library directly, and
//! rustc links with `--as-needed`, so the linker drops it from the ELF dependencies: the binary
//! then runs with a CPU-only libtorch on a GPU machine. `cargo:rustc-link-arg` cannot fix this,
//! since it only reaches this package's own binaries. What does work from a library crate is a
//! real reference: the shim takes the address of a function defined in the backend library
//! (`lathe_gpu_backend_anchor`), and the Rust side calls the shim whenever it resolves a device,
//! so any binary that can train references the backend and the linker keeps it.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=cpp/shim.cpp");
    println!("cargo:rerun-if-changed=cpp/dist.cpp");
    println!("cargo:rerun-if-changed=cpp/dist_nccl.cpp");
    println!("cargo:rerun-if-changed=cpp/nf4.cpp");
    println!("cargo:rerun-if-changed=cpp/profile.cpp");
    println!("cargo:rerun-if-changed=cpp/fused.cpp");
    println!("cargo:rerun-if-changed=cpp/loss.cpp");
    println!("cargo:rerun-if-changed=cpp/rotary.cpp");
    println!("cargo:rerun-if-changed=cpp/simd.h");
    println!("cargo:rerun-if-changed=cpp/error.h");
    println!("cargo:rerun-if-env-changed=LATHE_CUDA_INCLUDE");
    println!("cargo::rustc-check-cfg=cfg(lathe_nccl)");
    println!("cargo:rerun-if-changed=cpp/gloo_decls");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo::rustc-check-cfg=cfg(lathe_gpu_backend)");

    // torch-sys (links = "tch") publishes the libtorch lib directory it linked against.
    let lib_dir = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not report its libtorch directory (DEP_TCH_LIBTORCH_LIB)"),
    );
    let root = lib_dir.parent().expect("libtorch lib directory has a parent");
    // gloo_decls: the wheel has no Gloo headers; see cpp/gloo_decls/README.md.
    let includes = [root.join("include"), root.join("include/torch/csrc/api/include"), PathBuf::from("cpp/gloo_decls")];

    let backend = gpu_backend(&lib_dir);
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .includes(&includes)
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        // No fused multiply-add unless written: cpp/fused.cpp compiles its kernels for several
        // ISAs, and contraction on the ones with FMA would change their results' bits.
        .flag("-ffp-contract=off")
        .file("cpp/shim.cpp")
        .file("cpp/dist.cpp")
        .file("cpp/nf4.cpp")
        .file("cpp/profile.cpp")
        .file("cpp/fused.cpp")
        .file("cpp/loss.cpp")
        .file("cpp/rotary.cpp");
    if backend.is_some() {
        build.define("LATHE_GPU_BACKEND", None);
    }
    // NCCL for data parallel on CUDA: its c10d header needs nccl.h and the CUDA runtime headers,
    // which the CUDA torch wheel's nvidia-* packages ship. Without them (a CPU or ROCm libtorch)
    // GPU ranks are refused with a message saying so (cpp/dist.cpp).
    let nccl_includes = match backend {
        Some("torch_cuda") => cuda_includes(root),
        _ => None,
    };
    if let Some(dirs) = &nccl_includes {
        build.define("LATHE_NCCL", None).includes(dirs).file("cpp/dist_nccl.cpp");
        println!("cargo:rustc-cfg=lathe_nccl");
    }
    build.compile("lathe_torch_ext");

    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    if let Some(name) = backend {
        // After the shim on the link line, so the shim's reference keeps it under --as-needed.
        println!("cargo:rustc-link-lib=dylib={name}");
        println!("cargo:rustc-cfg=lathe_gpu_backend");
        println!("cargo:rustc-env=LATHE_GPU_BACKEND_LIB=lib{name}.so");
    }
    if nccl_includes.is_some() {
        // c10::cuda::set_device (dist_nccl.cpp); ProcessGroupNCCL itself is in torch_cuda.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The include directories holding `nccl.h` and the CUDA runtime headers (with `crt/` and
/// `nv/target`, from nvidia-cuda-crt and nvidia-cuda-cccl in scripts/requirements.txt): `LATHE_CUDA_INCLUDE`
/// (colon-separated), else the `nvidia/*/include` folders beside the torch package, else
/// `/usr/local/cuda/include`.
fn cuda_includes(torch_root: &Path) -> Option<Vec<PathBuf>> {
    let mut candidates: Vec<PathBuf> = std::env::var("LATHE_CUDA_INCLUDE").map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    if let Some(site) = torch_root.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("include")).filter(|p| p.is_dir()).collect();
            found.sort();
            candidates.extend(found);
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let has = |file: &str| candidates.iter().any(|d| d.join(file).is_file());
    let complete = ["nccl.h", "cuda_runtime_api.h", "crt/host_config.h", "nv/target"].into_iter().all(has);
    if !complete {
        println!("cargo:warning=NCCL process group not built: nccl.h or CUDA headers (crt/, nv/target) not found; GPU ranks will use Gloo");
    }
    complete.then_some(candidates)
}

/// `torch_cuda` for a CUDA libtorch, `torch_hip` for a ROCm one, `None` for a CPU-only build.
fn gpu_backend(lib_dir: &Path) -> Option<&'static str> {
    ["torch_cuda", "torch_hip"].into_iter().find(|name| lib_dir.join(format!("lib{name}.so")).exists())
}
