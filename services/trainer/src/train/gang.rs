//! The ranks of one data-parallel run, as the training loop sees them (docs/architecture.md §7).
//!
//! Every rank holds the whole model and the whole (encoded) data set, trains its own shard of
//! each optimizer step's rows (`batches::rank_rows`), and meets the others at four collectives
//! per step, in this order:
//! 1. control: any rank asked to stop or abandon → every rank does (`any`);
//! 2. the step's trained-token count, summed, so every rank divides its loss by the global count
//!    and the summed gradients equal one process training the whole step;
//! 3. gradients, summed in flat buckets (`all_reduce_grads`);
//! 4. metrics: loss, accuracy, tokens and each rank's compute time (`sum`).
//!
//! After (3) every rank holds the same bytes, so clipping and AdamW keep the replicas identical
//! without a parameter broadcast; the initial trainable weights are broadcast from rank 0 once.
//! A one-process run is a gang of one: every method returns at once.

use std::time::{Duration, Instant};

use lathe_torch_ext::dist::{Backend, ProcessGroup};
use tch::{Device, Kind, Tensor};

use crate::Result;

/// Gradients are summed in buckets of at most this many bytes, so full fine-tuning does not
/// need a second copy of every gradient at once (DDP's bucket idea; LoRA fits in one).
const BUCKET_BYTES: usize = 64 << 20;

pub struct Gang {
    group: Option<ProcessGroup>,
    backend: Backend,
}

impl Gang {
    /// A run on one process.
    pub fn single() -> Gang {
        Gang { group: None, backend: Backend::Gloo }
    }

    /// The ranks of `group`, whose collectives run on `backend`.
    pub fn of(group: ProcessGroup, backend: Backend) -> Gang {
        Gang { group: (group.world() > 1).then_some(group), backend }
    }

    /// "gloo" or "nccl"; "none" for a one-process run.
    pub fn backend_name(&self) -> &'static str {
        if self.group.is_some() {
            self.backend.name()
        } else {
            "none"
        }
    }

    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    pub fn world(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world())
    }

    /// Rank 0 alone writes checkpoints, adapters, events and results.
    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    /// For each flag, whether any rank raised it.
    pub fn any<const N: usize>(&self, flags: [bool; N]) -> Result<[bool; N]> {
        let Some(g) = &self.group else { return Ok(flags) };
        let t = self.on_device(Tensor::from_slice(&flags.map(|f| f as i64)));
        g.all_reduce_max(&t)?;
        let v: Vec<i64> = Vec::try_from(&t.to_device(Device::Cpu)).expect("i64 flags");
        Ok(std::array::from_fn(|i| v[i] != 0))
    }

    /// Sums `values` elementwise over ranks, in place (f64, so counts stay exact).
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let t = self.on_device(Tensor::from_slice(values));
        g.all_reduce_sum(&t)?;
        values.copy_from_slice(&Vec::<f64>::try_from(&t.to_device(Device::Cpu)).expect("f64 values"));
        Ok(())
    }

    /// NCCL reduces only tensors on the rank's GPU; Gloo takes them where they are.
    fn on_device(&self, t: Tensor) -> Tensor {
        match self.backend {
            Backend::Nccl { device } => t.to_device(Device::Cuda(device)),
            Backend::Gloo => t,
        }
    }

    /// Sums the gradients of `params` over ranks, in place; returns the time it took. A
    /// parameter without a gradient contributes zeros (and gets none back): every rank must
    /// therefore have run backward through the same parameters, which `Model::train_step`
    /// ensures even for a rank with an empty shard.
    pub fn all_reduce_grads(&self, params: &[Tensor]) -> Result<Duration> {
        let Some(g) = &self.group else { return Ok(Duration::ZERO) };
        let started = Instant::now();
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).filter(|g| g.defined()).collect();
        for bucket in buckets(&grads) {
            let flat = Tensor::cat(&bucket.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
            g.all_reduce_sum(&flat)?;
            let sizes: Vec<i64> = bucket.iter().map(|g| g.numel() as i64).collect();
            for (grad, part) in bucket.iter().zip(flat.split_with_sizes(&sizes, 0)) {
                let mut grad = grad.shallow_clone();
                grad.copy_(&part.view_as(&grad));
            }
        }
        if let Backend::Nccl { device } = self.backend {
            // NCCL's wait only orders the GPU stream; the time is the reduction's once it ran.
            tch::Cuda::synchronize(device as i64);
        }
        Ok(started.elapsed())
    }

    /// Every rank's `params` become rank 0's.
    pub fn broadcast_from_leader(&self, params: &[Tensor]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let _guard = tch::no_grad_guard();
        for p in params {
            g.broadcast(p, 0)?;
        }
        Ok(())
    }

    pub fn barrier(&self) -> Result<()> {
        match &self.group {
            Some(g) => Ok(g.barrier()?),
            None => Ok(()),
        }
    }
}

/// Consecutive gradients of one dtype and device, up to `BUCKET_BYTES` each.
fn buckets(grads: &[Tensor]) -> Vec<Vec<&Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0usize;
    for g in grads {
        let size = g.numel() * g.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|b: &Vec<&Tensor>| {
            let first = b[0];
            first.kind() == g.kind() && first.device() == g.device() && bytes + size <= BUCKET_BYTES
        });
        if !fits {
            out.push(Vec::new());
            bytes = 0;
        }
        out.last_mut().expect("a bucket").push(g);
        bytes += size;
    }
    out
}

/// An all-zero backward through every parameter: a rank with no rows this step still owes the
/// gradient all-reduce a (zero) gradient for each, so the buckets line up on every rank.
pub fn zero_backward(params: &[Tensor]) {
    let zero = params.iter().map(|p| (p * 0.0).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, params[0].device())), |a, b| a + b);
    zero.backward();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_by_dtype_and_size_and_keep_order() {
        let f = |n: i64, k: Kind| Tensor::zeros([n], (k, tch::Device::Cpu));
        let big = (BUCKET_BYTES / 4) as i64;
        let grads = [f(3, Kind::Float), f(big, Kind::Float), f(2, Kind::Double), f(1, Kind::Double)];
        let sizes: Vec<Vec<i64>> = buckets(&grads).iter().map(|b| b.iter().map(|g| g.numel() as i64).collect()).collect();
        assert_eq!(sizes, vec![vec![3], vec![big], vec![2, 1]]);
    }

    #[test]
    fn a_gang_of_one_changes_nothing() {
        let gang = Gang::single();
        let mut v = [1.5, 2.0];
        gang.sum(&mut v).unwrap();
        assert_eq!(v, [1.5, 2.0]);
        assert_eq!(gang.any([false, true]).unwrap(), [false, true]);
        assert!(gang.is_leader());
        assert_eq!(gang.world(), 1);
    }
}
