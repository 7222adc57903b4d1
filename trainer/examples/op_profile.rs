//! Times each primitive of one U-Net forward pass (CPU ops are synchronous).
//! cargo run --release -p trainer --example op_profile -- trainer/configs/mnist-ch64.toml 32
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use trainer::model::ops::{CandleOps, Ops};
use trainer::model::params::{InitSource, Param};
use trainer::model::unet::UNet;
use trainer::train::config::Config;

struct Timed<'a> {
    inner: CandleOps<'a>,
    t: BTreeMap<&'static str, (f64, usize)>,
}

macro_rules! timed {
    ($self:ident, $name:literal, $e:expr) => {{
        let s = Instant::now();
        let r = $e;
        let e = $self.t.entry($name).or_insert((0.0, 0));
        e.0 += s.elapsed().as_secs_f64();
        e.1 += 1;
        r
    }};
}

impl Ops for Timed<'_> {
    type T = Tensor;
    fn conv2d(&mut self, x: &Tensor, w: &Param, b: &Param, s: usize, p: usize) -> Result<Tensor> {
        timed!(self, "conv2d", self.inner.conv2d(x, w, b, s, p))
    }
    fn linear(&mut self, x: &Tensor, w: &Param, b: &Param) -> Result<Tensor> {
        timed!(self, "linear", self.inner.linear(x, w, b))
    }
    fn group_norm(&mut self, x: &Tensor, g: usize, e: f64, w: &Param, b: &Param) -> Result<Tensor> {
        timed!(self, "group_norm", self.inner.group_norm(x, g, e, w, b))
    }
    fn silu(&mut self, x: &Tensor) -> Result<Tensor> {
        timed!(self, "silu", self.inner.silu(x))
    }
    fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        timed!(self, "add", self.inner.add(a, b))
    }
    fn mul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        timed!(self, "mul", self.inner.mul(a, b))
    }
    fn affine(&mut self, x: &Tensor, m: f64, a: f64) -> Result<Tensor> {
        timed!(self, "affine", self.inner.affine(x, m, a))
    }
    fn reshape(&mut self, x: &Tensor, d: &[i64]) -> Result<Tensor> {
        timed!(self, "reshape", self.inner.reshape(x, d))
    }
    fn permute(&mut self, x: &Tensor, p: &[usize]) -> Result<Tensor> {
        timed!(self, "permute", self.inner.permute(x, p))
    }
    fn narrow(&mut self, x: &Tensor, d: usize, s: usize, l: usize) -> Result<Tensor> {
        timed!(self, "narrow", self.inner.narrow(x, d, s, l))
    }
    fn concat(&mut self, xs: &[Tensor], d: usize) -> Result<Tensor> {
        timed!(self, "concat", self.inner.concat(xs, d))
    }
    fn matmul(&mut self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        timed!(self, "matmul", self.inner.matmul(a, b))
    }
    fn softmax_last(&mut self, x: &Tensor) -> Result<Tensor> {
        timed!(self, "softmax", self.inner.softmax_last(x))
    }
    fn upsample_nearest2x(&mut self, x: &Tensor) -> Result<Tensor> {
        timed!(self, "upsample", self.inner.upsample_nearest2x(x))
    }
    fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        timed!(self, "dropout", self.inner.dropout(x, p))
    }
    fn embedding(&mut self, i: &Tensor, t: &Param) -> Result<Tensor> {
        timed!(self, "embedding", self.inner.embedding(i, t))
    }
    fn timesteps_to_f32(&mut self, t: &Tensor) -> Result<Tensor> {
        self.inner.timesteps_to_f32(t)
    }
    fn const_f32(&mut self, n: &str, v: &[f32]) -> Result<Tensor> {
        self.inner.const_f32(n, v)
    }
    fn sin(&mut self, x: &Tensor) -> Result<Tensor> {
        self.inner.sin(x)
    }
    fn cos(&mut self, x: &Tensor) -> Result<Tensor> {
        self.inner.cos(x)
    }
    fn to_model_dtype(&mut self, x: &Tensor) -> Result<Tensor> {
        self.inner.to_model_dtype(x)
    }
    fn group_norm_act(
        &mut self,
        x: &Tensor,
        g: usize,
        e: f64,
        w: &Param,
        b: &Param,
        ss: Option<(&Tensor, &Tensor)>,
        silu: bool,
    ) -> Result<Tensor> {
        timed!(self, "group_norm_act", self.inner.group_norm_act(x, g, e, w, b, ss, silu))
    }
    fn softmax_last_scaled(&mut self, x: &Tensor, s: f64) -> Result<Tensor> {
        timed!(self, "softmax", self.inner.softmax_last_scaled(x, s))
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cfg = Config::load(std::path::Path::new(
        args.get(1).map(String::as_str).unwrap_or("trainer/configs/mnist-ch64.toml"),
    ))?;
    let b: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let dev = Device::Cpu;
    let mut src = InitSource::new(0, &dev, DType::F32);
    let unet = UNet::new(cfg.unet(), &mut src)?;
    let s = cfg.model.image_size;
    let x = Tensor::randn(0f32, 1.0, (b, cfg.model.channels, s, s), &dev)?;
    let t = Tensor::from_vec((0..b as u32).collect::<Vec<_>>(), b, &dev)?;
    let y = Tensor::from_vec(vec![1u32; b], b, &dev)?;
    let mut dropout = trainer::model::random::DropoutKeys::new(trainer::model::random::StepKeys::new(0, 0), 0);
    for it in 0..3 {
        let mut o = Timed { inner: CandleOps::training(&dev, DType::F32, &mut dropout), t: BTreeMap::new() };
        let st = Instant::now();
        let out = unet.forward(&mut o, &x, &t, cfg.model.null_class().map(|_| &y))?;
        let total = st.elapsed().as_secs_f64();
        let s2 = Instant::now();
        out.sqr()?.mean_all()?.backward()?;
        eprintln!("iter {it}: forward {total:.3}s backward {:.3}s", s2.elapsed().as_secs_f64());
        let mut v: Vec<_> = o.t.into_iter().collect();
        v.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap());
        for (k, (secs, n)) in v.iter().take(8) {
            eprintln!("  {k:12} {secs:.3}s ({n} calls)");
        }
    }
    Ok(())
}
