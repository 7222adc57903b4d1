//! ONNX Runtime backend: loads libonnxruntime dynamically (one environment per process), reads the model's
//! metadata ([`ModelMeta`]) and implements [`Denoiser`] for an exported U-Net.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::value::Tensor;

use crate::error::{Error, Result};
use crate::metadata::{Dtype, ModelMeta, Prediction};
use crate::sampler::Denoiser;

pub const ORT_VERSION: &str = "1.31.1";

/// Extra places to look for libonnxruntime, added by the embedding program.
static EXTRA_CANDIDATES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Adds a place to look for libonnxruntime, after `ORT_DYLIB_PATH` and the executable's folder. It counts
/// only before the first model is opened (the library is loaded once per process).
pub fn add_library_candidate(path: PathBuf) {
    EXTRA_CANDIDATES.lock().unwrap_or_else(|p| p.into_inner()).push(path);
}

/// Where `scripts/setup.sh` installs ONNX Runtime under a checkout `root` (for programs built in the tree).
pub fn setup_library_path(root: &Path) -> PathBuf {
    root.join(format!(".ort/cpu-{ORT_VERSION}/libonnxruntime.so.{ORT_VERSION}"))
}

/// Where libonnxruntime is looked for, in order: `ORT_DYLIB_PATH`, the executable's folder, then the places
/// given to [`add_library_candidate`].
pub fn library_candidates() -> Vec<PathBuf> {
    let mut v = vec![];
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        v.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            v.push(dir.join(format!("libonnxruntime.so.{ORT_VERSION}")));
            v.push(dir.join("libonnxruntime.so"));
        }
    }
    v.extend(EXTRA_CANDIDATES.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
    v
}

static ENV: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment (ONNX Runtime allows one per process) and the library it loaded.
pub fn environment() -> Result<&'static (PathBuf, ort::environment::Environment)> {
    ENV.get_or_init(|| {
        let cands = library_candidates();
        let Some(lib) = cands.iter().find(|p| p.is_file()) else {
            return Err(format!(
                "ONNX Runtime {ORT_VERSION} not found (looked at: {}). Install it with scripts/setup.sh, or set ORT_DYLIB_PATH to libonnxruntime.so.{ORT_VERSION}",
                cands.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        };
        let env = ort::init_from(lib)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", lib.display()))?
            .with_name("diffusion-rs")
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))?;
        Ok((lib.clone(), env))
    })
    .as_ref()
    .map_err(|e| Error::Library(e.clone()))
}

/// Which execution provider, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProviderKind {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
    /// TensorRT, then CUDA, then CPU.
    Auto,
}

crate::named_enum!(ProviderKind, "provider", {
    Cpu => ["cpu"],
    Cuda => ["cuda"],
    TensorRt => ["tensorrt"],
    Auto => ["auto"],
});

/// Execution provider choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    Cpu,
    Cuda {
        device: i32,
    },
    TensorRt {
        device: i32,
        fp16: bool,
        cache_dir: Option<PathBuf>,
    },
    /// TensorRT, then CUDA, then CPU.
    Auto,
}

impl Provider {
    /// The provider of this kind on GPU 0, TensorRT without fp16 or an engine cache.
    pub fn of_kind(kind: ProviderKind) -> Self {
        match kind {
            ProviderKind::Cpu => Provider::Cpu,
            ProviderKind::Cuda => Provider::Cuda { device: 0 },
            ProviderKind::TensorRt => Provider::TensorRt { device: 0, fp16: false, cache_dir: None },
            ProviderKind::Auto => Provider::Auto,
        }
    }
}

/// Reads a model file's metadata entries (all of them, ours and others).
fn read_props(session: &Session) -> Result<BTreeMap<String, String>> {
    let meta = session.metadata().map_err(|e| Error::ort(format!("cannot read metadata: {e}")))?;
    let mut md = BTreeMap::new();
    for k in meta.custom_keys().map_err(Error::ort)? {
        if let Some(v) = meta.custom(&k) {
            md.insert(k, v);
        }
    }
    Ok(md)
}

/// An exported U-Net in an ONNX Runtime session.
pub struct OrtDenoiser {
    session: Session,
    info: ModelMeta,
    provider: ProviderKind,
    notes: Vec<String>,
}

/// A session builder with the thread setting.
fn builder(threads: Option<usize>) -> Result<ort::session::builder::SessionBuilder> {
    let (_, env) = environment()?;
    let mut b = Session::builder(env).map_err(Error::ort)?;
    if let Some(n) = threads {
        b = b.with_intra_threads(n).map_err(Error::ort)?;
    }
    Ok(b)
}

fn commit(mut b: ort::session::builder::SessionBuilder, path: &Path) -> Result<Session> {
    b.commit_from_file(path).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        reason: format!("ONNX Runtime cannot load this model: {e}"),
    })
}

/// A session on one provider (not Auto), failing if the provider cannot be used.
fn session_on(path: &Path, provider: &Provider, threads: Option<usize>) -> Result<Session> {
    let on = |ep: ort::ep::ExecutionProviderDispatch, name: &str| -> Result<Session> {
        let b = builder(threads)?
            .with_execution_providers([ep.error_on_failure()])
            .map_err(|e| Error::Ort(format!("the {name} provider cannot be used: {e}")))?;
        commit(b, path)
    };
    match provider {
        Provider::Cpu | Provider::Auto => commit(builder(threads)?, path),
        Provider::Cuda { device } => on(ort::ep::CUDA::default().with_device_id(*device).build(), "CUDA"),
        Provider::TensorRt { device, fp16, cache_dir } => {
            let mut trt = ort::ep::TensorRT::default().with_device_id(*device).with_fp16(*fp16);
            if let Some(d) = cache_dir {
                trt = trt.with_engine_cache(true).with_engine_cache_path(d.display());
            }
            on(trt.build(), "TensorRT")
        }
    }
}

/// The session, the provider that runs it, and why providers tried before it were passed over (Auto).
fn build_session(
    path: &Path,
    provider: &Provider,
    threads: Option<usize>,
) -> Result<(Session, ProviderKind, Vec<String>)> {
    let kind = match provider {
        Provider::Cpu => ProviderKind::Cpu,
        Provider::Cuda { .. } => ProviderKind::Cuda,
        Provider::TensorRt { .. } => ProviderKind::TensorRt,
        Provider::Auto => {
            let mut notes = vec![];
            for kind in [ProviderKind::TensorRt, ProviderKind::Cuda] {
                match session_on(path, &Provider::of_kind(kind), threads) {
                    Ok(s) => return Ok((s, kind, notes)),
                    Err(e @ Error::Model { .. }) => return Err(e),
                    Err(e) => notes.push(format!("{kind} unavailable: {e}")),
                }
            }
            return Ok((session_on(path, &Provider::Cpu, threads)?, ProviderKind::Cpu, notes));
        }
    };
    Ok((session_on(path, provider, threads)?, kind, vec![]))
}

impl OrtDenoiser {
    /// Opens a model exported by `trainer export`: its metadata is read and checked, and its inputs must be
    /// x `[B, C, H, W]`, t `[B]` (and y `[B]` for a conditional model, `[B, 1 + A]` with A attributes), its output eps.
    pub fn open(path: &Path, provider: &Provider, threads: Option<usize>) -> Result<Self> {
        let model_err = |reason: String| Error::Model { path: path.to_path_buf(), reason };
        let len = std::fs::metadata(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?.len();
        if len == 0 {
            return Err(model_err("empty file, not an ONNX model".into()));
        }
        let (session, provider, notes) = build_session(path, provider, threads)?;
        let info = ModelMeta::from_props(&read_props(&session)?).map_err(|e| e.in_model(path))?;
        let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let mut want: Vec<&str> = if info.num_classes > 0 { vec!["x", "t", "y"] } else { vec!["x", "t"] };
        if info.takes_guidance() {
            want.push("w");
        }
        if names != want {
            return Err(model_err(format!(
                "inputs are {names:?}, expected {want:?} (x [B,C,H,W], t [B] int64{}{})",
                if info.num_classes > 0 { ", y [B] int64" } else { "" },
                if info.takes_guidance() { ", w [B] float32" } else { "" }
            )));
        }
        let outs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        // the first output is eps, or the velocity of a v-predicting model (Salimans & Ho 2022); a model that
        // learns its variance also outputs v (Nichol & Dhariwal 2021, eq. 15)
        let first = info.prediction.output_name();
        let want: Vec<&str> = if info.variance.is_learned() { vec![first, "v"] } else { vec![first] };
        if outs != want {
            return Err(model_err(format!(
                "outputs are {outs:?}, expected {want:?} (its metadata says prediction_type = {}, variance_type = {})",
                info.prediction, info.variance
            )));
        }
        Ok(Self { session, info, provider, notes })
    }

    /// What the model's metadata says about it.
    pub fn info(&self) -> &ModelMeta {
        &self.info
    }

    /// The provider that runs the model.
    pub fn provider(&self) -> ProviderKind {
        self.provider
    }

    /// Why providers tried before the one in use were passed over (`Provider::Auto`); empty otherwise.
    pub fn provider_notes(&self) -> &[String] {
        &self.notes
    }
}

impl Denoiser for OrtDenoiser {
    fn prediction(&self) -> Prediction {
        self.info.prediction
    }

    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
        if self.info.takes_guidance() {
            // no weight given: the conditional model alone
            return Ok(self.run(x, shape, t, y, false, Some(&vec![0.0; shape[0]]))?.0);
        }
        Ok(self.run(x, shape, t, y, false, None)?.0)
    }

    fn guidance_input(&self) -> bool {
        self.info.takes_guidance()
    }

    fn eps_w(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>, w: &[f32]) -> Result<Vec<f32>> {
        if !self.info.takes_guidance() {
            return Err(Error::denoiser("this model takes no guidance weight"));
        }
        Ok(self.run(x, shape, t, y, false, Some(w))?.0)
    }

    fn eps_and_v(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[i64],
        y: Option<&[i64]>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let learned = self.info.variance.is_learned();
        if self.info.takes_guidance() {
            return self.run(x, shape, t, y, learned, Some(&vec![0.0; shape[0]]));
        }
        self.run(x, shape, t, y, learned, None)
    }
}

impl OrtDenoiser {
    /// One run of the model: eps, and v when `want_v` (a learned-variance model); `w` the guidance weights of a
    /// guidance-input model.
    fn run(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[i64],
        y: Option<&[i64]>,
        want_v: bool,
        weights: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let [n, c, h, w] = shape;
        let info = &self.info;
        if c != info.channels || h != info.image_size || w != info.image_size {
            return Err(Error::request(
                "shape",
                format!(
                    "the model takes {}x{}x{} images, got {c}x{h}x{w}",
                    info.channels, info.image_size, info.image_size
                ),
            ));
        }
        let dims = vec![n as i64, c as i64, h as i64, w as i64];
        let mut inputs: Vec<(std::borrow::Cow<str>, ort::session::SessionInputValue)> = vec![];
        let xv: ort::session::SessionInputValue = match info.dtype {
            Dtype::F16 => {
                let xh: Vec<half::f16> = x.iter().map(|v| half::f16::from_f32(*v)).collect();
                Tensor::from_array((dims, xh)).map_err(Error::ort)?.into()
            }
            Dtype::F32 => Tensor::from_array((dims, x.to_vec())).map_err(Error::ort)?.into(),
        };
        inputs.push(("x".into(), xv));
        inputs.push(("t".into(), Tensor::from_array((vec![n as i64], t.to_vec())).map_err(Error::ort)?.into()));
        if info.num_classes > 0 {
            let cols = info.label_columns();
            let yv = crate::metadata::full_labels(&info.label_nulls(), cols, y, n)?;
            // y [B] for a class-only model, [B, 1 + A] with attributes
            let ydims = if cols > 1 { vec![n as i64, cols as i64] } else { vec![n as i64] };
            inputs.push(("y".into(), Tensor::from_array((ydims, yv)).map_err(Error::ort)?.into()));
        }
        if let Some(gw) = weights {
            if gw.len() != n {
                return Err(Error::request("guidance", format!("{} guidance weights for {n} images", gw.len())));
            }
            inputs.push(("w".into(), Tensor::from_array((vec![n as i64], gw.to_vec())).map_err(Error::ort)?.into()));
        }
        let dtype = info.dtype;
        let out = self.session.run(inputs).map_err(|e| Error::Ort(format!("the model failed to run: {e}")))?;
        let read = |name: &str| -> Result<Vec<f32>> {
            let v = &out[name];
            Ok(match dtype {
                Dtype::F16 => {
                    v.try_extract_tensor::<half::f16>().map_err(Error::ort)?.1.iter().map(|h| h.to_f32()).collect()
                }
                Dtype::F32 => v.try_extract_tensor::<f32>().map_err(Error::ort)?.1.to_vec(),
            })
        };
        let first = info.prediction.output_name();
        let eps = read(first)?;
        let v = if want_v { Some(read("v")?) } else { None };
        for (name, o) in std::iter::once((first, &eps)).chain(v.as_ref().map(|v| ("v", v))) {
            if o.len() != x.len() {
                return Err(Error::Ort(format!(
                    "the model's {name} has {} values for an input of {}",
                    o.len(),
                    x.len()
                )));
            }
        }
        Ok((eps, v))
    }
}
