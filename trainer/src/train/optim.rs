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
    /// A non-finite norm updates nothing (neither the weights nor the moments nor t) and is returned as it is:
    /// the caller skips the step.
    pub fn step(&mut self, grads: &Grads, lr: f64, clip: f64) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            return Ok(norm);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn one_param(values: &[f32]) -> BTreeMap<String, Var> {
        let v = Var::from_slice(values, values.len(), &Device::Cpu).unwrap();
        [("w".to_string(), v)].into_iter().collect()
    }

    fn values(vars: &BTreeMap<String, Var>) -> Vec<f32> {
        vars["w"].as_tensor().to_vec1().unwrap()
    }

    fn close(a: &[f32], b: &[f64]) -> bool {
        a.iter().zip(b).all(|(a, b)| (*a as f64 - b).abs() < 1e-5)
    }

    #[test]
    fn adamw_matches_two_steps_computed_by_hand() {
        // theta = [1, -2], lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01, no clipping.
        let vars = one_param(&[1.0, -2.0]);
        let mut opt = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.01).unwrap();
        let grads = |g: Vec<f32>| [("w".to_string(), g)].into_iter().collect::<HashMap<_, _>>();
        // step 1, g = [0.5, -1]: m = 0.1 g, v = 0.001 g^2, so m_hat / sqrt(v_hat) = sign(g) and
        // theta = theta (1 - 0.1 * 0.01) - 0.1 sign(g) = [0.899, -1.898]
        let norm = opt.step_host(grads(vec![0.5, -1.0]), 0.1, 0.0).unwrap();
        assert!((norm - 1.25f64.sqrt()).abs() < 1e-6);
        assert!(close(&values(&vars), &[0.899, -1.898]), "{:?}", values(&vars));
        // step 2, g = [-0.25, 2]: m = [0.02, 0.11], v = [3.1225e-4, 4.999e-3], bias corrections 0.19 and
        // 1.999e-3: theta_0 = 0.899 * 0.999 - 0.1 * (0.02 / 0.19) / sqrt(3.1225e-4 / 1.999e-3) = 0.8714673
        opt.step_host(grads(vec![-0.25, 2.0]), 0.1, 0.0).unwrap();
        assert!(close(&values(&vars), &[0.8714673, -1.9327124]), "{:?}", values(&vars));
        let st = opt.state_tensors();
        assert!(close(&st["m.w"].to_vec1::<f32>().unwrap(), &[0.02, 0.11]));
        assert!(close(&st["v.w"].to_vec1::<f32>().unwrap(), &[3.1225e-4, 4.999e-3]));
        assert_eq!(opt.t, 2);
    }

    #[test]
    fn clipping_scales_the_gradient_to_the_threshold_and_reports_the_norm_before() {
        let vars = one_param(&[0.0, 0.0]);
        let mut opt = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.0).unwrap();
        // ||[3, 4]|| = 5 > 1: the moments see [0.6, 0.8]
        let g = [("w".to_string(), vec![3.0f32, 4.0])].into_iter().collect();
        assert!((opt.step_host(g, 0.1, 1.0).unwrap() - 5.0).abs() < 1e-6);
        assert!(close(&opt.state_tensors()["m.w"].to_vec1::<f32>().unwrap(), &[0.06, 0.08]));
        // a gradient for a parameter the optimiser does not hold is an error, as is a NaN gradient
        let g = [("nope".to_string(), vec![1.0f32])].into_iter().collect();
        assert!(opt.step_host(g, 0.1, 1.0).unwrap_err().to_string().contains("'nope'"));
        // a NaN gradient changes nothing: the step is the caller's to skip
        let (before, m_before) = (values(&vars), opt.state_tensors()["m.w"].to_vec1::<f32>().unwrap());
        let g = [("w".to_string(), vec![f32::NAN, 0.0])].into_iter().collect();
        assert!(opt.step_host(g, 0.1, 1.0).unwrap().is_nan());
        assert_eq!((values(&vars), opt.state_tensors()["m.w"].to_vec1::<f32>().unwrap()), (before, m_before));
        assert_eq!(opt.t, 1);
    }

    #[test]
    fn ema_warms_up_then_holds_its_decay() {
        let vars = one_param(&[1.0]);
        let mut ema = Ema::new(&vars, 0.999).unwrap();
        // min(decay, (1 + n) / (10 + n)): 0.1 at first, 0.91 after 90 updates, the decay itself from ~9000 on
        assert!((ema.effective_decay() - 0.1).abs() < 1e-12);
        vars["w"].set(&Tensor::new(&[3.0f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&vars).unwrap();
        // 0.1 * 1 + 0.9 * 3
        assert!((ema.tensors["w"].to_vec1::<f32>().unwrap()[0] - 2.8).abs() < 1e-6);
        ema.updates = 90;
        assert!((ema.effective_decay() - 0.91).abs() < 1e-12);
        ema.updates = 1_000_000;
        assert_eq!(ema.effective_decay(), 0.999);
    }
}
