//! The noise-prediction U-Net of DDPM (Ho et al. 2020, appendix B), with the improvements of
//! Nichol & Dhariwal 2021 (scale-shift norm, multi-head attention) and a class embedding with a null class
//! for classifier-free guidance (Ho & Salimans 2022).
//!
//! Layout, mirroring the paper's PixelCNN++-style backbone (and the PyTorch reference in
//! benches/torch_unet.py, whose parameter names this file keeps):
//!
//! ```text
//! t -> sinusoid(ch) -> Linear(ch, E) -> SiLU -> Linear(E, E) (+ label embedding) = emb   (E: embed_dim, 4ch)
//! x -> conv_in(kxk, ch)                                                              (k: kernel_size, 3)
//!   down: for each level i: num_res_blocks x [ResBlock(ch*mult[i]) (+ Attention at listed resolutions)]
//!         then a stride-2 kxk conv (not after the last level)
//!   mid:  ResBlock, Attention, ResBlock
//!   up:   for each level, reversed: (num_res_blocks + 1) x [ResBlock on concat(h, skip) (+ Attention)]
//!         then nearest 2x upsample + kxk conv (not after the first level)
//!   out:  GroupNorm -> SiLU -> conv(kxk, channels; 2 x channels, eps then v, for a learned variance)
//! ```
//!
//! The forward pass is written once against [`Ops`], so training (Candle) and export (ONNX) walk the same
//! structure.

use anyhow::{bail, Result};
use runtime::metadata::Prediction;
use serde::{Deserialize, Serialize};

pub use runtime::metadata::Attribute;

use crate::model::ops::Ops;
use crate::model::params::{Init, Param, ParamSource, ShapeCounter};

/// The architecture; stored with every checkpoint and (as metadata) in every export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UNetConfig {
    /// Image channels (1 grayscale, 3 RGB).
    pub channels: usize,
    /// Image height and width.
    pub image_size: usize,
    /// Base channel count.
    pub ch: usize,
    /// Channel multiplier per resolution level.
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Resolutions (in pixels) at which self-attention follows each residual block.
    pub attention_resolutions: Vec<usize>,
    /// Attention heads (Nichol & Dhariwal 2021); channels per head = channels / num_heads.
    pub num_heads: usize,
    pub dropout: f64,
    /// Adaptive GroupNorm: GroupNorm(h) (1 + scale) + shift (Dhariwal & Nichol 2021, sec. 3, "AdaGN";
    /// improved-diffusion's `use_scale_shift_norm`).
    pub use_scale_shift_norm: bool,
    /// Number of classes; 0 for an unconditional model. Conditional models get one extra "null" class
    /// (index = num_classes) for classifier-free guidance.
    pub num_classes: usize,
    /// Labels beside the class (multi-attribute conditioning, e.g. a digit's position), each with its own
    /// embedding and null entry: the label embedding is the sum of one embedding per label (class first), so
    /// any label can be unknown, or dropped for guidance, on its own. Needs num_classes > 0.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<Attribute>,
    /// A fourth input, the guidance weight w [B] (f32), embedded like the timestep and added to the timestep's
    /// sinusoid before the embedding MLP (Meng et al. 2023, "On distillation of guided diffusion models",
    /// sec. 3; diffusers' LCM `cond_proj`): a guidance-distilled student needs one call per step whatever w.
    /// Its layer `wemb` starts at zero, so the student starts as its teacher for every w. Needs num_classes > 0.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub guidance_embed: bool,
    /// GroupNorm groups (32 in the papers).
    pub norm_groups: usize,
    /// The side of every spatial convolution's kernel (3 in the papers; odd, 3 to 7), padded by kernel_size / 2
    /// so that sizes stay as with 3x3. The 1x1 convolutions (skip projections, attention) stay 1x1.
    #[serde(skip_serializing_if = "is_three")]
    pub kernel_size: usize,
    /// Width of the time (and label) embedding MLP and of every embedding added to it; None: 4 ch (Ho et al.
    /// 2020, appendix B, as DDPM's `temb_ch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embed_dim: Option<usize>,
    /// Output 2 x channels: eps, then v of the learned variance (Nichol & Dhariwal 2021, sec. 3.1;
    /// improved-diffusion's `learn_sigma`). Not a key of [model]: `Config::unet` sets it from
    /// diffusion.variance = "learned_range".
    #[serde(skip)]
    pub learn_sigma: bool,
    /// What the first output is: eps, or the velocity v (Salimans & Ho 2022). Not a key of [model]:
    /// `Config::unet` sets it from diffusion.prediction.
    #[serde(skip)]
    pub prediction: Prediction,
}

impl Default for UNetConfig {
    fn default() -> Self {
        // The DDPM CIFAR-10 model (35.7M parameters).
        Self {
            channels: 3,
            image_size: 32,
            ch: 128,
            ch_mult: vec![1, 2, 2, 2],
            num_res_blocks: 2,
            attention_resolutions: vec![16],
            num_heads: 1,
            dropout: 0.1,
            use_scale_shift_norm: false,
            num_classes: 0,
            attributes: vec![],
            guidance_embed: false,
            norm_groups: 32,
            kernel_size: 3,
            embed_dim: None,
            learn_sigma: false,
            prediction: Prediction::Epsilon,
        }
    }
}

/// Keeps the default kernel out of the serialized configuration: checkpoints and exports from before the key
/// existed stay byte for byte what they were.
fn is_three(k: &usize) -> bool {
    *k == 3
}

impl UNetConfig {
    /// Channels of the output: eps, and v when the model learns its variance.
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.channels
        } else {
            self.channels
        }
    }

    /// The resolutions the network runs at, from the input down.
    pub fn resolutions(&self) -> Vec<usize> {
        (0..self.ch_mult.len()).map(|i| self.image_size >> i).collect()
    }

    /// Checks that the network can be built and can take images of `image_size`.
    pub fn validate(&self) -> Result<()> {
        if self.ch_mult.is_empty() || self.ch_mult.len() > 8 {
            bail!("model.ch_mult must have 1 to 8 levels, got {}", self.ch_mult.len());
        }
        if self.channels == 0
            || self.ch == 0
            || self.num_res_blocks == 0
            || self.num_heads == 0
            || self.norm_groups == 0
        {
            bail!("model.channels, ch, num_res_blocks, num_heads and norm_groups must be positive");
        }
        let levels = self.ch_mult.len() as u32;
        let factor = 1usize << (levels - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(factor) {
            bail!(
                "image size {} cannot go through this U-Net: {} resolution levels halve it {} time(s), so it must be a multiple of {} (e.g. {} or {})",
                self.image_size,
                levels,
                levels - 1,
                factor,
                (self.image_size / factor).max(1) * factor,
                (self.image_size / factor + 1) * factor
            );
        }
        for m in &self.ch_mult {
            let c = self.ch * m;
            if !c.is_multiple_of(self.norm_groups) {
                bail!(
                    "model: {c} channels (ch {} x mult {m}) are not divisible by norm_groups {}",
                    self.ch,
                    self.norm_groups
                );
            }
        }
        let res = self.resolutions();
        for r in &self.attention_resolutions {
            if !res.contains(r) {
                bail!("model.attention_resolutions: {r} is never reached; this U-Net runs at {res:?}");
            }
        }
        for (i, m) in self.ch_mult.iter().enumerate() {
            if self.attention_resolutions.contains(&res[i]) && !(self.ch * m).is_multiple_of(self.num_heads) {
                bail!(
                    "model: {} channels at resolution {} are not divisible by num_heads {}",
                    self.ch * m,
                    res[i],
                    self.num_heads
                );
            }
        }
        Attribute::check_all(&self.attributes).map_err(|e| anyhow::anyhow!("model.attributes: {e}"))?;
        if !self.attributes.is_empty() && self.num_classes == 0 {
            bail!("model.attributes need a class-conditional model (model.num_classes > 0)");
        }
        if self.guidance_embed && self.num_classes == 0 {
            bail!("model.guidance_embed (a guidance-weight input) needs a class-conditional model");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("model.dropout must lie in [0, 1), got {}", self.dropout);
        }
        if !(3..=7).contains(&self.kernel_size) || self.kernel_size.is_multiple_of(2) {
            bail!(
                "model.kernel_size must be 3, 5 or 7 (odd, so that padding keeps the sizes), got {}",
                self.kernel_size
            );
        }
        if self.embed_dim == Some(0) {
            bail!("model.embed_dim must be at least 1 (leave it out for 4 x ch = {})", 4 * self.ch);
        }
        Ok(())
    }

    /// Number of parameters, computed without allocating them.
    pub fn num_params(&self) -> Result<usize> {
        let mut counter = ShapeCounter::default();
        UNet::new(self.clone(), &mut counter)?;
        Ok(counter.total())
    }

    /// The class embedding has num_classes + 1 rows; the last is the null class.
    pub fn null_class(&self) -> Option<usize> {
        (self.num_classes > 0).then_some(self.num_classes)
    }

    /// Labels per image: the class, then each attribute.
    pub fn label_columns(&self) -> usize {
        1 + self.attributes.len()
    }

    /// The null label of every column (the class's, then each attribute's); empty for unconditional models.
    pub fn label_nulls(&self) -> Vec<i64> {
        match self.null_class() {
            Some(c) => std::iter::once(c as i64).chain(self.attributes.iter().map(|a| a.null())).collect(),
            None => vec![],
        }
    }

    /// The shape of y for `n` images: [n], or [n, 1 + A] with attributes.
    pub fn label_dims(&self, n: usize) -> Vec<usize> {
        if self.attributes.is_empty() {
            vec![n]
        } else {
            vec![n, self.label_columns()]
        }
    }

    /// The model's labels for `n` images from a caller's: all of them (n x columns), the class alone (n; the
    /// attributes unknown) or none (all null). None for unconditional models.
    pub fn full_labels(&self, y: Option<&[i64]>, n: usize) -> Result<Option<Vec<i64>>> {
        let nulls = self.label_nulls();
        if nulls.is_empty() {
            return Ok(None);
        }
        Ok(Some(runtime::metadata::full_labels(&nulls, self.label_columns(), y, n)?))
    }

    /// The same network written one way: an `embed_dim` equal to its default (4 ch) left unset, so two configs
    /// that build the same U-Net compare equal.
    pub fn canonical(&self) -> UNetConfig {
        let mut c = self.clone();
        if c.embed_dim == Some(4 * c.ch) {
            c.embed_dim = None;
        }
        c
    }

    fn time_embed_dim(&self) -> usize {
        self.embed_dim.unwrap_or(4 * self.ch)
    }
}

const GN_EPS: f64 = 1e-5;

/// A conv layer (PyTorch `Conv2d` layout and default init).
#[derive(Debug, Clone)]
pub struct Conv {
    pub w: Param,
    pub b: Param,
    pub stride: usize,
    pub padding: usize,
}

impl Conv {
    fn new(
        src: &mut dyn ParamSource,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        zero: bool,
    ) -> Result<Self> {
        let bound = 1.0 / ((cin * k * k) as f64).sqrt();
        // zero-initialised output layers make each residual branch start as the identity (DDPM's
        // "init_scale=0." / improved-DDPM's zero_module)
        let init = if zero { Init::Const(0.0) } else { Init::Uniform(bound) };
        Ok(Self {
            w: src.param(&format!("{name}.weight"), &[cout, cin, k, k], init)?,
            b: src.param(
                &format!("{name}.bias"),
                &[cout],
                if zero { Init::Const(0.0) } else { Init::Uniform(bound) },
            )?,
            stride,
            padding: k / 2,
        })
    }
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        o.conv2d(x, &self.w, &self.b, self.stride, self.padding)
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub w: Param,
    pub b: Param,
}

impl Linear {
    fn new(src: &mut dyn ParamSource, name: &str, cin: usize, cout: usize) -> Result<Self> {
        let bound = 1.0 / (cin as f64).sqrt();
        Ok(Self {
            w: src.param(&format!("{name}.weight"), &[cout, cin], Init::Uniform(bound))?,
            b: src.param(&format!("{name}.bias"), &[cout], Init::Uniform(bound))?,
        })
    }
    /// A layer that outputs 0 until trained (weight and bias 0).
    fn zeros(src: &mut dyn ParamSource, name: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            w: src.param(&format!("{name}.weight"), &[cout, cin], Init::Const(0.0))?,
            b: src.param(&format!("{name}.bias"), &[cout], Init::Const(0.0))?,
        })
    }
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        o.linear(x, &self.w, &self.b)
    }
}

#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub w: Param,
    pub b: Param,
    pub groups: usize,
}

impl GroupNorm {
    fn new(src: &mut dyn ParamSource, name: &str, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            w: src.param(&format!("{name}.weight"), &[c], Init::Const(1.0))?,
            b: src.param(&format!("{name}.bias"), &[c], Init::Const(0.0))?,
            groups,
        })
    }
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        o.group_norm_act(x, self.groups, GN_EPS, &self.w, &self.b, None, false)
    }
    /// SiLU(GroupNorm(x)), fused where the ops can.
    pub fn forward_silu<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        o.group_norm_act(x, self.groups, GN_EPS, &self.w, &self.b, None, true)
    }
    /// SiLU(GroupNorm(x) (1 + scale) + shift) (Dhariwal & Nichol 2021, sec. 3, AdaGN), fused where the ops can.
    pub fn forward_scale_shift_silu<O: Ops>(&self, o: &mut O, x: &O::T, scale: &O::T, shift: &O::T) -> Result<O::T> {
        o.group_norm_act(x, self.groups, GN_EPS, &self.w, &self.b, Some((scale, shift)), true)
    }
}

/// Residual block (Ho et al. 2020, appendix B; scale-shift variant: Dhariwal & Nichol 2021).
#[derive(Debug, Clone)]
pub struct ResBlock {
    pub n1: GroupNorm,
    pub c1: Conv,
    /// Projects the time(+class) embedding to cout (or 2 cout for scale-shift).
    pub t: Linear,
    pub n2: GroupNorm,
    pub c2: Conv,
    pub skip: Option<Conv>,
    pub scale_shift: bool,
    pub dropout: f64,
    pub cout: usize,
}

impl ResBlock {
    fn new(src: &mut dyn ParamSource, name: &str, cin: usize, cout: usize, cfg: &UNetConfig) -> Result<Self> {
        let emb_out = if cfg.use_scale_shift_norm { 2 * cout } else { cout };
        Ok(Self {
            n1: GroupNorm::new(src, &format!("{name}.n1"), cin, cfg.norm_groups)?,
            c1: Conv::new(src, &format!("{name}.c1"), cin, cout, cfg.kernel_size, 1, false)?,
            t: Linear::new(src, &format!("{name}.t"), cfg.time_embed_dim(), emb_out)?,
            n2: GroupNorm::new(src, &format!("{name}.n2"), cout, cfg.norm_groups)?,
            c2: Conv::new(src, &format!("{name}.c2"), cout, cout, cfg.kernel_size, 1, true)?,
            skip: if cin != cout {
                Some(Conv::new(src, &format!("{name}.skip"), cin, cout, 1, 1, false)?)
            } else {
                None
            },
            scale_shift: cfg.use_scale_shift_norm,
            dropout: cfg.dropout,
            cout,
        })
    }

    /// x [B, cin, H, W], emb [B, E] -> [B, cout, H, W]
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T, emb: &O::T) -> Result<O::T> {
        let h = self.n1.forward_silu(o, x)?;
        let h = self.c1.forward(o, &h)?;
        let e = o.silu(emb)?;
        let e = self.t.forward(o, &e)?;
        let h = if self.scale_shift {
            // Dhariwal & Nichol 2021, sec. 3 (AdaGN): h = GroupNorm(h) * (1 + scale) + shift, with (scale, shift) = Linear(emb)
            let e = o.reshape(&e, &[-1, 2 * self.cout as i64, 1, 1])?;
            let scale = o.narrow(&e, 1, 0, self.cout)?;
            let shift = o.narrow(&e, 1, self.cout, self.cout)?;
            self.n2.forward_scale_shift_silu(o, &h, &scale, &shift)?
        } else {
            // Ho et al. 2020: the projected embedding is added per channel before the second norm
            let e = o.reshape(&e, &[-1, self.cout as i64, 1, 1])?;
            let h = o.add(&h, &e)?;
            self.n2.forward_silu(o, &h)?
        };
        let hd = o.dropout(&h, self.dropout)?;
        let hc = self.c2.forward(o, &hd)?;
        let out = match &self.skip {
            Some(c) => {
                let skip = c.forward(o, x)?;
                let out = o.add(&skip, &hc)?;
                o.release(&skip);
                out
            }
            None => o.add(x, &hc)?,
        };
        // read by dropout (a mask's product) and the residual sum only: no backward pass needs them
        o.release(&h);
        o.release(&hc);
        Ok(out)
    }
}

/// Multi-head self-attention over the spatial positions (Ho et al. 2020 appendix B; heads: Nichol & Dhariwal 2021).
#[derive(Debug, Clone)]
pub struct Attention {
    pub n: GroupNorm,
    pub qkv: Conv,
    pub proj: Conv,
    pub heads: usize,
    pub c: usize,
    pub hw: usize,
}

impl Attention {
    fn new(src: &mut dyn ParamSource, name: &str, c: usize, res: usize, cfg: &UNetConfig) -> Result<Self> {
        Ok(Self {
            n: GroupNorm::new(src, &format!("{name}.n"), c, cfg.norm_groups)?,
            qkv: Conv::new(src, &format!("{name}.qkv"), c, 3 * c, 1, 1, false)?,
            proj: Conv::new(src, &format!("{name}.proj"), c, c, 1, 1, true)?,
            heads: cfg.num_heads,
            c,
            hw: res * res,
        })
    }

    /// x [B, C, H, W] -> x + proj(softmax(q^T k / sqrt(d)) v) [B, C, H, W]
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T) -> Result<O::T> {
        let (h, d, n) = (self.heads as i64, (self.c / self.heads) as i64, self.hw as i64);
        let side = (self.hw as f64).sqrt() as i64;
        let qkv = self.n.forward(o, x)?;
        let qkv = self.qkv.forward(o, &qkv)?; // [B, 3C, H, W], channels ordered q | k | v
        let qkv = o.reshape(&qkv, &[-1, 3 * h, d, n])?; // [B, 3h, d, N]
        let q = o.narrow(&qkv, 1, 0, self.heads)?; // [B, h, d, N]
        let k = o.narrow(&qkv, 1, self.heads, self.heads)?;
        let v = o.narrow(&qkv, 1, 2 * self.heads, self.heads)?;
        let qt = o.permute(&q, &[0, 1, 3, 2])?; // [B, h, N, d]
                                                // Vaswani et al. 2017, eq. 1: softmax(Q K^T / sqrt(d_k)) V
        let scores = o.matmul(&qt, &k)?; // [B, h, N, N]
        let attn = o.softmax_last_scaled(&scores, 1.0 / (d as f64).sqrt())?;
        let vt = o.permute(&v, &[0, 1, 3, 2])?; // [B, h, N, d]
        let heads = o.matmul(&attn, &vt)?; // [B, h, N, d]
        let out = o.permute(&heads, &[0, 1, 3, 2])?; // [B, h, d, N]
        let out = o.reshape(&out, &[-1, self.c as i64, side, side])?;
        let proj = self.proj.forward(o, &out)?;
        let y = o.add(x, &proj)?;
        // copied on by narrow and permute, or read by softmax and the sum: no backward pass reads them
        for v in [&qkv, &q, &v, &scores, &heads, &proj] {
            o.release(v);
        }
        Ok(y)
    }
}

#[derive(Debug, Clone)]
pub enum Layer {
    /// A residual block, optionally followed by attention.
    Res(Box<ResBlock>, Option<Box<Attention>>),
    /// Stride-2 k x k conv.
    Down(Conv),
    /// Nearest 2x upsample, then k x k conv.
    Up(Conv),
}

#[derive(Debug, Clone)]
pub struct UNet {
    pub cfg: UNetConfig,
    pub temb0: Linear,
    pub temb2: Linear,
    /// The guidance-weight embedding (`model.guidance_embed`): sinusoid(1000 w) -> Linear(ch, ch), zero at init.
    pub wemb: Option<Linear>,
    pub label: Option<Param>,
    /// One embedding per attribute, `values + 1` rows each (the last: unknown).
    pub attrs: Vec<Param>,
    pub conv_in: Conv,
    pub down: Vec<Layer>,
    pub mid1: ResBlock,
    pub mida: Attention,
    pub mid2: ResBlock,
    pub up: Vec<Layer>,
    pub out_norm: GroupNorm,
    pub out_conv: Conv,
}

impl UNet {
    pub fn new(cfg: UNetConfig, src: &mut dyn ParamSource) -> Result<Self> {
        cfg.validate()?;
        let ch = cfg.ch;
        let temb = cfg.time_embed_dim();
        let temb0 = Linear::new(src, "temb.0", ch, temb)?;
        let temb2 = Linear::new(src, "temb.2", temb, temb)?;
        let wemb = if cfg.guidance_embed { Some(Linear::zeros(src, "wemb", ch, ch)?) } else { None };
        let label = if cfg.num_classes > 0 {
            Some(src.param("label.weight", &[cfg.num_classes + 1, temb], Init::Normal(1.0))?)
        } else {
            None
        };
        let mut attrs = vec![];
        for a in &cfg.attributes {
            attrs.push(src.param(
                &format!("attr.{}.weight", a.name),
                &[a.values.len() + 1, temb],
                Init::Normal(1.0),
            )?);
        }
        let k = cfg.kernel_size;
        let conv_in = Conv::new(src, "conv_in", cfg.channels, ch, k, 1, false)?;
        let mut down = vec![];
        let mut chans = vec![ch];
        let mut cur = ch;
        let mut res = cfg.image_size;
        let levels = cfg.ch_mult.len();
        for (i, m) in cfg.ch_mult.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let name = format!("down.{}", down.len());
                let rb = ResBlock::new(src, &format!("{name}.0"), cur, ch * m, &cfg)?;
                cur = ch * m;
                let at = if cfg.attention_resolutions.contains(&res) {
                    Some(Box::new(Attention::new(src, &format!("{name}.1"), cur, res, &cfg)?))
                } else {
                    None
                };
                down.push(Layer::Res(Box::new(rb), at));
                chans.push(cur);
            }
            if i != levels - 1 {
                let name = format!("down.{}.0", down.len());
                down.push(Layer::Down(Conv::new(src, &name, cur, cur, k, 2, false)?));
                chans.push(cur);
                res /= 2;
            }
        }
        let mid1 = ResBlock::new(src, "mid1", cur, cur, &cfg)?;
        let mida = Attention::new(src, "mida", cur, res, &cfg)?;
        let mid2 = ResBlock::new(src, "mid2", cur, cur, &cfg)?;
        let mut up = vec![];
        for (i, m) in cfg.ch_mult.iter().enumerate().rev() {
            for _ in 0..=cfg.num_res_blocks {
                let name = format!("up.{}", up.len());
                let skip = chans.pop().expect("one skip per down layer");
                let rb = ResBlock::new(src, &format!("{name}.0"), cur + skip, ch * m, &cfg)?;
                cur = ch * m;
                let at = if cfg.attention_resolutions.contains(&res) {
                    Some(Box::new(Attention::new(src, &format!("{name}.1"), cur, res, &cfg)?))
                } else {
                    None
                };
                up.push(Layer::Res(Box::new(rb), at));
            }
            if i != 0 {
                let name = format!("up.{}.1", up.len());
                up.push(Layer::Up(Conv::new(src, &name, cur, cur, k, 1, false)?));
                res *= 2;
            }
        }
        let out_norm = GroupNorm::new(src, "out.0", cur, cfg.norm_groups)?;
        let out_conv = Conv::new(src, "out.2", cur, cfg.out_channels(), k, 1, true)?;
        Ok(Self { cfg, temb0, temb2, wemb, label, attrs, conv_in, down, mid1, mida, mid2, up, out_norm, out_conv })
    }

    /// Sinusoidal embedding (Vaswani et al. 2017 sec. 3.5, as in DDPM's `get_timestep_embedding`) of f32 values
    /// [B] times `scale`: [sin(v scale w_i), cos(v scale w_i)], w_i = 10000^(-i/(half-1)), in the model's dtype.
    fn sinusoid<O: Ops>(&self, o: &mut O, v: &O::T, scale: f64, name: &str) -> Result<O::T> {
        let half = self.cfg.ch / 2;
        // the scale is folded into the f32 constant: an affine would run in the model's dtype (f16 exports)
        let freqs: Vec<f32> = (0..half)
            .map(|i| (scale * (-(10000f64.ln()) * i as f64 / (half as f64 - 1.0).max(1.0)).exp()) as f32)
            .collect();
        let v = o.reshape(v, &[-1, 1])?;
        let f = o.const_f32(name, &freqs)?;
        let args = o.mul(&v, &f)?; // [B, half]
        let s = o.sin(&args)?;
        let c = o.cos(&args)?;
        let e = o.concat(&[s, c], 1)?;
        o.to_model_dtype(&e)
    }

    /// The timestep's sinusoid, plus the guidance weight's through `wemb` for a guidance-input model
    /// (Meng et al. 2023, sec. 3: w gets a Fourier embedding like t; the 1000 puts w in [0, 10] on the
    /// timesteps' scale, as LCM's `get_guidance_scale_embedding`).
    fn time_and_guidance<O: Ops>(&self, o: &mut O, t: &O::T, w: Option<&O::T>) -> Result<O::T> {
        let tf = o.timesteps_to_f32(t)?;
        let e = self.sinusoid(o, &tf, 1.0, "timestep_freqs")?;
        match (&self.wemb, w) {
            (Some(wemb), Some(w)) => {
                let we = self.sinusoid(o, w, 1000.0, "guidance_freqs")?;
                let we = wemb.forward(o, &we)?;
                o.add(&e, &we)
            }
            (None, None) => Ok(e),
            (Some(_), None) => bail!("this model takes the guidance weight w as an input: call forward_w with it"),
            (None, Some(_)) => bail!("this model has no guidance-weight input (model.guidance_embed is off)"),
        }
    }

    /// eps_theta(x_t, t, y): x [B, C, H, W], t [B] integer timesteps, y [B] integer labels (num_classes = null),
    /// or [B, 1 + A] with attributes (the class, then each attribute; each column's last value is its null).
    pub fn forward<O: Ops>(&self, o: &mut O, x: &O::T, t: &O::T, y: Option<&O::T>) -> Result<O::T> {
        self.forward_w(o, x, t, y, None)
    }

    /// [`UNet::forward`] with the guidance weight w [B] (f32) of a `guidance_embed` model (None for others).
    pub fn forward_w<O: Ops>(&self, o: &mut O, x: &O::T, t: &O::T, y: Option<&O::T>, w: Option<&O::T>) -> Result<O::T> {
        let e = self.time_and_guidance(o, t, w)?;
        let e = self.temb0.forward(o, &e)?;
        let e = o.silu(&e)?;
        let mut emb = self.temb2.forward(o, &e)?;
        if let (Some(table), Some(y)) = (&self.label, y) {
            if self.attrs.is_empty() {
                let l = o.embedding(y, table)?;
                emb = o.add(&emb, &l)?;
            } else {
                // one embedding per label, summed: each column looked up in its own table
                for (i, table) in std::iter::once(table).chain(&self.attrs).enumerate() {
                    let col = o.narrow(y, 1, i, 1)?;
                    let col = o.reshape(&col, &[-1])?;
                    let l = o.embedding(&col, table)?;
                    emb = o.add(&emb, &l)?;
                }
            }
        }
        let mut h = self.conv_in.forward(o, x)?;
        let mut hs = vec![h.clone()];
        for layer in &self.down {
            h = match layer {
                Layer::Res(rb, at) => self.res_attn(o, rb, at, &h, &emb)?,
                Layer::Down(c) => c.forward(o, &h)?,
                Layer::Up(_) => unreachable!("no upsampling on the way down"),
            };
            hs.push(h.clone());
        }
        h = self.mid1.forward(o, &h, &emb)?;
        h = self.mida.forward(o, &h)?;
        h = self.mid2.forward(o, &h, &emb)?;
        for layer in &self.up {
            h = match layer {
                Layer::Res(rb, at) => {
                    let skip = hs.pop().expect("one skip per down layer");
                    let cat = o.concat(&[h.clone(), skip], 1)?;
                    o.release(&h); // copied into the concatenation
                    self.res_attn(o, rb, at, &cat, &emb)?
                }
                Layer::Up(c) => {
                    let u = o.upsample_nearest2x(&h)?;
                    o.release(&h);
                    c.forward(o, &u)?
                }
                Layer::Down(_) => unreachable!("no downsampling on the way up"),
            };
        }
        let h = self.out_norm.forward_silu(o, &h)?;
        self.out_conv.forward(o, &h)
    }

    fn res_attn<O: Ops>(
        &self,
        o: &mut O,
        rb: &ResBlock,
        at: &Option<Box<Attention>>,
        x: &O::T,
        emb: &O::T,
    ) -> Result<O::T> {
        let h = rb.forward(o, x, emb)?;
        match at {
            Some(a) => a.forward(o, &h),
            None => Ok(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddpm_cifar10_model_has_35_7m_parameters() {
        // Ho et al. 2020's CIFAR-10 model: ch 128, mult (1,2,2,2), 2 res blocks, attention at 16x16.
        // The PyTorch re-implementation (benches/torch_unet.py) counts 35,746,307.
        let cfg = UNetConfig::default();
        assert_eq!(cfg.num_params().unwrap(), 35_746_307);
    }

    #[test]
    fn class_embedding_and_scale_shift_add_their_parameters() {
        let base = UNetConfig {
            ch: 32,
            ch_mult: vec![1, 2],
            image_size: 28,
            channels: 1,
            attention_resolutions: vec![14],
            ..Default::default()
        };
        let n0 = base.num_params().unwrap();
        let cond = UNetConfig { num_classes: 10, ..base.clone() };
        assert_eq!(cond.num_params().unwrap(), n0 + 11 * 128);
        let ss = UNetConfig { use_scale_shift_norm: true, ..base.clone() };
        assert!(ss.num_params().unwrap() > n0);
    }

    #[test]
    fn image_sizes_the_unet_cannot_take_are_rejected_with_a_reason() {
        let cfg = UNetConfig { image_size: 28, ..Default::default() };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("image size 28") && err.contains("multiple of 8"), "{err}");
        let cfg = UNetConfig { image_size: 32, attention_resolutions: vec![12], ..Default::default() };
        assert!(cfg.validate().unwrap_err().to_string().contains("12 is never reached"));
        let cfg = UNetConfig { ch: 48, ..Default::default() };
        assert!(cfg.validate().unwrap_err().to_string().contains("norm_groups"));
    }

    #[test]
    fn kernel_size_and_embed_dim_shape_the_layers_and_stay_out_of_default_configs() {
        use crate::model::params::InitSource;
        let cfg = UNetConfig {
            ch: 16,
            ch_mult: vec![1, 2],
            image_size: 8,
            attention_resolutions: vec![],
            norm_groups: 8,
            num_classes: 2,
            kernel_size: 5,
            embed_dim: Some(24),
            ..Default::default()
        };
        let mut src = InitSource::new(0, &candle_core::Device::Cpu, candle_core::DType::F32);
        UNet::new(cfg.clone(), &mut src).unwrap();
        let vars = src.into_vars();
        let dims = |k: &str| vars[k].dims().to_vec();
        assert_eq!(dims("conv_in.weight"), [16, 3, 5, 5]);
        assert_eq!(dims("down.0.0.c1.weight"), [16, 16, 5, 5]);
        assert_eq!(dims("down.2.0.weight"), [16, 16, 5, 5]); // the stride-2 convolution
        assert_eq!(dims("out.2.weight"), [3, 16, 5, 5]);
        assert_eq!(dims("temb.0.weight"), [24, 16]);
        assert_eq!(dims("temb.2.weight"), [24, 24]);
        assert_eq!(dims("label.weight"), [3, 24]);
        assert_eq!(dims("down.0.0.t.weight"), [16, 24]);
        // the keys are written only when set, so files written before they existed read and write the same
        let json = serde_json::to_string(&UNetConfig::default()).unwrap();
        assert!(!json.contains("kernel_size") && !json.contains("embed_dim"), "{json}");
        let back: UNetConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        for (bad, key) in [
            (UNetConfig { kernel_size: 4, ..cfg.clone() }, "kernel_size"),
            (UNetConfig { embed_dim: Some(0), ..cfg }, "embed_dim"),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
