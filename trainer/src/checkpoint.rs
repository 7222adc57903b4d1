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
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;

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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RngState {
    pub algorithm: String,
    pub seed: u64,
    pub next_stream: u64,
}

pub struct Checkpoint {
    pub dir: PathBuf,
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
    std::fs::create_dir_all(&root)?;
    let name = step_dir_name(state.step);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    save_tensors(&tmp.join("model.safetensors"), model)?;
    save_tensors(&tmp.join("ema.safetensors"), ema)?;
    save_tensors(&tmp.join("optim.safetensors"), optim)?;
    write_atomic(&tmp.join("state.json"), serde_json::to_string_pretty(state)?.as_bytes())?;
    sync_dir(&tmp)?;
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
    Ok(Checkpoint { dir: dir.to_path_buf(), state, model, ema, optim })
}
