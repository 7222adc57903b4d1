//! Folders of PNG/JPEG images of any size. With sub-folders, each sub-folder is a class (sorted by name);
//! otherwise the set is unconditional. Images are composited onto a background (alpha), optionally made
//! grayscale, resized so the shorter side is the model size, and center-cropped.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use runtime::images::composite;

use super::Dataset;

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read image folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.file_name().and_then(|n| n.to_str()).unwrap_or(".").starts_with('.'))
        .collect();
    v.sort();
    Ok(v)
}

/// Resize so the shorter side is `size` (Catmull-Rom), then center-crop to size x size.
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (size, ((h as u64 * size as u64 + w as u64 / 2) / w as u64).max(size as u64) as u32)
    } else {
        (((w as u64 * size as u64 + h as u64 / 2) / h as u64).max(size as u64) as u32, size)
    };
    let resized =
        if (nw, nh) == (w, h) { img.clone() } else { image::imageops::resize(img, nw, nh, FilterType::CatmullRom) };
    let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
    image::imageops::crop_imm(&resized, x0, y0, size, size).to_image()
}

/// Decodes, composites, resizes and crops one file into CHW bytes.
pub fn load_image(path: &Path, size: usize, grayscale: bool, bg: [u8; 3]) -> Result<Vec<u8>> {
    let img: DynamicImage =
        runtime::images::decode(path).with_context(|| format!("cannot decode image {}", path.display()))?;
    let rgb = composite(&img.to_rgba8(), bg);
    let rgb = resize_center_crop(&rgb, size as u32);
    let n = size * size;
    if grayscale {
        // ITU-R BT.601 luma, as PIL's convert("L")
        Ok(rgb
            .pixels()
            .map(|p| ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8)
            .collect())
    } else {
        let mut out = vec![0u8; 3 * n];
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * n + i] = p[c];
            }
        }
        Ok(out)
    }
}

pub fn load(dir: &Path, size: usize, grayscale: bool, bg: [u8; 3]) -> Result<Dataset> {
    if !dir.is_dir() {
        bail!("image folder {} does not exist (fetch sets with scripts/fetch-data.sh)", dir.display());
    }
    let entries = sorted_entries(dir)?;
    let subdirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let mut files: Vec<(PathBuf, Option<u32>)> = vec![];
    let mut class_names = vec![];
    if subdirs.is_empty() {
        files.extend(entries.iter().filter(|p| is_image(p)).map(|p| (p.clone(), None)));
    } else {
        for (i, d) in subdirs.iter().enumerate() {
            class_names.push(d.file_name().unwrap().to_string_lossy().to_string());
            files.extend(sorted_entries(d)?.into_iter().filter(|p| is_image(p)).map(|p| (p, Some(i as u32))));
        }
    }
    if files.is_empty() {
        bail!("image folder {} holds no PNG or JPEG files", dir.display());
    }
    let channels = if grayscale { 1 } else { 3 };
    let mut images = Vec::with_capacity(files.len() * channels * size * size);
    for (p, _) in &files {
        images.extend(load_image(p, size, grayscale, bg)?);
    }
    let labels = if class_names.is_empty() { None } else { Some(files.iter().map(|(_, l)| l.unwrap()).collect()) };
    Dataset::new(images, labels, class_names, channels, size, format!("{} (image folder)", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbaImage;

    #[test]
    fn classes_from_subfolders_resize_crop_alpha_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("folder-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for c in ["cats", "dogs"] {
            std::fs::create_dir_all(dir.join(c)).unwrap();
        }
        // 20x10 fully transparent image: composited onto the background
        let clear = RgbaImage::from_pixel(20, 10, image::Rgba([255, 0, 0, 0]));
        clear.save(dir.join("cats/a.png")).unwrap();
        // 8x16 opaque red
        let red = RgbaImage::from_pixel(8, 16, image::Rgba([255, 0, 0, 255]));
        red.save(dir.join("dogs/b.png")).unwrap();
        let ds = load(&dir, 8, false, [0, 0, 255]).unwrap();
        assert_eq!((ds.len, ds.channels, ds.size), (2, 3, 8));
        assert_eq!(ds.class_names, vec!["cats", "dogs"]);
        assert_eq!(ds.labels.as_deref(), Some(&[0u32, 1][..]));
        // transparent -> blue background
        assert_eq!((ds.images[0], ds.images[64], ds.images[128]), (0, 0, 255));
        // red stays red after resize/crop
        assert_eq!((ds.images[192], ds.images[192 + 64], ds.images[192 + 128]), (255, 0, 0));
        let gray = load(&dir, 8, true, [0, 0, 255]).unwrap();
        assert_eq!(gray.channels, 1);
        assert_eq!(gray.images[64], 76); // 0.299 * 255
        std::fs::write(dir.join("dogs/broken.png"), b"not a png").unwrap();
        let err = format!("{:#}", load(&dir, 8, false, [0, 0, 0]).unwrap_err());
        assert!(err.contains("broken.png"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resize_keeps_aspect_then_crops_center() {
        let img =
            RgbImage::from_fn(68, 56, |x, _| if x < 34 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) });
        let out = resize_center_crop(&img, 64);
        assert_eq!(out.dimensions(), (64, 64));
        assert!(out.get_pixel(5, 30)[0] < 10 && out.get_pixel(60, 30)[0] > 245);
    }
}
