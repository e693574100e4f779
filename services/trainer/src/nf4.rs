//! QLoRA's frozen base weights: 4-bit NormalFloat (NF4) in blocks of 64, quantized exactly as
//! bitsandbytes quantizes them (`bitsandbytes.functional.quantize_4bit`, `quant_type="nf4"`), so
//! a Lathe QLoRA run trains on the very weights a `BitsAndBytesConfig(load_in_4bit=True)` model
//! holds (docs/qlora.md).
//!
//! - Each block of 64 values is scaled by its absolute maximum into [-1, 1] and every value
//!   rounded to the nearest of the 16 NF4 levels (ties to the lower level), two codes per byte,
//!   the even element in the high nibble.
//! - With double quantization the fp32 block maxima are centred on their mean and quantized
//!   again, 8 bits each in blocks of 256, with bitsandbytes' signed dynamic code
//!   ([`dynamic_code`]): 0.5 + 8.1/64 bits per weight instead of 0.5 + 32/64.
//!
//! Dequantizing and the memory-saving linear are libtorch kernels in `lathe_torch_ext::nf4`.

use lathe_torch_ext::nf4::{self, DoubleQuant, Nf4View};
use tch::{Device, Kind, Tensor};

/// How a model's frozen linear weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// In the compute dtype.
    #[default]
    None,
    /// NF4, with or without double quantization of the block maxima (QLoRA).
    Nf4 { double_quant: bool },
}

/// Whether a checkpoint tensor is one that QLoRA quantizes: the seven projections of every
/// decoder layer (what bitsandbytes replaces; embeddings, norms and the output head stay).
pub fn quantizes(name: &str) -> bool {
    name.starts_with("model.layers.")
        && name
            .strip_suffix(".weight")
            .and_then(|module| module.rsplit('.').next())
            .is_some_and(|module| crate::lora::LINEAR_MODULES.contains(&module))
}

/// Values per 4-bit block (bitsandbytes' default for `quantize_4bit`).
pub const BLOCKSIZE: i64 = 64;
/// Block maxima per 8-bit block under double quantization (bitsandbytes' `compress_statistics`).
pub const DOUBLE_QUANT_BLOCKSIZE: i64 = 256;

/// The 16 NF4 levels (`bitsandbytes.functional.get_4bit_type("nf4")`).
#[allow(clippy::excessive_precision)] // bitsandbytes' literals, kept as written there
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// A frozen (out, in) weight in NF4.
#[derive(Debug)]
pub struct Nf4Weight {
    /// (numel / 2) uint8.
    pub packed: Tensor,
    /// One fp32 scale per block, or with double quantization one uint8 code per block.
    pub absmax: Tensor,
    pub double: Option<DoubleQuantState>,
    pub out_features: i64,
    pub in_features: i64,
}

/// The second level of double quantization: block maxima = `code[absmax] · scale + offset`.
#[derive(Debug)]
pub struct DoubleQuantState {
    /// bitsandbytes' signed dynamic 8-bit code, 256 sorted fp32 values.
    pub code: Tensor,
    /// One fp32 scale per [`DOUBLE_QUANT_BLOCKSIZE`] block maxima.
    pub scale: Tensor,
    /// The mean of the fp32 block maxima.
    pub offset: f32,
}

impl Nf4Weight {
    /// Quantizes an (out, in) floating weight, on its device.
    pub fn quantize(weight: &Tensor, double_quant: bool) -> Nf4Weight {
        let (out_features, in_features) = weight.size2().expect("NF4 quantizes (out, in) weights");
        let (packed, absmax) = quantize_4bit(weight);
        let (absmax, double) = if double_quant {
            let (codes, state) = quantize_block_maxima(&absmax);
            (codes, Some(state))
        } else {
            (absmax, None)
        };
        Nf4Weight { packed, absmax, double, out_features, in_features }
    }

    pub fn view(&self) -> Nf4View<'_> {
        Nf4View {
            packed: &self.packed,
            absmax: &self.absmax,
            double: self.double.as_ref().map(|d| DoubleQuant {
                code: &d.code,
                absmax: &d.scale,
                offset: d.offset,
                blocksize: DOUBLE_QUANT_BLOCKSIZE,
            }),
            blocksize: BLOCKSIZE,
            out_features: self.out_features,
            in_features: self.in_features,
        }
    }

    /// The (out, in) weight in `kind`.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        nf4::dequantize(self.view(), kind).expect("NF4 tensors were built by quantize and are consistent")
    }

    /// `x · Wᵀ`; autograd keeps the 4-bit tensors and dequantizes again for the gradient.
    pub fn matmul(&self, x: &Tensor) -> Tensor {
        nf4::matmul(x, self.view()).expect("NF4 tensors were built by quantize and are consistent")
    }

    /// Bytes held: codes, scales and the double-quantization state.
    pub fn stored_bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        bytes(&self.packed) + bytes(&self.absmax) + self.double.as_ref().map_or(0, |d| bytes(&d.code) + bytes(&d.scale) + 4)
    }

    pub fn size(&self) -> [i64; 2] {
        [self.out_features, self.in_features]
    }

    pub fn device(&self) -> Device {
        self.packed.device()
    }
}

/// Elements quantized at once: a whole number of blocks (and even, so codes pair up), small enough
/// that the fp32 temporaries stay ~16 MB each. Quantizing a 4B model's 25M-element MLP weight in
/// one go held ~500 MB of them, the peak of a QLoRA run's memory.
const QUANTIZE_CHUNK: i64 = 1 << 22;

/// bitsandbytes' `quantize_4bit` over the whole weight, [`QUANTIZE_CHUNK`] elements at a time:
/// blocks are independent, so the codes and maxima are those of one pass.
fn quantize_4bit(weight: &Tensor) -> (Tensor, Tensor) {
    quantize_4bit_in_chunks(weight, QUANTIZE_CHUNK)
}

fn quantize_4bit_in_chunks(weight: &Tensor, chunk: i64) -> (Tensor, Tensor) {
    debug_assert!(chunk % BLOCKSIZE == 0 && chunk % 2 == 0);
    let flat = weight.reshape([-1]);
    let n = flat.numel() as i64;
    let (packed, absmax): (Vec<Tensor>, Vec<Tensor>) =
        (0..n).step_by(chunk as usize).map(|start| quantize_4bit_pass(&flat.narrow(0, start, chunk.min(n - start)))).unzip();
    (Tensor::cat(&packed, 0), Tensor::cat(&absmax, 0))
}

/// bitsandbytes' `quantize_4bit` (its CPU/default kernel): block maxima in fp32, values scaled by
/// the maximum's reciprocal, clamped to [-1, 1], bucketed by the midpoints between NF4 levels.
fn quantize_4bit_pass(weight: &Tensor) -> (Tensor, Tensor) {
    let device = weight.device();
    let flat = weight.reshape([-1]).to_kind(Kind::Float);
    let n = flat.numel() as i64;
    let rem = n % BLOCKSIZE;
    let full = n - rem;
    let blocks = flat.narrow(0, 0, full).view([full / BLOCKSIZE, BLOCKSIZE]);
    let mut absmax = blocks.abs().amax([-1].as_slice(), false);
    let mut scaled = (&blocks * absmax.clamp_min(1e-38).reciprocal().view([-1, 1])).clamp(-1.0, 1.0).reshape([-1]);
    if rem > 0 {
        let tail = flat.narrow(0, full, rem);
        let tail_max = tail.abs().max().clamp_min(1e-38);
        scaled = Tensor::cat(&[scaled, (&tail / &tail_max).clamp(-1.0, 1.0)], 0);
        absmax = Tensor::cat(&[absmax, tail_max.unsqueeze(0)], 0);
    }
    if scaled.numel() % 2 == 1 {
        scaled = Tensor::cat(&[scaled, Tensor::zeros([1], (Kind::Float, device))], 0);
    }
    let levels = Tensor::from_slice(&NF4_LEVELS).to_device(device);
    let bounds = (levels.narrow(0, 0, 15) + levels.narrow(0, 1, 15)) / 2.0;
    let codes = Tensor::bucketize(&scaled, &bounds, true, false).to_kind(Kind::Uint8);
    let pairs = codes.view([-1, 2]);
    let packed = pairs.select(1, 0).bitwise_left_shift_tensor_scalar(4).bitwise_or_tensor(&pairs.select(1, 1));
    (packed, absmax)
}

/// Double quantization of the fp32 block maxima (bitsandbytes `quantize_4bit` with
/// `compress_statistics=True`): centre on the mean, then 8-bit blockwise quantization as its CPU
/// kernel does it (a 65536-entry lookup from [-1, 1] to the nearest code).
fn quantize_block_maxima(absmax: &Tensor) -> (Tensor, DoubleQuantState) {
    let device = absmax.device();
    let offset = absmax.mean(Kind::Float);
    let centred: Vec<f32> = Vec::try_from(&(absmax - &offset).to_device(Device::Cpu)).expect("fp32 block maxima");
    let (code, lut) = code_and_lookup();
    let mut codes = Vec::with_capacity(centred.len());
    let mut scales = Vec::with_capacity(centred.len().div_ceil(DOUBLE_QUANT_BLOCKSIZE as usize));
    for block in centred.chunks(DOUBLE_QUANT_BLOCKSIZE as usize) {
        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        scales.push(max);
        if max == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0f32 / max;
        codes.extend(block.iter().map(|v| lut[lookup_index(v * inv)]));
    }
    let state = DoubleQuantState {
        code: Tensor::from_slice(code).to_device(device),
        scale: Tensor::from_slice(&scales).to_device(device),
        offset: offset.double_value(&[]) as f32,
    };
    (Tensor::from_slice(&codes).to_device(device), state)
}

const LOOKUP_SIZE: usize = 65536;

/// The dynamic code and its lookup, built once per process (every quantized weight uses them).
fn code_and_lookup() -> (&'static [f32], &'static [u8]) {
    static TABLES: std::sync::OnceLock<(Vec<f32>, Vec<u8>)> = std::sync::OnceLock::new();
    let (code, lut) = TABLES.get_or_init(|| {
        let code = dynamic_code();
        let lut = nearest_code_lookup(&code);
        (code, lut)
    });
    (code, lut)
}

/// For each of 65536 evenly spaced points of [-1, 1], the index of the nearest code (bitsandbytes
/// `build_quantize_lut`, float for float).
fn nearest_code_lookup(code: &[f32]) -> Vec<u8> {
    let midpoints: Vec<f32> = code.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
    let mut lut = Vec::with_capacity(LOOKUP_SIZE);
    let mut index = 0usize;
    for i in 0..LOOKUP_SIZE {
        let value = -1.0f32 + (2.0f32 * i as f32) / (LOOKUP_SIZE - 1) as f32;
        while index < midpoints.len() && midpoints[index] < value {
            index += 1;
        }
        lut.push(index as u8);
    }
    lut
}

/// bitsandbytes `norm_to_lut_index`: a value of [-1, 1] to its lookup slot. Its CPU library is
/// built for AVX2+FMA, where the compiler fuses the last multiply-add, so this does too.
fn lookup_index(value: f32) -> usize {
    let value = value.clamp(-1.0, 1.0);
    ((value + 1.0) * 0.5f32).mul_add((LOOKUP_SIZE - 1) as f32, 0.5) as u16 as usize
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted fp32 values, a sign, a decimal
/// exponent of 10⁻⁶..10⁰ and a linear fraction. Computed the way its Python computes it (fp32
/// `linspace` and means, scaled by a Python float), so every value matches bit for bit.
pub fn dynamic_code() -> Vec<f32> {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for (i, scale) in SCALES.iter().enumerate() {
        let items = (1i64 << i) + 1;
        let bounds: Vec<f32> = Vec::try_from(&Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu))).expect("fp32 linspace");
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let scale = *scale as f32;
        data.extend(means.iter().map(|m| (scale * m) as f64));
        data.extend(means.iter().map(|m| (-scale * m) as f64));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f64::total_cmp);
    data.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_decoder_projections_are_quantized() {
        assert!(quantizes("model.layers.3.self_attn.q_proj.weight"));
        assert!(quantizes("model.layers.0.mlp.down_proj.weight"));
        assert!(!quantizes("model.layers.0.self_attn.q_proj.bias"));
        assert!(!quantizes("model.layers.0.input_layernorm.weight"));
        assert!(!quantizes("model.embed_tokens.weight"));
        assert!(!quantizes("lm_head.weight"));
    }

    #[test]
    fn quantizing_in_chunks_gives_the_codes_and_maxima_of_one_pass() {
        // 5 blocks and a 13-element tail (odd: the last code is padded), in chunks of 2 blocks.
        let w = Tensor::randn([1, 5 * 64 + 13], (Kind::Float, Device::Cpu));
        let (packed, absmax) = quantize_4bit_in_chunks(&w, 128);
        let (one_packed, one_absmax) = quantize_4bit_pass(&w);
        assert_eq!(packed.size(), [(5 * 64 + 14) / 2]);
        assert!(packed.equal(&one_packed) && absmax.equal(&one_absmax));
    }

    #[test]
    fn a_block_round_trips_to_its_nearest_levels() {
        // A block holding every level times 3: quantizing and dequantizing gives it back exactly.
        let values: Vec<f32> = (0..64).map(|i| NF4_LEVELS[i % 16] * 3.0).collect();
        let w = Tensor::from_slice(&values).view([1, 64]);
        let q = Nf4Weight::quantize(&w, false);
        assert_eq!(q.packed.size(), [32]);
        assert_eq!(Vec::<f32>::try_from(&q.absmax).unwrap(), [3.0]);
        let back = q.dequantize(Kind::Float);
        assert_eq!((back - w).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn values_go_to_the_nearest_level_and_ties_to_the_lower_one() {
        let mid = (NF4_LEVELS[8] + NF4_LEVELS[9]) / 2.0;
        let mut values = vec![0.0f32; 64];
        values[0] = 1.0; // the block maximum
        values[1] = mid; // exactly between levels 8 and 9
        values[2] = NF4_LEVELS[12] + 1e-3;
        let q = Nf4Weight::quantize(&Tensor::from_slice(&values).view([1, 64]), false);
        let bytes: Vec<u8> = Vec::try_from(&q.packed).unwrap();
        assert_eq!(bytes[0], 0xF8, "1.0 is level 15, the midpoint goes down to level 8");
        assert_eq!(bytes[1] >> 4, 12);
    }

    #[test]
    fn double_quantization_keeps_block_maxima_close_and_stores_a_byte_each() {
        tch::manual_seed(5);
        let w = Tensor::randn([256, 128], (Kind::Float, Device::Cpu)) * 0.02;
        let single = Nf4Weight::quantize(&w, false);
        let double = Nf4Weight::quantize(&w, true);
        assert_eq!(double.absmax.kind(), Kind::Uint8);
        assert_eq!(double.absmax.size(), [512]);
        assert_eq!(double.double.as_ref().unwrap().scale.size(), [2]);
        let a = single.dequantize(Kind::Float);
        let b = double.dequantize(Kind::Float);
        let relative = ((&a - &b).abs().max() / a.abs().max()).double_value(&[]);
        assert!(relative < 0.01, "double quantization moved weights by {relative}");
        let error = ((&a - &w).square().mean(Kind::Float).sqrt() / w.square().mean(Kind::Float).sqrt()).double_value(&[]);
        assert!(error > 0.05 && error < 0.15, "NF4 relative RMS error {error}, expected about 0.1");
    }

    #[test]
    fn the_dynamic_code_is_sorted_signed_and_spans_minus_one_to_one() {
        let code = dynamic_code();
        assert_eq!(code.len(), 256);
        assert!(code.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(code[255], 1.0);
        assert!(code[0] < -0.99 && code[0] > -1.0);
        assert!(code.contains(&0.0));
        assert_eq!(code.iter().filter(|v| v.abs() < 1e-6).count(), 3, "0 and ±5.5e-7");
    }

    #[test]
    fn the_lookup_maps_each_point_to_its_nearest_code() {
        let code = dynamic_code();
        let lut = nearest_code_lookup(&code);
        for value in [-1.0f32, -0.5, -0.013, 0.0, 2e-6, 0.3, 0.999, 1.0] {
            let got = code[lut[lookup_index(value)] as usize];
            let best = code.iter().fold(f32::MAX, |b, c| b.min((c - value).abs()));
            assert!((got - value).abs() <= best + 2.0 / 65535.0, "{value}: got {got}");
        }
    }
}
