//! Elementwise ops: SiLU, add and mul with numpy broadcasting, affine, dropout, and sin/cos of constants.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::{numel, strides, Gradients, Op, Tape, Val, PAR_CHUNK};
use crate::model::kernels;
use crate::model::random::DropoutKeys;

fn par_map2(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    out.par_chunks_mut(PAR_CHUNK).zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK))).for_each(|(o, (a, b))| {
        for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
    });
}

fn par_map1(out: &mut [f32], a: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    out.par_chunks_mut(PAR_CHUNK).zip(a.par_chunks(PAR_CHUNK)).for_each(|(o, a)| {
        for (o, &x) in o.iter_mut().zip(a) {
            *o = f(x);
        }
    });
}

/// y = x sigmoid(x).
pub(super) struct Silu {
    x: usize,
}

impl Silu {
    /// The node the backward pass reads.
    pub(super) fn x(&self) -> usize {
        self.x
    }

    /// [`crate::model::ops::Ops::silu`].
    pub(super) fn forward(tape: &mut Tape, x: &Val) -> Result<Val> {
        let mut y = tape.pool.take(tape.values(x.0).len());
        par_map1(&mut y, tape.values(x.0), |v| v * kernels::sigmoid(v));
        let needs_grad = tape.needs_grad(x.0);
        Ok(tape.push(tape.nodes[x.0].dims.clone(), y, Op::Silu(Silu { x: x.0 }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let mut dx = tape.pool.take(g.len());
        par_map2(&mut dx, tape.values(self.x), g, |v, g| {
            let s = kernels::sigmoid(v);
            g * s * (1.0 + v * (1.0 - s))
        });
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum BinaryKind {
    Add,
    Mul,
}

/// y = a + b or a * b, broadcasting numpy-style.
pub(super) struct Binary {
    a: usize,
    b: usize,
    kind: BinaryKind,
}

/// numpy broadcasting of two shapes.
fn broadcast_dims(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let get = |d: &[usize], i: usize| if i + d.len() >= n { d[i + d.len() - n] } else { 1 };
    (0..n)
        .map(|i| match (get(a, i), get(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            (x, y) => bail!("cannot broadcast {a:?} with {b:?} (axis {i}: {x} vs {y})"),
        })
        .collect()
}

/// For every element of the broadcast output (row-major), calls f(output index, index into the input of
/// shape `inp`).
fn for_broadcast(out: &[usize], inp: &[usize], mut f: impl FnMut(usize, usize)) {
    let n = out.len();
    let st = strides(inp);
    // the input's stride along each output axis (0 where it is broadcast)
    let s: Vec<usize> = (0..n)
        .map(|i| {
            let j = i as isize - (n - inp.len()) as isize;
            if j < 0 || inp[j as usize] == 1 {
                0
            } else {
                st[j as usize]
            }
        })
        .collect();
    let total = numel(out);
    if total == 0 {
        return;
    }
    let mut idx = vec![0usize; n];
    let mut off = 0usize;
    for o in 0..total {
        f(o, off);
        for ax in (0..n).rev() {
            idx[ax] += 1;
            off += s[ax];
            if idx[ax] < out[ax] {
                break;
            }
            off -= s[ax] * idx[ax];
            idx[ax] = 0;
        }
    }
}

/// Sums `g` (of shape `out`) down to the broadcast input shape `inp`.
fn reduce_to(g: &[f32], out: &[usize], inp: &[usize], dst: &mut [f32]) {
    dst.fill(0.0);
    for_broadcast(out, inp, |o, i| dst[i] += g[o]);
}

impl Binary {
    /// The nodes the backward pass reads: a product's two factors; nothing for a sum.
    pub(super) fn reads(&self) -> Vec<usize> {
        match self.kind {
            BinaryKind::Mul => vec![self.a, self.b],
            BinaryKind::Add => vec![],
        }
    }

    /// [`crate::model::ops::Ops::add`] and [`crate::model::ops::Ops::mul`].
    pub(super) fn forward(tape: &mut Tape, a: &Val, b: &Val, kind: BinaryKind) -> Result<Val> {
        let (ad, bd) = (tape.nodes[a.0].dims.clone(), tape.nodes[b.0].dims.clone());
        let od = broadcast_dims(&ad, &bd)?;
        let mut y = tape.pool.take(numel(&od));
        let (av, bv) = (tape.values(a.0), tape.values(b.0));
        let mul = kind == BinaryKind::Mul;
        let f = |x: f32, z: f32| if mul { x * z } else { x + z };
        if ad == od && bd == od {
            par_map2(&mut y, av, bv, f);
        } else {
            for_broadcast(&od, &ad, |o, i| y[o] = av[i]);
            for_broadcast(&od, &bd, |o, i| y[o] = f(y[o], bv[i]));
        }
        let needs_grad = tape.needs_grad(a.0) || tape.needs_grad(b.0);
        Ok(tape.push(od, y, Op::Binary(Binary { a: a.0, b: b.0, kind }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let out = tape.nodes[out].dims.clone();
        for (me, other) in [(self.a, self.b), (self.b, self.a)] {
            if !tape.needs_grad(me) {
                continue;
            }
            let md = tape.nodes[me].dims.clone();
            let n = numel(&md);
            let mut d = tape.pool.take(n);
            if self.kind == BinaryKind::Mul {
                // d me = reduce(g * other)
                let od = tape.nodes[other].dims.clone();
                let mut prod = tape.pool.take(g.len());
                let os = tape.values(other);
                for_broadcast(&out, &od, |o, j| prod[o] = g[o] * os[j]);
                if md == out {
                    d.copy_from_slice(&prod);
                } else {
                    reduce_to(&prod, &out, &md, &mut d);
                }
                tape.pool.put(prod);
            } else if md == out {
                d.copy_from_slice(g);
            } else {
                reduce_to(g, &out, &md, &mut d);
            }
            tape.accumulate_grad(grads, me, d);
        }
        Ok(())
    }
}

/// y = x * mul + add.
pub(super) struct Affine {
    x: usize,
    mul: f32,
}

impl Affine {
    /// [`crate::model::ops::Ops::affine`].
    pub(super) fn forward(tape: &mut Tape, x: &Val, mul: f64, add: f64) -> Result<Val> {
        let mut y = tape.pool.take(tape.values(x.0).len());
        let (m, a) = (mul as f32, add as f32);
        par_map1(&mut y, tape.values(x.0), |v| v * m + a);
        let needs_grad = tape.needs_grad(x.0);
        Ok(tape.push(tape.nodes[x.0].dims.clone(), y, Op::Affine(Affine { x: x.0, mul: m }), needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let mut dx = tape.pool.take(g.len());
        let mul = self.mul;
        par_map1(&mut dx, g, |v| v * mul);
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}

/// y = x * mask, the inverted-dropout mask drawn as [`crate::model::ops::CandleOps`] draws it.
pub(super) struct Dropout {
    x: usize,
    /// The mask as one bit an element (kept: 1 / (1 - p), dropped: 0), a 32nd of the f32 mask's memory;
    /// dropped once the backward pass is past this node.
    pub(super) kept: Vec<u64>,
    scale: f32,
}

impl Dropout {
    /// [`crate::model::ops::Ops::dropout`]: the identity unless the tape has dropout keys (training).
    pub(super) fn forward(tape: &mut Tape, x: &Val, p: f64) -> Result<Val> {
        let Some(keys) = tape.dropout.as_deref_mut() else { return Ok(*x) };
        if p <= 0.0 {
            return Ok(*x);
        }
        // the same draws as CandleOps::dropout, so both engines train identically
        let n = tape.nodes[x.0].dims.iter().product();
        let mut mask = tape.pool.take(n);
        keys.fill(p, &mut mask, tape.nodes[x.0].dims[0]);
        let mut y = tape.pool.take(n);
        par_map2(&mut y, tape.values(x.0), &mask, |v, m| v * m);
        let scale = DropoutKeys::scale(p);
        let mut kept = vec![0u64; n.div_ceil(64)];
        for (word, m) in kept.iter_mut().zip(mask.chunks(64)) {
            *word = m.iter().enumerate().fold(0, |w, (i, &v)| w | (u64::from(v != 0.0) << i));
        }
        tape.pool.put(mask);
        let needs_grad = tape.needs_grad(x.0);
        let op = Op::Dropout(Dropout { x: x.0, kept, scale });
        Ok(tape.push(tape.nodes[x.0].dims.clone(), y, op, needs_grad))
    }

    pub(super) fn backward(&self, tape: &mut Tape, _out: usize, g: &[f32], grads: &mut Gradients) -> Result<()> {
        let mut dx = tape.pool.take(g.len());
        let scale = self.scale;
        // PAR_CHUNK is a multiple of 64: each chunk starts on a word of the mask
        const _: () = assert!(PAR_CHUNK.is_multiple_of(64));
        dx.par_chunks_mut(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)).enumerate().for_each(|(c, (d, g))| {
            let words = &self.kept[c * PAR_CHUNK / 64..];
            for (i, (d, &g)) in d.iter_mut().zip(g).enumerate() {
                *d = g * if (words[i / 64] >> (i % 64)) & 1 == 1 { scale } else { 0.0 };
            }
        });
        tape.accumulate_grad(grads, self.x, dx);
        Ok(())
    }
}

/// An elementwise function of a value that needs no gradient (the timestep embedding's sin and cos): a leaf.
pub(super) fn no_grad_map(tape: &mut Tape, x: &Val, f: fn(f32) -> f32) -> Result<Val> {
    ensure!(!tape.needs_grad(x.0), "the CPU engine differentiates sin/cos of constants only");
    let mut y = tape.pool.take(tape.values(x.0).len());
    par_map1(&mut y, tape.values(x.0), f);
    Ok(tape.push(tape.nodes[x.0].dims.clone(), y, Op::Leaf, false))
}

#[cfg(test)]
mod tests {
    use super::super::{Gradients, Pool, Tape};
    use crate::model::ops::Ops;
    use candle_core::{Device, Tensor};

    #[test]
    fn broadcasting_binary_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let a = candle_core::Var::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let b = candle_core::Var::randn(0f32, 1.0, (3, 1), &dev).unwrap();
        let want = (a.broadcast_mul(&b).unwrap() + a.broadcast_add(&b).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, want.dims(), &dev).unwrap();
        let g = (&want * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        // the tape needs a parameter-free graph that still requires gradients: route a and b through affine
        // nodes marked as needing them
        let mut pool = Pool::default();
        let mut tape = Tape::new(&mut pool, None);
        let av = tape.input(&a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a.dims()).unwrap();
        let bv = tape.input(&b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.dims()).unwrap();
        tape.nodes[av.0].needs_grad = true;
        tape.nodes[bv.0].needs_grad = true;
        let m = tape.mul(&av, &bv).unwrap();
        let s = tape.add(&av, &bv).unwrap();
        let out = tape.add(&m, &s).unwrap();
        let ours = tape.data(out).to_vec();
        let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(ours.iter().zip(&w).all(|(x, y)| (x - y).abs() < 1e-5));
        // gradients w.r.t. leaves are not returned (no parameters); check through the internal store
        let mut grads = Gradients::new(tape.nodes.len(), 0);
        grads.nodes[out.0] = Some(probe.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for i in (0..tape.nodes.len()).rev() {
            if i == av.0 || i == bv.0 {
                continue;
            }
            if let Some(gr) = grads.nodes[i].take() {
                tape.backprop(i, &gr, &mut grads).unwrap();
            }
        }
        for (v, leaf) in [(&a, av), (&b, bv)] {
            let want = g.get(v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = grads.nodes[leaf.0].as_ref().unwrap();
            let d = got.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }
}
