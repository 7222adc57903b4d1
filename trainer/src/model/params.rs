//! Named parameters: seeded initialisation, loading from tensors, and the variable list the optimiser updates.
//!
//! Candle's own `VarBuilder` initialises from an unseedable RNG on the CPU, so training would not be
//! reproducible; this store draws every tensor from a ChaCha stream keyed by (seed, parameter name), which
//! also makes a parameter's initial value independent of the order in which layers are built.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A model parameter: its checkpoint/ONNX name and its value.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
}

/// How a fresh parameter is drawn.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Const(f64),
    /// U(-b, b): PyTorch's default for conv and linear layers, b = 1/sqrt(fan_in).
    Uniform(f64),
    Normal(f64),
}

/// Where parameters come from when a model is built.
pub trait ParamSource {
    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param>;
}

/// Creates trainable variables from a seed.
pub struct InitSource {
    seed: u64,
    device: Device,
    dtype: DType,
    vars: BTreeMap<String, Var>,
}

impl InitSource {
    pub fn new(seed: u64, device: &Device, dtype: DType) -> Self {
        Self { seed, device: device.clone(), dtype, vars: BTreeMap::new() }
    }
    /// The created variables, sorted by name.
    pub fn into_vars(self) -> BTreeMap<String, Var> {
        self.vars
    }
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across platforms and Rust versions (unlike DefaultHasher).
    name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

pub fn init_values(seed: u64, name: &str, n: usize, init: Init) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform(b) => (0..n).map(|_| rng.gen_range(-b..b) as f32).collect(),
        Init::Normal(std) => {
            use rand_distr::{Distribution, StandardNormal};
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    (z * std) as f32
                })
                .collect()
        }
    }
}

impl ParamSource for InitSource {
    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        if self.vars.contains_key(name) {
            bail!("internal error: parameter '{name}' created twice");
        }
        let n = shape.iter().product();
        let t = Tensor::from_vec(init_values(self.seed, name, n, init), shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        let value = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(Param { name: name.to_string(), value })
    }
}

/// Takes parameters from a name -> tensor map (a checkpoint), checking every shape, and that every tensor
/// was used.
pub struct TensorSource<'a> {
    tensors: &'a HashMap<String, Tensor>,
    used: Vec<String>,
    /// Where the tensors came from, for error messages.
    origin: String,
    as_vars: bool,
    vars: BTreeMap<String, Var>,
    dtype: Option<DType>,
}

impl<'a> TensorSource<'a> {
    pub fn new(tensors: &'a HashMap<String, Tensor>, origin: impl Into<String>) -> Self {
        Self { tensors, used: vec![], origin: origin.into(), as_vars: false, vars: BTreeMap::new(), dtype: None }
    }
    /// Make each parameter a fresh trainable variable (for resuming training).
    pub fn as_vars(mut self) -> Self {
        self.as_vars = true;
        self
    }
    /// Convert every tensor to this dtype.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }
    /// Errors if the map holds tensors the model did not ask for.
    pub fn finish(self) -> Result<BTreeMap<String, Var>> {
        let mut extra: Vec<&String> = self.tensors.keys().filter(|k| !self.used.contains(k)).collect();
        extra.sort();
        if !extra.is_empty() {
            bail!(
                "{}: {} tensor(s) do not belong to a model of this config (first: '{}'): the checkpoint and its config do not match",
                self.origin,
                extra.len(),
                extra[0]
            );
        }
        Ok(self.vars)
    }
}

impl ParamSource for TensorSource<'_> {
    fn param(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Param> {
        let t = self.tensors.get(name).with_context(|| {
            format!("{}: tensor '{name}' is missing: the checkpoint and its config do not match", self.origin)
        })?;
        if t.dims() != shape {
            bail!(
                "{}: tensor '{name}' has shape {:?} but the config needs {:?}: the checkpoint and its config do not match",
                self.origin,
                t.dims(),
                shape
            );
        }
        self.used.push(name.to_string());
        let t = match self.dtype {
            Some(d) => t.to_dtype(d)?,
            None => t.clone(),
        };
        let value = if self.as_vars {
            let var = Var::from_tensor(&t)?;
            let v = var.as_tensor().clone();
            self.vars.insert(name.to_string(), var);
            v
        } else {
            t
        };
        Ok(Param { name: name.to_string(), value })
    }
}

/// Counts parameters without allocating them (for the size check of large configs).
#[derive(Default)]
pub struct ShapeCounter {
    pub shapes: Vec<(String, Vec<usize>)>,
}

impl ShapeCounter {
    pub fn total(&self) -> usize {
        self.shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

impl ParamSource for ShapeCounter {
    fn param(&mut self, name: &str, shape: &[usize], _init: Init) -> Result<Param> {
        self.shapes.push((name.to_string(), shape.to_vec()));
        // a zero-sized stand-in: nothing is computed with it
        let value = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
        Ok(Param { name: name.to_string(), value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_values_depend_on_seed_and_name_not_on_build_order() {
        let build = |order: &[&str], seed: u64| {
            let mut src = InitSource::new(seed, &Device::Cpu, DType::F32);
            for name in order {
                src.param(name, &[2, 3], Init::Uniform(0.5)).unwrap();
            }
            src.into_vars().into_iter().map(|(k, v)| (k, v.as_tensor().to_vec2::<f32>().unwrap())).collect::<Vec<_>>()
        };
        let ab = build(&["a", "b"], 3);
        assert_eq!(ab, build(&["b", "a"], 3));
        assert_ne!(ab, build(&["a", "b"], 4));
        assert_ne!(ab[0].1, ab[1].1, "two parameters do not share values");
        assert!(ab.iter().flat_map(|(_, v)| v.iter().flatten()).all(|x| (-0.5..0.5).contains(x)));
        assert_eq!(init_values(0, "c", 3, Init::Const(0.25)), vec![0.25; 3]);
        let z = init_values(1, "n", 20_000, Init::Normal(2.0));
        let var = z.iter().map(|v| (v * v) as f64).sum::<f64>() / z.len() as f64;
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
        let mut src = InitSource::new(0, &Device::Cpu, DType::F32);
        src.param("a", &[1], Init::Const(0.0)).unwrap();
        assert!(src.param("a", &[1], Init::Const(0.0)).is_err(), "a name is created once");
    }

    #[test]
    fn tensor_sources_check_names_shapes_and_leftovers() {
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
        let map: HashMap<String, Tensor> = [("w".to_string(), t(&[2, 2])), ("b".to_string(), t(&[2]))].into();
        let mut src = TensorSource::new(&map, "ck/model.safetensors").as_vars().with_dtype(DType::F16);
        assert_eq!(src.param("w", &[2, 2], Init::Const(1.0)).unwrap().value.dtype(), DType::F16);
        let e = src.param("w2", &[2], Init::Const(1.0)).unwrap_err().to_string();
        assert!(e.contains("ck/model.safetensors") && e.contains("'w2' is missing"), "{e}");
        let e = src.param("b", &[3], Init::Const(1.0)).unwrap_err().to_string();
        assert!(e.contains("[2]") && e.contains("[3]"), "{e}");
        // 'b' was never taken: the map and the model do not match
        let e = src.finish().unwrap_err().to_string();
        assert!(e.contains("1 tensor(s)") && e.contains("'b'"), "{e}");
        let mut src = TensorSource::new(&map, "x").as_vars();
        src.param("w", &[2, 2], Init::Const(1.0)).unwrap();
        src.param("b", &[2], Init::Const(1.0)).unwrap();
        assert_eq!(src.finish().unwrap().keys().collect::<Vec<_>>(), ["b", "w"]);
        let mut count = ShapeCounter::default();
        count.param("w", &[3, 4], Init::Const(0.0)).unwrap();
        count.param("b", &[4], Init::Const(0.0)).unwrap();
        assert_eq!(count.total(), 16);
    }
}
