//! Gradients summed over NCCL between GPUs (feature `nccl`), one process per GPU as every multi-GPU trainer
//! does (PyTorch DDP, Horovod): `mpirun` starts the ranks and MPI carries the control messages (the gates,
//! the fingerprints, rank 0's start-up state, NCCL's unique id); NCCL sums each gradient on the GPUs.

use std::ffi::c_char;

use anyhow::{anyhow, bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::mpi::MpiCollective;
use super::Collective;

/// MPI for control, NCCL for the gradients.
pub struct NcclCollective {
    mpi: MpiCollective,
    comm: Comm,
}

impl NcclCollective {
    /// Joins the ranks' NCCL communicator on `device` (each rank's own GPU): rank 0 makes the unique id and
    /// sends it over MPI.
    pub fn init(mpi: MpiCollective, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else { bail!("NCCL sums gradients on GPUs: use --device cuda:N") };
        let mut bytes = if mpi.rank() == 0 {
            let id = Id::new().map_err(|e| anyhow!("NCCL: no unique id: {e:?}"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![]
        };
        mpi.broadcast_bytes(&mut bytes)?;
        let mut internal = [0 as c_char; 128];
        if bytes.len() != internal.len() {
            bail!("NCCL: rank 0 sent an id of {} bytes", bytes.len());
        }
        for (i, b) in internal.iter_mut().zip(&bytes) {
            *i = *b as c_char;
        }
        let comm = Comm::from_rank(dev.cuda_stream(), mpi.rank(), mpi.size(), Id::uninit(internal))
            .map_err(|e| anyhow!("NCCL: rank {} could not join: {e:?}", mpi.rank()))?;
        Ok(Self { mpi, comm })
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.mpi.all_reduce_sum(buf)
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        if !t.device().is_cuda() {
            return super::all_reduce_on_host(self, t);
        }
        Ok(t.contiguous()?.apply_op1_no_bwd(&AllReduceSum { comm: &self.comm })?)
    }
    fn broadcast(&self, buf: &mut [f32]) -> Result<()> {
        self.mpi.broadcast(buf)
    }
    fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        self.mpi.broadcast_bytes(buf)
    }
    fn all_gather(&self, local: &[f64], per_rank: usize) -> Result<Vec<f64>> {
        self.mpi.all_gather(local, per_rank)
    }
    fn gate(&self, step: usize, stop: bool) -> Result<bool> {
        self.mpi.gate(step, stop)
    }
    fn abort(&self, msg: &str) -> ! {
        self.mpi.abort(msg)
    }
    fn costs(&self) -> (usize, f64, f64) {
        self.mpi.costs()
    }
}

/// One f32 tensor's sum over the ranks, on the GPU, as a Candle op (the shape of Candle's multi-process llama
/// example).
struct AllReduceSum<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        if s.dtype() != DType::F32 {
            candle_core::bail!("the NCCL all-reduce sums f32 gradients, not {:?}", s.dtype());
        }
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = dev.alloc_zeros::<f32>(end - start)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}
