//! AdamW with decoupled weight decay, written with tensor ops so its state can be saved in a
//! checkpoint and restored bit for bit. The update follows `torch.optim.AdamW` (single-tensor
//! path) line by line, and gradient clipping follows `clip_grad_norm_`.

use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable tensor and its moments.
pub struct ParamState {
    pub name: String,
    pub param: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Biases and norm weights are not decayed (the `transformers` Trainer rule).
    pub decay: bool,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<ParamState>,
    /// Number of updates applied so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, param)| {
                let decay = !(name.ends_with(".bias") || name.contains("norm."));
                ParamState { exp_avg: param.zeros_like(), exp_avg_sq: param.zeros_like(), name, param, decay }
            })
            .collect();
        AdamW { config, params, step: 0 }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.param.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.param.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm();
        let total_value = total.double_value(&[]);
        if max_norm > 0.0 {
            let coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
            for mut g in grads {
                let _ = g.g_mul_(&coef);
            }
        }
        total_value
    }

    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let step = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2_sqrt = (1.0 - c.beta2.powf(step)).sqrt();
        let step_size = lr / bias_correction1;
        for p in &mut self.params {
            let grad = p.param.grad();
            if !grad.defined() {
                continue;
            }
            if p.decay && c.weight_decay != 0.0 {
                let _ = p.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = p.exp_avg.lerp_(&grad, 1.0 - c.beta1);
            let _ = p.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = p.exp_avg_sq.g_add_(&(&grad * &grad * (1.0 - c.beta2)));
            let denom = p.exp_avg_sq.sqrt() / bias_correction2_sqrt + c.eps;
            let _ = p.param.g_add_(&(&p.exp_avg * (-step_size) / denom));
        }
    }

    /// Moments as named tensors, for checkpoints.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.params.len() * 2);
        for p in &self.params {
            out.push((format!("{}.exp_avg", p.name), p.exp_avg.shallow_clone()));
            out.push((format!("{}.exp_avg_sq", p.name), p.exp_avg_sq.shallow_clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`]; returns the names that were missing.
    pub fn load_state_tensors(&mut self, state: &std::collections::HashMap<String, Tensor>, step: u64) -> Vec<String> {
        let _guard = tch::no_grad_guard();
        let mut missing = Vec::new();
        for p in &mut self.params {
            for (suffix, target) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                match state.get(&format!("{}.{suffix}", p.name)) {
                    Some(saved) if saved.size() == target.size() => target.copy_(&saved.to_kind(Kind::Float)),
                    _ => missing.push(format!("{}.{suffix}", p.name)),
                }
            }
        }
        self.step = step;
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_matches_the_closed_form() {
        // After one step Adam moves each weight by lr * g / (|g| + eps') (bias-corrected), minus decay.
        let w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let loss = (&w * &w).sum(Kind::Float); // grad = 2w
        loss.backward();
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], AdamWConfig { weight_decay: 0.1, ..Default::default() });
        opt.step(0.01);
        let got: Vec<f32> = Vec::try_from(&w.detach()).unwrap();
        // decay: w *= 1 - 0.01*0.1; update: -0.01 * sign(g) (eps negligible)
        assert!((got[0] - (1.0 * 0.999 - 0.01)).abs() < 1e-6, "{got:?}");
        assert!((got[1] - (-2.0 * 0.999 + 0.01)).abs() < 1e-6, "{got:?}");
    }

    #[test]
    fn clipping_scales_the_global_norm_to_the_limit() {
        let w = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        (&w * 1.0).sum(Kind::Float).backward(); // grad = [1, 1]
        let w2 = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        (&w2 * 7.0).sum(Kind::Float).backward(); // grad = [7]
        let mut opt = AdamW::new(vec![("a".into(), w.shallow_clone()), ("b".into(), w2.shallow_clone())], AdamWConfig::default());
        let norm = opt.clip_grad_norm(1.0);
        assert!((norm - (1.0f64 + 1.0 + 49.0).sqrt()).abs() < 1e-5);
        let after = Tensor::cat(&[w.grad(), w2.grad()], 0).norm().double_value(&[]);
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn biases_and_norms_are_not_decayed() {
        let opt = AdamW::new(
            vec![
                ("model.layers.0.self_attn.q_proj.bias".into(), Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))),
                ("model.norm.weight".into(), Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))),
                ("model.layers.0.mlp.up_proj.weight".into(), Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))),
            ],
            AdamWConfig::default(),
        );
        let decays: Vec<bool> = opt.params.iter().map(|p| p.decay).collect();
        assert_eq!(decays, vec![false, false, true]);
    }
}
