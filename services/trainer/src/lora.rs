//! LoRA: a frozen linear layer plus a trainable low-rank update,
//! `y = x·Wᵀ + b + scaling · B(A(dropout(x)))` with `scaling = alpha / rank` (or
//! `alpha / √rank` for rsLoRA). As in PEFT and torchtune, A starts Kaiming-uniform and B at
//! zero, so step 0 reproduces the base model exactly.
//!
//! Trainable tensors are kept in fp32 (the optimizer's master copy) and cast to the
//! activations' dtype at use, so bf16 training never rounds the update away.

use tch::{Kind, Tensor};

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
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 16, alpha: 32.0, dropout: 0.0, target_modules: TargetModules::AllLinear, use_rslora: false }
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
}

impl LoraPair {
    /// Kaiming-uniform A with a = √5 (bound 1/√in_features, as nn.Linear and PEFT), zero B.
    pub fn new(in_features: i64, out_features: i64, config: &LoraConfig, device: tch::Device) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = Tensor::empty([config.rank, in_features], (Kind::Float, device)).uniform_(-bound, bound);
        let b = Tensor::zeros([out_features, config.rank], (Kind::Float, device));
        LoraPair { a: a.set_requires_grad(true), b: b.set_requires_grad(true), scaling: config.scaling(), dropout: config.dropout }
    }

    /// `scaling · B·A` as a full (out, in) matrix, for merging into the base weight.
    pub fn delta_weight(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scaling
    }
}

/// A linear layer of the decoder, optionally LoRA-adapted.
#[derive(Debug)]
pub struct Linear {
    /// (out_features, in_features), as PyTorch stores it.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        let bias = self.bias.as_ref().map(|b| b.to_kind(kind));
        let y = x.linear(&self.weight.to_kind(kind), bias.as_ref());
        match &self.lora {
            None => y,
            Some(lora) => {
                let x = if train && lora.dropout > 0.0 { x.dropout(lora.dropout, true) } else { x.shallow_clone() };
                let update = x.linear::<Tensor>(&lora.a.to_kind(kind), None).linear::<Tensor>(&lora.b.to_kind(kind), None);
                y + update * lora.scaling
            }
        }
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_adapter_leaves_the_output_unchanged() {
        tch::manual_seed(0);
        let weight = Tensor::randn([6, 4], (Kind::Float, tch::Device::Cpu));
        let plain = Linear { weight: weight.copy(), bias: None, lora: None };
        let config = LoraConfig { rank: 2, ..LoraConfig::default() };
        let adapted = Linear { weight, bias: None, lora: Some(LoraPair::new(4, 6, &config, tch::Device::Cpu)) };
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
        let mut lora = LoraPair::new(4, 5, &config, tch::Device::Cpu);
        lora.b = Tensor::randn([5, 2], (Kind::Float, tch::Device::Cpu));
        let weight = Tensor::randn([5, 4], (Kind::Float, tch::Device::Cpu));
        let merged = &weight + lora.delta_weight();
        let adapted = Linear { weight, bias: None, lora: Some(lora) };
        let x = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let expected = x.linear::<Tensor>(&merged, None);
        let diff = (adapted.forward(&x, false) - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn rank_zero_and_unknown_modules_are_rejected() {
        let zero = LoraConfig { rank: 0, ..LoraConfig::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("lora.rank"));
        let unknown = LoraConfig { target_modules: TargetModules::Named(vec!["qkv".into()]), ..LoraConfig::default() };
        assert!(unknown.validate().unwrap_err().to_string().contains("qkv"));
    }
}
