//! IDX files (LeCun's MNIST format; also Fashion-MNIST and EMNIST), raw or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::Dataset;

/// IDX files (after gunzipping) larger than this are refused, so a small hostile file (a gzip bomb) cannot make
/// the loader allocate more; the largest real one, EMNIST ByClass training images, is 546 MB.
pub const MAX_IDX_BYTES: u64 = 1 << 30;

/// Reads a whole file, gunzipping it when it starts with the gzip magic; at most `limit` bytes
/// ([`MAX_IDX_BYTES`]), never inflating more than that.
fn read_maybe_gz(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let too_big = || anyhow::anyhow!("{}: more than {limit} bytes of IDX data: refused", path.display());
    let len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if len > limit {
        return Err(too_big());
    }
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = vec![];
        flate2::read::GzDecoder::new(&raw[..])
            .take(limit + 1)
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt gzip data", path.display()))?;
        if out.len() as u64 > limit {
            return Err(too_big());
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes: returns (dims, data).
pub fn parse(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        bail!("{}: not an IDX file (bad magic number)", path.display());
    }
    if bytes[2] != 0x08 {
        bail!("{}: IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)", path.display(), bytes[2]);
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        bail!("{}: truncated IDX header", path.display());
    }
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let Some(n) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
        bail!("{}: IDX header declares dims {:?}, more bytes than can exist", path.display(), dims);
    };
    if bytes.len() - header != n {
        bail!(
            "{}: IDX header promises {:?} = {n} bytes of data, the file has {}",
            path.display(),
            dims,
            bytes.len() - header
        );
    }
    Ok((dims, bytes[header..].to_vec()))
}

/// Finds `{prefix}-{kind}-idx{d}-ubyte[.gz]` (or the `prefix-kind.idx3-ubyte` spelling) in `dir`.
fn find(dir: &Path, prefix: &str, kind: &str, d: u8) -> Result<PathBuf> {
    let names = [
        format!("{prefix}-{kind}-idx{d}-ubyte"),
        format!("{prefix}-{kind}-idx{d}-ubyte.gz"),
        format!("{prefix}-{kind}.idx{d}-ubyte"),
        format!("{prefix}-{kind}.idx{d}-ubyte.gz"),
    ];
    for n in &names {
        let p = dir.join(n);
        if p.is_file() {
            return Ok(p);
        }
    }
    if !dir.is_dir() {
        bail!("dataset folder {} does not exist (fetch it with scripts/fetch-data.sh)", dir.display());
    }
    bail!("{}: no {} file (looked for {})", dir.display(), kind, names.join(", "))
}

/// Loads `train-*` or `t10k-*` images and labels from an IDX folder.
pub fn load_dir(dir: &Path, train: bool, class_names: Vec<String>, transpose: bool) -> Result<Dataset> {
    let prefix = if train { "train" } else { "t10k" };
    let ip = find(dir, prefix, "images", 3)?;
    let lp = find(dir, prefix, "labels", 1)?;
    let (idims, mut images) = parse(&read_maybe_gz(&ip, MAX_IDX_BYTES)?, &ip)?;
    let (ldims, labels) = parse(&read_maybe_gz(&lp, MAX_IDX_BYTES)?, &lp)?;
    if idims.len() != 3 || idims[1] != idims[2] {
        bail!("{}: expected square images [N, H, W], found dims {:?}", ip.display(), idims);
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        bail!("{}: {} labels for {} images in {}", lp.display(), ldims.first().unwrap_or(&0), idims[0], ip.display());
    }
    let size = idims[1];
    if size == 0 || idims[0] == 0 {
        bail!("{}: no images (dims {:?})", ip.display(), idims);
    }
    if transpose {
        let n = size * size;
        for img in images.chunks_mut(n) {
            let src = img.to_vec();
            for y in 0..size {
                for x in 0..size {
                    img[y * size + x] = src[x * size + y];
                }
            }
        }
    }
    let labels: Vec<u32> = labels.into_iter().map(u32::from).collect();
    let max = *labels.iter().max().unwrap_or(&0) as usize;
    let class_names = if class_names.is_empty() { (0..=max).map(|i| i.to_string()).collect() } else { class_names };
    if max >= class_names.len() {
        bail!("{}: label {max} but only {} class names", lp.display(), class_names.len());
    }
    Dataset::new(images, Some(labels), class_names, 1, size, format!("{} ({prefix})", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("x");
        let (d, data) = parse(&idx(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]), p).unwrap();
        assert_eq!(d, vec![2, 2, 2]);
        assert_eq!(data.len(), 8);
        assert!(parse(&idx(&[2, 2, 2], &[1, 2, 3]), p).unwrap_err().to_string().contains("promises"));
        assert!(parse(b"\x89PNG", p).unwrap_err().to_string().contains("not an IDX"));
    }

    #[test]
    fn gz_and_raw_load_the_same_and_emnist_transposes() {
        let dir = std::env::temp_dir().join(format!("idx-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img: Vec<u8> = (0..8).collect();
        std::fs::write(dir.join("train-images-idx3-ubyte"), idx(&[2, 2, 2], &img)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &idx(&[2], &[1, 0])).unwrap();
        std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), gz.finish().unwrap()).unwrap();
        let ds = load_dir(&dir, true, vec![], false).unwrap();
        assert_eq!((ds.len, ds.size, ds.channels), (2, 2, 1));
        assert_eq!(ds.labels.as_deref(), Some(&[1u32, 0][..]));
        assert_eq!(ds.class_names, vec!["0", "1"]);
        let t = load_dir(&dir, true, vec![], true).unwrap();
        assert_eq!(&t.images[..4], &[0, 2, 1, 3]);
        let err = load_dir(&dir, false, vec![], false).unwrap_err().to_string();
        assert!(err.contains("t10k-images-idx3-ubyte"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Mutation fuzzing (a smoke run; `IDX_FUZZ_CASES=200000 cargo test --release -p trainer idx_fuzz` for a
    /// longer one): byte flips, truncations, extensions and hostile header fields of a valid pair never panic,
    /// and what loads is what the header says.
    #[test]
    fn idx_fuzz_mutated_files_load_or_are_refused_never_panic() {
        use rand::{Rng, SeedableRng};
        use runtime::fuzz::largest_allocation;
        let cases: usize = std::env::var("IDX_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
        let dir = std::env::temp_dir().join(format!("idx-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let images = idx(&[3, 4, 4], &(0..48).collect::<Vec<u8>>());
        let labels = idx(&[3], &[0, 2, 1]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (mut loaded, mut refused, mut largest) = (0, 0, 0);
        for case in 0..cases {
            let mut files = [images.clone(), labels.clone()];
            let f = &mut files[rng.gen_range(0..2)];
            match rng.gen_range(0..5) {
                0..=2 => runtime::fuzz::mutate_bytes(f, &mut rng, 40),
                // hostile dims: huge, zero, overflowing
                3 => {
                    let i = 4 + 4 * rng.gen_range(0..(f[3] as usize).max(1));
                    let v = [u32::MAX, 0, 1 << 31, rng.gen()][rng.gen_range(0..4)];
                    if i + 4 <= f.len() {
                        f[i..i + 4].copy_from_slice(&v.to_be_bytes());
                    }
                }
                _ => f[3] = rng.gen(),
            }
            let gz = case % 3 == 0;
            for (name, bytes) in [("train-images-idx3-ubyte", &files[0]), ("train-labels-idx1-ubyte", &files[1])] {
                let _ = std::fs::remove_file(dir.join(name));
                let _ = std::fs::remove_file(dir.join(format!("{name}.gz")));
                if gz {
                    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
                    std::io::Write::write_all(&mut e, bytes).unwrap();
                    std::fs::write(dir.join(format!("{name}.gz")), e.finish().unwrap()).unwrap();
                } else {
                    std::fs::write(dir.join(name), bytes).unwrap();
                }
            }
            let (res, bytes) = largest_allocation(|| load_dir(&dir, true, vec![], case % 2 == 0));
            largest = largest.max(bytes);
            match res {
                Ok(ds) => {
                    loaded += 1;
                    assert_eq!(ds.images.len(), ds.len * ds.size * ds.size);
                }
                Err(_) => refused += 1,
            }
        }
        assert!(refused > cases / 2 && loaded > 0, "{loaded} loaded, {refused} refused");
        runtime::fuzz::report("idx", loaded, refused, largest);
        // a header may declare 2^32 images: nothing is sized by it (the files here are under 200 bytes)
        assert!(largest < 1 << 20, "a {largest}-byte allocation for a file of under 200 bytes");
        // a gzip bomb (64 MiB of zeros in a small file): refused past the limit, having inflated no more than it
        let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            std::io::Write::write_all(&mut e, &zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let p = dir.join("bomb.gz");
        std::fs::write(&p, &bomb).unwrap();
        let e = read_maybe_gz(&p, 16 << 20).unwrap_err().to_string();
        assert!(e.contains("more than 16777216 bytes"), "{e}");
        assert_eq!(read_maybe_gz(&p, 64 << 20).unwrap().len(), 64 << 20, "at the limit it inflates");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
