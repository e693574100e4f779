//! NF4 weights (QLoRA): dequantization and the memory-saving linear of `cpp/nf4.cpp`. The
//! format is bitsandbytes'; quantizing lives with the trainer (`lathe_trainer::nf4`), which
//! owns the tensors these functions read.

use tch::{Kind, TchError, Tensor};

use crate::ffi;

/// The tensors of one NF4 weight, borrowed.
#[derive(Clone, Copy)]
pub struct Nf4View<'a> {
    /// (numel / 2) uint8, the even element in the high nibble.
    pub packed: &'a Tensor,
    /// fp32 scale per block, or uint8 codes into `code2` with double quantization.
    pub absmax: &'a Tensor,
    /// With double quantization: `code2` (256 fp32), `absmax2` (fp32 per `blocksize2` scales), `offset`.
    pub double: Option<DoubleQuant<'a>>,
    pub blocksize: i64,
    pub out_features: i64,
    pub in_features: i64,
}

#[derive(Clone, Copy)]
pub struct DoubleQuant<'a> {
    pub code: &'a Tensor,
    pub absmax: &'a Tensor,
    pub offset: f32,
    pub blocksize: i64,
}

impl Nf4View<'_> {
    /// The C struct the shim reads; it borrows this view's tensors.
    fn raw(&self) -> ffi::LatheNf4 {
        let ptr = |t: &Tensor| t.as_ptr() as *mut torch_sys::C_tensor;
        let (absmax2, code2, offset, blocksize2) = match self.double {
            Some(d) => (ptr(d.absmax), ptr(d.code), d.offset as f64, d.blocksize),
            None => (std::ptr::null_mut(), std::ptr::null_mut(), 0.0, 0),
        };
        ffi::LatheNf4 {
            packed: ptr(self.packed),
            absmax: ptr(self.absmax),
            absmax2,
            code2,
            offset,
            blocksize: self.blocksize,
            blocksize2,
            out_features: self.out_features,
            in_features: self.in_features,
        }
    }
}

/// The weight as an (out, in) tensor of `kind`: each value `NF4[code] · scale` in fp32, rounded
/// once to `kind`.
pub fn dequantize(w: Nf4View, kind: Kind) -> Result<Tensor, TchError> {
    let (raw, dtype) = (w.raw(), scalar_type(kind)?);
    call(|err, len| unsafe { ffi::lathe_nf4_dequantize(&raw, dtype, err, len) })
}

/// `x · Wᵀ`, differentiable in `x`. Autograd keeps the 4-bit tensors, not the dequantized weight;
/// the backward pass dequantizes again.
pub fn matmul(x: &Tensor, w: Nf4View) -> Result<Tensor, TchError> {
    let raw = w.raw();
    call(|err, len| unsafe { ffi::lathe_nf4_matmul(x.as_ptr() as *mut _, &raw, err, len) })
}

/// c10::ScalarType of the dtypes a weight is dequantized to (tch keeps its own mapping private).
fn scalar_type(kind: Kind) -> Result<i32, TchError> {
    match kind {
        Kind::Half => Ok(5),
        Kind::Float => Ok(6),
        Kind::BFloat16 => Ok(15),
        other => Err(TchError::Kind(format!("nf4: cannot dequantize to {other:?}"))),
    }
}

fn call(f: impl FnOnce(*mut std::ffi::c_char, usize) -> *mut torch_sys::C_tensor) -> Result<Tensor, TchError> {
    ffi::new_tensor(f).map_err(TchError::Torch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(packed: &'a Tensor, absmax: &'a Tensor, out: i64, inp: i64) -> Nf4View<'a> {
        Nf4View { packed, absmax, double: None, blocksize: 64, out_features: out, in_features: inp }
    }

    #[test]
    fn codes_map_to_the_nf4_table_times_the_block_scale() {
        // Codes 0..15 twice per block: the high nibble is the even element.
        let bytes: Vec<u8> = (0..64u8).map(|i| ((i % 8) * 2) << 4 | ((i % 8) * 2 + 1)).collect();
        let packed = Tensor::from_slice(&bytes);
        let absmax = Tensor::from_slice(&[2.0f32, 0.5]);
        let w = dequantize(view(&packed, &absmax, 2, 64), Kind::Float).unwrap();
        let values: Vec<f32> = Vec::try_from(w.flatten(0, -1)).unwrap();
        assert_eq!(values[0], -2.0);
        assert_eq!(values[7], 0.0);
        assert_eq!(values[15], 2.0);
        assert_eq!(values[64 + 15], 0.5);
        assert_eq!(values[64 + 1], -0.696_192_8 * 0.5);
    }

    #[test]
    fn the_matmul_equals_a_linear_on_the_dequantized_weight_and_its_gradient_reaches_x() {
        tch::manual_seed(3);
        let packed = Tensor::randint(256, [3 * 128 / 2], (Kind::Uint8, tch::Device::Cpu));
        let absmax = Tensor::rand([3 * 128 / 64], (Kind::Float, tch::Device::Cpu));
        let w = view(&packed, &absmax, 3, 128);
        let dense = dequantize(w, Kind::Float).unwrap();
        let x = Tensor::randn([2, 5, 128], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let y = matmul(&x, w).unwrap();
        let expected = x.detach().linear::<Tensor>(&dense, None);
        assert_eq!((&y - &expected).abs().max().double_value(&[]), 0.0);
        let g = Tensor::randn([2, 5, 3], (Kind::Float, tch::Device::Cpu));
        (&y * &g).sum(Kind::Float).backward();
        let expected_grad = g.matmul(&dense);
        assert!((x.grad() - expected_grad).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn a_bad_shape_is_an_error_not_a_crash() {
        let packed = Tensor::zeros([8], (Kind::Uint8, tch::Device::Cpu));
        let absmax = Tensor::ones([1], (Kind::Float, tch::Device::Cpu));
        let err = dequantize(view(&packed, &absmax, 4, 64), Kind::Float).unwrap_err();
        assert!(err.to_string().contains("packed bytes"), "{err}");
    }
}
