//! CIFAR-10 binary batches (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`): records of
//! 1 label byte + 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32x32).

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{Dataset, CIFAR10_CLASSES};

pub const RECORD: usize = 1 + 3 * 32 * 32;

/// Parses one batch file's bytes into (images `[N, 3, 32, 32]`, labels).
pub fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, Vec<u32>)> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        bail!("{}: {} bytes is not a whole number of CIFAR-10 records of {RECORD} bytes", path.display(), bytes.len());
    }
    let n = bytes.len() / RECORD;
    let mut images = Vec::with_capacity(n * (RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks(RECORD).enumerate() {
        if rec[0] as usize >= CIFAR10_CLASSES.len() {
            bail!("{}: record {i} has label {}, CIFAR-10 labels are 0..9", path.display(), rec[0]);
        }
        labels.push(rec[0] as u32);
        images.extend_from_slice(&rec[1..]);
    }
    Ok((images, labels))
}

/// Loads the training batches (all `data_batch_*.bin` present) or `test_batch.bin`.
pub fn load_dir(dir: &Path, train: bool) -> Result<Dataset> {
    if !dir.is_dir() {
        bail!(
            "dataset folder {} does not exist (CIFAR-10 binary version: data_batch_1.bin ... test_batch.bin)",
            dir.display()
        );
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if train {
                n.starts_with("data_batch_") && n.ends_with(".bin")
            } else {
                n == "test_batch.bin"
            }
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no {} in this folder", dir.display(), if train { "data_batch_N.bin" } else { "test_batch.bin" });
    }
    let (mut images, mut labels) = (vec![], vec![]);
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        let (i, l) = parse(&bytes, f)?;
        images.extend(i);
        labels.extend(l);
    }
    let names = CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect();
    Dataset::new(
        images,
        Some(labels),
        names,
        3,
        32,
        format!("{} (CIFAR-10 {})", dir.display(), if train { "train" } else { "test" }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exact_binary_layout_and_subsets() {
        // Three records written in the CIFAR-10 layout: label, then R, G, B planes.
        let dir = std::env::temp_dir().join(format!("cifar-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = vec![];
        for (label, r, g, b) in [(0u8, 10u8, 20u8, 30u8), (3, 40, 50, 60), (7, 70, 80, 90)] {
            bytes.push(label);
            bytes.extend(std::iter::repeat_n(r, 1024));
            bytes.extend(std::iter::repeat_n(g, 1024));
            bytes.extend(std::iter::repeat_n(b, 1024));
        }
        std::fs::write(dir.join("data_batch_1.bin"), &bytes).unwrap();
        std::fs::write(dir.join("data_batch_2.bin"), &bytes[..RECORD]).unwrap();
        let ds = load_dir(&dir, true).unwrap();
        assert_eq!((ds.len, ds.channels, ds.size), (4, 3, 32));
        assert_eq!(ds.labels.as_deref(), Some(&[0u32, 3, 7, 0][..]));
        // second image: red plane 40, green 50, blue 60
        let img = &ds.images[3072..2 * 3072];
        assert_eq!((img[0], img[1024], img[2048], img[3071]), (40, 50, 60, 60));
        let sub = ds.select_classes(&["horse".into(), "cat".into()]).unwrap();
        assert_eq!(sub.labels.as_deref(), Some(&[1u32, 0][..]));
        assert_eq!(sub.class_names, vec!["horse", "cat"]);
        std::fs::write(dir.join("data_batch_3.bin"), &bytes[..100]).unwrap();
        let err = load_dir(&dir, true).unwrap_err().to_string();
        assert!(err.contains("data_batch_3.bin"), "{err}");
        assert!(load_dir(&dir, false).unwrap_err().to_string().contains("test_batch.bin"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Mutation fuzzing (smoke run): truncated, extended and flipped batches never panic, and what parses holds
    /// whole records with labels 0..9.
    #[test]
    fn cifar_fuzz_mutated_batches_parse_or_are_refused() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let good: Vec<u8> =
            (0..3 * RECORD).map(|i| if i % RECORD == 0 { (i / RECORD) as u8 } else { i as u8 }).collect();
        let p = Path::new("batch.bin");
        let (mut ok, mut refused, mut largest) = (0, 0, 0);
        for _ in 0..3000 {
            let mut b = good.clone();
            match rng.gen_range(0..3) {
                0 => b.truncate(rng.gen_range(0..b.len())),
                1 => b.extend((0..rng.gen_range(1..2 * RECORD)).map(|_| rng.gen::<u8>())),
                _ => {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            let (res, bytes) = runtime::fuzz::largest_allocation(|| parse(&b, p));
            largest = largest.max(bytes);
            match res {
                Ok((images, labels)) => {
                    ok += 1;
                    assert_eq!(images.len(), labels.len() * (RECORD - 1));
                    assert!(labels.iter().all(|l| *l < 10));
                }
                Err(_) => refused += 1,
            }
        }
        assert!(ok > 0 && refused > 0, "{ok} parsed, {refused} refused");
        runtime::fuzz::report("cifar", ok, refused, largest);
        // nothing is sized by a declared count: at most twice the batch itself (at most 5 records here)
        assert!(largest <= 2 * 5 * RECORD, "{largest} bytes for a batch of at most {} bytes", 5 * RECORD);
    }
}
