//! A c10d process group (TCPStore rendezvous + ProcessGroupGloo or ProcessGroupNCCL) over
//! `cpp/dist.cpp`, with the three collectives data-parallel training needs: all-reduce,
//! broadcast and barrier, in place on tch tensors. NCCL serves GPU ranks when this build has it
//! ([`NCCL_BUILT`]); Gloo serves CPU ranks, and GPU ranks otherwise (through host staging).
//! Calls must be made in the same order on every rank, as with torch.distributed.

use std::ffi::{c_char, c_void, CString};
use std::time::Duration;

use tch::Tensor;

use crate::ffi;

/// Whether this build can create NCCL groups (a CUDA libtorch with the NCCL headers found at
/// build time; see build.rs).
pub const NCCL_BUILT: bool = cfg!(lathe_nccl);

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    /// On this rank's GPU `cuda:N`.
    Nccl {
        device: usize,
    },
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl { .. } => "nccl",
        }
    }
}

/// Where and how a rank joins its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// The TCPStore's address (MASTER_ADDR).
    pub host: String,
    pub port: u16,
    pub rank: usize,
    pub world: usize,
    /// This rank hosts the TCPStore (rank 0, unless a launcher's agent already does).
    pub host_store: bool,
    /// Namespaces the group's keys in a store it may share (torchrun's agent store).
    pub prefix: String,
    /// How long to wait for the store (rank 0, or torchrun's agent) to answer.
    pub join_timeout: Duration,
    /// How long a collective may wait for the other ranks before it fails.
    pub op_timeout: Duration,
    /// The network interface Gloo binds (GLOO_SOCKET_IFNAME); None: the address of the hostname.
    pub interface: Option<String>,
    pub backend: Backend,
}

#[derive(Debug, thiserror::Error)]
#[error("{op} (rank {rank} of {world}): {message}")]
pub struct DistError {
    pub op: &'static str,
    pub rank: usize,
    pub world: usize,
    pub message: String,
}

pub struct ProcessGroup {
    ptr: *mut c_void,
    rank: usize,
    world: usize,
}

// A group may move to another thread (the worker's training thread); it is not Sync, since
// calls from two threads at once could reach the ranks in different orders.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group: blocks until every rank has arrived or the timeout passes.
    pub fn join(r: &Rendezvous) -> Result<ProcessGroup, DistError> {
        let fail = |message: String| DistError { op: "rendezvous", rank: r.rank, world: r.world, message };
        let c = |s: &str| CString::new(s).map_err(|_| fail(format!("{s:?} contains a NUL byte")));
        let host = c(&r.host)?;
        let prefix = c(&r.prefix)?;
        let iface = r.interface.as_deref().map(c).transpose()?;
        let mut err = ffi::ErrorBuffer::new();
        let ptr = unsafe {
            ffi::lathe_pg_new(
                host.as_ptr(),
                r.port,
                r.rank as i32,
                r.world as i32,
                r.host_store as i32,
                prefix.as_ptr(),
                r.join_timeout.as_millis() as i64,
                r.op_timeout.as_millis() as i64,
                iface.as_ref().map_or(std::ptr::null(), |i| i.as_ptr()),
                match r.backend {
                    Backend::Gloo => -1,
                    Backend::Nccl { device } => device as i32,
                },
                err.as_mut_ptr(),
                ffi::ErrorBuffer::LEN,
            )
        };
        if ptr.is_null() {
            return Err(fail(first_line(err.message())));
        }
        Ok(ProcessGroup { ptr, rank: r.rank, world: r.world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Every rank's `tensor` becomes the elementwise sum over ranks.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<(), DistError> {
        self.call("all_reduce", |err, len| unsafe { ffi::lathe_pg_all_reduce(self.ptr, tensor.as_ptr() as *mut _, 0, err, len) })
    }

    /// Every rank's `tensor` becomes the elementwise maximum over ranks.
    pub fn all_reduce_max(&self, tensor: &Tensor) -> Result<(), DistError> {
        self.call("all_reduce", |err, len| unsafe { ffi::lathe_pg_all_reduce(self.ptr, tensor.as_ptr() as *mut _, 1, err, len) })
    }

    /// Every rank's `tensor` becomes `root`'s.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<(), DistError> {
        self.call("broadcast", |err, len| unsafe { ffi::lathe_pg_broadcast(self.ptr, tensor.as_ptr() as *mut _, root as i32, err, len) })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), DistError> {
        self.call("barrier", |err, len| unsafe { ffi::lathe_pg_barrier(self.ptr, err, len) })
    }

    fn call(&self, op: &'static str, f: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), DistError> {
        ffi::status(f).map_err(|message| DistError { op, rank: self.rank, world: self.world, message: first_line(message) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ffi::lathe_pg_free(self.ptr) }
    }
}

/// c10d messages carry a C++ backtrace after the first line.
fn first_line(message: String) -> String {
    message.lines().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn rendezvous(port: u16, rank: usize, world: usize) -> Rendezvous {
        Rendezvous {
            host: "127.0.0.1".into(),
            port,
            rank,
            world,
            host_store: rank == 0,
            prefix: "test".into(),
            join_timeout: Duration::from_secs(30),
            op_timeout: Duration::from_secs(30),
            interface: Some("lo".into()),
            backend: Backend::Gloo,
        }
    }

    /// Runs `body(group)` on `world` threads, one rank each.
    fn on_ranks<T: Send + 'static>(world: usize, body: fn(ProcessGroup) -> T) -> Vec<T> {
        let port = free_port();
        let handles: Vec<_> =
            (0..world).map(|rank| std::thread::spawn(move || body(ProcessGroup::join(&rendezvous(port, rank, world)).unwrap()))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_and_maxes_across_ranks_and_broadcast_copies_the_root() {
        let results = on_ranks(3, |g| {
            let r = g.rank() as f64;
            let sum = Tensor::from_slice(&[r, 10.0 * r, 0.5]);
            g.all_reduce_sum(&sum).unwrap();
            let max = Tensor::from_slice(&[r, -r]);
            g.all_reduce_max(&max).unwrap();
            let weights = Tensor::full([2, 2], r + 1.0, (Kind::Float, tch::Device::Cpu));
            g.broadcast(&weights, 1).unwrap();
            g.barrier().unwrap();
            (Vec::<f64>::try_from(sum).unwrap(), Vec::<f64>::try_from(max).unwrap(), Vec::<f32>::try_from(weights.view([-1])).unwrap())
        });
        for (sum, max, weights) in results {
            assert_eq!(sum, vec![3.0, 30.0, 1.5]);
            assert_eq!(max, vec![2.0, 0.0]);
            assert_eq!(weights, vec![2.0; 4]);
        }
    }

    #[test]
    fn nccl_without_a_gpu_fails_with_a_reason_not_a_crash() {
        let mut r = rendezvous(free_port(), 0, 1);
        r.backend = Backend::Nccl { device: 0 };
        let err = ProcessGroup::join(&r).err().expect("no GPU here, so no NCCL group");
        assert!(!err.message.is_empty(), "{err}");
        if !NCCL_BUILT {
            assert!(err.message.contains("without NCCL"), "{err}");
        }
    }

    #[test]
    fn a_rank_that_never_arrives_fails_the_rendezvous_with_its_reason() {
        let mut r = rendezvous(free_port(), 0, 2);
        r.op_timeout = Duration::from_millis(1500);
        let err = ProcessGroup::join(&r).err().expect("a group of 2 with one rank cannot form");
        assert_eq!(err.op, "rendezvous");
        assert!(!err.message.is_empty(), "{err}");
    }
}
