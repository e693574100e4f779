//! LoRA: a frozen linear layer plus a trainable low-rank update,
//! `y = x·Wᵀ + b + scaling · B(A(dropout(x)))` with `scaling = alpha / rank` (or
//! `alpha / √rank` for rsLoRA). As in PEFT and torchtune, A starts Kaiming-uniform and B at
//! zero, so step 0 reproduces the base model exactly.
//!
//! Trainable tensors are kept in fp32 (the optimizer's master copy) and cast to the
//! activations' dtype at use, so bf16 training never rounds the update away.

use tch::{Kind, Tensor};

use crate::hash::{fnv1a, unit_f64};
use crate::nf4::Nf4Weight;
use crate::{Result, TrainerError};

/// The linear projections of a decoder layer, by the names checkpoints and PEFT use.
pub const LINEAR_MODULES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Every linear layer of the decoder except the output head (PEFT's "all-linear").
    AllLinear,
    Named(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// Seeds the initial A matrices (with each layer's path), so a run starts from the same
    /// adapter whatever else the process does with libtorch's global generator.
    pub init_seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 16, alpha: 32.0, dropout: 0.0, target_modules: TargetModules::AllLinear, use_rslora: false, init_seed: 0 }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank <= 0 {
            return Err(TrainerError::invalid("lora.rank", format!("must be at least 1, got {}", self.rank)));
        }
        if self.alpha.is_nan() || self.alpha <= 0.0 {
            return Err(TrainerError::invalid("lora.alpha", format!("must be positive, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainerError::invalid("lora.dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        if let TargetModules::Named(names) = &self.target_modules {
            if names.is_empty() {
                return Err(TrainerError::invalid("lora.target_modules", "empty list"));
            }
            if let Some(unknown) = names.iter().find(|n| !LINEAR_MODULES.contains(&n.as_str())) {
                return Err(TrainerError::invalid(
                    "lora.target_modules",
                    format!("unknown module {unknown:?} (known: {})", LINEAR_MODULES.join(", ")),
                ));
            }
        }
        Ok(())
    }

    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            TargetModules::AllLinear => LINEAR_MODULES.contains(&module),
            TargetModules::Named(names) => names.iter().any(|n| n == module),
        }
    }

    /// Module names in the order PEFT lists them in `adapter_config.json`.
    pub fn target_module_names(&self) -> Vec<String> {
        LINEAR_MODULES.iter().filter(|m| self.targets(m)).map(|m| m.to_string()).collect()
    }
}

/// The trainable low-rank pair of one linear layer.
#[derive(Debug)]
pub struct LoraPair {
    /// (rank, in_features)
    pub a: Tensor,
    /// (out_features, rank)
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    /// Distinguishes this layer's dropout mask from its neighbours' (see [`hashed_dropout`]).
    salt: i64,
}

impl LoraPair {
    /// Kaiming-uniform A with a = √5 (bound 1/√in_features, as nn.Linear and PEFT), zero B.
    /// A's values come from a counter-based stream keyed by (init_seed, path): deterministic and
    /// independent of libtorch's process-wide generator, which other threads may be using.
    pub fn new(in_features: i64, out_features: i64, config: &LoraConfig, device: tch::Device, path: &str) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let mut state = config.init_seed ^ fnv1a(path.as_bytes());
        let values: Vec<f32> = (0..config.rank * in_features).map(|_| ((2.0 * unit_f64(&mut state) - 1.0) * bound) as f32).collect();
        let a = Tensor::from_slice(&values).view([config.rank, in_features]).to_device(device);
        let b = Tensor::zeros([out_features, config.rank], (Kind::Float, device));
        LoraPair {
            a: a.set_requires_grad(true),
            b: b.set_requires_grad(true),
            scaling: config.scaling(),
            dropout: config.dropout,
            salt: fnv1a(path.as_bytes()) as i64 & 0x7fff_ffff,
        }
    }

    /// The input the pair sees: `x`, or in training with dropout, `x` with this layer's mask.
    pub fn input(&self, x: &Tensor, train: bool) -> Tensor {
        match DROPOUT_KEY.with(|k| k.get()) {
            Some(key) if train && self.dropout > 0.0 => hashed_dropout(x, self.dropout, key ^ self.salt),
            _ if train && self.dropout > 0.0 => x.dropout(self.dropout, true),
            _ => x.shallow_clone(),
        }
    }

    /// True when [`LoraPair::input`] is `x` itself, so pairs reading the same `x` can share one
    /// matmul with their A matrices stacked.
    pub fn reads_input_unchanged(&self, train: bool) -> bool {
        !(train && self.dropout > 0.0)
    }

    /// `scaling · B` in `kind`, (out, rank): the scaling folded into the small matrix, so the
    /// update needs no pass over the (tokens, out) activations of its own.
    pub fn scaled_b(&self, kind: Kind) -> Tensor {
        (&self.b * self.scaling).to_kind(kind)
    }

    /// `y + scaling · B(A(x))` for the base output `y` (rows, out) and the LoRA input `x`
    /// (rows, in). The update's second matmul accumulates into `y` in place (addmm_ with β = 1),
    /// which saves the scale and add passes over the output that `y + update * scaling` costs,
    /// and their backward. `y` must be a fresh matmul output that nothing else reads.
    pub fn add_update(&self, mut y: Tensor, x: &Tensor) -> Tensor {
        let u = x.linear::<Tensor>(&self.a.to_kind(x.kind()), None);
        let _ = y.addmm_(&u, &self.scaled_b(x.kind()).tr());
        y
    }

    /// `scaling · B·A` as a full (out, in) matrix, for merging into the base weight.
    pub fn delta_weight(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scaling
    }
}

/// The base weight of a linear layer: a plain tensor, or frozen 4-bit NF4 (QLoRA).
#[derive(Debug)]
pub enum BaseWeight {
    /// (out_features, in_features), as PyTorch stores it.
    Dense(Tensor),
    Nf4(Nf4Weight),
}

impl BaseWeight {
    /// `x · Wᵀ (+ b)` in x's dtype for `x` (rows, in): a fresh (rows, out) tensor, never a view,
    /// so a LoRA update may accumulate into it in place.
    fn apply(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        match self {
            BaseWeight::Dense(w) => x.linear(&w.to_kind(x.kind()), bias),
            BaseWeight::Nf4(w) => match bias {
                Some(b) => w.matmul(x) + b,
                None => w.matmul(x),
            },
        }
    }

    pub fn size(&self) -> [i64; 2] {
        match self {
            BaseWeight::Dense(w) => w.size2().map(|(o, i)| [o, i]).expect("linear weights are (out, in)"),
            BaseWeight::Nf4(w) => w.size(),
        }
    }
}

/// A linear layer of the decoder, optionally LoRA-adapted.
#[derive(Debug)]
pub struct Linear {
    pub weight: BaseWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
}

impl Linear {
    /// `x · Wᵀ + b (+ scaling · B(A(dropout(x))))` for `x` (…, in).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        let mut shape = x.size();
        let x2 = x.reshape([-1, *shape.last().expect("x has a feature axis")]);
        let bias = self.bias.as_ref().map(|b| b.to_kind(kind));
        let y = self.weight.apply(&x2, bias.as_ref());
        let y = match self.active_lora() {
            None => y,
            Some(lora) => lora.add_update(y, &lora.input(&x2, train)),
        };
        *shape.last_mut().expect("x has a feature axis") = self.out_features();
        y.view(shape.as_slice())
    }

    /// The adapter, unless [`without_adapters`] is running on this thread.
    pub fn active_lora(&self) -> Option<&LoraPair> {
        if ADAPTERS_OFF.with(|off| off.get()) {
            return None;
        }
        self.lora.as_ref()
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
}

thread_local! {
    /// The dropout key of the layer being computed on this thread, set by the training step
    /// from (seed, step, micro-batch, layer). Thread-local, so trainers on other threads of the
    /// same process (several workers in `lathe up`) never disturb each other's masks.
    static DROPOUT_KEY: std::cell::Cell<Option<i64>> = const { std::cell::Cell::new(None) };
}

thread_local! {
    /// Set while [`without_adapters`] runs: every LoRA layer computes the base alone.
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every LoRA adapter switched off on this thread: the base model, as PEFT's
/// `disable_adapter()` gives it. DPO's reference model is the policy computed this way, so it
/// needs no second copy of the weights.
pub fn without_adapters<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ADAPTERS_OFF.with(|off| off.set(self.0));
        }
    }
    let _restore = Restore(ADAPTERS_OFF.with(|off| off.replace(true)));
    f()
}

/// Sets (or clears) the dropout key for LoRA layers run on this thread.
pub fn set_dropout_key(key: Option<i64>) {
    DROPOUT_KEY.with(|k| k.set(key));
}

/// Inverted dropout whose mask is a hash of (key, element index), computed with tensor ops: the
/// same key gives the same mask on every call (gradient-checkpoint recomputation, resume), with
/// no random generator involved. Products stay below 2^63 so int64 arithmetic never overflows.
pub fn hashed_dropout(x: &Tensor, p: f64, key: i64) -> Tensor {
    const M32: i64 = 0xffff_ffff;
    let index = Tensor::arange(x.numel() as i64, (Kind::Int64, x.device()));
    let mut h = index.bitwise_xor(key & M32).bitwise_and(M32);
    h = h.bitwise_right_shift_tensor_scalar(16).bitwise_xor_tensor(&h).g_mul_scalar(0x7feb_352d_i64).bitwise_and(M32);
    h = h.bitwise_right_shift_tensor_scalar(15).bitwise_xor_tensor(&h).g_mul_scalar(0x2c1b_3c6d_i64).bitwise_and(M32);
    h = h.bitwise_right_shift_tensor_scalar(16).bitwise_xor_tensor(&h);
    let unit = h.bitwise_and(0x00ff_ffff_i64).to_kind(Kind::Float) / 16_777_216.0;
    let keep = unit.ge(p).to_kind(x.kind()).view(x.size().as_slice());
    x * keep / (1.0 - p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_adapter_leaves_the_output_unchanged() {
        tch::manual_seed(0);
        let weight = Tensor::randn([6, 4], (Kind::Float, tch::Device::Cpu));
        let plain = Linear { weight: BaseWeight::Dense(weight.copy()), bias: None, lora: None };
        let config = LoraConfig { rank: 2, ..LoraConfig::default() };
        let adapted =
            Linear { weight: BaseWeight::Dense(weight), bias: None, lora: Some(LoraPair::new(4, 6, &config, tch::Device::Cpu, "q_proj")) };
        let x = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let diff = (plain.forward(&x, true) - adapted.forward(&x, true)).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn the_update_is_scaled_by_alpha_over_rank_or_its_root() {
        let mut config = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() };
        assert_eq!(config.scaling(), 2.0);
        config.use_rslora = true;
        assert_eq!(config.scaling(), 4.0);
    }

    #[test]
    fn merged_weight_gives_the_adapted_output() {
        tch::manual_seed(1);
        let config = LoraConfig { rank: 2, alpha: 4.0, ..LoraConfig::default() };
        let mut lora = LoraPair::new(4, 5, &config, tch::Device::Cpu, "q_proj");
        lora.b = Tensor::randn([5, 2], (Kind::Float, tch::Device::Cpu));
        let weight = Tensor::randn([5, 4], (Kind::Float, tch::Device::Cpu));
        let merged = &weight + lora.delta_weight();
        let adapted = Linear { weight: BaseWeight::Dense(weight), bias: None, lora: Some(lora) };
        let x = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let expected = x.linear::<Tensor>(&merged, None);
        let diff = (adapted.forward(&x, false) - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn hashed_dropout_repeats_its_mask_for_a_key_and_drops_about_p() {
        let x = Tensor::ones([64, 256], (Kind::Float, tch::Device::Cpu));
        let a = hashed_dropout(&x, 0.25, 42);
        assert_eq!((&a - hashed_dropout(&x, 0.25, 42)).abs().max().double_value(&[]), 0.0);
        assert!((&a - hashed_dropout(&x, 0.25, 43)).abs().max().double_value(&[]) > 0.0);
        let dropped = a.eq(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((dropped - 0.25).abs() < 0.02, "dropped fraction {dropped}");
        let kept_value = a.max().double_value(&[]);
        assert!((kept_value - 1.0 / 0.75).abs() < 1e-6);
    }

    #[test]
    fn the_initial_adapter_depends_only_on_seed_and_layer() {
        let config = LoraConfig { rank: 2, init_seed: 7, ..LoraConfig::default() };
        let a = LoraPair::new(8, 4, &config, tch::Device::Cpu, "model.layers.0.self_attn.q_proj");
        let b = LoraPair::new(8, 4, &config, tch::Device::Cpu, "model.layers.0.self_attn.q_proj");
        let c = LoraPair::new(8, 4, &config, tch::Device::Cpu, "model.layers.0.self_attn.k_proj");
        assert_eq!((&a.a - &b.a).abs().max().double_value(&[]), 0.0);
        assert!((&a.a - &c.a).abs().max().double_value(&[]) > 0.0);
        assert!(a.a.abs().max().double_value(&[]) <= 1.0 / 8f64.sqrt());
    }

    #[test]
    fn rank_zero_and_unknown_modules_are_rejected() {
        let zero = LoraConfig { rank: 0, ..LoraConfig::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("lora.rank"));
        let unknown = LoraConfig { target_modules: TargetModules::Named(vec!["qkv".into()]), ..LoraConfig::default() };
        assert!(unknown.validate().unwrap_err().to_string().contains("qkv"));
    }
}
