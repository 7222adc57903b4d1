//! Datasets: IDX (MNIST, Fashion-MNIST, EMNIST), CIFAR-10 binary batches and folders of images, all held
//! as u8 [N, C, H, W] and turned into [-1, 1] floats batch by batch, with optional augmentation.

pub mod augment;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod shifted;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use augment::AugmentConfig;
pub use runtime::metadata::Attribute;
pub use shifted::ShiftedConfig;

/// An attribute label that is not known (withheld): the model sees the attribute's null entry.
pub const UNKNOWN: u32 = u32::MAX;

pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
pub const FASHION_CLASSES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"];
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// What kind of dataset `data.path` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataKind {
    /// MNIST digits (IDX files).
    #[default]
    Mnist,
    /// Fashion-MNIST garments (IDX files).
    FashionMnist,
    /// EMNIST (IDX files, images stored transposed; names from data.class_names).
    Emnist,
    /// Any IDX image/label pair (names from data.class_names).
    Idx,
    /// CIFAR-10 binary batches.
    Cifar10,
    /// A folder of images, one sub-folder per class (or none).
    Folder,
}

runtime::named_enum!(DataKind, "data kind", {
    Mnist => ["mnist"],
    FashionMnist => ["fashion-mnist"],
    Emnist => ["emnist"],
    Idx => ["idx"],
    Cifar10 => ["cifar10"],
    Folder => ["folder"],
});

/// Which part of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    #[default]
    Train,
    Test,
}

runtime::named_enum!(Split, "split", { Train => ["train"], Test => ["test"] });

/// `[data]` in a config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `mnist`, `fashion-mnist`, `emnist`, `idx` (any IDX pair), `cifar10`, or `folder`.
    pub kind: DataKind,
    /// The dataset folder (IDX files, CIFAR batches, or images).
    pub path: PathBuf,
    /// `train` or `test`.
    pub split: Split,
    /// Use only these classes (names), relabelled 0..k in this order (e.g. a CIFAR-10 subset).
    pub classes: Vec<String>,
    /// Class names for a generic `idx` dataset (label i is named classes_names[i]).
    pub class_names: Vec<String>,
    /// Ignore labels: train an unconditional model even when the data has classes.
    pub unconditional: bool,
    /// Image folders: convert to one channel.
    pub grayscale: bool,
    /// Image folders: RGB that transparent pixels are composited onto.
    pub background: [u8; 3],
    /// Use at most this many images (0: all).
    pub limit: usize,
    pub augment: AugmentConfig,
    /// Place each digit in one quadrant of a larger canvas, with its position as a second label
    /// ([`shifted`]).
    pub shifted: Option<ShiftedConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            kind: DataKind::Mnist,
            path: PathBuf::from("data/mnist"),
            split: Split::Train,
            classes: vec![],
            class_names: vec![],
            unconditional: false,
            grayscale: false,
            background: [255, 255, 255],
            limit: 0,
            augment: AugmentConfig::default(),
            shifted: None,
        }
    }
}

impl DataConfig {
    pub fn resolve_relative_to(&mut self, base: &Path) {
        if self.path.is_relative() {
            self.path = base.join(&self.path);
        }
    }
}

/// Images as u8 [N, C, H, W] with optional labels.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Option<Vec<u32>>,
    pub class_names: Vec<String>,
    /// Labels beside the class, and per attribute one label per image ([`UNKNOWN`] where withheld).
    pub attributes: Vec<Attribute>,
    pub attr_labels: Vec<Vec<u32>>,
    pub len: usize,
    pub channels: usize,
    pub size: usize,
    /// Short SHA-256 of the pixels and labels (stored with checkpoints and exports).
    pub fingerprint: String,
    pub description: String,
}

impl Dataset {
    pub fn new(
        images: Vec<u8>,
        labels: Option<Vec<u32>>,
        class_names: Vec<String>,
        channels: usize,
        size: usize,
        description: String,
    ) -> Result<Self> {
        let per = channels * size * size;
        if per == 0 || !images.len().is_multiple_of(per) {
            bail!("internal error: {} bytes are not a whole number of {channels}x{size}x{size} images", images.len());
        }
        let len = images.len() / per;
        if len == 0 {
            bail!("{description}: no images");
        }
        if let Some(l) = &labels {
            if l.len() != len {
                bail!("{description}: {} labels for {len} images", l.len());
            }
        }
        let mut h = Sha256::new();
        h.update([channels as u8, size as u8]);
        h.update(&images);
        if let Some(l) = &labels {
            for v in l {
                h.update(v.to_le_bytes());
            }
        }
        let fingerprint = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            images,
            labels,
            class_names,
            attributes: vec![],
            attr_labels: vec![],
            len,
            channels,
            size,
            fingerprint,
            description,
        })
    }

    /// Adds attribute labels (one list per attribute, one label per image, [`UNKNOWN`] or below the
    /// attribute's value count); the fingerprint covers them.
    pub fn with_attributes(mut self, attributes: Vec<Attribute>, labels: Vec<Vec<u32>>) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(&self.fingerprint);
        for (a, l) in attributes.iter().zip(&labels) {
            if l.len() != self.len || l.iter().any(|&v| v != UNKNOWN && v as usize >= a.values.len()) {
                bail!("{}: attribute {} needs one label in 0..{} per image", self.description, a.name, a.values.len());
            }
            h.update(a.name.as_bytes());
            for v in l {
                h.update(v.to_le_bytes());
            }
        }
        if attributes.len() != labels.len() {
            bail!("internal error: {} attributes with {} label lists", attributes.len(), labels.len());
        }
        self.fingerprint = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        (self.attributes, self.attr_labels) = (attributes, labels);
        Ok(self)
    }

    pub fn num_classes(&self) -> usize {
        if self.labels.is_some() {
            self.class_names.len()
        } else {
            0
        }
    }

    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Image i as [-1, 1] floats, [C, H, W].
    pub fn image_f32(&self, i: usize) -> Vec<f32> {
        let n = self.image_len();
        self.images[i * n..(i + 1) * n].iter().map(|&p| p as f32 / 127.5 - 1.0).collect()
    }

    /// Keeps only `names` (in that order, relabelled 0..k).
    pub fn select_classes(self, names: &[String]) -> Result<Self> {
        let Some(labels) = &self.labels else {
            bail!("{}: data.classes given, but this dataset has no labels", self.description);
        };
        let mut map = vec![None; self.class_names.len()];
        for (new, name) in names.iter().enumerate() {
            let Some(old) = self.class_names.iter().position(|c| c == name) else {
                bail!("{}: unknown class '{name}'; the classes are: {}", self.description, self.class_names.join(", "));
            };
            map[old] = Some(new as u32);
        }
        let n = self.image_len();
        let (mut images, mut new_labels) = (vec![], vec![]);
        for (i, l) in labels.iter().enumerate() {
            if let Some(new) = map[*l as usize] {
                images.extend_from_slice(&self.images[i * n..(i + 1) * n]);
                new_labels.push(new);
            }
        }
        let desc = format!("{} [{}]", self.description, names.join(","));
        Dataset::new(images, Some(new_labels), names.to_vec(), self.channels, self.size, desc)
    }

    /// Keeps the first `n` images.
    pub fn truncate(self, n: usize) -> Result<Self> {
        if n == 0 || n >= self.len {
            return Ok(self);
        }
        let len = self.image_len();
        let labels = self.labels.map(|l| l[..n].to_vec());
        Dataset::new(
            self.images[..n * len].to_vec(),
            labels,
            self.class_names,
            self.channels,
            self.size,
            self.description,
        )
    }

    pub fn drop_labels(self) -> Result<Self> {
        Dataset::new(self.images, None, vec![], self.channels, self.size, self.description)
    }
}

/// Loads the dataset a config describes, sized for a model of `image_size`.
pub fn load(cfg: &DataConfig, image_size: usize) -> Result<Dataset> {
    let train = cfg.split == Split::Train;
    let named = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ds = match cfg.kind {
        DataKind::Mnist => idx::load_dir(&cfg.path, train, named(&MNIST_CLASSES), false)?,
        DataKind::FashionMnist => idx::load_dir(&cfg.path, train, named(&FASHION_CLASSES), false)?,
        // EMNIST's IDX images are stored transposed
        DataKind::Emnist => idx::load_dir(&cfg.path, train, cfg.class_names.clone(), true)?,
        DataKind::Idx => idx::load_dir(&cfg.path, train, cfg.class_names.clone(), false)?,
        DataKind::Cifar10 => cifar::load_dir(&cfg.path, train)?,
        DataKind::Folder => folder::load(&cfg.path, image_size, cfg.grayscale, cfg.background)?,
    };
    let ds = if cfg.classes.is_empty() { ds } else { ds.select_classes(&cfg.classes)? };
    let ds = if cfg.unconditional { ds.drop_labels()? } else { ds };
    let ds = ds.truncate(cfg.limit)?;
    let ds = match &cfg.shifted {
        Some(s) => shifted::shift(ds, s)?,
        None => ds,
    };
    if ds.size != image_size {
        bail!(
            "{}: images are {}x{} but model.image_size is {image_size}; set model.image_size = {} (folders are resized, IDX and CIFAR are not)",
            ds.description,
            ds.size,
            ds.size,
            ds.size
        );
    }
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_subsets_relabel_in_the_given_order_and_unknown_classes_are_named() {
        let images: Vec<u8> = (0..4u8).flat_map(|i| vec![i; 4]).collect();
        let ds =
            Dataset::new(images, Some(vec![0, 1, 2, 1]), vec!["a".into(), "b".into(), "c".into()], 1, 2, "toy".into())
                .unwrap();
        let sub = ds.clone().select_classes(&["c".into(), "b".into()]).unwrap();
        assert_eq!(sub.len, 3);
        assert_eq!(sub.labels.as_deref(), Some(&[1u32, 0, 1][..]));
        assert_eq!(sub.images, vec![1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
        let err = ds.select_classes(&["zebra".into()]).unwrap_err().to_string();
        assert!(err.contains("zebra") && err.contains("a, b, c"), "{err}");
    }

    #[test]
    fn pixels_map_to_minus_one_one() {
        let ds = Dataset::new(vec![0, 255, 128, 64], None, vec![], 1, 2, "toy".into()).unwrap();
        let x = ds.image_f32(0);
        assert_eq!(x[0], -1.0);
        assert_eq!(x[1], 1.0);
        assert!((x[2] - 0.00392).abs() < 1e-3);
    }
}
