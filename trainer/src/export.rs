//! `trainer export`: writes the ONNX graph of the U-Net straight from its definition.
//!
//! [`OnnxOps`] implements the same [`Ops`] trait that training runs on, emitting one ONNX node (or a few)
//! per primitive, so the graph has exactly the trained model's structure. The op set stays inside what
//! candle-onnx's `simple_eval` reads at opset 17 (GroupNorm as Reshape/ReduceMean/Sub/Mul/Add/Sqrt/Div,
//! SiLU as Sigmoid*Mul), so three independent readers (Candle, ONNX Runtime, candle-onnx) can check it.
//!
//! f16 export keeps weights and activations in f16 but computes the GroupNorm statistics and the
//! attention softmax in f32 (fp16 U-Nets are known to produce NaN/black images otherwise: diffusers
//! #1083, #4321); the timestep embedding is computed in f32 and cast.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use prost::Message;

use crate::checkpoint::State;
use crate::ops::Ops;
use crate::params::{Param, TensorSource};
use crate::unet::UNet;

/// Version of the metadata layout (`diffusion.format_version`).
pub const METADATA_FORMAT: &str = "1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
}

impl ExportDtype {
    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            o => bail!("unknown dtype '{o}' (f32 or f16)"),
        }
    }
    pub fn onnx(self) -> DataType {
        match self {
            Self::F32 => DataType::Float,
            Self::F16 => DataType::Float16,
        }
    }
}

/// Emits ONNX nodes for the U-Net's primitives.
pub struct OnnxOps {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    seen: HashSet<String>,
    next: usize,
    dtype: ExportDtype,
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}
fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}
fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

impl OnnxOps {
    pub fn new(dtype: ExportDtype) -> Self {
        Self { nodes: vec![], initializers: vec![], seen: HashSet::new(), next: 0, dtype }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("{hint}_{}", self.next)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: format!("{op}_{}", self.next),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn tensor_proto(name: &str, dims: &[i64], values: &[f32], dtype: ExportDtype) -> TensorProto {
        let raw: Vec<u8> = match dtype {
            ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        };
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: dtype.onnx() as i32,
            raw_data: raw,
            ..Default::default()
        }
    }

    /// A parameter as an initializer (once), optionally stored with another shape.
    fn param_as(&mut self, p: &Param, dims: Option<&[i64]>) -> Result<String> {
        let name = match dims {
            Some(_) => format!("{}:bcast", p.name),
            None => p.name.clone(),
        };
        if self.seen.insert(name.clone()) {
            let values: Vec<f32> = p.value.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let own: Vec<i64> = p.value.dims().iter().map(|d| *d as i64).collect();
            self.initializers.push(Self::tensor_proto(&name, dims.unwrap_or(&own), &values, self.dtype));
        }
        Ok(name)
    }

    fn param(&mut self, p: &Param) -> Result<String> {
        self.param_as(p, None)
    }

    fn const_i64(&mut self, values: &[i64]) -> String {
        let name = self.fresh("const_i64");
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: vec![values.len() as i64],
            data_type: DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    /// A scalar in the model dtype.
    fn scalar(&mut self, v: f64) -> String {
        let name = self.fresh("scalar");
        self.initializers.push(Self::tensor_proto(&name, &[], &[v as f32], self.dtype));
        name
    }

    fn scalar_f32(&mut self, v: f64) -> String {
        let name = self.fresh("scalar_f32");
        self.initializers.push(Self::tensor_proto(&name, &[], &[v as f32], ExportDtype::F32));
        name
    }

    fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)])
    }
    fn widen_if_half(&mut self, x: &str) -> String {
        match self.dtype {
            ExportDtype::F16 => self.cast(x, DataType::Float),
            ExportDtype::F32 => x.to_string(),
        }
    }
    fn narrow_if_half(&mut self, x: &str) -> String {
        match self.dtype {
            ExportDtype::F16 => self.cast(x, DataType::Float16),
            ExportDtype::F32 => x.to_string(),
        }
    }
}

impl Ops for OnnxOps {
    type T = String;

    fn conv2d(&mut self, x: &String, w: &Param, b: &Param, stride: usize, padding: usize) -> Result<String> {
        let (wn, bn) = (self.param(w)?, self.param(b)?);
        let k = w.value.dim(2)? as i64;
        let (s, p) = (stride as i64, padding as i64);
        Ok(self.node(
            "Conv",
            &[x, &wn, &bn],
            vec![attr_ints("kernel_shape", &[k, k]), attr_ints("pads", &[p, p, p, p]), attr_ints("strides", &[s, s])],
        ))
    }

    fn linear(&mut self, x: &String, w: &Param, b: &Param) -> Result<String> {
        let (wn, bn) = (self.param(w)?, self.param(b)?);
        Ok(self.node("Gemm", &[x, &wn, &bn], vec![attr_int("transB", 1)]))
    }

    fn group_norm(&mut self, x: &String, groups: usize, eps: f64, w: &Param, b: &Param) -> Result<String> {
        // statistics in f32: Reshape [B, G, -1] -> (x - mean) / sqrt(var + eps) -> Reshape back
        let c = w.value.dim(0)? as i64;
        let xf = self.widen_if_half(x);
        let shape = self.node("Shape", &[x], vec![]);
        let gshape = self.const_i64(&[0, groups as i64, -1]);
        let xg = self.node("Reshape", &[&xf, &gshape], vec![]);
        let mean = self.node("ReduceMean", &[&xg], vec![attr_ints("axes", &[2]), attr_int("keepdims", 1)]);
        let d = self.node("Sub", &[&xg, &mean], vec![]);
        let d2 = self.node("Mul", &[&d, &d], vec![]);
        let var = self.node("ReduceMean", &[&d2], vec![attr_ints("axes", &[2]), attr_int("keepdims", 1)]);
        let e = self.scalar_f32(eps);
        let ve = self.node("Add", &[&var, &e], vec![]);
        let sd = self.node("Sqrt", &[&ve], vec![]);
        let n = self.node("Div", &[&d, &sd], vec![]);
        let n = self.node("Reshape", &[&n, &shape], vec![]);
        let n = self.narrow_if_half(&n);
        let wn = self.param_as(w, Some(&[c, 1, 1]))?;
        let bn = self.param_as(b, Some(&[c, 1, 1]))?;
        let y = self.node("Mul", &[&n, &wn], vec![]);
        Ok(self.node("Add", &[&y, &bn], vec![]))
    }

    fn silu(&mut self, x: &String) -> Result<String> {
        let s = self.node("Sigmoid", &[x], vec![]);
        Ok(self.node("Mul", &[x, &s], vec![]))
    }
    fn add(&mut self, a: &String, b: &String) -> Result<String> {
        Ok(self.node("Add", &[a, b], vec![]))
    }
    fn mul(&mut self, a: &String, b: &String) -> Result<String> {
        Ok(self.node("Mul", &[a, b], vec![]))
    }
    fn affine(&mut self, x: &String, mul: f64, add: f64) -> Result<String> {
        let mut y = x.clone();
        if mul != 1.0 {
            let m = self.scalar(mul);
            y = self.node("Mul", &[&y, &m], vec![]);
        }
        if add != 0.0 {
            let a = self.scalar(add);
            y = self.node("Add", &[&y, &a], vec![]);
        }
        Ok(y)
    }
    fn reshape(&mut self, x: &String, dims: &[i64]) -> Result<String> {
        let s = self.const_i64(dims);
        Ok(self.node("Reshape", &[x, &s], vec![]))
    }
    fn permute(&mut self, x: &String, perm: &[usize]) -> Result<String> {
        let p: Vec<i64> = perm.iter().map(|v| *v as i64).collect();
        Ok(self.node("Transpose", &[x], vec![attr_ints("perm", &p)]))
    }
    fn narrow(&mut self, x: &String, dim: usize, start: usize, len: usize) -> Result<String> {
        let s = self.const_i64(&[start as i64]);
        let e = self.const_i64(&[(start + len) as i64]);
        let a = self.const_i64(&[dim as i64]);
        Ok(self.node("Slice", &[x, &s, &e, &a], vec![]))
    }
    fn concat(&mut self, xs: &[String], dim: usize) -> Result<String> {
        let refs: Vec<&str> = xs.iter().map(String::as_str).collect();
        Ok(self.node("Concat", &refs, vec![attr_int("axis", dim as i64)]))
    }
    fn matmul(&mut self, a: &String, b: &String) -> Result<String> {
        Ok(self.node("MatMul", &[a, b], vec![]))
    }
    fn softmax_last(&mut self, x: &String) -> Result<String> {
        let xf = self.widen_if_half(x);
        let s = self.node("Softmax", &[&xf], vec![attr_int("axis", -1)]);
        Ok(self.narrow_if_half(&s))
    }
    fn upsample_nearest2x(&mut self, x: &String) -> Result<String> {
        let scales = self.fresh("scales");
        self.initializers.push(Self::tensor_proto(&scales, &[4], &[1.0, 1.0, 2.0, 2.0], ExportDtype::F32));
        Ok(self.node(
            "Resize",
            &[x, "", &scales],
            vec![
                attr_str("mode", "nearest"),
                attr_str("coordinate_transformation_mode", "asymmetric"),
                attr_str("nearest_mode", "floor"),
            ],
        ))
    }
    fn dropout(&mut self, x: &String, _p: f64) -> Result<String> {
        Ok(x.clone())
    }
    fn embedding(&mut self, ids: &String, table: &Param) -> Result<String> {
        let t = self.param(table)?;
        Ok(self.node("Gather", &[&t, ids], vec![attr_int("axis", 0)]))
    }
    fn timesteps_to_f32(&mut self, t: &String) -> Result<String> {
        Ok(self.cast(t, DataType::Float))
    }
    fn const_f32(&mut self, name: &str, values: &[f32]) -> Result<String> {
        let n = self.fresh(name);
        self.initializers.push(Self::tensor_proto(&n, &[values.len() as i64], values, ExportDtype::F32));
        Ok(n)
    }
    fn sin(&mut self, x: &String) -> Result<String> {
        Ok(self.node("Sin", &[x], vec![]))
    }
    fn cos(&mut self, x: &String) -> Result<String> {
        Ok(self.node("Cos", &[x], vec![]))
    }
    fn to_model_dtype(&mut self, x: &String) -> Result<String> {
        Ok(self.narrow_if_half(x))
    }
}

pub fn value_info(name: &str, elem: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                None => tensor_shape_proto::dimension::Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds the ONNX model of `unet` with `metadata` (key, value) pairs.
pub fn build_model(
    unet: &UNet,
    dtype: ExportDtype,
    opset: i64,
    metadata: &BTreeMap<String, String>,
) -> Result<ModelProto> {
    let cfg = &unet.cfg;
    let mut o = OnnxOps::new(dtype);
    let (x, t, y) = ("x".to_string(), "t".to_string(), "y".to_string());
    let conditional = cfg.num_classes > 0;
    let out = unet.forward(&mut o, &x, &t, conditional.then_some(&y))?;
    let (c, s) = (cfg.channels as i64, cfg.image_size as i64);
    let img = [None, Some(c), Some(s), Some(s)];
    let mut inputs = vec![value_info("x", dtype.onnx(), &img), value_info("t", DataType::Int64, &[None])];
    if conditional {
        inputs.push(value_info("y", DataType::Int64, &[None]));
    }
    let graph = Graph { name: "ddpm_unet", inputs, outputs: vec![(out, "eps", img.to_vec())] };
    finish_model(o, graph, opset, metadata, "DDPM noise-prediction U-Net (eps = f(x_t, t[, y]))")
}

/// The interface of a graph built with [`OnnxOps`]: inputs, and (internal name, public name, dims) outputs.
pub struct Graph<'a> {
    pub name: &'a str,
    pub inputs: Vec<ValueInfoProto>,
    pub outputs: Vec<(String, &'a str, Vec<Option<i64>>)>,
}

/// Wraps the nodes emitted into `o` as a model: names the outputs, adapts to `opset`, adds metadata.
pub fn finish_model(
    mut o: OnnxOps,
    g: Graph,
    opset: i64,
    metadata: &BTreeMap<String, String>,
    doc: &str,
) -> Result<ModelProto> {
    if !(17..=21).contains(&opset) {
        bail!("opset {opset} is not supported: use 17..=21 (17 keeps the graph readable by candle-onnx)");
    }
    let mut outputs = vec![];
    for (internal, public, dims) in &g.outputs {
        for n in o.nodes.iter_mut() {
            for v in n.output.iter_mut().chain(n.input.iter_mut()).filter(|v| *v == internal) {
                *v = public.to_string();
            }
        }
        if !o.nodes.iter().any(|n| n.output.iter().any(|v| v == public)) {
            bail!("the graph has no node computing {public}");
        }
        outputs.push(value_info(public, o.dtype.onnx(), dims));
    }
    if opset >= 18 {
        // from opset 18 ReduceMean takes axes as an input
        for n in o.nodes.iter_mut().filter(|n| n.op_type == "ReduceMean") {
            let axes = n.attribute.iter().position(|a| a.name == "axes").unwrap();
            let a = n.attribute.remove(axes);
            let name = format!("{}_axes", n.name);
            o.initializers.push(TensorProto {
                name: name.clone(),
                dims: vec![a.ints.len() as i64],
                data_type: DataType::Int64 as i32,
                int64_data: a.ints.clone(),
                ..Default::default()
            });
            n.input.push(name);
        }
    }
    let graph = GraphProto {
        name: g.name.into(),
        node: o.nodes,
        initializer: o.initializers,
        input: g.inputs,
        output: outputs,
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        producer_name: "diffusion-rs trainer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto { key: k.clone(), value: v.clone() })
            .collect(),
        doc_string: doc.into(),
        ..Default::default()
    })
}

/// The self-describing metadata the runtime reads (keys prefixed `diffusion.`).
pub fn metadata(
    state: &State,
    weights: &str,
    dtype: ExportDtype,
    recommended: Option<&runtime::onnx::Recommended>,
) -> Result<BTreeMap<String, String>> {
    let cfg = &state.config;
    let sched = cfg.diffusion.schedule()?;
    let kind = runtime::schedule::BetaSchedule::from_name(&cfg.diffusion.schedule).map_err(anyhow::Error::msg)?;
    let m = &cfg.model;
    let mut md = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        md.insert(format!("diffusion.{k}"), v);
    };
    put("format_version", METADATA_FORMAT.into());
    put("schedule", serde_json::to_string(&kind)?);
    put("betas", serde_json::to_string(&sched.betas)?);
    put("num_timesteps", sched.num_timesteps().to_string());
    put("prediction_type", "epsilon".into());
    put("variance_type", cfg.diffusion.variance.clone());
    put("image_size", m.image_size.to_string());
    put("channels", m.channels.to_string());
    put("num_classes", m.num_classes.to_string());
    let names: Vec<String> = if m.num_classes > 0 { state.class_names.clone() } else { vec![] };
    put("class_names", serde_json::to_string(&names)?);
    put("null_class", m.null_class().map(|n| n.to_string()).unwrap_or_else(|| "none".into()));
    put("pixel_range", "[-1, 1]: pixel = (x + 1) * 127.5".into());
    put("dtype", if dtype == ExportDtype::F16 { "float16" } else { "float32" }.into());
    put("weights", weights.into());
    put("training_steps", state.step.to_string());
    put("ema_decay", cfg.train.ema_decay.to_string());
    put("dataset", state.data_description.clone());
    put("dataset_fingerprint", state.data_fingerprint.clone());
    put("model_config", serde_json::to_string(m)?);
    put("exporter", format!("diffusion-rs trainer {}", env!("CARGO_PKG_VERSION")));
    if let Some(r) = recommended {
        if r.guidance != 0.0 && m.num_classes == 0 {
            bail!("a guidance weight is recommended for an unconditional model");
        }
        md.extend(r.to_props());
        runtime::onnx::Recommended::from_props(&md)?;
    }
    Ok(md)
}

/// Options of `trainer export`.
pub struct ExportOptions<'a> {
    pub run: &'a Path,
    pub checkpoint: &'a str,
    pub weights: &'a str,
    pub dtype: &'a str,
    pub opset: i64,
    pub out: &'a Path,
    pub force: bool,
    /// Also write a model card (OUT with the extension .md) from the run's state and its eval.json.
    pub card: bool,
    /// The sampler, steps and guidance to record as the model's default way of sampling.
    pub recommended: Option<runtime::onnx::Recommended>,
}

/// Loads a checkpoint's model (EMA or raw weights) onto `device`.
pub fn load_unet(run: &Path, checkpoint: &str, weights: &str, device: &Device) -> Result<(UNet, State)> {
    let dir = crate::checkpoint::resolve(run, checkpoint)?;
    let ck = crate::checkpoint::load(&dir, device, false)?;
    let (tensors, file) = match weights {
        "ema" => (&ck.ema, "ema.safetensors"),
        "raw" => (&ck.model, "model.safetensors"),
        o => bail!("--weights must be 'ema' or 'raw', got '{o}'"),
    };
    let mut src = TensorSource::new(tensors, format!("{}/{file}", dir.display())).with_dtype(DType::F32);
    let unet = UNet::new(ck.state.config.model.clone(), &mut src)?;
    src.finish()?;
    Ok((unet, ck.state))
}

pub fn export(opts: &ExportOptions) -> Result<()> {
    let dtype = ExportDtype::from_name(opts.dtype)?;
    let card = opts.card.then(|| opts.out.with_extension("md"));
    for p in std::iter::once(opts.out).chain(card.as_deref()) {
        if p.exists() && !opts.force {
            bail!("{} already exists; use --force to replace it", p.display());
        }
    }
    let (unet, state) = load_unet(opts.run, opts.checkpoint, opts.weights, &Device::Cpu)?;
    let md = metadata(&state, opts.weights, dtype, opts.recommended.as_ref())?;
    let model = build_model(&unet, dtype, opts.opset, &md)?;
    let bytes = model.encode_to_vec();
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::checkpoint::write_atomic(opts.out, &bytes)?;
    if let Some(p) = card {
        let eval = std::fs::read(opts.run.join("eval.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        crate::checkpoint::write_atomic(&p, model_card(&state, opts, &bytes, eval.as_ref()).as_bytes())?;
        eprintln!("wrote {}", p.display());
    }
    eprintln!(
        "wrote {} ({:.1} MB, {}, opset {}, {} weights of step {})",
        opts.out.display(),
        bytes.len() as f64 / 1e6,
        opts.dtype,
        opts.opset,
        opts.weights,
        state.step
    );
    Ok(())
}

/// The augmentations that are on, as `name = value` (or "none").
fn augmentation(a: &crate::data::augment::AugmentConfig) -> String {
    let on: Vec<String> = serde_json::to_value(a)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| v.as_bool() != Some(false) && v.as_f64() != Some(0.0))
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    if on.is_empty() {
        "none".into()
    } else {
        on.join(", ")
    }
}

/// A model card in Markdown: what the model was trained on and how, the file, and the metrics of `trainer eval`
/// when the run has them.
pub fn model_card(state: &State, opts: &ExportOptions, bytes: &[u8], eval: Option<&serde_json::Value>) -> String {
    use sha2::Digest;
    let (c, m, d, t) = (&state.config, &state.config.model, &state.config.diffusion, &state.config.train);
    let name = opts.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut s = format!(
        "# {name}\n\nDDPM noise-prediction U-Net (eps = f(x_t, t[, y])), exported by diffusion-rs trainer {}.\n\n",
        env!("CARGO_PKG_VERSION")
    );
    let classes = if m.num_classes > 0 {
        format!(
            "{} ({}); null class {} for classifier-free guidance, label dropout p = {}",
            m.num_classes,
            state.class_names.join(", "),
            m.null_class().map(|n| n.to_string()).unwrap_or_default(),
            t.p_uncond
        )
    } else {
        "unconditional".into()
    };
    let rows = [
        ("data", format!("{} (fingerprint {})", state.data_description, state.data_fingerprint)),
        ("image", format!("{}x{}, {} channel(s), pixels in [-1, 1]", m.image_size, m.image_size, m.channels)),
        ("classes", classes),
        (
            "U-Net",
            format!(
                "ch {}, ch_mult {:?}, {} res blocks per level, attention at {:?} ({} heads), dropout {}; {:.2}M parameters",
                m.ch,
                m.ch_mult,
                m.num_res_blocks,
                m.attention_resolutions,
                m.num_heads,
                m.dropout,
                state.num_params as f64 / 1e6
            ),
        ),
        ("diffusion", format!("{} schedule, T = {}, variance {}, eps prediction", d.schedule, d.timesteps, d.variance)),
        (
            "training",
            format!(
                "{} steps, batch {}, lr {} ({} warm-up, then {}), AdamW, {} loss{}, EMA {}, seed {}; augmentation: {}",
                state.step,
                t.batch_size,
                t.lr,
                t.warmup_steps,
                t.lr_schedule,
                t.loss,
                if t.min_snr_gamma > 0.0 { format!(" with Min-SNR-{} weighting", t.min_snr_gamma) } else { String::new() },
                t.ema_decay,
                t.seed,
                augmentation(&c.data.augment)
            ),
        ),
        ("device, wall time", format!("{}, {:.2} h ({:.0} s)", state.device, state.elapsed_s / 3600.0, state.elapsed_s)),
        ("final loss", format!("{:.4} (mean of the last logged window)", state.recent_loss)),
        (
            "file",
            format!(
                "{}, {} weights, opset {}, {:.1} MB, sha256 {:x}",
                opts.dtype,
                opts.weights,
                opts.opset,
                bytes.len() as f64 / 1e6,
                sha2::Sha256::digest(bytes)
            ),
        ),
    ];
    s += "| | |\n|---|---|\n";
    for (k, v) in rows {
        s += &format!("| {k} | {v} |\n");
    }
    if let Some(e) = eval {
        let f = |k: &str| e.get(k).and_then(|v| v.as_f64());
        s += &format!(
            "\n## Metrics (`trainer eval`, {} samples, {}, guidance {})\n\n| metric | value | real-vs-real floor |\n|---|---|---|\n",
            e["samples"], e["sampler"].as_str().unwrap_or("?"), e["guidance"]
        );
        if let Some(a) = f("classifier_test_accuracy") {
            s += &format!("| evaluation classifier's test accuracy | {:.2}% | |\n", 100.0 * a);
        }
        if let Some(v) = f("classifier_score") {
            s += &format!("| classifier score (samples classified as their class) | {:.2}% | |\n", 100.0 * v);
        }
        for (key, floor, label) in [
            ("fid_classifier_features", "fid_floor_train_vs_test", "FID, classifier features (128-d)"),
            ("fid_inception", "fid_inception_floor", "FID, Inception-v3 pool3 (2048-d)"),
        ] {
            if let Some(v) = f(key) {
                let fl = f(floor).map(|x| format!("{x:.3}")).unwrap_or_default();
                s += &format!("| {label} | {v:.3} | {fl} |\n");
            }
        }
    }
    let class = if m.num_classes > 0 { " --class 0" } else { "" };
    let how = match &opts.recommended {
        Some(r) => {
            let g = if m.num_classes > 0 { format!(", guidance {}", r.guidance) } else { String::new() };
            format!(
                "The file recommends {} with {} steps{g} (its metadata; `generate` uses it unless told otherwise).\n\n",
                r.sampler, r.steps
            )
        }
        None if m.num_classes > 0 => "Try `--sampler dpm++ --steps 20 --guidance 2`.\n\n".to_string(),
        None => String::new(),
    };
    s += &format!("\n## Use\n\n{how}```\ngenerate --model {} --n 64{class}\n```\n", opts.out.display());
    s
}

/// Evaluates an exported model with candle-onnx (an independent reader, CPU).
pub fn candle_onnx_eval(model: &ModelProto, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
    let mut inputs = std::collections::HashMap::new();
    inputs.insert("x".to_string(), x.clone());
    inputs.insert("t".to_string(), t.clone());
    if let Some(y) = y {
        inputs.insert("y".to_string(), y.clone());
    }
    let mut out = candle_onnx::simple_eval(model, inputs)?;
    out.remove("eps").context("no 'eps' output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_card_lists_only_the_augmentations_that_are_on() {
        let mut a = crate::data::augment::AugmentConfig::default();
        assert_eq!(augmentation(&a), "none");
        a.hflip = true;
        a.rotate_degrees = 10.0;
        assert_eq!(augmentation(&a), "hflip = true, rotate_degrees = 10.0");
    }
}
