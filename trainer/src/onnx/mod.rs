//! The ONNX side of the trainer: the graph writer (the U-Net's [`Ops`](crate::model::ops::Ops) emitted as
//! ONNX nodes), `trainer export` with the model's metadata, and the model card.

pub mod card;
pub mod export;
pub mod graph;

pub use export::{export, metadata, recommend, ExportOptions, Exported, RecommendOptions};
pub use graph::{
    build_model, candle_onnx_eval, candle_onnx_eval_w, finish_model, onnx_type, value_info, Graph, OnnxOps,
};
