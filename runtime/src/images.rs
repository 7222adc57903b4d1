//! Generated images: 8-bit conversion, grids, reverse-process strips and PNG files.

use std::path::Path;

use crate::error::{Error, Result};
use crate::sampler::StepInfo;

/// The largest image a file may decode to (all files this toolkit reads: inputs, masks, training folders):
/// 16,384 pixels a side and 64 MiB of decoded pixels (4,096 x 4,096 RGBA). A file that declares more is refused
/// before its pixels are allocated, so a small hostile header cannot claim the size it declares.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// See [`MAX_IMAGE_SIDE`].
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// Opens and decodes an image file (format from its bytes, not its name) within [`MAX_IMAGE_SIDE`] and
/// [`MAX_IMAGE_BYTES`].
pub fn decode(path: &Path) -> std::result::Result<image::DynamicImage, image::ImageError> {
    let mut reader = image::ImageReader::open(path)?.with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    reader.decode()
}

/// An image file as a model input: [c, h, w] in [-1, 1] (x = pixel / 127.5 - 1), converted to `channels` (1:
/// luma, 3: RGB) and resized to `size` x `size` (triangle filter). Transparent pixels are laid on
/// `background` (the model's training background, its metadata), or dropped without one. Also returns what
/// was changed, for the caller to tell its user.
pub fn load_image(
    path: &Path,
    channels: usize,
    size: usize,
    background: Option<[u8; 3]>,
) -> Result<(Vec<f32>, Vec<String>)> {
    let mut img = decode(path).map_err(|e| image_error(path, "read", e))?;
    let mut notes = vec![];
    if img.color().has_alpha() {
        match background {
            Some(bg) => {
                img = image::DynamicImage::ImageRgb8(composite(&img.to_rgba8(), bg));
                notes.push(format!(
                    "{}: transparent pixels laid on the model's training background {bg:?}",
                    path.display()
                ));
            }
            None => notes.push(format!("{}: transparency dropped (the model names no background)", path.display())),
        }
    }
    let (w, h) = (img.width(), img.height());
    if (w as usize, h as usize) != (size, size) {
        notes.push(format!("{}: {w}x{h} resized to the model's {size}x{size}", path.display()));
    }
    let img_channels = img.color().channel_count() as usize;
    let filter = image::imageops::FilterType::Triangle;
    let pixels: Vec<u8> = match channels {
        1 => {
            if img_channels >= 3 {
                notes.push(format!("{}: colour converted to the model's grey", path.display()));
            }
            image::imageops::resize(&img.to_luma8(), size as u32, size as u32, filter).into_raw()
        }
        3 => {
            if img_channels < 3 {
                notes.push(format!("{}: grey converted to the model's RGB", path.display()));
            }
            image::imageops::resize(&img.to_rgb8(), size as u32, size as u32, filter).into_raw()
        }
        c => return Err(Error::request("channels", format!("{c}: images have 1 or 3 channels"))),
    };
    Ok((from_u8_hwc(&pixels, channels), notes))
}

/// `img` laid on the colour `bg` by its alpha (out = alpha pixel + (1 - alpha) bg, rounded): how the trainer
/// reads a folder of images with transparency, and how `generate` reads an input image for such a model.
pub fn composite(img: &image::RgbaImage, bg: [u8; 3]) -> image::RgbImage {
    image::RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        let a = p[3] as u32;
        let mix = |c: u8, b: u8| ((c as u32 * a + b as u32 * (255 - a) + 127) / 255) as u8;
        image::Rgb([mix(p[0], bg[0]), mix(p[1], bg[1]), mix(p[2], bg[2])])
    })
}

/// 8-bit interleaved pixels [h, w, c] -> [c, h, w] in [-1, 1] (x = pixel / 127.5 - 1), the inverse of
/// [`to_u8_nhwc`] for one image.
pub fn from_u8_hwc(pixels: &[u8], channels: usize) -> Vec<f32> {
    let hw = pixels.len() / channels;
    let mut x = vec![0f32; pixels.len()];
    for (i, p) in pixels.iter().enumerate() {
        x[(i % channels) * hw + i / channels] = *p as f32 / 127.5 - 1.0;
    }
    x
}

/// An 8-bit mask (>= 128: generate, below: keep) as the sampler's known-pixel weights (1 = keep).
pub fn mask_from_u8(mask: &[u8]) -> Vec<f32> {
    mask.iter().map(|&p| if p >= 128 { 0.0 } else { 1.0 }).collect()
}

/// An inpainting mask file: white (>= 128) where the image is to be generated, black where it is kept. It
/// must have the size of the image it masks (`image_size`, width x height); it is resized to `size` x `size`
/// (nearest). Returns, per pixel, 1 where the image is known (kept) and 0 where it is generated.
pub fn load_mask(path: &Path, image_size: (u32, u32), size: usize) -> Result<Vec<f32>> {
    let img = decode(path).map_err(|e| image_error(path, "read", e))?;
    if (img.width(), img.height()) != image_size {
        return Err(Error::request(
            "mask",
            format!(
                "{} is {}x{}, the image it masks {}x{}",
                path.display(),
                img.width(),
                img.height(),
                image_size.0,
                image_size.1
            ),
        ));
    }
    let small =
        image::imageops::resize(&img.to_luma8(), size as u32, size as u32, image::imageops::FilterType::Nearest);
    Ok(mask_from_u8(&small.into_raw()))
}

/// Width and height of an image file.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    image::image_dimensions(path).map_err(|e| image_error(path, "read", e))
}

/// An image file that cannot be read or written (`what`).
fn image_error(path: &Path, what: &str, e: image::ImageError) -> Error {
    Error::Image { path: path.to_path_buf(), reason: format!("cannot {what}: {e}") }
}

/// 8-bit pixels (`color`'s layout) as the bytes of a PNG file.
fn encode_png(pixels: &[u8], width: usize, height: usize, color: image::ColorType) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(pixels, width as u32, height as u32, color.into())
        .map_err(|e| image_error(Path::new("<memory>"), "encode a PNG", e))?;
    Ok(out)
}

/// Generated images as 8-bit pixels, [n, h, w, c] interleaved.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
    /// The label of each image (conditional models).
    pub labels: Option<Vec<i64>>,
}

/// [-1, 1] NCHW floats -> 8-bit NHWC (pixel = (x + 1) * 127.5, rounded).
pub fn to_u8_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * c * h * w];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                let v = x[(i * c + ch) * h * w + p];
                out[(i * h * w + p) * c + ch] = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
            }
        }
    }
    out
}

impl Images {
    /// From [-1, 1] NCHW floats ([n, c, h, w]).
    pub fn from_f32(x: &[f32], n: usize, [c, h, w]: [usize; 3], labels: Option<Vec<i64>>) -> Self {
        Self { n, channels: c, height: h, width: w, pixels: to_u8_nhwc(x, n, c, h, w), labels }
    }

    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width * self.channels;
        &self.pixels[i * n..(i + 1) * n]
    }

    fn color(&self) -> image::ColorType {
        if self.channels == 1 {
            image::ColorType::L8
        } else {
            image::ColorType::Rgb8
        }
    }

    /// A grid with ceil(sqrt(n)) columns and a 2-pixel border.
    pub fn grid(&self, cols: Option<usize>) -> (Vec<u8>, usize, usize) {
        let cols = cols.unwrap_or_else(|| (self.n as f64).sqrt().ceil() as usize).max(1);
        let rows = self.n.div_ceil(cols);
        let pad = 2;
        let (gw, gh) = (cols * self.width + (cols + 1) * pad, rows * self.height + (rows + 1) * pad);
        let c = self.channels;
        let mut g = vec![0u8; gw * gh * c];
        for i in 0..self.n {
            let (r, col) = (i / cols, i % cols);
            let (x0, y0) = (pad + col * (self.width + pad), pad + r * (self.height + pad));
            let img = self.image(i);
            for y in 0..self.height {
                let src = &img[y * self.width * c..(y + 1) * self.width * c];
                let dst = ((y0 + y) * gw + x0) * c;
                g[dst..dst + self.width * c].copy_from_slice(src);
            }
        }
        (g, gw, gh)
    }

    pub fn save_grid(&self, path: &Path) -> Result<()> {
        self.save_grid_cols(path, None)
    }

    /// A grid PNG with `cols` columns (None: ceil(sqrt(n))).
    pub fn save_grid_cols(&self, path: &Path, cols: Option<usize>) -> Result<()> {
        let (g, w, h) = self.grid(cols);
        image::save_buffer(path, &g, w as u32, h as u32, self.color()).map_err(|e| image_error(path, "write", e))
    }

    /// The grid (`cols` columns; None: ceil(sqrt(n))) as PNG bytes.
    pub fn grid_png(&self, cols: Option<usize>) -> Result<Vec<u8>> {
        let (g, w, h) = self.grid(cols);
        encode_png(&g, w, h, self.color())
    }

    /// Image `i` as PNG bytes.
    pub fn png(&self, i: usize) -> Result<Vec<u8>> {
        encode_png(self.image(i), self.width, self.height, self.color())
    }

    /// Appends the images of `chunk` (of this set's shape; a chunk of a longer run). Labels stay this set's.
    pub fn append(&mut self, chunk: &Images) {
        debug_assert_eq!((chunk.channels, chunk.height, chunk.width), (self.channels, self.height, self.width));
        self.pixels.extend_from_slice(&chunk.pixels);
        self.n += chunk.n;
    }

    /// One PNG per image: DIR/000000.png ...
    pub fn save_each(&self, dir: &Path) -> Result<()> {
        self.save_each_from(dir, 0)
    }

    /// One PNG per image, numbered from `first`: `DIR/<first>.png` ... (the chunks of a longer run).
    pub fn save_each_from(&self, dir: &Path, first: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|err| Error::Io { path: dir.to_path_buf(), err })?;
        for i in 0..self.n {
            let p = dir.join(format!("{:06}.png", first + i));
            image::save_buffer(&p, self.image(i), self.width as u32, self.height as u32, self.color())
                .map_err(|e| image_error(&p, "write", e))?;
        }
        Ok(())
    }
}

/// Records a reverse-process strip: x_t and the predicted x0 of the first `rows` images of the first chunk at
/// `cols` evenly spaced steps. Feed it every [`StepInfo`]; [`Strip::tiles`] lays the frames out row-major.
pub struct Strip {
    rows: usize,
    per: usize,
    want: Vec<usize>,
    /// (t, x_t, x0) per captured step.
    frames: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

impl Strip {
    /// `num_steps`: the sampler's steps per chunk; `per`: values per image; `rows` is capped by the caller's
    /// batch (only the first chunk is recorded).
    pub fn new(num_steps: usize, cols: usize, rows: usize, per: usize) -> Self {
        let cols = cols.clamp(1, num_steps.max(1));
        let want = (0..cols).map(|k| k * (num_steps.max(1) - 1) / (cols - 1).max(1)).collect();
        Self { rows, per, want, frames: vec![] }
    }

    pub fn record(&mut self, s: &StepInfo) {
        let rows = self.rows.min(s.x.len() / self.per);
        if s.chunk_start == 0 && self.want.contains(&s.step) && self.frames.len() < self.want.len() {
            self.frames.push((s.t, s.x[..rows * self.per].to_vec(), s.x0[..rows * self.per].to_vec()));
        }
    }

    /// The timestep of each column.
    pub fn timesteps(&self) -> Vec<usize> {
        self.frames.iter().map(|f| f.0).collect()
    }

    /// (tiles, columns): for each image a row of x_t then a row of predicted x0, one column per captured step.
    pub fn tiles(&self) -> (Vec<f32>, usize) {
        let rows = self.frames.first().map_or(0, |f| f.1.len() / self.per);
        let mut tiles = vec![];
        for i in 0..rows {
            for which in 0..2 {
                for (_, x, x0) in &self.frames {
                    let src = if which == 0 { x } else { x0 };
                    tiles.extend_from_slice(&src[i * self.per..(i + 1) * self.per]);
                }
            }
        }
        (tiles, self.frames.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparency_is_laid_on_the_models_background_when_it_names_one() {
        // a fully transparent black pixel
        let img = image::RgbaImage::from_raw(1, 1, vec![0, 0, 0, 0]).unwrap();
        let p = std::env::temp_dir().join(format!("alpha-{}.png", std::process::id()));
        img.save(&p).unwrap();
        let (x, notes) = load_image(&p, 3, 1, Some([255, 0, 255])).unwrap();
        assert_eq!(x, vec![1.0, -1.0, 1.0]);
        assert!(notes.iter().any(|n| n.contains("training background [255, 0, 255]")), "{notes:?}");
        let (x, notes) = load_image(&p, 3, 1, None).unwrap();
        assert_eq!(x, vec![-1.0, -1.0, -1.0]);
        assert!(notes.iter().any(|n| n.contains("transparency dropped")), "{notes:?}");
        // half transparent grey on white
        let half = image::RgbaImage::from_raw(1, 1, vec![0, 0, 0, 128]).unwrap();
        assert_eq!(composite(&half, [255, 255, 255]).get_pixel(0, 0).0, [127, 127, 127]);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn strip_records_evenly_spaced_steps_of_the_first_chunk() {
        let mut strip = Strip::new(50, 8, 2, 3);
        for chunk_start in [0, 4] {
            for step in 0..50 {
                // 4 images of 3 values; value = step (x) and -step (x0), + image index / 10
                let x: Vec<f32> = (0..12).map(|i| step as f32 + (i / 3) as f32 / 10.0).collect();
                let x0: Vec<f32> = x.iter().map(|v| -v).collect();
                strip.record(&StepInfo { chunk_start, step, num_steps: 50, t: 1000 - 20 * step, x: &x, x0: &x0 });
            }
        }
        let ts = strip.timesteps();
        assert_eq!(ts.len(), 8);
        assert_eq!((ts[0], ts[7]), (1000, 1000 - 20 * 49));
        let (tiles, cols) = strip.tiles();
        assert_eq!((tiles.len(), cols), (2 * 2 * 8 * 3, 8));
        // row 0: image 0's x_t at step 0..49; row 1: its x0; row 2: image 1's x_t
        assert_eq!((tiles[0], tiles[7 * 3]), (0.0, 49.0));
        assert_eq!(tiles[8 * 3 + 7 * 3], -49.0);
        assert!((tiles[16 * 3] - 0.1).abs() < 1e-6);
        // fewer steps than columns: one column per step
        assert_eq!(Strip::new(3, 8, 1, 1).want, vec![0, 1, 2]);
    }
}
