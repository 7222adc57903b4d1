//! `trainer export`: a checkpoint's U-Net as a self-describing ONNX file ([`ModelMeta`] in its metadata), and
//! its model card.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use prost::Message;
use runtime::metadata::{Dtype, ModelMeta, Recommended, Weights};
use runtime::sampler::SamplerKind;

use super::card::{model_card, CardFile};
use super::graph::build_model;
use crate::report::EvalReport;
use crate::train::checkpoint::{self, LoadedUnet, State};
use crate::train::post_hoc;

/// The self-describing metadata the runtime reads ([`ModelMeta`], keys prefixed `diffusion.`).
pub fn metadata(state: &State, weights: Weights, dtype: Dtype, recommended: Option<&Recommended>) -> Result<ModelMeta> {
    let cfg = &state.config;
    let sched = cfg.diffusion.schedule()?;
    let m = &cfg.model;
    let meta = ModelMeta {
        betas: sched.betas,
        prediction: cfg.diffusion.prediction,
        variance: cfg.diffusion.variance,
        image_size: m.image_size,
        channels: m.channels,
        num_classes: m.num_classes,
        class_names: if m.num_classes > 0 { state.class_names.clone() } else { vec![] },
        null_class: m.null_class().map(|n| n as i64),
        attributes: m.attributes.clone(),
        dtype,
        schedule: Some(cfg.diffusion.beta_schedule()),
        weights: Some(weights),
        training_steps: Some(state.step as u64),
        ema_decay: Some(cfg.train.ema_decay),
        dataset: Some(state.data_description.clone()),
        dataset_fingerprint: Some(state.data_fingerprint.clone()),
        model_config: Some(serde_json::to_string(m)?),
        exporter: Some(format!("diffusion-rs trainer {}", env!("CARGO_PKG_VERSION"))),
        background: (cfg.data.kind == crate::data::DataKind::Folder).then_some(cfg.data.background),
        recommended: recommended.cloned(),
        student: None,
        guidance_input: None,
        extra: Default::default(),
    };
    let meta = match &cfg.distill {
        Some(d) => student_metadata(meta, d, state, recommended)?,
        None => meta,
    };
    // what the runtime will refuse is refused here, before a file is written
    ModelMeta::from_props(&meta.to_props())?;
    Ok(meta)
}

/// A distilled student's keys (format 2): what it is, the guidance range of its w input, and, unless the caller
/// recommends otherwise, its own sampling (DDIM in its steps, its distillation's guidance). A recommendation
/// that contradicts the student is refused.
fn student_metadata(
    mut meta: ModelMeta,
    d: &crate::train::config::DistillConfig,
    state: &State,
    recommended: Option<&Recommended>,
) -> Result<ModelMeta> {
    let steps = d.steps_at(state.step, state.config.train.steps);
    let sampler = if d.consistency() { SamplerKind::Consistency } else { SamplerKind::Ddim };
    meta.student = Some(runtime::metadata::Student {
        method: d.method.clone(),
        sampler,
        steps,
        teacher_steps: d.teacher_steps,
        teacher: d.teacher.clone(),
        teacher_sha256: d.teacher_sha256.clone(),
    });
    if state.config.model.guidance_embed {
        meta.guidance_input = Some((0.0, d.guidance_max));
    }
    let own = Recommended { sampler, steps, guidance: d.guidance, guidance_interval: None };
    match recommended {
        None => meta.recommended = Some(own),
        Some(r) if r.sampler != sampler || (r.steps != steps && !d.consistency()) || r.guidance_interval.is_some() => {
            bail!(
                "this run is a {steps}-step student (checkpoint step {}): it is sampled by {sampler} in {steps} steps with no guidance interval; drop --sampler/--steps/--guidance-interval or match them",
                state.step
            )
        }
        Some(r) => meta.recommended = Some(r.clone()),
    }
    Ok(meta)
}

/// Options of `trainer export`.
pub struct ExportOptions<'a> {
    pub run: &'a Path,
    pub checkpoint: &'a str,
    pub weights: Weights,
    /// Instead of the checkpoint's EMA, an EMA of this decay rebuilt from the run's checkpoints
    /// ([`crate::train::post_hoc`]).
    pub post_hoc_ema: Option<f64>,
    pub dtype: Dtype,
    pub opset: i64,
    pub out: &'a Path,
    pub force: bool,
    /// Also write a model card (OUT with the extension .md) from the run's state and its eval.json.
    pub card: bool,
    /// The sampler, steps and guidance to record as the model's default way of sampling.
    pub recommended: Option<Recommended>,
}

/// Writes the ONNX file (atomically; an existing file only with `force`) and, when asked, its model card.
pub fn export(opts: &ExportOptions) -> Result<Exported> {
    let dtype = opts.dtype;
    let card = opts.card.then(|| opts.out.with_extension("md"));
    for p in std::iter::once(opts.out).chain(card.as_deref()) {
        if p.exists() && !opts.force {
            bail!("{} already exists; use --force to replace it", p.display());
        }
    }
    let (LoadedUnet { unet, state, passed_over }, rebuilt) =
        post_hoc::load_unet(opts.run, opts.checkpoint, opts.weights, opts.post_hoc_ema, &Device::Cpu)?;
    let meta = metadata(&state, opts.weights, dtype, opts.recommended.as_ref())?;
    // a student recommends its own sampling even when the caller gave none
    let recommended = meta.recommended.clone();
    let md = meta.to_props();
    let model = build_model(&unet, dtype, opts.opset, &md)?;
    let bytes = model.encode_to_vec();
    if let Some(dir) = opts.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // a report that cannot be read stops the export before anything is written
    let eval = if card.is_some() { EvalReport::read(opts.run)? } else { None };
    checkpoint::write_atomic(opts.out, &bytes)?;
    if let Some(p) = &card {
        let file = CardFile {
            out: opts.out,
            dtype,
            weights: opts.weights,
            rebuilt: rebuilt.as_deref(),
            opset: opts.opset,
            recommended: recommended.as_ref(),
            bytes: &bytes,
        };
        checkpoint::write_atomic(p, model_card(&state, &file, eval.as_ref()).as_bytes())?;
    }
    Ok(Exported { bytes: bytes.len(), step: state.step, card, passed_over })
}

/// What [`export`] wrote.
pub struct Exported {
    /// The size of the ONNX file.
    pub bytes: usize,
    /// The training step of the exported weights.
    pub step: usize,
    /// The model card, when asked for.
    pub card: Option<PathBuf>,
    /// Newer checkpoints that could not be read (the export used the newest one that could).
    pub passed_over: Vec<String>,
}

/// Options of `trainer export --model`: an exported file's recommended sampling replaced, its graph and weights
/// kept byte for byte.
pub struct RecommendOptions<'a> {
    pub model: &'a Path,
    pub out: &'a Path,
    pub force: bool,
    /// Also bring the card beside OUT (or, when there is none yet, the one beside the model) in step: its file
    /// row (size, hash) and its recommendation; everything else in it is kept.
    pub card: bool,
    pub recommended: Recommended,
}

/// Rewrites an exported model's `diffusion.recommended_*` entries (checked against its own schedule and classes
/// as the runtime checks them) and writes it atomically; nothing is written when the file is not one of ours.
pub fn recommend(opts: &RecommendOptions) -> Result<Exported> {
    use anyhow::Context;
    let card_out = opts.card.then(|| opts.out.with_extension("md"));
    if opts.out.exists() && !opts.force {
        bail!("{} already exists; use --force to replace it", opts.out.display());
    }
    let src = std::fs::read(opts.model).with_context(|| format!("cannot read {}", opts.model.display()))?;
    let mut model = candle_onnx::onnx::ModelProto::decode(src.as_slice())
        .with_context(|| format!("{} is not an ONNX model", opts.model.display()))?;
    let props: std::collections::BTreeMap<String, String> =
        model.metadata_props.iter().map(|p| (p.key.clone(), p.value.clone())).collect();
    let mut meta = ModelMeta::from_props(&props).map_err(|e| e.in_model(opts.model))?;
    meta.recommended = Some(opts.recommended.clone());
    let md = meta.to_props();
    ModelMeta::from_props(&md).map_err(|e| anyhow::anyhow!("the recommended sampling does not fit this model: {e}"))?;
    // the entries of other tools stay where they were; ours are written in the exporter's order
    model.metadata_props.retain(|p| !p.key.starts_with("diffusion."));
    model
        .metadata_props
        .extend(md.into_iter().map(|(key, value)| candle_onnx::onnx::StringStringEntryProto { key, value }));
    let bytes = model.encode_to_vec();
    let card = match &card_out {
        Some(p) => {
            let old = if p.exists() { p.clone() } else { opts.model.with_extension("md") };
            let text = std::fs::read_to_string(&old).with_context(|| {
                format!("--card brings an existing card in step, and {} cannot be read", old.display())
            })?;
            let conditional = meta.num_classes > 0;
            Some((p, super::card::restamp(&text, &bytes, &opts.recommended, conditional, &old)?))
        }
        None => None,
    };
    checkpoint::write_atomic(opts.out, &bytes)?;
    if let Some((p, text)) = &card {
        checkpoint::write_atomic(p, text.as_bytes())?;
    }
    let step = meta.training_steps.unwrap_or(0) as usize;
    Ok(Exported { bytes: bytes.len(), step, card: card_out, passed_over: vec![] })
}
