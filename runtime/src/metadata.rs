//! The self-describing metadata of an exported model: one schema, written by `trainer export` into the ONNX
//! file's `metadata_props` and read back by the runtime, `trainer eval` and the model card.
//!
//! Every key is prefixed `diffusion.`. Format 1, as the table [`KEYS`] says (a test checks that this table is
//! that one); format 2 ([`FORMAT_VERSION`]) adds the keys of a few-step student (`student`, `guidance_input`),
//! and is written only by files that carry them, so every other file stays format 1 and loads in older runtimes:
//!
//! | key | value | required |
//! |---|---|---|
//! | `format_version` | `1`, or `2` with the student keys | yes |
//! | `betas` | JSON list of the T betas (authoritative for sampling) | yes |
//! | `prediction_type` | `epsilon`, or `v` (the first output is the velocity of Salimans & Ho 2022) | yes |
//! | `variance_type` | `fixed_small`, `fixed_large` or `learned_range` (the model has a second output, `v`) | yes |
//! | `image_size` | square side in pixels | yes |
//! | `channels` | 1 (grey) or 3 (RGB) | yes |
//! | `num_classes` | 0 for an unconditional model | yes |
//! | `class_names` | JSON list: empty, or one name per class | yes |
//! | `null_class` | the "no class" label for guidance, or `none` | yes |
//! | `dtype` | `float32` or `float16` (the type of x and eps) | yes |
//! | `attributes` | JSON list of the labels beside the class, `[{"name": .., "values": [..]}]`: y is then [B, 1 + A] | no |
//! | `schedule` | JSON of the `BetaSchedule` that made the betas | no |
//! | `num_timesteps` | T; must equal the length of `betas` | no |
//! | `pixel_range` | how to map x to 8-bit pixels (documentation) | no |
//! | `weights` | `ema` or `raw`: which weights of the checkpoint | no |
//! | `training_steps` | the checkpoint's step | no |
//! | `ema_decay` | the EMA decay, in [0, 1] | no |
//! | `dataset` | provenance: the training data | no |
//! | `dataset_fingerprint` | provenance: the data's fingerprint (`trainer eval` checks it) | no |
//! | `model_config` | provenance: the trainer's model configuration, as JSON | no |
//! | `exporter` | provenance: the program that wrote the file | no |
//! | `background` | JSON `[r, g, b]`: what the transparent pixels of the training images were laid on (image folders); `generate` lays an input image's transparency on it | no |
//! | `recommended_sampler` | how the model card says to sample it: the sampler | no: all three or none |
//! | `recommended_steps` | ... its steps | no: all three or none |
//! | `recommended_guidance` | ... its guidance weight | no: all three or none |
//! | `recommended_guidance_interval` | `LO,HI`: guide only at these timesteps | no: with the three above |
//! | `student` | JSON `{"method", "sampler", "steps", "teacher_steps", "teacher", "teacher_sha256"}`: a distilled student, sampled (trailing spacing) by `ddim` in exactly `steps` steps, or by `consistency` in any | no: format 2 |
//! | `guidance_input` | `LO,HI`: the model's fourth input w [B] (float32) is the guidance weight, one call per step; weights in LO..=HI | no: format 2 |
//!
//! Keys this schema does not know are kept in [`ModelMeta::extra`] and written back unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sampler::{GuidanceInterval, SamplerKind};
pub use crate::schedule::Prediction;
use crate::schedule::{BetaSchedule, NoiseSchedule, VarianceType};

/// The newest metadata layout this runtime reads and writes (`diffusion.format_version`): 2 for a model with the
/// student keys, 1 for every other.
pub const FORMAT_VERSION: u32 = 2;

/// The prefix of every key.
pub const PREFIX: &str = "diffusion.";

/// The documentation entry `pixel_range`.
pub const PIXEL_RANGE: &str = "[-1, 1]: pixel = (x + 1) * 127.5";

/// The floating-point type of the model's x input and eps output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    #[default]
    F32,
    F16,
}

crate::named_enum!(Dtype, "dtype", { F32 => ["float32", "f32"], F16 => ["float16", "f16"] });

/// Which weights of a checkpoint were exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weights {
    /// The exponential moving average of the weights (what DDPM samples from).
    #[default]
    Ema,
    /// The optimiser's current weights.
    Raw,
}

crate::named_enum!(Weights, "weights", { Ema => ["ema"], Raw => ["raw"] });

/// How the exporter recommends sampling the model (the setting its model card measured); `generate` uses it
/// unless told otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommended {
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance: f32,
    /// Guidance only at these timesteps (Kynkäänniemi et al. 2024); None: at every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<GuidanceInterval>,
}

/// A few-step student distilled from a teacher (`trainer distill`): a progressive one is sampled by DDIM (eta 0)
/// on the trailing grid of exactly `steps` steps, the grid it was distilled on (Salimans & Ho 2022); a consistency
/// one by multistep consistency sampling (Song et al. 2023, Algorithm 1) on a trailing grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Student {
    /// `progressive` (Salimans & Ho 2022) or `consistency` (Song et al. 2023).
    pub method: String,
    /// How it samples: `ddim` in exactly `steps` steps (progressive), or `consistency` in any number of steps
    /// (`steps` recommended).
    pub sampler: SamplerKind,
    pub steps: usize,
    /// The DDIM steps of the teacher it was distilled from.
    pub teacher_steps: usize,
    /// The teacher as its distillation named it, and the SHA-256 of its weight file.
    pub teacher: String,
    pub teacher_sha256: String,
}

/// A label beside the class of a multi-attribute model (e.g. where a digit sits): its name and the names of
/// its values. Value i is label i; label `values.len()` is its null entry ("unknown"), so each attribute can
/// be dropped on its own for guidance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribute {
    pub name: String,
    pub values: Vec<String>,
}

impl Attribute {
    /// The label meaning "this attribute is unknown".
    pub fn null(&self) -> i64 {
        self.values.len() as i64
    }

    /// A value given as an index or a name.
    pub fn index(&self, s: &str) -> Result<i64> {
        match label_index(&self.values, self.values.len(), s) {
            Some(i) => Ok(i),
            None => Err(Error::request(
                "attributes",
                format!(
                    "unknown value '{s}' of {}: its values are 0..{} ({})",
                    self.name,
                    self.values.len() - 1,
                    self.values.join(", ")
                ),
            )),
        }
    }

    /// Checks a model's attribute list: unique, non-empty names other than `class`, each with values.
    pub fn check_all(attrs: &[Attribute]) -> std::result::Result<(), String> {
        for (i, a) in attrs.iter().enumerate() {
            if a.name.is_empty() || a.name == "class" || a.name.contains(['=', ',']) {
                return Err(format!("'{}' cannot name an attribute (empty, 'class', or with '=' or ',')", a.name));
            }
            if attrs[..i].iter().any(|b| b.name == a.name) {
                return Err(format!("attribute '{}' is listed twice", a.name));
            }
            if a.values.is_empty() {
                return Err(format!("attribute '{}' has no values", a.name));
            }
        }
        Ok(())
    }
}

/// Everything an exported model says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub betas: Vec<f64>,
    pub prediction: Prediction,
    pub variance: VarianceType,
    pub image_size: usize,
    pub channels: usize,
    /// 0 for an unconditional model.
    pub num_classes: usize,
    /// Empty, or one name per class.
    pub class_names: Vec<String>,
    /// The label meaning "no class" (classifier-free guidance); None: the model cannot sample without a class.
    pub null_class: Option<i64>,
    /// The labels beside the class (multi-attribute conditioning); empty for a class-only model. With any,
    /// the model's y is [B, 1 + A]: the class, then each attribute, every column with its own null.
    pub attributes: Vec<Attribute>,
    pub dtype: Dtype,
    /// The named schedule the betas came from, when the exporter recorded it.
    pub schedule: Option<BetaSchedule>,
    pub weights: Option<Weights>,
    pub training_steps: Option<u64>,
    pub ema_decay: Option<f64>,
    pub dataset: Option<String>,
    /// The training data's fingerprint (`trainer eval` checks it against the run's).
    pub dataset_fingerprint: Option<String>,
    /// The trainer's model configuration, as JSON.
    pub model_config: Option<String>,
    pub exporter: Option<String>,
    /// The colour the transparent pixels of the training images were composited onto (image folders), so
    /// that an input image with transparency (`--init`, `--inpaint`) can be given the same.
    pub background: Option<[u8; 3]>,
    pub recommended: Option<Recommended>,
    /// A distilled few-step student (format 2).
    pub student: Option<Student>,
    /// The guidance weights [lo, hi] of a model that takes w as its fourth input (format 2): guidance in one call.
    pub guidance_input: Option<(f32, f32)>,
    /// Entries this schema does not know (without the prefix), kept as they are.
    pub extra: BTreeMap<String, String>,
}

/// Whether a model carries a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Every model.
    Required,
    Optional,
    /// The recommended sampling: all of these keys or none.
    Recommendation,
    /// Optional, and only with the recommended sampling.
    WithRecommendation,
    /// Optional, and only in format 2.
    Format2,
}

impl Need {
    fn doc(self) -> &'static str {
        match self {
            Need::Required => "yes",
            Need::Optional => "no",
            Need::Recommendation => "no: all three or none",
            Need::WithRecommendation => "no: with the three above",
            Need::Format2 => "no: format 2",
        }
    }
}

/// One metadata key (without the prefix), whether a model carries it, and what its value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub need: Need,
    pub value: &'static str,
}

const fn key_of(name: &'static str, need: Need, value: &'static str) -> Key {
    Key { name, need, value }
}

/// Every key of format 1, in the order of the module's table. It drives the reader (which keys must be there,
/// which are kept as unknown in [`ModelMeta::extra`]) and the documentation; tests check that the writer writes
/// exactly these keys and that the module's table is this one.
pub const KEYS: &[Key] = &[
    key_of("format_version", Need::Required, "`1`, or `2` with the student keys"),
    key_of("betas", Need::Required, "JSON list of the T betas (authoritative for sampling)"),
    key_of(
        "prediction_type",
        Need::Required,
        "`epsilon`, or `v` (the first output is the velocity of Salimans & Ho 2022)",
    ),
    key_of(
        "variance_type",
        Need::Required,
        "`fixed_small`, `fixed_large` or `learned_range` (the model has a second output, `v`)",
    ),
    key_of("image_size", Need::Required, "square side in pixels"),
    key_of("channels", Need::Required, "1 (grey) or 3 (RGB)"),
    key_of("num_classes", Need::Required, "0 for an unconditional model"),
    key_of("class_names", Need::Required, "JSON list: empty, or one name per class"),
    key_of("null_class", Need::Required, "the \"no class\" label for guidance, or `none`"),
    key_of("dtype", Need::Required, "`float32` or `float16` (the type of x and eps)"),
    key_of(
        "attributes",
        Need::Optional,
        "JSON list of the labels beside the class, `[{\"name\": .., \"values\": [..]}]`: y is then [B, 1 + A]",
    ),
    key_of("schedule", Need::Optional, "JSON of the `BetaSchedule` that made the betas"),
    key_of("num_timesteps", Need::Optional, "T; must equal the length of `betas`"),
    key_of("pixel_range", Need::Optional, "how to map x to 8-bit pixels (documentation)"),
    key_of("weights", Need::Optional, "`ema` or `raw`: which weights of the checkpoint"),
    key_of("training_steps", Need::Optional, "the checkpoint's step"),
    key_of("ema_decay", Need::Optional, "the EMA decay, in [0, 1]"),
    key_of("dataset", Need::Optional, "provenance: the training data"),
    key_of("dataset_fingerprint", Need::Optional, "provenance: the data's fingerprint (`trainer eval` checks it)"),
    key_of("model_config", Need::Optional, "provenance: the trainer's model configuration, as JSON"),
    key_of("exporter", Need::Optional, "provenance: the program that wrote the file"),
    key_of(
        "background",
        Need::Optional,
        "JSON `[r, g, b]`: what the transparent pixels of the training images were laid on (image folders); \
         `generate` lays an input image's transparency on it",
    ),
    key_of("recommended_sampler", Need::Recommendation, "how the model card says to sample it: the sampler"),
    key_of("recommended_steps", Need::Recommendation, "... its steps"),
    key_of("recommended_guidance", Need::Recommendation, "... its guidance weight"),
    key_of("recommended_guidance_interval", Need::WithRecommendation, "`LO,HI`: guide only at these timesteps"),
    key_of(
        "student",
        Need::Format2,
        "JSON `{\"method\", \"sampler\", \"steps\", \"teacher_steps\", \"teacher\", \"teacher_sha256\"}`: a distilled student, sampled (trailing spacing) by `ddim` in exactly `steps` steps, or by `consistency` in any",
    ),
    key_of(
        "guidance_input",
        Need::Format2,
        "`LO,HI`: the model's fourth input w [B] (float32) is the guidance weight, one call per step; weights in LO..=HI",
    ),
];

/// The keys of one kind of need, in table order.
fn keys(need: Need) -> impl Iterator<Item = &'static str> {
    KEYS.iter().filter(move |k| k.need == need).map(|k| k.name)
}

/// The rows of the module's documentation table, from [`KEYS`].
pub fn doc_table() -> String {
    KEYS.iter().map(|k| format!("| `{}` | {} | {} |\n", k.name, k.value, k.need.doc())).collect()
}

fn key(k: &str) -> String {
    format!("{PREFIX}{k}")
}

/// Parses one entry, naming the key on failure.
fn parse<T: std::str::FromStr>(k: &str, v: &str, what: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    v.parse().map_err(|e| Error::metadata(key(k), format!("'{v}' is not {what} ({e})")))
}

fn json<T: serde::de::DeserializeOwned>(k: &str, v: &str, what: &str) -> Result<T> {
    serde_json::from_str(v).map_err(|e| Error::metadata(key(k), format!("not {what} ({e})")))
}

impl ModelMeta {
    /// The noise schedule the model was trained with.
    pub fn noise_schedule(&self) -> NoiseSchedule {
        NoiseSchedule::from_betas(self.betas.clone())
    }

    /// T, the number of diffusion steps.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// A class given as an index or a name.
    pub fn class_index(&self, s: &str) -> Result<i64> {
        class_index(&self.class_names, self.num_classes, s)
    }

    /// Labels per image: the class, then one per attribute.
    pub fn label_columns(&self) -> usize {
        1 + self.attributes.len()
    }

    /// The null label of every column (the class's, then each attribute's); empty without a null class.
    pub fn label_nulls(&self) -> Vec<i64> {
        self.null_class.into_iter().chain(self.attributes.iter().map(|a| a.null())).collect()
    }

    /// An attribute by name.
    pub fn attribute(&self, name: &str) -> Result<(usize, &Attribute)> {
        self.attributes.iter().enumerate().find(|(_, a)| a.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.attributes.iter().map(|a| a.name.as_str()).collect();
            Error::request(
                "attributes",
                if names.is_empty() {
                    format!("unknown attribute '{name}': this model has no attributes besides its class")
                } else {
                    format!("unknown attribute '{name}': this model's attributes are {}", names.join(", "))
                },
            )
        })
    }

    /// The metadata entries, keys prefixed `diffusion.`.
    pub fn to_props(&self) -> BTreeMap<String, String> {
        let mut md = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            md.insert(key(k), v);
        };
        let format2 = self.student.is_some() || self.guidance_input.is_some();
        put("format_version", if format2 { "2" } else { "1" }.to_string());
        put("betas", to_json(&self.betas));
        put("prediction_type", self.prediction.to_string());
        put("variance_type", self.variance.to_string());
        put("image_size", self.image_size.to_string());
        put("channels", self.channels.to_string());
        put("num_classes", self.num_classes.to_string());
        put("class_names", to_json(&self.class_names));
        put("null_class", self.null_class.map_or_else(|| "none".to_string(), |n| n.to_string()));
        put("dtype", self.dtype.to_string());
        if !self.attributes.is_empty() {
            put("attributes", to_json(&self.attributes));
        }
        put("num_timesteps", self.num_timesteps().to_string());
        put("pixel_range", PIXEL_RANGE.to_string());
        if let Some(s) = &self.schedule {
            put("schedule", to_json(s));
        }
        let optional = [
            ("weights", self.weights.map(|w| w.to_string())),
            ("training_steps", self.training_steps.map(|s| s.to_string())),
            ("ema_decay", self.ema_decay.map(|d| d.to_string())),
            ("dataset", self.dataset.clone()),
            ("dataset_fingerprint", self.dataset_fingerprint.clone()),
            ("model_config", self.model_config.clone()),
            ("exporter", self.exporter.clone()),
            ("background", self.background.map(|b| to_json(&b))),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                put(k, v);
            }
        }
        if let Some(r) = &self.recommended {
            put("recommended_sampler", r.sampler.to_string());
            put("recommended_steps", r.steps.to_string());
            put("recommended_guidance", r.guidance.to_string());
            if let Some(g) = &r.guidance_interval {
                put("recommended_guidance_interval", g.to_string());
            }
        }
        if let Some(st) = &self.student {
            put("student", to_json(st));
        }
        if let Some((lo, hi)) = self.guidance_input {
            put("guidance_input", format!("{lo},{hi}"));
        }
        for (k, v) in &self.extra {
            put(k, v.clone());
        }
        md
    }

    /// The guidance weight goes into the model as its input w (a guidance-distilled student).
    pub fn takes_guidance(&self) -> bool {
        self.guidance_input.is_some()
    }

    /// Reads and checks the entries: a missing required key, an unknown format version, a value that does not
    /// parse or does not fit the others is an error naming the key.
    pub fn from_props(md: &BTreeMap<String, String>) -> Result<Self> {
        let e = Entries(md);
        e.check_required_and_version()?;
        let betas = e.betas()?;
        let prediction = parse("prediction_type", e.req("prediction_type"), "a supported prediction")?;
        let variance = parse("variance_type", e.req("variance_type"), "a variance type")?;
        let (image_size, channels) = e.geometry()?;
        let labels = e.labels()?;
        let dtype = parse("dtype", e.req("dtype"), "a dtype")?;
        let schedule = e.get("schedule").map(|s| json("schedule", s, "a beta schedule")).transpose()?;
        let provenance = e.provenance()?;
        let background =
            e.get("background").map(|s| json("background", s, "a JSON list [r, g, b] of 0..=255")).transpose()?;
        let recommended = e.recommended(labels.num_classes, betas.len())?;
        let (student, guidance_input) = e.student(labels.null_class.is_some())?;
        Ok(Self {
            betas,
            prediction,
            variance,
            image_size,
            channels,
            num_classes: labels.num_classes,
            class_names: labels.class_names,
            null_class: labels.null_class,
            attributes: labels.attributes,
            dtype,
            schedule,
            weights: provenance.weights,
            training_steps: provenance.training_steps,
            ema_decay: provenance.ema_decay,
            dataset: e.text("dataset"),
            dataset_fingerprint: e.text("dataset_fingerprint"),
            model_config: e.text("model_config"),
            exporter: e.text("exporter"),
            background,
            recommended,
            student,
            guidance_input,
            extra: e.unknown(),
        })
    }
}

/// A model's entries as [`ModelMeta::from_props`] reads them, one function a group of keys.
struct Entries<'a>(&'a BTreeMap<String, String>);

/// The label part of the metadata.
struct Labels {
    num_classes: usize,
    class_names: Vec<String>,
    null_class: Option<i64>,
    attributes: Vec<Attribute>,
}

/// The checkpoint part of the provenance.
struct Provenance {
    weights: Option<Weights>,
    training_steps: Option<u64>,
    ema_decay: Option<f64>,
}

impl Entries<'_> {
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(&key(k)).map(String::as_str)
    }

    /// A required entry (present: [`Entries::check_required_and_version`] ran first).
    fn req(&self, k: &str) -> &str {
        self.0[&key(k)].as_str()
    }

    fn text(&self, k: &str) -> Option<String> {
        self.get(k).map(str::to_string)
    }

    fn check_required_and_version(&self) -> Result<()> {
        let missing: Vec<String> = keys(Need::Required).map(key).filter(|k| !self.0.contains_key(k)).collect();
        if !missing.is_empty() {
            let found: Vec<&str> = self.0.keys().map(String::as_str).collect();
            return Err(Error::metadata(
                missing.join(", "),
                format!(
                    "missing: the model was not exported by `trainer export` (its keys: {})",
                    if found.is_empty() { "none".to_string() } else { found.join(", ") }
                ),
            ));
        }
        let version: u32 = parse("format_version", self.req("format_version"), "a number")?;
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(Error::metadata(
                key("format_version"),
                format!("format {version}, but this runtime reads format {FORMAT_VERSION}: use a matching release"),
            ));
        }
        Ok(())
    }

    fn betas(&self) -> Result<Vec<f64>> {
        let betas: Vec<f64> = json("betas", self.req("betas"), "a JSON list of numbers")?;
        if betas.is_empty() || betas.iter().any(|b| !(*b > 0.0 && *b < 1.0)) {
            return Err(Error::metadata(key("betas"), "must be a non-empty list of numbers in (0, 1)"));
        }
        if let Some(t) = self.get("num_timesteps") {
            let t: usize = parse("num_timesteps", t, "a number")?;
            if t != betas.len() {
                return Err(Error::metadata(key("num_timesteps"), format!("{t}, but there are {} betas", betas.len())));
            }
        }
        Ok(betas)
    }

    /// (image_size, channels).
    fn geometry(&self) -> Result<(usize, usize)> {
        let image_size: usize = parse("image_size", self.req("image_size"), "a number")?;
        if image_size == 0 {
            return Err(Error::metadata(key("image_size"), "must be at least 1"));
        }
        let channels: usize = parse("channels", self.req("channels"), "a number")?;
        if !matches!(channels, 1 | 3) {
            return Err(Error::metadata(
                key("channels"),
                format!("{channels}: only 1 (grey) or 3 (RGB) are supported"),
            ));
        }
        Ok((image_size, channels))
    }

    fn labels(&self) -> Result<Labels> {
        let num_classes: usize = parse("num_classes", self.req("num_classes"), "a number")?;
        let class_names: Vec<String> = json("class_names", self.req("class_names"), "a JSON list of strings")?;
        if !class_names.is_empty() && class_names.len() != num_classes {
            return Err(Error::metadata(
                key("class_names"),
                format!("{} names for {num_classes} classes", class_names.len()),
            ));
        }
        let null_class = match self.req("null_class") {
            "none" => None,
            s => Some(parse::<i64>("null_class", s, "a class index or 'none'")?),
        };
        match null_class {
            Some(_) if num_classes == 0 => {
                return Err(Error::metadata(key("null_class"), "an unconditional model has no null class"));
            }
            Some(n) if !(0..=num_classes as i64).contains(&n) => {
                return Err(Error::metadata(key("null_class"), format!("{n} is outside 0..={num_classes}")));
            }
            _ => {}
        }
        let attributes: Vec<Attribute> = self
            .get("attributes")
            .map(|s| json("attributes", s, "a JSON list of {\"name\", \"values\"} objects"))
            .transpose()?
            .unwrap_or_default();
        Attribute::check_all(&attributes).map_err(|e| Error::metadata(key("attributes"), e))?;
        if !attributes.is_empty() && null_class.is_none() {
            return Err(Error::metadata(key("attributes"), "attributes need a conditional model with a null class"));
        }
        Ok(Labels { num_classes, class_names, null_class, attributes })
    }

    fn provenance(&self) -> Result<Provenance> {
        let weights = self.get("weights").map(|s| parse("weights", s, "ema or raw")).transpose()?;
        let training_steps = self.get("training_steps").map(|s| parse("training_steps", s, "a number")).transpose()?;
        let ema_decay: Option<f64> = self.get("ema_decay").map(|s| parse("ema_decay", s, "a number")).transpose()?;
        // found by meta_fuzz: "NaN" parsed as a decay (and broke the round trip, NaN != NaN)
        if let Some(d) = ema_decay.filter(|d| !(0.0..=1.0).contains(d)) {
            return Err(Error::metadata(key("ema_decay"), format!("{d}: an EMA decay lies in [0, 1]")));
        }
        Ok(Provenance { weights, training_steps, ema_decay })
    }

    /// The entries of the prefix that [`KEYS`] does not know, without the prefix.
    fn unknown(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(PREFIX)?, v)))
            .filter(|(k, _)| !KEYS.iter().any(|known| known.name == *k))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// The student keys: only in format 2, which needs at least one of them.
    #[allow(clippy::type_complexity)]
    fn student(&self, has_null: bool) -> Result<(Option<Student>, Option<(f32, f32)>)> {
        let version = self.req("format_version");
        let present: Vec<String> = keys(Need::Format2).map(key).filter(|k| self.0.contains_key(k)).collect();
        match (version, present.is_empty()) {
            ("1", false) => {
                return Err(Error::metadata(present.join(", "), "a format-2 key in a format-1 file"));
            }
            ("2", true) => {
                return Err(Error::metadata(key("format_version"), "2, but none of the format-2 keys is there"));
            }
            _ => {}
        }
        let student: Option<Student> =
            self.get("student").map(|s| json("student", s, "a student description")).transpose()?;
        if let Some(st) = &student {
            if st.steps == 0 || st.teacher_steps < st.steps {
                return Err(Error::metadata(key("student"), "steps must be at least 1 and at most teacher_steps"));
            }
        }
        let range = match self.get("guidance_input") {
            None => None,
            Some(v) => {
                let r = v
                    .split_once(',')
                    .and_then(|(a, b)| Some((a.trim().parse::<f32>().ok()?, b.trim().parse::<f32>().ok()?)));
                match r {
                    Some((lo, hi)) if lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi => Some((lo, hi)),
                    _ => {
                        return Err(Error::metadata(
                            key("guidance_input"),
                            format!("'{v}' is not LO,HI with 0 <= LO <= HI"),
                        ))
                    }
                }
            }
        };
        if range.is_some() && !has_null {
            return Err(Error::metadata(
                key("guidance_input"),
                "a guidance input needs a conditional model with a null class",
            ));
        }
        Ok((student, range))
    }

    /// None when no recommendation key is present; an error when only some are, or one does not parse.
    fn recommended(&self, num_classes: usize, t: usize) -> Result<Option<Recommended>> {
        let all: Vec<String> = keys(Need::Recommendation).map(key).collect();
        let present: Vec<String> = all.iter().filter(|k| self.0.contains_key(*k)).cloned().collect();
        let interval = self.get("recommended_guidance_interval");
        if present.is_empty() {
            if interval.is_some() {
                return Err(Error::metadata(
                    key("recommended_guidance_interval"),
                    format!("needs the recommended sampling ({})", all.join(", ")),
                ));
            }
            return Ok(None);
        }
        if present.len() != all.len() {
            return Err(Error::metadata(
                present.join(", "),
                format!("the recommended sampling is incomplete (it needs all of {})", all.join(", ")),
            ));
        }
        let sampler: SamplerKind = parse("recommended_sampler", self.req("recommended_sampler"), "a sampler")?;
        let steps: usize = parse("recommended_steps", self.req("recommended_steps"), "a number")?;
        let guidance: f32 = parse("recommended_guidance", self.req("recommended_guidance"), "a number")?;
        if steps == 0 {
            return Err(Error::metadata(key("recommended_steps"), "must be at least 1"));
        }
        if !(guidance.is_finite() && guidance >= 0.0) || (guidance != 0.0 && num_classes == 0) {
            return Err(Error::metadata(
                key("recommended_guidance"),
                format!("{guidance}: guidance must be >= 0, and 0 for an unconditional model"),
            ));
        }
        let guidance_interval: Option<GuidanceInterval> =
            interval.map(|v| parse("recommended_guidance_interval", v, "a guidance interval")).transpose()?;
        if let Some(g) = guidance_interval.filter(|g| g.hi >= t) {
            return Err(Error::metadata(
                key("recommended_guidance_interval"),
                format!("{g}: timesteps run 0..={}", t - 1),
            ));
        }
        Ok(Some(Recommended { sampler, steps, guidance, guidance_interval }))
    }
}

/// A class given as an index or a name, for a model with `num_classes` classes named `names`.
pub fn class_index(names: &[String], num_classes: usize, s: &str) -> Result<i64> {
    if num_classes == 0 {
        return Err(Error::request("class", format!("{s}: this model is unconditional (it has no classes)")));
    }
    match label_index(names, num_classes, s) {
        Some(i) => Ok(i),
        None => Err(Error::request(
            "class",
            format!("unknown class '{s}': this model's classes are 0..{} ({})", num_classes - 1, names.join(", ")),
        )),
    }
}

/// A label given by its name among `names`, or as an index below `count`.
fn label_index(names: &[String], count: usize, s: &str) -> Option<i64> {
    match names.iter().position(|n| n == s) {
        Some(i) => Some(i as i64),
        None => s.parse::<usize>().ok().filter(|&i| i < count).map(|i| i as i64),
    }
}

/// The model's labels for `n` images from a caller's, for a conditional model whose null labels are `nulls` (the
/// class's, then each attribute's; empty without a null class) in `cols` columns: all of them (n x cols), the
/// class alone (n: every attribute unknown) or none (every label null). What the ONNX model and the trainer's
/// U-Net both take.
pub fn full_labels(nulls: &[i64], cols: usize, y: Option<&[i64]>, n: usize) -> Result<Vec<i64>> {
    match y {
        Some(y) if y.len() == n * cols => Ok(y.to_vec()),
        // the class alone: every attribute unknown
        Some(y) if y.len() == n => {
            Ok(y.iter().flat_map(|&c| std::iter::once(c).chain(nulls[1..].iter().copied())).collect())
        }
        Some(y) => Err(Error::request("labels", format!("{} labels for {n} images ({cols} per image)", y.len()))),
        None if !nulls.is_empty() => Ok((0..n).flat_map(|_| nulls.iter().copied()).collect()),
        None => Err(Error::request("labels", "this conditional model has no null class: give a class for every image")),
    }
}

/// serde_json of a metadata value (lists of numbers and strings, a tagged enum: these cannot fail).
fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("metadata values serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleKind;

    fn meta() -> ModelMeta {
        ModelMeta {
            betas: BetaSchedule::LINEAR.betas(1000),
            prediction: Prediction::Epsilon,
            variance: VarianceType::FixedSmall,
            image_size: 28,
            channels: 1,
            num_classes: 10,
            class_names: (0..10).map(|i| i.to_string()).collect(),
            null_class: Some(10),
            attributes: vec![Attribute { name: "position".into(), values: vec!["0".into(), "1".into(), "2".into()] }],
            dtype: Dtype::F16,
            schedule: Some(BetaSchedule::named(ScheduleKind::Linear, 1000)),
            weights: Some(Weights::Ema),
            training_steps: Some(5400),
            ema_decay: Some(0.999),
            dataset: Some("./data/mnist (train)".into()),
            dataset_fingerprint: Some("b2a523dbb17581eb".into()),
            model_config: Some("{\"ch\":32}".into()),
            exporter: Some("diffusion-rs trainer 0.1.0".into()),
            background: Some([255, 255, 255]),
            recommended: Some(Recommended {
                sampler: SamplerKind::DpmSolverPP,
                steps: 20,
                guidance: 2.0,
                guidance_interval: Some(GuidanceInterval { lo: 82, hi: 579 }),
            }),
            student: None,
            guidance_input: None,
            extra: [("note".to_string(), "kept".to_string())].into_iter().collect(),
        }
    }

    /// A distilled 2-step student with a guidance input.
    fn student() -> ModelMeta {
        let mut m = meta();
        m.student = Some(Student {
            method: "progressive".into(),
            sampler: SamplerKind::Ddim,
            steps: 2,
            teacher_steps: 8,
            teacher: "models/mnist.onnx".into(),
            teacher_sha256: "3393f674".into(),
        });
        m.guidance_input = Some((0.0, 4.0));
        m
    }

    #[test]
    fn a_student_is_format_2_and_every_other_model_stays_format_1() {
        let s = student();
        let md = s.to_props();
        assert_eq!(md["diffusion.format_version"], "2");
        assert_eq!(md["diffusion.guidance_input"], "0,4");
        assert!(md["diffusion.student"].contains("\"steps\":2"));
        assert_eq!(ModelMeta::from_props(&md).unwrap(), s);
        assert!(s.takes_guidance() && !meta().takes_guidance());
        // format 1 files are written as before, without the new keys
        assert_eq!(meta().to_props()["diffusion.format_version"], "1");
        let with = |k: &str, v: &str| {
            let mut md = md.clone();
            md.insert(key(k), v.into());
            md
        };
        assert!(err(&with("format_version", "1")).contains("a format-2 key in a format-1 file"));
        assert!(err(&with("guidance_input", "4,0")).contains("is not LO,HI"));
        assert!(err(&with("guidance_input", "nan,1")).contains("is not LO,HI"));
        assert!(err(&with("student", "{\"steps\": 2}")).contains("diffusion.student: not a student description"));
        let zero = md["diffusion.student"].replace("\"steps\":2", "\"steps\":0");
        assert!(err(&with("student", &zero)).contains("steps must be at least 1"));
        let mut unconditional = with("null_class", "none");
        unconditional.remove("diffusion.attributes");
        assert!(err(&unconditional).contains("needs a conditional model with a null class"));
    }

    fn err(md: &BTreeMap<String, String>) -> String {
        ModelMeta::from_props(md).unwrap_err().to_string()
    }

    #[test]
    fn round_trips_every_field_and_keeps_unknown_keys() {
        let m = meta();
        let md = m.to_props();
        assert_eq!(md["diffusion.format_version"], "1");
        assert_eq!(md["diffusion.dtype"], "float16");
        assert_eq!(md["diffusion.null_class"], "10");
        assert_eq!(md["diffusion.recommended_sampler"], "dpm++");
        assert_eq!(md["diffusion.recommended_guidance_interval"], "82,579");
        assert_eq!(md["diffusion.note"], "kept");
        assert!(md.keys().all(|k| k.starts_with(PREFIX)));
        assert_eq!(ModelMeta::from_props(&md).unwrap(), m);
        let mut bare = m.clone();
        (bare.num_classes, bare.class_names, bare.null_class, bare.recommended) = (0, vec![], None, None);
        bare.attributes.clear();
        (bare.schedule, bare.weights, bare.training_steps, bare.ema_decay) = (None, None, None, None);
        (bare.dataset, bare.dataset_fingerprint, bare.model_config, bare.exporter) = (None, None, None, None);
        bare.background = None;
        bare.extra.clear();
        assert_eq!(ModelMeta::from_props(&bare.to_props()).unwrap(), bare);
    }

    #[test]
    fn the_key_table_is_what_the_writer_writes_and_what_the_module_documents() {
        // a model with every optional part writes every key of the table, and nothing else
        let mut md = student().to_props();
        md.remove("diffusion.note");
        let written: Vec<&str> = md.keys().map(|k| k.strip_prefix(PREFIX).unwrap()).collect();
        let mut table: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        table.sort_unstable();
        assert_eq!(written, table);
        // the required keys are what a bare model writes
        let mut bare = meta();
        (bare.num_classes, bare.class_names, bare.null_class, bare.recommended, bare.schedule) =
            (0, vec![], None, None, None);
        bare.attributes.clear();
        (bare.weights, bare.training_steps, bare.ema_decay, bare.background) = (None, None, None, None);
        (bare.dataset, bare.dataset_fingerprint, bare.model_config, bare.exporter) = (None, None, None, None);
        bare.extra.clear();
        let bare_keys: Vec<String> = bare.to_props().into_keys().collect();
        let always = ["num_timesteps", "pixel_range"].map(key);
        let mut required: Vec<String> = keys(Need::Required).map(key).chain(always).collect();
        required.sort_unstable();
        assert_eq!(bare_keys, required);
        // the module documentation's table is the key table
        let source = include_str!("metadata.rs");
        let documented: String = source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .filter_map(|l| l.strip_prefix("//! | `"))
            .map(|l| format!("| `{l}\n"))
            .collect();
        assert_eq!(documented, doc_table(), "the table in metadata.rs's module documentation differs from KEYS");
    }

    #[test]
    fn refuses_missing_keys_other_versions_and_values_that_do_not_fit() {
        let good = meta().to_props();
        let with = |k: &str, v: &str| {
            let mut md = good.clone();
            md.insert(key(k), v.into());
            md
        };
        let mut md = good.clone();
        md.remove("diffusion.betas");
        md.remove("diffusion.dtype");
        let e = err(&md);
        assert!(
            e.contains("diffusion.betas, diffusion.dtype") && e.contains("not exported by `trainer export`"),
            "{e}"
        );
        assert!(err(&BTreeMap::new()).contains("(its keys: none)"));
        assert!(err(&with("format_version", "3")).contains("format 3, but this runtime reads format 2"));
        assert!(err(&with("format_version", "2")).contains("2, but none of the format-2 keys is there"));
        assert!(err(&with("betas", "[0.1, 1.5]")).contains("(0, 1)"));
        assert!(err(&with("betas", "oops")).contains("diffusion.betas: not a JSON list"));
        assert!(err(&with("num_timesteps", "999")).contains("999, but there are 1000 betas"));
        assert!(err(&with("prediction_type", "x0")).contains("unknown prediction type 'x0'"));
        assert!(err(&with("background", "[255, 256, 0]")).contains("diffusion.background: not a JSON list [r, g, b]"));
        assert!(err(&with("variance_type", "trainable")).contains("unknown variance type 'trainable'"));
        assert!(err(&with("channels", "4")).contains("only 1 (grey) or 3 (RGB)"));
        assert!(err(&with("class_names", "{}")).contains("diffusion.class_names: not a JSON list"));
        assert!(err(&with("class_names", "[\"a\"]")).contains("1 names for 10 classes"));
        assert!(err(&with("null_class", "12")).contains("outside 0..=10"));
        assert!(err(&with("dtype", "bfloat16")).contains("unknown dtype 'bfloat16'"));
        assert!(err(&with("attributes", "[{\"name\": \"class\", \"values\": [\"a\"]}]")).contains("cannot name"));
        assert!(err(&with("attributes", "[{\"name\": \"p\", \"values\": []}]")).contains("'p' has no values"));
        assert!(err(&with("attributes", "[1]")).contains("diffusion.attributes: not a JSON list"));
        let mut no_null = with("null_class", "none");
        assert!(err(&no_null).contains("attributes need a conditional model"));
        no_null.remove("diffusion.attributes");
        assert!(ModelMeta::from_props(&no_null).is_ok());
        assert!(err(&with("image_size", "-3")).contains("diffusion.image_size: '-3' is not a number"));
        // a conditional model may lack a null class (it then needs a class per image and cannot be guided)
        assert_eq!(ModelMeta::from_props(&no_null).unwrap().null_class, None);
        // class names are optional: an empty list is valid
        assert!(ModelMeta::from_props(&with("class_names", "[]")).unwrap().class_names.is_empty());
    }

    #[test]
    fn an_ema_decay_outside_0_1_is_refused() {
        // the minimal input meta_fuzz found: one entry, "NaN"
        let mut md = meta().to_props();
        for bad in ["NaN", "inf", "-0.5", "1.5"] {
            md.insert(key("ema_decay"), bad.into());
            assert!(err(&md).contains("an EMA decay lies in [0, 1]"), "{bad}: {}", err(&md));
        }
        md.insert(key("ema_decay"), "1".into());
        assert_eq!(ModelMeta::from_props(&md).unwrap().ema_decay, Some(1.0));
    }

    #[test]
    fn the_recommended_sampling_is_all_or_nothing_and_checked() {
        let good = meta().to_props();
        let mut md = good.clone();
        md.insert(key("recommended_sampler"), "euler".into());
        assert!(err(&md).contains("unknown sampler 'euler'"));
        md.insert(key("recommended_sampler"), "ddim".into());
        md.insert(key("recommended_steps"), "0".into());
        assert!(err(&md).contains("recommended_steps: must be at least 1"));
        md.remove(&key("recommended_steps"));
        assert!(err(&md).contains("incomplete"));
        for k in keys(Need::Recommendation).chain(keys(Need::WithRecommendation)) {
            md.remove(&key(k));
        }
        assert_eq!(ModelMeta::from_props(&md).unwrap().recommended, None);
        // the interval: optional, only with the rest, inside 0..T
        let mut md = good.clone();
        md.remove(&key("recommended_guidance_interval"));
        assert_eq!(ModelMeta::from_props(&md).unwrap().recommended.unwrap().guidance_interval, None);
        for (v, why) in [("82,1000", "timesteps run 0..=999"), ("579,82", "above the second"), ("x", "LO,HI")] {
            md.insert(key("recommended_guidance_interval"), v.into());
            let e = err(&md);
            assert!(e.contains("recommended_guidance_interval") && e.contains(why), "{v}: {e}");
        }
        for k in keys(Need::Recommendation) {
            md.remove(&key(k));
        }
        assert!(err(&md).contains("needs the recommended sampling"));
        let mut unc = meta();
        (unc.num_classes, unc.class_names, unc.null_class) = (0, vec![], None);
        unc.attributes.clear();
        let e = err(&unc.to_props());
        assert!(e.contains("0 for an unconditional model"), "{e}");
    }

    /// Mutation fuzzing of the metadata reader (a smoke run; `META_FUZZ_CASES=1000000 cargo test --release -p
    /// runtime meta_fuzz` for a longer one): hostile values, missing and extra keys never panic, and whatever is
    /// accepted writes back to itself.
    #[test]
    fn meta_fuzz_hostile_entries_are_refused_or_round_trip() {
        use rand::{Rng, SeedableRng};
        let cases: usize = std::env::var("META_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        let hostile = [
            "",
            "-1",
            "0",
            "1",
            "3",
            "10",
            "1e309",
            "NaN",
            "inf",
            "-0",
            "none",
            "[",
            "[]",
            "{}",
            "null",
            "[0.5]",
            "[1e-300, 0.999999]",
            "[\"a\"]",
            "99999999999999999999",
            "18446744073709551615",
            "epsilon",
            "float16",
            "fixed_large",
            "dpm++",
            "\u{0}",
            "ü",
            "[0.1, -0.2]",
        ];
        let good = meta().to_props();
        let keys: Vec<String> = good.keys().cloned().collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (mut accepted, mut largest) = (0, 0);
        for _ in 0..cases {
            let mut md = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let k = keys[rng.gen_range(0..keys.len())].clone();
                match rng.gen_range(0..4) {
                    0 => {
                        md.remove(&k);
                    }
                    1 => {
                        md.insert(k, hostile[rng.gen_range(0..hostile.len())].to_string());
                    }
                    2 => {
                        let v = md.get(&k).cloned().unwrap_or_default();
                        let cut = rng.gen_range(0..=v.len());
                        md.insert(k, v.get(..cut).unwrap_or("").to_string());
                    }
                    _ => {
                        md.insert(format!("{PREFIX}x{}", rng.gen::<u16>()), "y".into());
                    }
                }
            }
            let (res, bytes) = crate::fuzz::largest_allocation(|| ModelMeta::from_props(&md));
            largest = largest.max(bytes);
            if let Ok(m) = res {
                accepted += 1;
                assert_eq!(ModelMeta::from_props(&m.to_props()).unwrap(), m);
            }
        }
        assert!(accepted > 0 && accepted < cases, "{accepted} of {cases} accepted");
        crate::fuzz::report("metadata", accepted, cases - accepted, largest);
        // a count such as num_timesteps or num_classes sizes nothing: the largest buffer is a copy of an entry
        assert!(largest < 1 << 20, "{largest} bytes for entries of a few KiB");
    }
}
