//! The training configuration: one TOML file (presets in trainer/configs/), every key checked.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::model::unet::UNetConfig;
pub use runtime::metadata::Prediction;
pub use runtime::schedule::{ScheduleKind, VarianceType};

/// The learning rate after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LrSchedule {
    /// Held at train.lr (DDPM).
    #[default]
    Constant,
    /// Half a cosine from train.lr down to 0 at train.steps (Loshchilov & Hutter 2017, SGDR without restarts).
    Cosine,
}

runtime::named_enum!(LrSchedule, "learning-rate schedule", { Constant => ["constant"], Cosine => ["cosine"] });

/// The per-pixel loss between the true and the predicted noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Loss {
    /// Mean squared error: L_simple (Ho et al. 2020, eq. 14).
    #[default]
    Mse,
    /// Mean absolute error.
    L1,
}

runtime::named_enum!(Loss, "loss", { Mse => ["mse"], L1 => ["l1"] });

/// How the timestep of each training image is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestepSampling {
    /// t ~ U{0..T-1} (Ho et al. 2020, Algorithm 1).
    #[default]
    Uniform,
    /// Importance sampling, p_t proportional to sqrt(E[L_t^2]) over the last 10 losses at each t, the loss
    /// weighted by 1 / (T p_t) (Nichol & Dhariwal 2021, sec. 3.3, eq. 18); uniform until every t has 10.
    Importance,
    /// EDM's training distribution of noise levels (Karras et al. 2022, Table 1: ln sigma ~ N(P_mean,
    /// P_std^2), train.p_mean and train.p_std), carried to the schedule's timesteps through sigma_t =
    /// sqrt((1 - alpha_bar_t) / alpha_bar_t): each t gets the normal's mass between the midpoints of ln sigma
    /// to its neighbours. No reweighting: the distribution is the point. With v-prediction and no Min-SNR this
    /// is EDM's loss (see `train.p_mean`).
    LogNormal,
}

runtime::named_enum!(TimestepSampling, "timestep sampling", {
    Uniform => ["uniform"],
    Importance => ["importance", "loss_second_moment"],
    LogNormal => ["lognormal", "edm"],
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Another config file this one starts from, relative to this file: its keys, with this file's laid over
    /// them (tables merged key by key, values and arrays replaced whole). Resolved when the file is read; a
    /// run's config.toml holds the merged result.
    #[serde(skip_serializing)]
    pub extends: Option<PathBuf>,
    pub model: UNetConfig,
    pub diffusion: DiffusionConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    /// Set by `trainer distill` on the student's run: what it is distilled from and for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

/// A student's distillation (`trainer distill`): progressive distillation (Salimans & Ho 2022) from a teacher
/// sampled by DDIM in `teacher_steps` down to `student_steps`, halving the steps train.steps / log2(teacher_steps /
/// student_steps) steps at a time, with the guidance weight w as the student's input (Meng et al. 2023).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// `progressive` (Salimans & Ho 2022) or `consistency` (Song et al. 2023, consistency distillation).
    pub method: String,
    /// The teacher as given: an exported .onnx file or a run folder.
    pub teacher: String,
    /// SHA-256 of the teacher's weight file, checked when a run resumes in its first stage.
    pub teacher_sha256: String,
    /// DDIM steps of the teacher (the first stage's two-step targets), a power of two times student_steps.
    pub teacher_steps: usize,
    /// Steps the student samples in.
    pub student_steps: usize,
    /// Guidance weights are drawn from U[0, guidance_max] per image.
    pub guidance_max: f32,
    /// The guidance weight the exported student recommends.
    pub guidance: f32,
    /// The teacher guides only at these timesteps [lo, hi] (its recommended interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<[usize; 2]>,
    /// Clip the teacher's x0 to [-1, 1] in its DDIM steps.
    pub clip_teacher_x0: bool,
}

impl DistillConfig {
    /// Consistency distillation (one stage, any number of sampling steps) rather than progressive.
    pub fn consistency(&self) -> bool {
        self.method == "consistency"
    }

    /// The number of stages: log2(teacher_steps / student_steps) halvings, or one for consistency distillation.
    pub fn stages(&self) -> usize {
        if self.consistency() {
            return 1;
        }
        (self.teacher_steps / self.student_steps).trailing_zeros() as usize
    }

    /// The stage (0-based) that trains step `step` (0-based) of `total`: stage s covers [total s / S, total (s+1) / S).
    pub fn stage_of(&self, step: usize, total: usize) -> usize {
        let n = self.stages();
        (0..n).rev().find(|&s| step >= self.stage_start(s, total)).unwrap_or(0)
    }

    /// The first step of stage `s`.
    pub fn stage_start(&self, s: usize, total: usize) -> usize {
        s * total / self.stages().max(1)
    }

    /// The steps the student of a checkpoint at `step` samples in: those of the stage that trained its last step.
    pub fn steps_at(&self, step: usize, total: usize) -> usize {
        if self.consistency() {
            return self.student_steps;
        }
        let s = self.stage_of(step.saturating_sub(1), total);
        self.teacher_steps >> (s + 1)
    }

    pub fn validate(&self) -> Result<()> {
        let (n, k) = (self.teacher_steps, self.student_steps);
        match self.method.as_str() {
            "progressive" if k == 0 || n <= k || n % k != 0 || !(n / k).is_power_of_two() => {
                bail!(
                    "distill: the teacher's steps ({n}) must be the student's ({k}) times a power of two (at least 2)"
                )
            }
            "consistency" if k == 0 || n < 2 || n % k != 0 => {
                bail!("distill: the teacher's steps ({n}, its grid) must be a multiple of the student's ({k}) and at least 2")
            }
            "progressive" | "consistency" => {}
            m => bail!("distill.method must be \"progressive\" or \"consistency\", got \"{m}\""),
        }
        if !(self.guidance_max.is_finite()
            && self.guidance_max >= 0.0
            && self.guidance >= 0.0
            && self.guidance <= self.guidance_max)
        {
            bail!(
                "distill: the recommended guidance {} must lie in [0, guidance_max = {}]",
                self.guidance,
                self.guidance_max
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// T, the number of diffusion steps.
    pub timesteps: usize,
    /// `linear` (Ho et al. 2020) or `cosine` (Nichol & Dhariwal 2021).
    pub schedule: ScheduleKind,
    /// Reverse-process variance: `fixed_small` (beta-tilde), `fixed_large` (beta), or `learned_range`: the
    /// U-Net outputs a second image v that interpolates the two (Nichol & Dhariwal 2021, eq. 15), trained
    /// with the hybrid loss (train.vlb_weight).
    pub variance: VarianceType,
    /// What the U-Net predicts: `epsilon` (Ho et al. 2020), or `v`, the velocity
    /// sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, sec. 4), which stays well conditioned
    /// where alpha_bar -> 0 (the cosine schedule's last steps), where eps-prediction magnifies small errors.
    pub prediction: Prediction,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            timesteps: 1000,
            schedule: ScheduleKind::Linear,
            variance: VarianceType::FixedSmall,
            prediction: Prediction::Epsilon,
        }
    }
}

/// The most diffusion steps a configuration may ask for (DDPM uses 1,000; the schedule is held in memory).
pub const MAX_TIMESTEPS: usize = 100_000;

impl DiffusionConfig {
    /// The named schedule with the papers' parameters for this T (the linear one scaled by 1000 / T).
    pub fn beta_schedule(&self) -> runtime::schedule::BetaSchedule {
        runtime::schedule::BetaSchedule::named(self.schedule, self.timesteps)
    }

    pub fn schedule(&self) -> Result<runtime::schedule::NoiseSchedule> {
        if !(2..=MAX_TIMESTEPS).contains(&self.timesteps) {
            bail!("diffusion.timesteps must be in 2..={MAX_TIMESTEPS}, got {}", self.timesteps);
        }
        Ok(runtime::schedule::NoiseSchedule::new(self.beta_schedule(), self.timesteps))
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
    pub lr_schedule: LrSchedule,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023, eq. 9 for eps-prediction: w_t = min(SNR_t, gamma) /
    /// SNR_t); 0 = off (Ho et al.'s unweighted L_simple). 5 is the paper's choice.
    pub min_snr_gamma: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Gradient-norm clipping threshold (DDPM: 1.0); 0 disables it.
    pub grad_clip: f64,
    /// A step whose loss or gradient norm is not finite is skipped (no update) and counted in metrics.csv;
    /// this many in a row stop the run.
    pub max_skipped_steps: usize,
    /// EMA decay of the weights (DDPM: 0.9999), warmed up as min(decay, (1 + n) / (10 + n)).
    pub ema_decay: f64,
    /// `mse` (Ho et al. 2020 eq. 14, L_simple) or `l1`.
    pub loss: Loss,
    /// lambda of the hybrid loss L_simple + lambda L_vlb (Nichol & Dhariwal 2021, eq. 16: 0.001) for a learned
    /// variance; L_vlb = T E_t[L_t] trains v alone (the mean is held fixed in it).
    pub vlb_weight: f64,
    /// `uniform`, `importance` (Nichol & Dhariwal 2021, sec. 3.3) or `lognormal` (Karras et al. 2022).
    pub timestep_sampling: TimestepSampling,
    /// Mean and standard deviation of ln sigma for `timestep_sampling = "lognormal"` (EDM: -1.2 and 1.2).
    /// v-prediction is EDM's preconditioning with sigma_data = 1: in x = x_t / sqrt(alpha_bar),
    /// c_in x = x_t, c_skip x = sqrt(alpha_bar) x_t and c_out = sqrt(1 - alpha_bar), so D = x_0 holds when
    /// F = -v (Salimans & Ho 2022, eq. for v; Karras et al. 2022, Table 1), and EDM's weight
    /// (sigma^2 + 1) / sigma^2 on ||D - x_0||^2 is the unweighted v loss (train.min_snr_gamma = 0).
    pub p_mean: f64,
    pub p_std: f64,
    /// Probability of replacing the label with the null class (Ho & Salimans 2022: 0.1-0.2).
    pub p_uncond: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// Read and ignored: runs made before logging went to every step's metrics.csv row wrote `log_every`.
    #[serde(rename = "log_every", skip_serializing)]
    pub legacy_log_every: Option<usize>,
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
            lr_schedule: LrSchedule::Constant,
            min_snr_gamma: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            max_skipped_steps: 10,
            ema_decay: 0.9999,
            loss: Loss::Mse,
            vlb_weight: 0.001,
            timestep_sampling: TimestepSampling::Uniform,
            p_mean: -1.2,
            p_std: 1.2,
            p_uncond: 0.1,
            seed: 0,
            checkpoint_every: 5000,
            keep_checkpoints: 3,
            legacy_log_every: None,
            preview_every: 0,
            preview_images: 16,
            preview_steps: 50,
        }
    }
}

impl Config {
    /// Reads a configuration from text that has no file of its own: an `extends` key is refused.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        Self::from_toml_str_at(text, origin, None)
    }

    /// Reads a configuration whose `extends` path is relative to `dir`.
    pub fn from_toml_str_at(text: &str, origin: &str, dir: Option<&Path>) -> Result<Self> {
        let table = layers(text, origin, dir, &mut Vec::new())?;
        let cfg: Config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            anyhow::anyhow!("{origin} with the files it extends: {}", e.message().trim())
        })?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg = Self::from_toml_str_at(&text, &path.display().to_string(), path.parent())?;
        // data paths in a config file are relative to the working directory, like every CLI path
        cfg.data.resolve_relative_to(&PathBuf::from("."));
        Ok(cfg)
    }

    /// The U-Net this configuration trains: [model], with the second output of a learned variance.
    pub fn unet(&self) -> UNetConfig {
        UNetConfig {
            learn_sigma: self.diffusion.variance.is_learned(),
            prediction: self.diffusion.prediction,
            ..self.model.clone()
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if let Some(d) = &self.distill {
            d.validate()?;
        } else if self.model.guidance_embed {
            bail!("model.guidance_embed is set by `trainer distill` (its students take the guidance weight as an input); `trainer fit` trains models without it");
        }
        self.diffusion.schedule()?;
        if self.diffusion.variance.is_learned() && self.train.vlb_weight == 0.0 {
            bail!("diffusion.variance = \"learned_range\" is trained by the L_vlb term alone: train.vlb_weight must be positive (0.001 in Nichol & Dhariwal 2021)");
        }
        // every numeric range (the flags that override a file, --lr, --batch-size, ..., included): RANGES
        let table = toml::Table::try_from(self).context("the configuration as TOML")?;
        check_ranges(&table, &|_| "the configuration".into())
    }
}

/// The range a numeric config value must lie in.
#[derive(Debug, Clone, Copy)]
enum Range {
    /// > 0 and finite.
    Positive,
    /// >= 0 and finite.
    NonNegative,
    /// In [0, 1).
    BelowOne,
    /// In [0, 1].
    Unit,
    /// An integer >= 1.
    AtLeastOne,
    /// In [lo, hi].
    Within(f64, f64),
}

impl Range {
    fn holds(self, v: f64) -> bool {
        match self {
            Range::Positive => v.is_finite() && v > 0.0,
            Range::NonNegative => v.is_finite() && v >= 0.0,
            Range::BelowOne => (0.0..1.0).contains(&v),
            Range::Unit => (0.0..=1.0).contains(&v),
            Range::AtLeastOne => v >= 1.0,
            Range::Within(lo, hi) => (lo..=hi).contains(&v),
        }
    }

    fn describe(self) -> String {
        match self {
            Range::Positive => "a finite number > 0".into(),
            Range::NonNegative => "a finite number >= 0".into(),
            Range::BelowOne => "a number in [0, 1)".into(),
            Range::Unit => "a number in [0, 1]".into(),
            Range::AtLeastOne => "at least 1".into(),
            Range::Within(lo, hi) => format!("a number in [{lo}, {hi}]"),
        }
    }
}

/// Every numeric key of a config with a range narrower than its type's, checked as each file is read (naming
/// the file and line) and again on the whole configuration with the flags applied. Counts where 0 means "off"
/// or "all" (keep_checkpoints, preview_images, preview_steps, warmup_steps, data.limit) are not listed.
const RANGES: &[(&str, Range)] = &[
    ("model.channels", Range::Within(1.0, 3.0)),
    ("model.image_size", Range::AtLeastOne),
    ("model.ch", Range::AtLeastOne),
    ("model.num_res_blocks", Range::AtLeastOne),
    ("model.num_heads", Range::AtLeastOne),
    ("model.dropout", Range::BelowOne),
    ("model.norm_groups", Range::AtLeastOne),
    ("model.kernel_size", Range::Within(3.0, 7.0)),
    ("model.embed_dim", Range::AtLeastOne),
    ("diffusion.timesteps", Range::Within(2.0, MAX_TIMESTEPS as f64)),
    ("data.augment.rotate_degrees", Range::Within(0.0, 180.0)),
    ("data.augment.brightness", Range::Unit),
    ("data.augment.contrast", Range::Unit),
    ("data.augment.saturation", Range::Unit),
    ("data.augment.crop_min_scale", Range::Unit),
    ("data.shifted.canvas", Range::AtLeastOne),
    ("data.shifted.unlabelled", Range::Unit),
    ("train.steps", Range::AtLeastOne),
    ("train.batch_size", Range::AtLeastOne),
    ("train.lr", Range::Positive),
    ("train.min_snr_gamma", Range::NonNegative),
    ("train.weight_decay", Range::NonNegative),
    ("train.adam_beta1", Range::BelowOne),
    ("train.adam_beta2", Range::BelowOne),
    ("train.adam_eps", Range::Positive),
    ("train.grad_clip", Range::NonNegative),
    ("train.max_skipped_steps", Range::AtLeastOne),
    ("train.ema_decay", Range::BelowOne),
    ("train.vlb_weight", Range::NonNegative),
    ("train.p_uncond", Range::BelowOne),
    // ln sigma's mean of EDM's log-normal timesteps: sigma from 4.5e-5 to 22,026 covers every schedule
    ("train.p_mean", Range::Within(-10.0, 10.0)),
    ("train.p_std", Range::Positive),
    ("train.checkpoint_every", Range::AtLeastOne),
];

/// Checks every numeric value of `table` present in [`RANGES`]; `place` says where a dotted key was written.
fn check_ranges(table: &toml::Table, place: &dyn Fn(&str) -> String) -> Result<()> {
    for (key, range) in RANGES {
        let mut path = key.split('.');
        let root = path.next().and_then(|k| table.get(k));
        let value = path.fold(root, |v, k| v.and_then(|v| v.get(k)));
        let v = match value {
            Some(toml::Value::Float(f)) => *f,
            Some(toml::Value::Integer(i)) => *i as f64,
            _ => continue,
        };
        if !range.holds(v) {
            let shown = value.map(|v| v.to_string()).unwrap_or_default();
            bail!("{}: {key} = {shown} must be {}", place(key), range.describe());
        }
    }
    Ok(())
}

/// The line (1-based) of a dotted key in a config file's text: `key = ` under its `[table]` header.
fn key_line(text: &str, dotted: &str) -> Option<usize> {
    let (table, key) = dotted.rsplit_once('.')?;
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = h.trim().to_string();
        } else if let Some((k, _)) = l.split_once('=') {
            let k = k.trim();
            if (current == table && k == key) || (current.is_empty() && k == dotted) {
                return Some(i + 1);
            }
        }
    }
    None
}

/// One config file as a TOML table with the files it `extends` merged under it. Each file is read as a whole
/// config first, so an unknown key or a wrong type is reported with that file's name and line.
fn layers(text: &str, origin: &str, dir: Option<&Path>, chain: &mut Vec<PathBuf>) -> Result<toml::Table> {
    let own: Config = toml::from_str(text)
        .map_err(|e| anyhow::anyhow!("{origin}: {}", e.message().trim()).context(describe_toml_error(&e, text)))?;
    let mut table: toml::Table = text.parse().with_context(|| format!("{origin}: not a TOML table"))?;
    check_ranges(&table, &|key| key_line(text, key).map(|l| format!("{origin}, line {l}")).unwrap_or(origin.into()))?;
    let Some(base) = own.extends else { return Ok(table) };
    table.remove("extends");
    let Some(dir) = dir else { bail!("{origin}: `extends` needs a config file to be relative to") };
    let path = dir.join(&base);
    let canonical =
        path.canonicalize().with_context(|| format!("{origin}: extends {}: no such file", path.display()))?;
    if chain.contains(&canonical) {
        bail!("{origin}: extends {}, which extends it back (a cycle)", path.display());
    }
    chain.push(canonical);
    let base_text = std::fs::read_to_string(&path)
        .with_context(|| format!("{origin}: extends {}: cannot read it", path.display()))?;
    let mut merged = layers(&base_text, &path.display().to_string(), path.parent(), chain)?;
    merge_into(&mut merged, table);
    Ok(merged)
}

/// Lays `top` over `base`: tables merge key by key, every other value replaces the base's.
fn merge_into(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge_into(b, t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let line = text.as_bytes()[..span.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1;
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
    fn names_are_typed_where_the_file_is_read() {
        let cfg = Config::from_toml_str("[train]\nloss = \"l1\"\nlr_schedule = \"cosine\"\n", "x.toml").unwrap();
        assert_eq!((cfg.train.loss, cfg.train.lr_schedule), (Loss::L1, LrSchedule::Cosine));
        for (text, what) in [
            ("[train]\nloss = \"huber\"\n", "unknown loss 'huber' (expected one of: mse, l1)"),
            ("[train]\nlr_schedule = \"step\"\n", "unknown learning-rate schedule 'step'"),
            ("[diffusion]\nschedule = \"sigmoid\"\n", "unknown beta schedule 'sigmoid'"),
            ("[diffusion]\nvariance = \"trainable\"\n", "unknown variance type 'trainable'"),
            ("[train]\ntimestep_sampling = \"stratified\"\n", "unknown timestep sampling 'stratified'"),
        ] {
            let msg = format!("{:#}", Config::from_toml_str(text, "x.toml").unwrap_err());
            assert!(msg.contains(what) && msg.contains("x.toml"), "{msg}");
        }
        // the same check holds for a configuration read back as JSON (a checkpoint's state.json)
        let mut json = serde_json::to_value(Config::default()).unwrap();
        json["train"]["loss"] = "huber".into();
        let e = serde_json::from_value::<Config>(json).unwrap_err().to_string();
        assert!(e.contains("unknown loss 'huber'"), "{e}");
    }

    #[test]
    fn numeric_values_out_of_range_are_refused_with_their_file_and_line() {
        let base = "[model]\nch = 32\n\n[train]\nsteps = 10\n";
        for (line, bad, needle) in [
            ("lr = nan", "train.lr = nan", "must be a finite number > 0"),
            ("lr = -1e-3", "train.lr = -0.001", "must be a finite number > 0"),
            ("ema_decay = nan", "train.ema_decay = nan", "must be a number in [0, 1)"),
            ("adam_beta2 = 1.0", "train.adam_beta2 = 1.0", "must be a number in [0, 1)"),
            ("batch_size = 0", "train.batch_size = 0", "must be at least 1"),
            ("grad_clip = inf", "train.grad_clip = inf", "must be a finite number >= 0"),
            ("p_mean = nan", "train.p_mean = nan", "must be a number in [-10, 10]"),
        ] {
            let text = format!("{base}{line}\n");
            let e = format!("{:#}", Config::from_toml_str(&text, "x.toml").unwrap_err());
            assert!(e.contains(&format!("x.toml, line 6: {bad} {needle}")), "{line}: {e}");
        }
        let e = format!("{:#}", Config::from_toml_str("[data.augment]\nbrightness = 2.5\n", "y.toml").unwrap_err());
        assert!(e.contains("y.toml, line 2: data.augment.brightness = 2.5 must be a number in [0, 1]"), "{e}");
        let e = format!("{:#}", Config::from_toml_str("[model]\ndropout = -0.1\n", "z.toml").unwrap_err());
        assert!(e.contains("z.toml, line 2: model.dropout"), "{e}");
        // a flag (set after the file was read) meets the same range in validate()
        let mut cfg = Config::from_toml_str(base, "x.toml").unwrap();
        cfg.train.lr = f64::NAN;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("train.lr = nan must be a finite number > 0"), "{e}");
    }

    #[test]
    fn extends_lays_a_file_over_its_base() {
        let dir = std::env::temp_dir().join(format!("config-extends-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write(
            "base.toml",
            "[model]\nch = 48\nch_mult = [1, 2, 2]\n[diffusion]\nschedule = \"cosine\"\n[train]\nsteps = 100\nlr = 0.5\n",
        );
        // a chain of two, the middle file in another folder: each path is relative to the file that names it
        write("sub/mid.toml", "extends = \"../base.toml\"\n[model]\nch_mult = [1, 2]\n[train]\nsteps = 200\n");
        write("top.toml", "extends = \"sub/mid.toml\"\n[train]\nbatch_size = 7\n");
        let cfg = Config::load(&dir.join("top.toml")).unwrap();
        // tables merge key by key, arrays are replaced whole, the nearest file wins
        assert_eq!((cfg.model.ch, cfg.model.ch_mult.clone()), (48, vec![1, 2]));
        assert_eq!((cfg.train.steps, cfg.train.batch_size, cfg.train.lr), (200, 7, 0.5));
        assert_eq!(cfg.diffusion.schedule, ScheduleKind::Cosine);
        assert_eq!(cfg.extends, None);
        // what a run saves is the merged configuration, readable without its bases
        let saved = toml::to_string_pretty(&cfg).unwrap();
        assert!(!saved.contains("extends"), "{saved}");
        assert_eq!(Config::from_toml_str(&saved, "saved").unwrap(), cfg);

        // errors name the file they are in, with its line
        write("typo.toml", "extends = \"base.toml\"\n\n[train]\nstepz = 3\n");
        let msg = format!("{:#}", Config::load(&dir.join("typo.toml")).unwrap_err());
        assert!(msg.contains("typo.toml") && msg.contains("stepz") && msg.contains("line 4"), "{msg}");
        write("bad-base.toml", "extends = \"typo.toml\"\n");
        let msg = format!("{:#}", Config::load(&dir.join("bad-base.toml")).unwrap_err());
        assert!(msg.contains("typo.toml") && msg.contains("stepz"), "{msg}");
        write("orphan.toml", "extends = \"nowhere.toml\"\n");
        let msg = format!("{:#}", Config::load(&dir.join("orphan.toml")).unwrap_err());
        assert!(msg.contains("orphan.toml") && msg.contains("nowhere.toml"), "{msg}");
        write("a.toml", "extends = \"b.toml\"\n");
        write("b.toml", "extends = \"a.toml\"\n");
        let msg = format!("{:#}", Config::load(&dir.join("a.toml")).unwrap_err());
        assert!(msg.contains("cycle"), "{msg}");
        // text without a file of its own has nothing to be relative to
        let msg = format!("{:#}", Config::from_toml_str("extends = \"base.toml\"\n", "x.toml").unwrap_err());
        assert!(msg.contains("x.toml") && msg.contains("extends"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
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

    /// Mutation fuzzing of the config reader (smoke run): byte flips, truncations and hostile values in every
    /// preset never panic, in parsing or in validation.
    #[test]
    fn config_fuzz_mutated_presets_are_read_or_refused_never_panic() {
        use rand::{Rng, SeedableRng};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let presets: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        let hostile =
            ["-1", "0", "1e308", "nan", "inf", "18446744073709551616", "4000000000", "\"\"", "[]", "true", "{}"];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (mut ok, mut refused, mut largest) = (0, 0, 0);
        for _ in 0..2000 {
            let mut text = presets[rng.gen_range(0..presets.len())].clone().into_bytes();
            match rng.gen_range(0..3) {
                0 => {
                    let i = rng.gen_range(0..text.len());
                    text[i] = rng.gen_range(0x20..0x7f);
                }
                1 => text.truncate(rng.gen_range(0..text.len())),
                _ => {
                    // a value replaced: after some '= ', up to the end of its line
                    let s = String::from_utf8(text.clone()).unwrap();
                    let eqs: Vec<usize> = s.match_indices("= ").map(|(i, _)| i + 2).collect();
                    if let Some(&at) = eqs.get(rng.gen_range(0..eqs.len().max(1))) {
                        let end = s[at..].find('\n').map_or(s.len(), |e| at + e);
                        text = format!("{}{}{}", &s[..at], hostile[rng.gen_range(0..hostile.len())], &s[end..])
                            .into_bytes();
                    }
                }
            }
            let Ok(text) = String::from_utf8(text) else { continue };
            let (res, bytes) = runtime::fuzz::largest_allocation(|| {
                Config::from_toml_str_at(&text, "fuzz.toml", Some(&dir)).and_then(|c| c.validate().map(|_| c))
            });
            largest = largest.max(bytes);
            match res {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(ok > 0 && refused > 0, "{ok} accepted, {refused} refused");
        runtime::fuzz::report("config", ok, refused, largest);
        assert!(largest < 1 << 20, "{largest} bytes for a config of a few KiB");
    }
}
