//! The training configuration: one TOML file (presets in trainer/configs/), every key checked.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::unet::UNetConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: UNetConfig,
    pub diffusion: DiffusionConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// T, the number of diffusion steps.
    pub timesteps: usize,
    /// `linear` (Ho et al. 2020) or `cosine` (Nichol & Dhariwal 2021).
    pub schedule: String,
    /// Reverse-process variance for DDPM sampling: `fixed_small` (beta-tilde) or `fixed_large` (beta).
    pub variance: String,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self { timesteps: 1000, schedule: "linear".into(), variance: "fixed_small".into() }
    }
}

impl DiffusionConfig {
    pub fn schedule(&self) -> Result<runtime::schedule::NoiseSchedule> {
        let kind = runtime::schedule::BetaSchedule::from_name(&self.schedule).map_err(anyhow::Error::msg)?;
        if self.timesteps < 2 {
            bail!("diffusion.timesteps must be at least 2, got {}", self.timesteps);
        }
        Ok(runtime::schedule::NoiseSchedule::new(kind, self.timesteps))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate (DDPM: 2e-4).
    pub lr: f64,
    /// Linear warm-up steps (DDPM: 5000).
    pub warmup_steps: usize,
    /// After the warm-up: `constant` (DDPM) or `cosine` (half a cosine from lr down to 0 at train.steps;
    /// Loshchilov & Hutter 2017, SGDR without restarts), which suits short runs.
    pub lr_schedule: String,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023, eq. 9 for eps-prediction: w_t = min(SNR_t, gamma) /
    /// SNR_t); 0 = off (Ho et al.'s unweighted L_simple). 5 is the paper's choice.
    pub min_snr_gamma: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Gradient-norm clipping threshold (DDPM: 1.0); 0 disables it.
    pub grad_clip: f64,
    /// EMA decay of the weights (DDPM: 0.9999), warmed up as min(decay, (1 + n) / (10 + n)).
    pub ema_decay: f64,
    /// `mse` (Ho et al. 2020 eq. 14, L_simple) or `l1`.
    pub loss: String,
    /// Probability of replacing the label with the null class (Ho & Salimans 2022: 0.1-0.2).
    pub p_uncond: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    pub log_every: usize,
    /// Sample-grid previews from the EMA weights every this many steps (0: only at the end).
    pub preview_every: usize,
    /// Images in a preview grid, and DDIM steps used for it.
    pub preview_images: usize,
    pub preview_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 800_000,
            batch_size: 128,
            lr: 2e-4,
            warmup_steps: 5000,
            lr_schedule: "constant".into(),
            min_snr_gamma: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            ema_decay: 0.9999,
            loss: "mse".into(),
            p_uncond: 0.1,
            seed: 0,
            checkpoint_every: 5000,
            keep_checkpoints: 3,
            log_every: 10,
            preview_every: 0,
            preview_images: 16,
            preview_steps: 50,
        }
    }
}

impl Config {
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{origin}: {}", e.message().trim()).context(describe_toml_error(&e, text)))?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg = Self::from_toml_str(&text, &path.display().to_string())?;
        // data paths in a config file are relative to the working directory, like every CLI path
        cfg.data.resolve_relative_to(&PathBuf::from("."));
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.diffusion.schedule()?;
        runtime::schedule::VarianceType::from_name(&self.diffusion.variance).map_err(anyhow::Error::msg)?;
        let t = &self.train;
        if t.batch_size == 0 || t.steps == 0 {
            bail!("train.steps and train.batch_size must be positive");
        }
        if !matches!(t.lr_schedule.as_str(), "constant" | "cosine") {
            bail!("train.lr_schedule must be 'constant' or 'cosine', got '{}'", t.lr_schedule);
        }
        if !(t.min_snr_gamma >= 0.0 && t.min_snr_gamma.is_finite()) {
            bail!("train.min_snr_gamma must be 0 (off) or positive, got {}", t.min_snr_gamma);
        }
        if !matches!(t.loss.as_str(), "mse" | "l1") {
            bail!("train.loss must be 'mse' or 'l1', got '{}'", t.loss);
        }
        if !(0.0..1.0).contains(&t.p_uncond) {
            bail!("train.p_uncond must lie in [0, 1), got {}", t.p_uncond);
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            bail!("train.ema_decay must lie in [0, 1), got {}", t.ema_decay);
        }
        if t.checkpoint_every == 0 || t.log_every == 0 {
            bail!("train.checkpoint_every and train.log_every must be positive");
        }
        Ok(())
    }
}

fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].lines().count().max(1);
            format!("at line {line}")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml_str("[train]\nstepz = 3\n", "x.toml").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("stepz"), "{msg}");
        assert!(msg.contains("x.toml"), "{msg}");
        let err = Config::from_toml_str("[modle]\nch = 3\n", "x.toml").unwrap_err();
        assert!(format!("{err:#}").contains("modle"));
    }

    #[test]
    fn presets_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                let cfg = Config::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                cfg.validate().unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 5, "expected the five presets, found {n}");
    }
}
