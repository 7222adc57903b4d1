//! The ONNX graph writer: [`OnnxOps`] implements the same [`Ops`] trait that training runs on, emitting one
//! ONNX node (or a few) per primitive, so the graph has exactly the trained model's structure. The op set
//! stays inside what candle-onnx's `simple_eval` reads at opset 17 (GroupNorm as Reshape/ReduceMean/Sub/Mul/
//! Add/Sqrt/Div, SiLU as Sigmoid*Mul), so three independent readers (Candle, ONNX Runtime, candle-onnx) can
//! check it.
//!
//! f16 export keeps weights and activations in f16 but computes the GroupNorm statistics and the
//! attention softmax in f32 (fp16 U-Nets are known to produce NaN/black images otherwise: diffusers
//! #1083, #4321); the timestep embedding is computed in f32 and cast.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use runtime::metadata::Dtype;

use crate::model::ops::Ops;
use crate::model::params::Param;
use crate::model::unet::UNet;

/// The ONNX element type of a dtype.
pub fn onnx_type(dtype: Dtype) -> DataType {
    match dtype {
        Dtype::F32 => DataType::Float,
        Dtype::F16 => DataType::Float16,
    }
}

/// Emits ONNX nodes for the U-Net's primitives.
pub struct OnnxOps {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    seen: HashSet<String>,
    next: usize,
    dtype: Dtype,
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
    pub fn new(dtype: Dtype) -> Self {
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

    fn tensor_proto(name: &str, dims: &[i64], values: &[f32], dtype: Dtype) -> TensorProto {
        let raw: Vec<u8> = match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        };
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: onnx_type(dtype) as i32,
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
        self.initializers.push(Self::tensor_proto(&name, &[], &[v as f32], Dtype::F32));
        name
    }

    fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)])
    }
    fn widen_if_half(&mut self, x: &str) -> String {
        match self.dtype {
            Dtype::F16 => self.cast(x, DataType::Float),
            Dtype::F32 => x.to_string(),
        }
    }
    fn narrow_if_half(&mut self, x: &str) -> String {
        match self.dtype {
            Dtype::F16 => self.cast(x, DataType::Float16),
            Dtype::F32 => x.to_string(),
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
        self.initializers.push(Self::tensor_proto(&scales, &[4], &[1.0, 1.0, 2.0, 2.0], Dtype::F32));
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
        self.initializers.push(Self::tensor_proto(&n, &[values.len() as i64], values, Dtype::F32));
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
pub fn build_model(unet: &UNet, dtype: Dtype, opset: i64, metadata: &BTreeMap<String, String>) -> Result<ModelProto> {
    let cfg = &unet.cfg;
    let mut o = OnnxOps::new(dtype);
    let (x, t, y, w) = ("x".to_string(), "t".to_string(), "y".to_string(), "w".to_string());
    let conditional = cfg.num_classes > 0;
    let out = unet.forward_w(&mut o, &x, &t, conditional.then_some(&y), cfg.guidance_embed.then_some(&w))?;
    let (c, s) = (cfg.channels as i64, cfg.image_size as i64);
    let img = [None, Some(c), Some(s), Some(s)];
    let mut inputs = vec![value_info("x", onnx_type(dtype), &img), value_info("t", DataType::Int64, &[None])];
    if conditional {
        // y [B], or [B, 1 + A] for a multi-attribute model
        let dims = if cfg.attributes.is_empty() { vec![None] } else { vec![None, Some(cfg.label_columns() as i64)] };
        inputs.push(value_info("y", DataType::Int64, &dims));
    }
    if cfg.guidance_embed {
        // the guidance weight of a distilled student (f32 whatever the model's dtype, like t is int64)
        inputs.push(value_info("w", DataType::Float, &[None]));
    }
    // eps, or the velocity of a v-predicting model (Salimans & Ho 2022): the runtime reads it by this name
    let first = cfg.prediction.output_name();
    let (outputs, doc) = if cfg.learn_sigma {
        // Nichol & Dhariwal 2021, sec. 3.1: the second C channels are v of the learned variance (eq. 15)
        let c = cfg.channels;
        let eps = o.narrow(&out, 1, 0, c)?;
        let v = o.narrow(&out, 1, c, c)?;
        (
            vec![(eps, first, img.to_vec()), (v, "v", img.to_vec())],
            "DDPM U-Net with a learned variance ((eps or velocity, v) = f(x_t, t[, y]))",
        )
    } else {
        (vec![(out, first, img.to_vec())], "DDPM U-Net (eps or velocity = f(x_t, t[, y]), as prediction_type says)")
    };
    let graph = Graph { name: "ddpm_unet", inputs, outputs };
    finish_model(o, graph, opset, metadata, doc)
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
        outputs.push(value_info(public, onnx_type(o.dtype), dims));
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

/// Evaluates an exported model with candle-onnx (an independent reader, CPU).
pub fn candle_onnx_eval(model: &ModelProto, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
    candle_onnx_eval_w(model, x, t, y, None)
}

/// [`candle_onnx_eval`] with the guidance weights w of a guidance-input model.
pub fn candle_onnx_eval_w(
    model: &ModelProto,
    x: &Tensor,
    t: &Tensor,
    y: Option<&Tensor>,
    w: Option<&Tensor>,
) -> Result<Tensor> {
    let mut inputs = std::collections::HashMap::new();
    if let Some(w) = w {
        inputs.insert("w".to_string(), w.clone());
    }
    inputs.insert("x".to_string(), x.clone());
    inputs.insert("t".to_string(), t.clone());
    if let Some(y) = y {
        inputs.insert("y".to_string(), y.clone());
    }
    let mut out = candle_onnx::simple_eval(model, inputs)?;
    let first = model.graph.as_ref().and_then(|g| g.output.first()).map(|o| o.name.clone()).unwrap_or_default();
    out.remove(&first).with_context(|| format!("no first output '{first}'"))
}
