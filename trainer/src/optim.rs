//! AdamW (Loshchilov & Hutter 2019) with global gradient-norm clipping, and the EMA of the weights.
//! Unlike candle-nn's AdamW, the moments are exposed so that checkpoints can save and restore them.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Where the optimiser finds each parameter's gradient.
pub enum Grads<'a> {
    /// Candle's autograd, keyed by variable.
    Candle(&'a GradStore),
    /// By parameter name (the CPU engine).
    Named(&'a HashMap<String, Tensor>),
}

impl Grads<'_> {
    fn get(&self, name: &str, var: &Var) -> Option<Tensor> {
        match self {
            Grads::Candle(g) => g.get(var).cloned(),
            Grads::Named(m) => m.get(name).cloned(),
        }
    }
}

pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub t: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: &BTreeMap<String, Var>, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        let vars: Vec<(String, Var)> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, m, v, t: 0, beta1, beta2, eps, weight_decay })
    }

    /// Global L2 norm of the gradients (Pascanu et al. 2013), one device sync.
    pub fn grad_norm(&self, grads: &Grads) -> Result<f64> {
        let sq: Vec<Tensor> = self
            .vars
            .iter()
            .filter_map(|(k, v)| grads.get(k, v))
            .map(|g| g.to_dtype(candle_core::DType::F32).and_then(|g| g.sqr()?.sum_all()))
            .collect::<candle_core::Result<_>>()?;
        if sq.is_empty() {
            return Ok(0.0);
        }
        Ok(Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64)
    }

    /// One update; gradients are scaled by min(1, clip / ||g||) when clip > 0. Returns ||g|| before clipping.
    pub fn step(&mut self, grads: &Grads, lr: f64, clip: f64) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            bail!("gradient norm is {norm} at optimiser step {}: training diverged (lower train.lr or enable train.grad_clip)", self.t + 1);
        }
        let gscale = if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        // Kingma & Ba 2015, Algorithm 1: bias corrections 1 - beta^t
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(name, var) else { continue };
            let g = if gscale != 1.0 { (g * gscale)? } else { g };
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            // Loshchilov & Hutter 2019, Algorithm 2: decoupled weight decay theta <- theta (1 - lr lambda) - lr m_hat / (sqrt(v_hat) + eps)
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let theta = var.as_tensor();
            let theta = if self.weight_decay > 0.0 { (theta * (1.0 - lr * self.weight_decay))? } else { theta.clone() };
            var.set(&(theta - (update * lr)?)?)?;
            // detached: the moments must not keep this step's autograd graph alive
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(norm)
    }

    /// [`AdamW::step`] with host gradients by parameter name (the CPU engine's output).
    pub fn step_host(&mut self, grads: HashMap<String, Vec<f32>>, lr: f64, clip: f64) -> Result<f64> {
        let mut named = HashMap::with_capacity(grads.len());
        for (name, g) in grads {
            let var = self.vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v);
            let var = var.with_context(|| format!("a gradient for '{name}', which the optimiser does not hold"))?;
            named.insert(name, Tensor::from_vec(g, var.dims(), var.device())?);
        }
        self.step(&Grads::Named(&named), lr, clip)
    }

    /// Moments keyed `m.<param>` / `v.<param>` for the checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (key, slot) in [(format!("m.{name}"), &mut self.m[i]), (format!("v.{name}"), &mut self.v[i])] {
                let tensor = tensors.get(&key).with_context(|| format!("optimizer state has no '{key}'"))?;
                if tensor.dims() != var.dims() {
                    bail!("optimizer state '{key}' has shape {:?}, the parameter {:?}", tensor.dims(), var.dims());
                }
                *slot = tensor.to_dtype(var.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Exponential moving average of the weights (Polyak averaging; DDPM uses decay 0.9999).
pub struct Ema {
    pub decay: f64,
    pub tensors: BTreeMap<String, Tensor>,
    pub updates: usize,
}

impl Ema {
    pub fn new(vars: &BTreeMap<String, Var>, decay: f64) -> Result<Self> {
        let tensors =
            vars.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.detach()))).collect::<Result<_>>()?;
        Ok(Self { decay, tensors, updates: 0 })
    }

    /// The decay in force after n updates: min(decay, (1 + n) / (10 + n)), so short runs are not dominated
    /// by the initial weights (TensorFlow's ExponentialMovingAverage num_updates rule).
    pub fn effective_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    pub fn update(&mut self, vars: &BTreeMap<String, Var>) -> Result<()> {
        let d = self.effective_decay();
        for (k, v) in vars {
            let e = self.tensors.get_mut(k).with_context(|| format!("EMA has no '{k}'"))?;
            // ema <- d ema + (1 - d) theta
            *e = ((&*e * d)? + (v.as_tensor().detach() * (1.0 - d))?)?;
        }
        self.updates += 1;
        Ok(())
    }

    pub fn as_map(&self) -> HashMap<String, Tensor> {
        self.tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
