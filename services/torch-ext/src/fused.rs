//! RMSNorm, SwiGLU and rotary embedding as single autograd functions (`cpp/fused.cpp`,
//! `cpp/rotary.cpp`). They compute what the tensor-op versions compute, with the same roundings,
//! in fewer passes, and keep less for the backward pass. RMSNorm and rotary are one-pass CPU
//! kernels (callers use the tensor ops on other devices); SwiGLU runs on any device.

use std::ffi::c_char;

use tch::Tensor;

use crate::ffi;

/// `weight · round(x / rms(x))` over the last axis, statistics in fp32. `x` may be a view whose
/// last axis is contiguous (a head of a fused q/k/v output); `weight` is cast to x's dtype.
/// Panics, as tch's ops do, if libtorch refuses the tensors.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    call("rms_norm", |err, len| unsafe { ffi::lathe_rms_norm(x.as_ptr() as *mut _, weight.as_ptr() as *mut _, eps, err, len) })
}

/// `x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x₂, x₁]`, for CPU tensors in bf16 or
/// fp32: `x` (B, H, T, D), possibly a transposed view, `cos` and `sin` (B, 1, T, D). Equal bit
/// for bit to those tensor ops, gradient included; the output is laid out like `x`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    call("rotary", |err, len| unsafe { ffi::lathe_rotary(x.as_ptr() as *mut _, cos.as_ptr() as *mut _, sin.as_ptr() as *mut _, err, len) })
}

/// The vector instructions the CPU kernels (RMSNorm, rotary) run with on this CPU: each is
/// compiled for AVX-512, AVX2 and baseline x86-64, all giving the same bits, and the widest the
/// CPU has is used.
pub fn cpu_kernel_isa() -> &'static str {
    match unsafe { ffi::lathe_cpu_kernel_isa() } {
        2 => "avx512",
        1 => "avx2",
        _ => "baseline",
    }
}

/// `silu(gate) · up` for `z = [gate | up]` along the last axis (the fused gate/up projection's
/// output): (…, 2I) → (…, I), with autograd's numerics exactly. Keeps only `z` for the backward
/// pass and returns its gradient as one tensor.
pub fn swiglu(z: &Tensor) -> Tensor {
    call("swiglu", |err, len| unsafe { ffi::lathe_swiglu(z.as_ptr() as *mut _, err, len) })
}

fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> *mut torch_sys::C_tensor) -> Tensor {
    ffi::new_tensor(f).unwrap_or_else(|message| panic!("{what}: {message}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tch::{Device, Kind};

    use super::*;

    /// The ISA cap is process-wide and tests run in parallel threads: each test that lowers it
    /// holds this while it compares variants, so another cannot raise or lower it meanwhile.
    static ISA_CAP: Mutex<()> = Mutex::new(());

    /// `f` run with the kernels capped at `cap` (0 baseline, 1 AVX2, 2 AVX-512).
    fn with_isa_cap<T>(cap: i32, f: impl FnOnce() -> T) -> T {
        let previous = unsafe { ffi::lathe_cpu_kernel_set_isa_cap(cap) };
        let out = f();
        unsafe { ffi::lathe_cpu_kernel_set_isa_cap(previous) };
        out
    }

    fn reference_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let var = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        w.to_kind(x.kind()) * (x32 * (var + eps).rsqrt()).to_kind(x.kind())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
    }

    /// Forward and input/weight gradients of `f` against `reference` for one input.
    fn grads(f: impl Fn(&Tensor, &Tensor) -> Tensor, x: &Tensor, w: &Tensor, g: &Tensor) -> (Tensor, Tensor, Tensor) {
        let x = x.detach().set_requires_grad(true);
        let w = w.detach().set_requires_grad(true);
        let y = f(&x, &w);
        (y.shallow_clone() * g).sum(Kind::Float).backward();
        (y.detach(), x.grad(), w.grad())
    }

    #[test]
    fn rms_norm_matches_the_tensor_op_version_in_fp32_and_bf16() {
        tch::manual_seed(0);
        for (kind, tol) in [(Kind::Float, 2e-6), (Kind::BFloat16, 0.02)] {
            let x = (Tensor::randn([3, 5, 96], (Kind::Float, Device::Cpu)) * 3.0).to_kind(kind);
            let w = Tensor::randn([96], (Kind::Float, Device::Cpu)).to_kind(kind);
            let g = Tensor::randn([3, 5, 96], (Kind::Float, Device::Cpu)).to_kind(kind);
            let ours = grads(|x, w| rms_norm(x, w, 1e-6), &x, &w, &g);
            let theirs = grads(|x, w| reference_rms_norm(x, w, 1e-6), &x, &w, &g);
            for (name, a, b) in [("y", &ours.0, &theirs.0), ("dx", &ours.1, &theirs.1), ("dw", &ours.2, &theirs.2)] {
                let scale = b.to_kind(Kind::Float).abs().max().double_value(&[]).max(1.0);
                let d = max_diff(a, b) / scale;
                assert!(d < tol, "{kind:?} {name}: relative difference {d}");
            }
        }
    }

    #[test]
    fn bf16_rms_norm_gives_the_same_bits_with_every_vector_isa_the_cpu_has() {
        tch::manual_seed(3);
        let _cap = ISA_CAP.lock().unwrap_or_else(|e| e.into_inner());
        let best = unsafe { ffi::lathe_cpu_kernel_isa() };
        // Widths with and without a tail past the 8 lanes; a strided view of heads as well.
        for d in [64_i64, 100] {
            let x = (Tensor::randn([3, 7, d], (Kind::Float, Device::Cpu)) * 3.0).to_kind(Kind::BFloat16);
            let w = Tensor::randn([d], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let g = Tensor::randn([3, 7, d], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let fused = Tensor::randn([2, 5, 3 * d], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
            let heads = fused.narrow(2, d, d).view([2, 5, 1, d]);
            let run = |cap: i32| with_isa_cap(cap, || (grads(|x, w| rms_norm(x, w, 1e-6), &x, &w, &g), rms_norm(&heads, &w, 1e-6)));
            let ((y0, dx0, dw0), h0) = run(0);
            for cap in 1..=best {
                let ((y, dx, dw), h) = run(cap);
                for (name, a, b) in [("y", &y, &y0), ("dx", &dx, &dx0), ("dw", &dw, &dw0), ("heads", &h, &h0)] {
                    assert!(a.equal(b), "d {d}, isa {cap} vs baseline: {name} differs by {}", max_diff(a, b));
                }
            }
        }
    }

    fn reference_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        let rotated = Tensor::cat(&[&(-x.narrow(-1, half, half)), &x.narrow(-1, 0, half)], -1);
        x * cos + rotated * sin
    }

    #[test]
    fn rotary_equals_the_tensor_ops_bit_for_bit_with_gradients_on_every_isa() {
        tch::manual_seed(4);
        let _cap = ISA_CAP.lock().unwrap_or_else(|e| e.into_inner());
        let best = unsafe { ffi::lathe_cpu_kernel_isa() };
        for kind in [Kind::Float, Kind::BFloat16] {
            // q as the decoder makes it: (B, T, H, D) heads transposed to (B, H, T, D).
            let (b, t, h, d) = (2, 9, 3, 64);
            let x = (Tensor::randn([b, t, h, d], (Kind::Float, Device::Cpu)) * 2.0).to_kind(kind).transpose(1, 2);
            // One table per sequence; (1, 1, T, D) one for all is checked below.
            let angles = Tensor::randn([b, 1, t, d], (Kind::Float, Device::Cpu)) * 3.0;
            let (cos, sin) = (angles.cos().to_kind(kind), angles.sin().to_kind(kind));
            let g = Tensor::randn([b, h, t, d], (Kind::Float, Device::Cpu)).to_kind(kind);
            let run = |f: &dyn Fn(&Tensor) -> Tensor| {
                let x = x.detach().set_requires_grad(true);
                let y = f(&x);
                // d(Σ y·g)/dy = g exactly (×1), so x.grad is the backward pass of g.
                (y.shallow_clone() * &g).sum(Kind::Float).backward();
                (y.detach(), x.grad())
            };
            let (want_y, want_dx) = run(&|x| reference_rotary(x, &cos, &sin));
            for cap in 0..=best {
                let (y, dx) = with_isa_cap(cap, || run(&|x| rotary(x, &cos, &sin)));
                assert!(y.equal(&want_y), "{kind:?} isa {cap}: y differs by {}", max_diff(&y, &want_y));
                assert!(dx.equal(&want_dx), "{kind:?} isa {cap}: dx differs by {}", max_diff(&dx, &want_dx));
                assert_eq!(y.stride(), want_y.stride(), "laid out like x, as ATen's ops lay theirs out");
            }
            let (cos1, sin1) = (cos.narrow(0, 1, 1), sin.narrow(0, 1, 1));
            let shared = rotary(&x, &cos1, &sin1);
            assert!(shared.equal(&reference_rotary(&x, &cos1, &sin1)), "{kind:?}: a batch-of-one table");
        }
    }

    #[test]
    fn rms_norm_reads_heads_of_a_strided_view_in_place() {
        tch::manual_seed(1);
        // (B, T, 3·H·D) fused output; the middle third viewed as (B, T, H, D) heads.
        let fused = Tensor::randn([2, 4, 3 * 4 * 8], (Kind::Float, Device::Cpu));
        let heads = fused.narrow(2, 32, 32).view([2, 4, 4, 8]);
        let w = Tensor::randn([8], (Kind::Float, Device::Cpu));
        let d = max_diff(&rms_norm(&heads, &w, 1e-6), &reference_rms_norm(&heads.contiguous(), &w, 1e-6));
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn swiglu_equals_silu_gate_times_up_with_gradients() {
        tch::manual_seed(2);
        for kind in [Kind::Float, Kind::BFloat16] {
            let z = (Tensor::randn([2, 3, 2 * 40], (Kind::Float, Device::Cpu)) * 2.0).to_kind(kind);
            let g = Tensor::randn([2, 3, 40], (Kind::Float, Device::Cpu)).to_kind(kind);
            let run = |f: &dyn Fn(&Tensor) -> Tensor| {
                let z = z.detach().set_requires_grad(true);
                let y = f(&z);
                (y.shallow_clone() * &g).sum(Kind::Float).backward();
                (y.detach(), z.grad())
            };
            let ours = run(&|z| swiglu(z));
            let theirs = run(&|z| {
                let parts = z.split(40, -1);
                parts[0].silu() * &parts[1]
            });
            // The same ATen ops in the same order: equal, not merely close.
            for (name, a, b) in [("y", &ours.0, &theirs.0), ("dz", &ours.1, &theirs.1)] {
                assert_eq!(max_diff(a, b), 0.0, "{kind:?} {name}");
            }
        }
    }
}
