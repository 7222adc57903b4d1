//! Checkpoints: `RUN/checkpoints/step-NNNNNNNN/{model,ema,optim}.safetensors` + `state.json`.
//!
//! Each checkpoint is written into a temporary folder, every file synced, then renamed into place in one
//! atomic step; `RUN/checkpoints/LATEST` is replaced the same way. A process killed at any moment
//! therefore leaves the previous complete checkpoint untouched and loadable.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use runtime::metadata::Weights;
use serde::{Deserialize, Serialize};

use crate::model::params::TensorSource;
use crate::model::unet::UNet;
use crate::train::config::Config;

pub const FORMAT_VERSION: u32 = 1;

/// `state.json`: everything besides the tensors needed to continue or describe a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub format_version: u32,
    pub trainer_version: String,
    pub step: usize,
    pub config: Config,
    /// How every random number of step s is drawn: ChaCha8 seeded with `seed`, stream s. No other
    /// RNG state exists, so a resumed run draws exactly what the uninterrupted run would have.
    pub rng: RngState,
    pub data_fingerprint: String,
    pub data_description: String,
    pub class_names: Vec<String>,
    pub num_params: usize,
    /// Mean training loss over the last logged window.
    pub recent_loss: f64,
    /// Training wall time so far, seconds.
    pub elapsed_s: f64,
    pub device: String,
    /// The importance sampler's recent losses per timestep (train.timestep_sampling = "importance"), which
    /// set the next steps' timesteps as much as the RNG does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_history: Option<Vec<std::collections::VecDeque<f64>>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RngState {
    pub algorithm: String,
    pub seed: u64,
    pub next_stream: u64,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    /// Newer checkpoints that could not be read and were passed over (`load_which` with `latest`), with why.
    pub passed_over: Vec<String>,
    pub state: State,
    pub model: HashMap<String, Tensor>,
    pub ema: HashMap<String, Tensor>,
    pub optim: HashMap<String, Tensor>,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// The folder of the checkpoint of step `step`.
pub fn step_dir(run: &Path, step: usize) -> PathBuf {
    checkpoints_dir(run).join(step_dir_name(step))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    {
        let mut f = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
    sync_dir(dir)
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path).with_context(|| format!("cannot write {}", path.display()))?;
    File::open(path)?.sync_all()?;
    Ok(())
}

/// Saves a checkpoint atomically and prunes old ones, keeping the newest `keep`.
pub fn save(
    run: &Path,
    state: &State,
    model: &HashMap<String, Tensor>,
    ema: &HashMap<String, Tensor>,
    optim: &HashMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> Result<()> {
        std::fs::create_dir_all(&root)?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        save_tensors(&tmp.join("model.safetensors"), model)?;
        save_tensors(&tmp.join("ema.safetensors"), ema)?;
        save_tensors(&tmp.join("optim.safetensors"), optim)?;
        write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
        sync_dir(&tmp)
    };
    if let Err(e) = write() {
        // a full or unwritable disk: give back what the partial copy took; the newest complete checkpoint is
        // untouched (nothing of it was renamed or removed yet)
        let _ = std::fs::remove_dir_all(&tmp);
        let kept = list(run).ok().and_then(|v| v.last().map(|(s, _)| format!("step {s}")));
        return Err(e.context(format!(
            "cannot write the step-{} checkpoint into {} (the newest complete checkpoint, {}, is kept)",
            state.step,
            root.display(),
            kept.as_deref().unwrap_or("none yet")
        )));
    }
    let dst = root.join(&name);
    if dst.exists() {
        // re-saving the same step (e.g. a resumed run that stopped at once): the old copy goes only after
        // the new one is complete
        let old = root.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(&dst, &old)?;
        std::fs::rename(&tmp, &dst)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &dst)?;
    }
    sync_dir(&root)?;
    write_atomic(&root.join("LATEST"), name.as_bytes())?;
    prune(&root, keep)?;
    Ok(dst)
}

/// Complete checkpoints (those with a state.json), oldest first.
pub fn list(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = checkpoints_dir(run);
    let mut v = vec![];
    if !root.is_dir() {
        return Ok(v);
    }
    for e in std::fs::read_dir(&root)? {
        let p = e?.path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            if p.join("state.json").is_file() {
                v.push((n, p));
            }
        }
    }
    v.sort();
    Ok(v)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let run = root.parent().unwrap();
    let all = list(run)?;
    if keep > 0 && all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p)?;
        }
    }
    // leftovers of an interrupted save
    for e in std::fs::read_dir(root)? {
        let p = e?.path();
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        if n.starts_with('.') && (n.contains(".tmp-") || n.contains(".old-")) && p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        }
    }
    Ok(())
}

/// The checkpoint folder for `which` = `latest` or a step number.
pub fn resolve(run: &Path, which: &str) -> Result<PathBuf> {
    let all = list(run)?;
    if all.is_empty() {
        if !run.is_dir() {
            bail!("run folder {} does not exist", run.display());
        }
        bail!(
            "run {} has no checkpoint yet (checkpoints are written every train.checkpoint_every steps and at the end)",
            run.display()
        );
    }
    if which == "latest" {
        let root = checkpoints_dir(run);
        if let Ok(name) = std::fs::read_to_string(root.join("LATEST")) {
            let p = root.join(name.trim());
            if p.join("state.json").is_file() {
                return Ok(p);
            }
        }
        return Ok(all.last().unwrap().1.clone());
    }
    let step: usize =
        which.parse().with_context(|| format!("checkpoint must be 'latest' or a step number, got '{which}'"))?;
    all.iter().find(|(s, _)| *s == step).map(|(_, p)| p.clone()).with_context(|| {
        format!(
            "run {} has no checkpoint at step {step}; it has steps {:?}",
            run.display(),
            all.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        )
    })
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).with_context(|| format!("cannot read {}", path.display()))
}

pub fn load_state(dir: &Path) -> Result<State> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let state: State =
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid checkpoint state", p.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} is not supported (this trainer reads {FORMAT_VERSION})",
            p.display(),
            state.format_version
        );
    }
    Ok(state)
}

pub fn load(dir: &Path, device: &Device, with_optim: bool) -> Result<Checkpoint> {
    let state = load_state(dir)?;
    let model = load_tensors(&dir.join("model.safetensors"), device)?;
    let ema = load_tensors(&dir.join("ema.safetensors"), device)?;
    let optim = if with_optim { load_tensors(&dir.join("optim.safetensors"), device)? } else { HashMap::new() };
    Ok(Checkpoint { dir: dir.to_path_buf(), passed_over: vec![], state, model, ema, optim })
}

/// Loads the checkpoint `which` names (`latest` or a step). For `latest`, a newest checkpoint that cannot be
/// read (a truncated tensor file, a broken state.json) is passed over for the one before it, and the reason
/// is kept in [`Checkpoint::passed_over`] for the caller to warn about; a named step must load itself.
pub fn load_which(run: &Path, which: &str, device: &Device, with_optim: bool) -> Result<Checkpoint> {
    let first = resolve(run, which)?;
    if which != "latest" {
        return load(&first, device, with_optim);
    }
    let mut order = vec![first.clone()];
    order.extend(list(run)?.into_iter().rev().map(|(_, p)| p).filter(|p| *p != first));
    let mut passed_over = vec![];
    for dir in &order {
        match load(dir, device, with_optim) {
            Ok(mut ck) => {
                ck.passed_over = passed_over;
                return Ok(ck);
            }
            Err(e) => passed_over.push(format!("{}: {e:#}", dir.display())),
        }
    }
    bail!("no checkpoint of {} can be read: {}", run.display(), passed_over.join("; "))
}

/// A checkpoint's model, its state, and the newer checkpoints passed over because they could not be read.
pub struct LoadedUnet {
    pub unet: UNet,
    pub state: State,
    pub passed_over: Vec<String>,
}

/// Loads a checkpoint's model (EMA or raw weights) onto `device` ([`load_which`]).
pub fn load_unet(run: &Path, which: &str, weights: Weights, device: &Device) -> Result<LoadedUnet> {
    let ck = load_which(run, which, device, false)?;
    let dir = &ck.dir;
    let (tensors, file) = match weights {
        Weights::Ema => (&ck.ema, "ema.safetensors"),
        Weights::Raw => (&ck.model, "model.safetensors"),
    };
    let unet = unet_from(&ck.state, tensors, format!("{}/{file}", dir.display()))?;
    Ok(LoadedUnet { unet, state: ck.state, passed_over: ck.passed_over })
}

/// The U-Net of `state`'s config with `tensors` as its weights (as f32; every tensor used, none missing);
/// `origin` names them in errors.
pub fn unet_from(state: &State, tensors: &HashMap<String, Tensor>, origin: String) -> Result<UNet> {
    let mut src = TensorSource::new(tensors, origin).with_dtype(DType::F32);
    let unet = UNet::new(state.config.unet(), &mut src)?;
    src.finish()?;
    Ok(unet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> State {
        State {
            format_version: FORMAT_VERSION,
            trainer_version: "test".into(),
            step,
            config: Config::default(),
            rng: RngState { algorithm: "chacha8".into(), seed: 1, next_stream: step as u64 },
            data_fingerprint: "fp".into(),
            data_description: "toy".into(),
            class_names: vec![],
            num_params: 2,
            recent_loss: 0.5,
            elapsed_s: step as f64,
            device: "cpu".into(),
            timestep_history: None,
        }
    }

    fn tensors(v: f32) -> HashMap<String, Tensor> {
        [("w".to_string(), Tensor::new(&[v, -v], &Device::Cpu).unwrap())].into_iter().collect()
    }

    #[test]
    fn save_resolve_prune_and_the_latest_fallback() {
        let run = std::env::temp_dir().join(format!("ck-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        assert!(resolve(&run, "latest").unwrap_err().to_string().contains("has no checkpoint yet"));
        for step in [10, 20, 30] {
            save(&run, &state(step), &tensors(step as f32), &tensors(1.0), &tensors(2.0), 2).unwrap();
        }
        // the newest two are kept; LATEST names the last
        let steps: Vec<usize> = list(&run).unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, vec![20, 30]);
        let latest = resolve(&run, "latest").unwrap();
        let ck = load(&latest, &Device::Cpu, true).unwrap();
        assert_eq!((ck.state.step, ck.state.rng.next_stream), (30, 30));
        assert_eq!(ck.model["w"].to_vec1::<f32>().unwrap(), vec![30.0, -30.0]);
        assert_eq!(ck.optim["w"].to_vec1::<f32>().unwrap(), vec![2.0, -2.0]);
        assert_eq!(resolve(&run, "20").unwrap(), checkpoints_dir(&run).join(step_dir_name(20)));
        let e = resolve(&run, "10").unwrap_err().to_string();
        assert!(e.contains("no checkpoint at step 10") && e.contains("[20, 30]"), "{e}");
        assert!(resolve(&run, "newest").unwrap_err().to_string().contains("'latest' or a step number"));
        // LATEST naming a checkpoint that is gone (or garbage): the newest complete one is used
        std::fs::write(checkpoints_dir(&run).join("LATEST"), "step-00000099").unwrap();
        assert_eq!(resolve(&run, "latest").unwrap(), latest);
        // an interrupted save (a temporary folder, no state.json) is not a checkpoint and is cleaned up
        let tmp = checkpoints_dir(&run).join(".step-00000040.tmp-1");
        std::fs::create_dir_all(&tmp).unwrap();
        assert_eq!(list(&run).unwrap().len(), 2);
        save(&run, &state(40), &tensors(4.0), &tensors(1.0), &tensors(2.0), 2).unwrap();
        assert!(!tmp.exists());
        assert_eq!(resolve(&run, "latest").unwrap(), checkpoints_dir(&run).join(step_dir_name(40)));
        // a state.json of another format version is refused with both versions named
        let mut s = state(40);
        s.format_version = 9;
        write_atomic(
            &checkpoints_dir(&run).join(step_dir_name(40)).join("state.json"),
            &serde_json::to_vec(&s).unwrap(),
        )
        .unwrap();
        let e = load(&resolve(&run, "latest").unwrap(), &Device::Cpu, false).err().unwrap().to_string();
        assert!(e.contains("checkpoint format 9") && e.contains(&format!("reads {FORMAT_VERSION}")), "{e}");
        // ... so `latest` passes over it to the one before, and says why; a named step must load itself
        let ck = load_which(&run, "latest", &Device::Cpu, true).unwrap();
        assert_eq!(ck.state.step, 30);
        assert!(ck.passed_over.len() == 1 && ck.passed_over[0].contains("checkpoint format 9"), "{:?}", ck.passed_over);
        assert!(load_which(&run, "40", &Device::Cpu, false).is_err());
        // a truncated tensor file too; with nothing readable left the error names every reason
        let ema = checkpoints_dir(&run).join(step_dir_name(30)).join("ema.safetensors");
        let bytes = std::fs::read(&ema).unwrap();
        std::fs::write(&ema, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_which(&run, "latest", &Device::Cpu, false).err().unwrap().to_string();
        assert!(e.contains("no checkpoint") && e.contains("format 9") && e.contains("ema.safetensors"), "{e}");
        std::fs::remove_dir_all(&run).unwrap();
    }
}
