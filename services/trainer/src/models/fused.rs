//! Projections that read the same input, run as one: q/k/v of attention, gate/up of the MLP.
//!
//! transformers + PEFT run every projection on its own: for q/k/v that is three base matmuls,
//! three thin `x·Aᵀ` matmuls that each read all of `x`, three thin `·Bᵀ` matmuls, and a scale
//! and an add over each output, all again in the backward pass. On a CPU (and for the thin
//! matmuls on a GPU too) those calls are bound by memory traffic, not FLOPs. Here a group costs
//! one matmul for the frozen base weights stacked by rows, one for the LoRA A matrices stacked
//! by rows (`x` read once), and one `addmm` that multiplies by the block-diagonal of the scaled
//! B matrices and accumulates straight into the base output. The results equal the separate
//! projections' up to fp32 summation order (docs/architecture.md §6).
//!
//! Each member keeps its own [`Linear`] whose weight is a row view into the stacked matrix, so
//! names, PEFT export, merging and adapter loading see the checkpoint's tensors, stored once.

use tch::Tensor;

use crate::lora::{BaseWeight, Linear};

/// The stacked frozen weights (and biases) of a group of projections that share their input.
#[derive(Debug)]
pub struct FusedBase {
    /// (Σ out, in) in the compute dtype.
    weight: Tensor,
    bias: Option<Tensor>,
    outs: Vec<i64>,
}

impl FusedBase {
    /// Stacks the members' weights and points each member at its rows. None, leaving the
    /// members as they were, when a weight is trained (full fine-tuning), NF4, or when only some
    /// members have a bias.
    pub fn stack(members: &mut [&mut Linear]) -> Option<FusedBase> {
        let mut weights = Vec::with_capacity(members.len());
        for m in members.iter() {
            match &m.weight {
                BaseWeight::Dense(w) if !w.requires_grad() => weights.push(w.shallow_clone()),
                _ => return None,
            }
        }
        let with_bias = members.iter().filter(|m| m.bias.is_some()).count();
        if with_bias != 0 && with_bias != members.len() {
            return None;
        }
        if members.iter().flat_map(|m| &m.bias).any(|b| b.requires_grad()) {
            return None;
        }
        let outs: Vec<i64> = weights.iter().map(|w| w.size()[0]).collect();
        let weight = Tensor::cat(&weights, 0);
        drop(weights);
        let bias =
            (with_bias > 0).then(|| Tensor::cat(&members.iter().map(|m| m.bias.as_ref().unwrap().shallow_clone()).collect::<Vec<_>>(), 0));
        let mut offset = 0;
        for (m, &out) in members.iter_mut().zip(&outs) {
            m.weight = BaseWeight::Dense(weight.narrow(0, offset, out));
            if let Some(b) = &bias {
                m.bias = Some(b.narrow(0, offset, out));
            }
            offset += out;
        }
        Some(FusedBase { weight, bias, outs })
    }

    /// The members' outputs for `x` (…, in) side by side, (…, Σ out): the base matmul, then
    /// every LoRA update in one `addmm` with the block-diagonal of the scaled B matrices (a member
    /// without LoRA contributes an empty block). When no member's LoRA input is changed by
    /// dropout, one matmul with the stacked A matrices gives every update's `x·Aᵀ`.
    /// `members` are the linears [`FusedBase::stack`] was given, in the same order.
    pub fn forward(&self, members: &[&Linear], x: &Tensor, train: bool) -> Tensor {
        let kind = x.kind();
        let mut shape = x.size();
        let x2 = x.reshape([-1, self.weight.size()[1]]);
        *shape.last_mut().expect("x has a feature axis") = self.weight.size()[0];
        // 2-D, so the output is a fresh tensor the LoRA updates may accumulate into in place.
        let mut y = x2.linear(&self.weight.to_kind(kind), self.bias.as_ref().map(|b| b.to_kind(kind)).as_ref());
        let pairs: Vec<_> = members.iter().filter_map(|m| m.active_lora()).collect();
        if pairs.is_empty() {
            return y.view(shape.as_slice());
        }
        let u = if pairs.iter().all(|p| p.reads_input_unchanged(train)) {
            let a = Tensor::cat(&pairs.iter().map(|p| p.a.to_kind(kind)).collect::<Vec<_>>(), 0);
            x2.linear::<Tensor>(&a, None)
        } else {
            let parts: Vec<_> = pairs.iter().map(|p| p.input(&x2, train).linear::<Tensor>(&p.a.to_kind(kind), None)).collect();
            Tensor::cat(&parts, 1)
        };
        let blocks: Vec<Tensor> = members
            .iter()
            .zip(&self.outs)
            .map(|(m, &out)| match m.active_lora() {
                Some(p) => p.scaled_b(kind),
                None => Tensor::zeros([out, 0], (kind, x.device())),
            })
            .collect();
        let _ = y.addmm_(&u, &Tensor::block_diag(&blocks).tr());
        y.view(shape.as_slice())
    }

    /// [`FusedBase::forward`]'s output cut into the members' outputs (views, no copy).
    pub fn split(&self, y: &Tensor) -> Vec<Tensor> {
        y.split_with_sizes(&self.outs, -1)
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::lora::{LoraConfig, LoraPair};

    fn linear(out: i64, inp: i64, lora: Option<&LoraConfig>, path: &str) -> Linear {
        let weight = BaseWeight::Dense(Tensor::randn([out, inp], (Kind::Float, Device::Cpu)));
        let lora = lora.map(|c| {
            let mut pair = LoraPair::new(inp, out, c, Device::Cpu, path);
            // A trained B, so the update is not zero.
            pair.b = (Tensor::randn([out, c.rank], (Kind::Float, Device::Cpu)) * 0.1).set_requires_grad(true);
            pair
        });
        Linear { weight, bias: Some(Tensor::randn([out], (Kind::Float, Device::Cpu))), lora }
    }

    /// Fused outputs and the gradients of x and of every LoRA tensor, against each member run
    /// on its own through `Linear::forward` (the members' weights are views into the stack).
    fn check(configs: [Option<LoraConfig>; 3]) {
        tch::manual_seed(3);
        let mut members: Vec<Linear> =
            configs.iter().zip([24, 8, 8]).enumerate().map(|(i, (c, out))| linear(out, 16, c.as_ref(), &format!("m{i}"))).collect();
        let fused = {
            let mut refs: Vec<&mut Linear> = members.iter_mut().collect();
            FusedBase::stack(&mut refs).expect("frozen dense weights stack")
        };
        let refs: Vec<&Linear> = members.iter().collect();
        let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([2, 5, 40], (Kind::Float, Device::Cpu));
        crate::lora::set_dropout_key(Some(11));
        let run = |fused_path: bool| {
            let x = x.detach().set_requires_grad(true);
            let y = if fused_path {
                fused.forward(&refs, &x, true)
            } else {
                Tensor::cat(&refs.iter().map(|m| m.forward(&x, true)).collect::<Vec<_>>(), -1)
            };
            (&y * &g).sum(Kind::Float).backward();
            let mut grads = vec![y.detach(), x.grad()];
            for m in &refs {
                if let Some(p) = &m.lora {
                    grads.push(p.a.grad());
                    grads.push(p.b.grad());
                    let _ = p.a.grad().zero_();
                    let _ = p.b.grad().zero_();
                }
            }
            grads
        };
        let (ours, theirs) = (run(true), run(false));
        crate::lora::set_dropout_key(None);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let d = (a - b).abs().max().double_value(&[]);
            assert!(d < 1e-5, "tensor {i}: max difference {d}");
        }
    }

    #[test]
    fn fused_projections_equal_the_separate_ones_with_their_gradients() {
        let lora = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() };
        check([Some(lora.clone()), Some(lora.clone()), Some(lora)]);
    }

    #[test]
    fn a_member_without_lora_and_dropout_masks_are_handled() {
        let lora = LoraConfig { rank: 2, alpha: 3.0, dropout: 0.3, ..LoraConfig::default() };
        check([Some(lora.clone()), None, Some(lora)]);
    }

    #[test]
    fn trained_or_quantized_weights_are_not_stacked() {
        let mut a = linear(4, 8, None, "a");
        let mut b = linear(4, 8, None, "b");
        if let BaseWeight::Dense(w) = &mut b.weight {
            *w = w.detach().set_requires_grad(true);
        }
        assert!(FusedBase::stack(&mut [&mut a, &mut b]).is_none());
    }
}
