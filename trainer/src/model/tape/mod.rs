//! The CPU training engine: a reverse-mode autograd over the U-Net's [`Ops`] primitives, on f32 host buffers.
//!
//! Candle's autograd is general, and pays for it on the CPU: every backward node allocates a zero tensor
//! and adds into it, every intermediate is a fresh allocation that the kernel faults in page by page, and
//! gradients flow into nodes that need none (the timestep embedding, the input image). On 2 cores that
//! overhead was as large as the arithmetic. This engine runs the same forward pass (unet.rs, written once
//! against [`Ops`]) and records a tape:
//!
//! - every buffer comes from a [`Pool`] that outlives the step, so after the first step a training step
//!   allocates (almost) nothing and faults in no pages;
//! - a gradient is moved, not copied, into its first consumer and added in place only where paths join;
//! - a node whose inputs need no gradient is not differentiated (`needs_grad`);
//! - only the values a backward pass reads are kept (`Op::reads`): the others go back to the pool as soon as
//!   the forward pass is done with them ([`Ops::release`]), and a dropout mask is one bit an element (peak
//!   memory: -18 to -33% on the presets' steps);
//! - the heavy ops reuse the fused kernels of [`crate::model::kernels`] (GEMM convolution, GroupNorm + scale-shift
//!   + SiLU, scaled softmax), so both engines compute the same numbers.
//!
//! Parameters are read in place from their Candle tensors; their gradients come back by name
//! ([`Tape::backward`]).
//!
//! This file holds the engine: the [`Pool`], the tape of `Node`s, the backward driver and the [`Ops`]
//! implementation, whose methods delegate to the op families. Each family's file holds, for every op, the
//! state its backward needs (an `Op` variant), its forward pass (`forward`, what the [`Ops`] method
//! records) and its backward pass (`backward`) side by side: `conv.rs` (conv2d, linear), `norm.rs`
//! (GroupNorm + affine + SiLU), `elementwise.rs` (SiLU, broadcasting add and mul, affine, dropout, sin/cos),
//! `shape.rs` (reshape, permute, narrow, concat, upsampling), `attention.rs` (matmul, softmax) and
//! `embed.rs` (embedding lookup). `tests` checks every primitive's values and gradients against Candle's
//! autograd.

mod attention;
mod conv;
mod elementwise;
mod embed;
mod norm;
mod shape;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::Tensor;
use rayon::prelude::*;

use crate::model::ops::Ops;
use crate::model::params::Param;
use crate::model::profile;
use crate::model::random::DropoutKeys;

/// Reusable f32 buffers, by length: a training step asks for the same sizes every time.
#[derive(Default)]
pub struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
}

impl Pool {
    /// A buffer of `len` elements with unspecified contents.
    fn take(&mut self, len: usize) -> Vec<f32> {
        match self.free.get_mut(&len).and_then(|v| v.pop()) {
            Some(b) => b,
            None => vec![0f32; len],
        }
    }
    fn zeroed(&mut self, len: usize) -> Vec<f32> {
        let mut b = self.take(len);
        b.fill(0.0);
        b
    }
    fn put(&mut self, b: Vec<f32>) {
        if !b.is_empty() {
            self.free.entry(b.len()).or_default().push(b);
        }
    }
}

/// A value on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Val(usize);

/// A parameter as the tape sees it: its tensor (read in place) and its slot in the gradient list.
#[derive(Clone)]
struct ParamSlot {
    tensor: Tensor,
    slot: usize,
}

/// How a node was computed, with what its backward pass needs (inputs are node indices).
enum Op {
    /// Input, constant, or a value computed from them only.
    Leaf,
    /// Shares its input's buffer (a reshape); the backward driver passes its gradient on unchanged.
    Alias {
        x: usize,
    },
    Conv(conv::Conv),
    Linear(conv::Linear),
    GroupNormAct(norm::GroupNormAct),
    Silu(elementwise::Silu),
    Binary(elementwise::Binary),
    Affine(elementwise::Affine),
    Dropout(elementwise::Dropout),
    Permute(shape::Permute),
    Narrow(shape::Narrow),
    Concat(shape::Concat),
    Upsample2x(shape::Upsample2x),
    MatMul(attention::MatMul),
    Softmax(attention::Softmax),
    Embedding(embed::Embedding),
}

impl Op {
    /// The nodes whose values this op's backward pass reads (`out`: the op's own node). Every other value is
    /// the forward pass's alone: [`Ops::release`] gives its buffer back to the pool once the forward is done
    /// with it.
    fn reads(&self, out: usize) -> Vec<usize> {
        match self {
            Op::Leaf | Op::Alias { .. } | Op::Affine(_) | Op::Dropout(_) => vec![],
            Op::Permute(_) | Op::Narrow(_) | Op::Concat(_) | Op::Upsample2x(_) => vec![],
            Op::Conv(op) => vec![op.x()],
            Op::Linear(op) => vec![op.x()],
            Op::GroupNormAct(op) => op.reads(),
            Op::Silu(op) => vec![op.x()],
            Op::Binary(op) => op.reads(),
            Op::MatMul(op) => op.reads(),
            Op::Softmax(_) => vec![out],
            Op::Embedding(op) => vec![op.ids()],
        }
    }

    /// The op's name in a profile ([`crate::model::profile`]).
    fn kind(&self) -> &'static str {
        match self {
            Op::Leaf => "input",
            Op::Alias { .. } => "reshape",
            Op::Conv(c) => c.kind(),
            Op::Linear(_) => "linear",
            Op::GroupNormAct(_) => "group norm (+ scale-shift, SiLU)",
            Op::Silu(_) => "silu",
            Op::Binary(_) => "add / mul",
            Op::Affine(_) => "affine",
            Op::Dropout(_) => "dropout",
            Op::Permute(_) => "permute",
            Op::Narrow(_) => "narrow",
            Op::Concat(_) => "concat",
            Op::Upsample2x(_) => "upsample",
            Op::MatMul(_) => "attention matmul",
            Op::Softmax(_) => "softmax",
            Op::Embedding(_) => "embedding",
        }
    }
}

struct Node {
    dims: Vec<usize>,
    /// Index into `Tape::bufs` (aliases share one).
    buf: usize,
    op: Op,
    needs_grad: bool,
}

/// One forward pass recorded for its backward pass. Dropping the tape returns its buffers to the pool.
pub struct Tape<'a> {
    pool: &'a mut Pool,
    nodes: Vec<Node>,
    bufs: Vec<Vec<f32>>,
    /// Per buffer: whether a backward pass reads it (`Op::reads`); the others can be released early.
    read_back: Vec<bool>,
    dropout: Option<&'a mut DropoutKeys>,
    /// Parameter name -> slot; gradients are accumulated per slot.
    slots: HashMap<String, usize>,
    names: Vec<String>,
}

/// The gradients a backward pass collects: per node (moved into the first consumer, added in place where
/// paths join) and per parameter slot.
struct Gradients {
    nodes: Vec<Option<Vec<f32>>>,
    params: Vec<Option<Vec<f32>>>,
}

impl Gradients {
    fn new(nodes: usize, params: usize) -> Self {
        Self { nodes: (0..nodes).map(|_| None).collect(), params: (0..params).map(|_| None).collect() }
    }

    /// Adds `g` to the gradient of parameter slot `slot` (moving it in when it is the first).
    fn accumulate_param_grad(&mut self, slot: usize, g: Vec<f32>) {
        match &mut self.params[slot] {
            Some(have) => have.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
            s @ None => *s = Some(g),
        }
    }
}

fn numel(d: &[usize]) -> usize {
    d.iter().product()
}

/// Contiguous row-major strides.
fn strides(d: &[usize]) -> Vec<usize> {
    let mut s = vec![1; d.len()];
    for i in (0..d.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * d[i + 1];
    }
    s
}

/// Rows per parallel task for elementwise work.
const PAR_CHUNK: usize = 1 << 15;

/// dst += src, in parallel.
fn par_add_assign(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(PAR_CHUNK).zip(src.par_chunks(PAR_CHUNK)).for_each(|(d, s)| {
        for (d, &v) in d.iter_mut().zip(s) {
            *d += v;
        }
    });
}

impl<'a> Tape<'a> {
    /// An empty tape; dropout draws its masks from `dropout` when given (training), as
    /// [`crate::model::ops::CandleOps`] does.
    pub fn new(pool: &'a mut Pool, dropout: Option<&'a mut DropoutKeys>) -> Self {
        Self { pool, nodes: vec![], bufs: vec![], read_back: vec![], dropout, slots: HashMap::new(), names: vec![] }
    }

    /// A constant input (images, timesteps and labels as f32).
    pub fn input(&mut self, data: &[f32], dims: &[usize]) -> Result<Val> {
        ensure!(data.len() == numel(dims), "input of {} values for shape {dims:?}", data.len());
        let mut b = self.pool.take(data.len());
        b.copy_from_slice(data);
        Ok(self.push(dims.to_vec(), b, Op::Leaf, false))
    }

    pub fn dims(&self, v: Val) -> &[usize] {
        &self.nodes[v.0].dims
    }
    pub fn data(&self, v: Val) -> &[f32] {
        self.values(v.0)
    }

    /// Records a node that owns its buffer, and marks the values its backward pass reads.
    fn push(&mut self, dims: Vec<usize>, buf: Vec<f32>, op: Op, needs_grad: bool) -> Val {
        debug_assert_eq!(buf.len(), numel(&dims));
        self.bufs.push(buf);
        self.read_back.push(false);
        let node = self.nodes.len();
        for r in op.reads(node) {
            // the op's own output: its buffer is the one just pushed
            let buf = if r == node { self.bufs.len() - 1 } else { self.nodes[r].buf };
            self.read_back[buf] = true;
        }
        self.nodes.push(Node { dims, buf: self.bufs.len() - 1, op, needs_grad });
        Val(node)
    }

    /// [`Ops::release`]: the forward pass reads `x` no more; its buffer goes back to the pool (to serve the
    /// values still to come) unless a backward pass reads it.
    fn release_value(&mut self, x: Val) {
        let buf = self.nodes[x.0].buf;
        if !self.read_back[buf] {
            let b = std::mem::take(&mut self.bufs[buf]);
            self.pool.put(b);
        }
    }

    /// Runs an op's forward `f`, its wall time counted to the op's kind while profiling.
    fn recorded(&mut self, f: impl FnOnce(&mut Self) -> Result<Val>) -> Result<Val> {
        if !profile::is_on() {
            return f(self);
        }
        let start = Instant::now();
        let v = f(self)?;
        profile::add(&format!("{} forward", self.nodes[v.0].op.kind()), start.elapsed());
        Ok(v)
    }

    /// Records a node that shares node `x`'s buffer under other dimensions.
    fn alias(&mut self, x: usize, dims: Vec<usize>) -> Val {
        let (buf, needs_grad) = (self.nodes[x].buf, self.nodes[x].needs_grad);
        self.nodes.push(Node { dims, buf, op: Op::Alias { x }, needs_grad });
        Val(self.nodes.len() - 1)
    }

    fn needs_grad(&self, node: usize) -> bool {
        self.nodes[node].needs_grad
    }

    /// Node `node`'s values.
    fn values(&self, node: usize) -> &[f32] {
        let b = &self.bufs[self.nodes[node].buf];
        // a released value read again: a forward pass that called `release` too early, or an op whose backward
        // reads a value its `reads` does not name (either would otherwise compute on the wrong buffer)
        assert!(b.len() == numel(&self.nodes[node].dims), "node {node}'s value was released and read again");
        b
    }

    /// The tape's view of a parameter: its f32 CPU tensor and its gradient slot (by name, so a parameter
    /// used twice collects both gradients).
    fn param(&mut self, p: &Param) -> Result<ParamSlot> {
        ensure!(
            p.value.device().is_cpu() && p.value.dtype() == candle_core::DType::F32,
            "parameter {} must be f32 on the CPU",
            p.name
        );
        let slot = match self.slots.get(&p.name) {
            Some(&s) => s,
            None => {
                self.names.push(p.name.clone());
                self.slots.insert(p.name.clone(), self.names.len() - 1);
                self.names.len() - 1
            }
        };
        Ok(ParamSlot { tensor: p.value.contiguous()?, slot })
    }

    /// Backpropagates `seed` (d loss / d out) and returns the gradient of every parameter used, by name.
    pub fn backward(mut self, out: Val, seed: Vec<f32>) -> Result<HashMap<String, Vec<f32>>> {
        ensure!(seed.len() == numel(&self.nodes[out.0].dims), "seed gradient has the wrong size");
        let mut grads = Gradients::new(self.nodes.len(), self.names.len());
        // the seed goes into a buffer of the pool: every gradient buffer is put back into the pool once used,
        // and the caller's own Vec would make the pool grow by one output's size every step
        let mut g = self.pool.take(seed.len());
        g.copy_from_slice(&seed);
        grads.nodes[out.0] = Some(g);
        for i in (0..self.nodes.len()).rev() {
            if let Some(g) = grads.nodes[i].take() {
                if let Op::Alias { x } = self.nodes[i].op {
                    // a reshape passes its gradient on unchanged
                    self.accumulate_grad(&mut grads, x, g);
                    continue;
                }
                if self.nodes[i].needs_grad {
                    let start = profile::is_on().then(Instant::now);
                    self.backprop(i, &g, &mut grads)?;
                    if let Some(start) = start {
                        profile::add(&format!("{} backward", self.nodes[i].op.kind()), start.elapsed());
                    }
                }
                self.pool.put(g);
            }
            // node i's value is read only by its own backward and its consumers' (all later on the tape, so
            // done by now): its buffer can serve the gradients still to come (peak memory)
            if !matches!(self.nodes[i].op, Op::Alias { .. }) {
                let b = std::mem::take(&mut self.bufs[self.nodes[i].buf]);
                self.pool.put(b);
            }
            if let Op::Dropout(dropout) = &mut self.nodes[i].op {
                dropout.kept = vec![];
            }
        }
        let mut map = HashMap::new();
        for (name, g) in self.names.iter().zip(grads.params) {
            if let Some(g) = g {
                map.insert(name.clone(), g);
            }
        }
        Ok(map)
    }

    /// Adds `g` to the gradient of node `node` (moving it in when it is the first; dropping it when the node
    /// needs none).
    fn accumulate_grad(&mut self, grads: &mut Gradients, node: usize, g: Vec<f32>) {
        if !self.nodes[node].needs_grad {
            self.pool.put(g);
            return;
        }
        match &mut grads.nodes[node] {
            Some(have) => {
                par_add_assign(have, &g);
                self.pool.put(g);
            }
            slot @ None => *slot = Some(g),
        }
    }

    /// Node `node`'s backward pass for its output gradient `g`: its op's `backward`.
    fn backprop(&mut self, node: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        // take the op out so that `self` can be borrowed mutably below; put back at the end
        let op = std::mem::replace(&mut self.nodes[node].op, Op::Leaf);
        let result = match &op {
            Op::Leaf => Ok(()),
            Op::Alias { .. } => unreachable!("aliases pass their gradient on in backward()"),
            Op::Conv(op) => op.backward(self, node, g, grads),
            Op::Linear(op) => op.backward(self, node, g, grads),
            Op::GroupNormAct(op) => op.backward(self, node, g, grads),
            Op::Silu(op) => op.backward(self, node, g, grads),
            Op::Binary(op) => op.backward(self, node, g, grads),
            Op::Affine(op) => op.backward(self, node, g, grads),
            Op::Dropout(op) => op.backward(self, node, g, grads),
            Op::Permute(op) => op.backward(self, node, g, grads),
            Op::Narrow(op) => op.backward(self, node, g, grads),
            Op::Concat(op) => op.backward(self, node, g, grads),
            Op::Upsample2x(op) => op.backward(self, node, g, grads),
            Op::MatMul(op) => op.backward(self, node, g, grads),
            Op::Softmax(op) => op.backward(self, node, g, grads),
            Op::Embedding(op) => op.backward(self, node, g, grads),
        };
        self.nodes[node].op = op;
        result
    }
}

/// The forward passes, each recorded by its op family (the files of this module).
impl Ops for Tape<'_> {
    type T = Val;

    fn conv2d(&mut self, x: &Val, w: &Param, b: &Param, stride: usize, padding: usize) -> Result<Val> {
        self.recorded(|t| conv::Conv::forward(t, x, w, b, stride, padding))
    }
    fn linear(&mut self, x: &Val, w: &Param, b: &Param) -> Result<Val> {
        self.recorded(|t| conv::Linear::forward(t, x, w, b))
    }
    fn group_norm(&mut self, x: &Val, groups: usize, eps: f64, w: &Param, b: &Param) -> Result<Val> {
        self.group_norm_act(x, groups, eps, w, b, None, false)
    }
    fn group_norm_act(
        &mut self,
        x: &Val,
        groups: usize,
        eps: f64,
        w: &Param,
        b: &Param,
        scale_shift: Option<(&Val, &Val)>,
        silu: bool,
    ) -> Result<Val> {
        self.recorded(|t| norm::GroupNormAct::forward(t, x, (groups, eps), (w, b), scale_shift, silu))
    }
    fn silu(&mut self, x: &Val) -> Result<Val> {
        self.recorded(|t| elementwise::Silu::forward(t, x))
    }
    fn add(&mut self, a: &Val, b: &Val) -> Result<Val> {
        self.recorded(|t| elementwise::Binary::forward(t, a, b, elementwise::BinaryKind::Add))
    }
    fn mul(&mut self, a: &Val, b: &Val) -> Result<Val> {
        self.recorded(|t| elementwise::Binary::forward(t, a, b, elementwise::BinaryKind::Mul))
    }
    fn affine(&mut self, x: &Val, mul: f64, add: f64) -> Result<Val> {
        self.recorded(|t| elementwise::Affine::forward(t, x, mul, add))
    }
    fn reshape(&mut self, x: &Val, dims: &[i64]) -> Result<Val> {
        shape::reshape(self, x, dims)
    }
    fn permute(&mut self, x: &Val, perm: &[usize]) -> Result<Val> {
        self.recorded(|t| shape::Permute::forward(t, x, perm))
    }
    fn narrow(&mut self, x: &Val, dim: usize, start: usize, len: usize) -> Result<Val> {
        self.recorded(|t| shape::Narrow::forward(t, x, dim, start, len))
    }
    fn concat(&mut self, xs: &[Val], dim: usize) -> Result<Val> {
        self.recorded(|t| shape::Concat::forward(t, xs, dim))
    }
    fn matmul(&mut self, a: &Val, b: &Val) -> Result<Val> {
        self.recorded(|t| attention::MatMul::forward(t, a, b))
    }
    fn softmax_last(&mut self, x: &Val) -> Result<Val> {
        self.softmax_last_scaled(x, 1.0)
    }
    fn softmax_last_scaled(&mut self, x: &Val, scale: f64) -> Result<Val> {
        self.recorded(|t| attention::Softmax::forward(t, x, scale))
    }
    fn upsample_nearest2x(&mut self, x: &Val) -> Result<Val> {
        self.recorded(|t| shape::Upsample2x::forward(t, x))
    }
    fn dropout(&mut self, x: &Val, p: f64) -> Result<Val> {
        self.recorded(|t| elementwise::Dropout::forward(t, x, p))
    }
    fn embedding(&mut self, ids: &Val, table: &Param) -> Result<Val> {
        self.recorded(|t| embed::Embedding::forward(t, ids, table))
    }
    fn timesteps_to_f32(&mut self, t: &Val) -> Result<Val> {
        // inputs are f32 already
        Ok(*t)
    }
    fn const_f32(&mut self, _name: &str, values: &[f32]) -> Result<Val> {
        self.input(values, &[values.len()])
    }
    fn sin(&mut self, x: &Val) -> Result<Val> {
        elementwise::no_grad_map(self, x, f32::sin)
    }
    fn cos(&mut self, x: &Val) -> Result<Val> {
        elementwise::no_grad_map(self, x, f32::cos)
    }
    fn to_model_dtype(&mut self, x: &Val) -> Result<Val> {
        Ok(*x)
    }
    fn release(&mut self, x: &Val) {
        self.release_value(*x)
    }
}

impl Drop for Tape<'_> {
    fn drop(&mut self) {
        for b in self.bufs.drain(..) {
            self.pool.put(b);
        }
    }
}
