//! ONNX Runtime backend: loads libonnxruntime dynamically (one environment per process), reads our
//! self-describing metadata and implements [`Denoiser`] for an exported U-Net.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use ort::session::Session;
use ort::value::Tensor;

use crate::sampler::Denoiser;
use crate::schedule::{NoiseSchedule, VarianceType};

pub const ORT_VERSION: &str = "1.31.1";

/// Where libonnxruntime is looked for, in order.
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
    // the project's own install folder (scripts/setup.sh)
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
    v.push(root.join(format!(".ort/cpu-{ORT_VERSION}/libonnxruntime.so.{ORT_VERSION}")));
    v
}

static ENV: OnceLock<std::result::Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment (ONNX Runtime allows one per process).
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
    .map_err(|e| anyhow!("{e}"))
}

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
    pub fn from_name(s: &str) -> Result<Self> {
        Ok(match s {
            "cpu" => Provider::Cpu,
            "cuda" => Provider::Cuda { device: 0 },
            "tensorrt" => Provider::TensorRt { device: 0, fp16: false, cache_dir: None },
            "auto" => Provider::Auto,
            o => bail!("unknown provider '{o}' (cpu, cuda, tensorrt, auto)"),
        })
    }
}

/// How the exporter recommends sampling the model (the setting its model card measured); `generate` uses it
/// unless told otherwise. Optional metadata: `diffusion.recommended_sampler`, `_steps`, `_guidance`.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommended {
    pub sampler: String,
    pub steps: usize,
    pub guidance: f32,
}

impl Recommended {
    pub const KEYS: [&'static str; 3] =
        ["diffusion.recommended_sampler", "diffusion.recommended_steps", "diffusion.recommended_guidance"];

    /// The three metadata entries.
    pub fn to_props(&self) -> [(String, String); 3] {
        [
            (Self::KEYS[0].into(), self.sampler.clone()),
            (Self::KEYS[1].into(), self.steps.to_string()),
            (Self::KEYS[2].into(), self.guidance.to_string()),
        ]
    }

    /// None when no key is present; an error when only some are, or when one does not parse.
    pub fn from_props(md: &BTreeMap<String, String>) -> Result<Option<Self>> {
        let present: Vec<&str> = Self::KEYS.iter().copied().filter(|k| md.contains_key(*k)).collect();
        if present.is_empty() {
            return Ok(None);
        }
        if present.len() != Self::KEYS.len() {
            bail!(
                "the recommended sampling is incomplete: the metadata has {} but not all of {}",
                present.join(", "),
                Self::KEYS.join(", ")
            );
        }
        let sampler = md[Self::KEYS[0]].clone();
        if !matches!(sampler.as_str(), "ddim" | "ddpm" | "dpm++") {
            bail!("{}: unknown sampler '{sampler}'", Self::KEYS[0]);
        }
        let steps: usize = md[Self::KEYS[1]].parse().with_context(|| format!("bad {}", Self::KEYS[1]))?;
        let guidance: f32 = md[Self::KEYS[2]].parse().with_context(|| format!("bad {}", Self::KEYS[2]))?;
        if steps == 0 || !(guidance.is_finite() && guidance >= 0.0) {
            bail!("the recommended sampling needs steps >= 1 and a guidance >= 0 (got {steps}, {guidance})");
        }
        Ok(Some(Self { sampler, steps, guidance }))
    }
}

/// What the model's metadata says about it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub betas: Vec<f64>,
    pub variance: VarianceType,
    pub image_size: usize,
    pub channels: usize,
    pub num_classes: usize,
    pub class_names: Vec<String>,
    pub null_class: Option<i64>,
    pub f16: bool,
    /// The sampler, steps and guidance the exporter recommends, if it wrote them.
    pub recommended: Option<Recommended>,
    pub metadata: BTreeMap<String, String>,
}

pub const REQUIRED_KEYS: [&str; 9] = [
    "diffusion.format_version",
    "diffusion.betas",
    "diffusion.prediction_type",
    "diffusion.variance_type",
    "diffusion.image_size",
    "diffusion.channels",
    "diffusion.num_classes",
    "diffusion.class_names",
    "diffusion.null_class",
];

impl ModelInfo {
    pub fn from_metadata(md: BTreeMap<String, String>, path: &Path) -> Result<Self> {
        let missing: Vec<&str> = REQUIRED_KEYS.iter().copied().filter(|k| !md.contains_key(*k)).collect();
        if !missing.is_empty() {
            bail!(
                "{} was not exported by `trainer export`: its metadata lacks {} (found keys: {})",
                path.display(),
                missing.join(", "),
                if md.is_empty() { "none".to_string() } else { md.keys().cloned().collect::<Vec<_>>().join(", ") }
            );
        }
        let get = |k: &str| md[&format!("diffusion.{k}")].clone();
        let num = |k: &str| -> Result<usize> {
            get(k).parse().with_context(|| format!("{}: bad diffusion.{k}", path.display()))
        };
        if get("prediction_type") != "epsilon" {
            bail!("{}: prediction type '{}' is not supported (epsilon only)", path.display(), get("prediction_type"));
        }
        let betas: Vec<f64> =
            serde_json::from_str(&get("betas")).with_context(|| format!("{}: bad diffusion.betas", path.display()))?;
        if betas.is_empty() || betas.iter().any(|b| !(*b > 0.0 && *b < 1.0)) {
            bail!("{}: diffusion.betas must be a non-empty list in (0, 1)", path.display());
        }
        let num_classes = num("num_classes")?;
        let class_names: Vec<String> = serde_json::from_str(&get("class_names")).unwrap_or_default();
        let null_class = match get("null_class").as_str() {
            "none" => None,
            s => Some(s.parse::<i64>().with_context(|| format!("{}: bad diffusion.null_class", path.display()))?),
        };
        Ok(Self {
            betas,
            variance: VarianceType::from_name(&get("variance_type")).map_err(anyhow::Error::msg)?,
            image_size: num("image_size")?,
            channels: num("channels")?,
            num_classes,
            class_names,
            null_class,
            f16: md.get("diffusion.dtype").is_some_and(|d| d == "float16"),
            recommended: Recommended::from_props(&md).with_context(|| path.display().to_string())?,
            metadata: md,
        })
    }

    pub fn schedule(&self) -> NoiseSchedule {
        NoiseSchedule::from_betas(self.betas.clone())
    }

    /// A class given as an index or a name.
    pub fn class_index(&self, s: &str) -> Result<i64> {
        crate::sampler::class_index(&self.class_names, self.num_classes, s)
    }
}

/// An exported U-Net in an ONNX Runtime session.
pub struct OrtDenoiser {
    pub session: Session,
    pub info: ModelInfo,
    pub provider: String,
}

fn build_session(path: &Path, provider: &Provider, threads: Option<usize>) -> Result<(Session, String)> {
    let (_, env) = environment()?;
    let mk = || -> Result<ort::session::builder::SessionBuilder> {
        let mut b = Session::builder(env).map_err(|e| anyhow!("{e}"))?;
        if let Some(n) = threads {
            b = b.with_intra_threads(n).map_err(|e| anyhow!("{e}"))?;
        }
        Ok(b)
    };
    let commit = |b: ort::session::builder::SessionBuilder| -> Result<Session> {
        let mut b = b;
        b.commit_from_file(path).map_err(|e| anyhow!("{}: ONNX Runtime cannot load this model: {e}", path.display()))
    };
    let try_ep = |ep: ort::ep::ExecutionProviderDispatch, name: &str| -> Result<Session> {
        let b = mk()?
            .with_execution_providers([ep.error_on_failure()])
            .map_err(|e| anyhow!("the {name} provider cannot be used: {e}"))?;
        commit(b)
    };
    match provider {
        Provider::Cpu => Ok((commit(mk()?)?, "cpu".into())),
        Provider::Cuda { device } => {
            Ok((try_ep(ort::ep::CUDA::default().with_device_id(*device).build(), "CUDA")?, "cuda".into()))
        }
        Provider::TensorRt { device, fp16, cache_dir } => {
            let mut trt = ort::ep::TensorRT::default().with_device_id(*device).with_fp16(*fp16);
            if let Some(d) = cache_dir {
                trt = trt.with_engine_cache(true).with_engine_cache_path(d.display());
            }
            Ok((try_ep(trt.build(), "TensorRT")?, "tensorrt".into()))
        }
        Provider::Auto => {
            for (p, name) in [
                (Provider::TensorRt { device: 0, fp16: false, cache_dir: None }, "tensorrt"),
                (Provider::Cuda { device: 0 }, "cuda"),
            ] {
                match build_session(path, &p, threads) {
                    Ok(s) => return Ok(s),
                    Err(e) => eprintln!("auto: {name} unavailable ({e:#}); trying the next provider"),
                }
            }
            Ok((commit(mk()?)?, "cpu".into()))
        }
    }
}

impl OrtDenoiser {
    pub fn open(path: &Path, provider: &Provider, threads: Option<usize>) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
        if bytes.is_empty() {
            bail!("{}: empty file, not an ONNX model", path.display());
        }
        let (session, provider) = build_session(path, provider, threads)?;
        let meta = session.metadata().map_err(|e| anyhow!("{}: cannot read metadata: {e}", path.display()))?;
        let mut md = BTreeMap::new();
        for k in meta.custom_keys().map_err(|e| anyhow!("{e}"))? {
            if let Some(v) = meta.custom(&k) {
                md.insert(k, v);
            }
        }
        drop(meta);
        let info = ModelInfo::from_metadata(md, path)?;
        let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        let want: Vec<&str> = if info.num_classes > 0 { vec!["x", "t", "y"] } else { vec!["x", "t"] };
        if names != want {
            bail!(
                "{}: inputs are {:?}, expected {:?} (x [B,C,H,W], t [B] int64{})",
                path.display(),
                names,
                want,
                if info.num_classes > 0 { ", y [B] int64" } else { "" }
            );
        }
        let outs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        if outs != ["eps"] {
            bail!("{}: outputs are {:?}, expected [\"eps\"]", path.display(), outs);
        }
        Ok(Self { session, info, provider })
    }
}

impl Denoiser for OrtDenoiser {
    fn eps(&mut self, x: &[f32], shape: [usize; 4], t: &[i64], y: Option<&[i64]>) -> Result<Vec<f32>> {
        let [n, c, h, w] = shape;
        if c != self.info.channels || h != self.info.image_size || w != self.info.image_size {
            bail!(
                "the model takes {}x{}x{} images, got {c}x{h}x{w}",
                self.info.channels,
                self.info.image_size,
                self.info.image_size
            );
        }
        let dims = vec![n as i64, c as i64, h as i64, w as i64];
        let tt = Tensor::from_array((vec![n as i64], t.to_vec())).map_err(|e| anyhow!("{e}"))?;
        let mut inputs: Vec<(std::borrow::Cow<str>, ort::session::SessionInputValue)> = vec![];
        if self.info.f16 {
            let xh: Vec<half::f16> = x.iter().map(|v| half::f16::from_f32(*v)).collect();
            inputs.push(("x".into(), Tensor::from_array((dims, xh)).map_err(|e| anyhow!("{e}"))?.into()));
        } else {
            inputs.push(("x".into(), Tensor::from_array((dims, x.to_vec())).map_err(|e| anyhow!("{e}"))?.into()));
        }
        inputs.push(("t".into(), tt.into()));
        if self.info.num_classes > 0 {
            let yv: Vec<i64> = match y {
                Some(y) => y.to_vec(),
                None => vec![self.info.null_class.unwrap_or(0); n],
            };
            inputs.push(("y".into(), Tensor::from_array((vec![n as i64], yv)).map_err(|e| anyhow!("{e}"))?.into()));
        }
        let out = self.session.run(inputs).map_err(|e| anyhow!("ONNX Runtime failed: {e}"))?;
        let v = &out["eps"];
        let eps = if self.info.f16 {
            let (_, d) = v.try_extract_tensor::<half::f16>().map_err(|e| anyhow!("{e}"))?;
            d.iter().map(|h| h.to_f32()).collect()
        } else {
            v.try_extract_tensor::<f32>().map_err(|e| anyhow!("{e}"))?.1.to_vec()
        };
        Ok(eps)
    }
}

#[cfg(test)]
mod recommended_tests {
    use super::*;

    #[test]
    fn recommended_sampling_round_trips_and_refuses_partial_or_bad_entries() {
        let r = Recommended { sampler: "dpm++".into(), steps: 20, guidance: 2.0 };
        let mut md: BTreeMap<String, String> = r.to_props().into_iter().collect();
        assert_eq!(Recommended::from_props(&md).unwrap(), Some(r));
        assert_eq!(Recommended::from_props(&BTreeMap::new()).unwrap(), None);
        md.insert("diffusion.recommended_sampler".into(), "euler".into());
        assert!(Recommended::from_props(&md).unwrap_err().to_string().contains("unknown sampler 'euler'"));
        md.insert("diffusion.recommended_sampler".into(), "ddim".into());
        md.insert("diffusion.recommended_steps".into(), "0".into());
        assert!(Recommended::from_props(&md).is_err());
        md.remove("diffusion.recommended_steps");
        assert!(Recommended::from_props(&md).unwrap_err().to_string().contains("incomplete"));
    }
}
