//! Generated images: 8-bit conversion, grids and PNG files.

use std::path::Path;

use anyhow::{Context, Result};

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
        image::save_buffer(path, &g, w as u32, h as u32, self.color())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// One PNG per image: DIR/000000.png ...
    pub fn save_each(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for i in 0..self.n {
            let p = dir.join(format!("{i:06}.png"));
            image::save_buffer(&p, self.image(i), self.width as u32, self.height as u32, self.color())
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        Ok(())
    }
}
