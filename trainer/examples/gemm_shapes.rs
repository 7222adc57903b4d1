//! The GEMMs of the Winograd convolutions (kernels/winograd.rs) on one core: the gemm crate the trainer uses
//! against a CBLAS library loaded at run time (BLIS, OpenBLAS), each shape in the layout the kernels use.
//! cargo run --release -p trainer --example gemm_shapes -- [LIBRARY.so ...]
//! (default: Debian's BLIS and OpenBLAS, pthread builds, each set to one thread)
//!
//! Issue #32 asks whether another GEMM library would speed the step up; the workers run each half batch on one
//! thread, so one thread is what counts. The shapes are those of the mnist preset's (ch 32, mult (1, 2, 2))
//! same-size 3x3 convolutions at a worker's half of batch 32: the forward and input-gradient GEMMs
//! M[tiles, outs] = V[tiles, ins] . U[ins, outs] over a group of ~64 tiles, and the weight gradient's
//! dU[outs, ins] += W[tiles, outs]^T . V[tiles, ins] over a group of ~256.
use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Instant;

use anyhow::{bail, Result};
use gemm::Parallelism;

/// cblas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// One GEMM: dst [m, n] (+)= lhs [m, k] . rhs [k, n], lhs stored transposed ([k, m]) when `lhs_t`.
#[derive(Clone, Copy)]
struct Shape {
    what: &'static str,
    m: usize,
    n: usize,
    k: usize,
    lhs_t: bool,
    /// How many such calls a step of the half batch makes (the layer count times the 36 positions times the
    /// groups), to weight the shape in the total.
    calls: usize,
}

fn shapes() -> Vec<Shape> {
    // (map side, ins, outs, layers of this shape): the down path's residual blocks, the middle's, the up path's
    // (their first convolution reads the skip concatenated) and the upsampling convolutions; the one-channel input
    // and output convolutions left out
    let layers = [
        (28, 32, 32, 7),
        (28, 64, 32, 2),
        (28, 96, 32, 1),
        (28, 64, 64, 1),
        (14, 32, 64, 1),
        (14, 64, 64, 7),
        (14, 96, 64, 1),
        (14, 128, 64, 2),
        (7, 64, 64, 11),
        (7, 128, 64, 3),
    ];
    let mut out = Vec::new();
    for (side, ins, outs, n) in layers {
        let tiles_per_image = (side as usize).div_ceil(4).pow(2);
        let images = 16;
        let group = 64usize.div_ceil(tiles_per_image).max(1) * tiles_per_image;
        let groups = (images * tiles_per_image).div_ceil(group);
        let grad_group = 256usize.div_ceil(tiles_per_image).max(1).min(images) * tiles_per_image;
        let grad_groups = (images * tiles_per_image).div_ceil(grad_group);
        let (fwd, dw) = (36 * n * groups, 36 * n * grad_groups);
        out.push(Shape { what: "forward", m: group, n: outs, k: ins, lhs_t: false, calls: fwd });
        out.push(Shape { what: "input grad", m: group, n: ins, k: outs, lhs_t: false, calls: fwd });
        out.push(Shape { what: "weight grad", m: outs, n: ins, k: grad_group, lhs_t: true, calls: dw });
    }
    out
}

fn gemm_crate(s: Shape, dst: &mut [f32], lhs: &[f32], rhs: &[f32]) {
    let (lhs_rs, lhs_cs) = if s.lhs_t { (1, s.m) } else { (s.k, 1) };
    // SAFETY: dst is m x n, lhs m x k (or k x m), rhs k x n, all dense
    unsafe {
        gemm::gemm(
            s.m,
            s.n,
            s.k,
            dst.as_mut_ptr(),
            1,
            s.n as isize,
            true,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            s.n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

struct Cblas {
    name: String,
    sgemm: Sgemm,
}

impl Cblas {
    fn open(path: &str) -> Result<Self> {
        let c = CString::new(path)?;
        // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols are the CBLAS and threading entry points
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if h.is_null() {
                bail!("cannot load {path}");
            }
            let sym = |n: &str| libc::dlsym(h, CString::new(n).unwrap().as_ptr() as *const c_char);
            let s = sym("cblas_sgemm");
            if s.is_null() {
                bail!("{path} has no cblas_sgemm");
            }
            for setter in ["bli_thread_set_num_threads", "openblas_set_num_threads"] {
                let f = sym(setter);
                if !f.is_null() {
                    let set = std::mem::transmute::<*mut c_void, unsafe extern "C" fn(c_int)>(f);
                    set(1);
                }
            }
            Ok(Cblas {
                name: path.rsplit('/').next().unwrap_or(path).to_string(),
                sgemm: std::mem::transmute::<*mut c_void, Sgemm>(s),
            })
        }
    }

    fn run(&self, s: Shape, dst: &mut [f32], lhs: &[f32], rhs: &[f32]) {
        let (ta, lda) = if s.lhs_t { (TRANS, s.m) } else { (NO_TRANS, s.k) };
        let (m, n, k) = (s.m as c_int, s.n as c_int, s.k as c_int);
        // SAFETY: the same extents as gemm_crate's
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                ta,
                NO_TRANS,
                m,
                n,
                k,
                1.0,
                lhs.as_ptr(),
                lda as c_int,
                rhs.as_ptr(),
                n,
                1.0,
                dst.as_mut_ptr(),
                n,
            )
        }
    }
}

/// The fastest of a few timings of `reps` calls, in seconds a call.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            (0..reps).for_each(|_| f());
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let paths = if args.is_empty() {
        vec![
            "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4".to_string(),
            "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0".to_string(),
        ]
    } else {
        args
    };
    let libs: Vec<Cblas> = paths.iter().map(|p| Cblas::open(p)).collect::<Result<_>>()?;
    let mut shapes = shapes();
    shapes.push(Shape { what: "square (peak)", m: 1024, n: 1024, k: 1024, lhs_t: false, calls: 0 });
    let mut header = "| GEMM | m x n x k | calls a step | gemm crate GFLOP/s".to_string();
    libs.iter().for_each(|l| header += &format!(" | {} GFLOP/s", l.name));
    println!("{header} |");
    println!("|{}", " --- |".repeat(4 + libs.len()));
    let mut totals = vec![0f64; 1 + libs.len()];
    for s in shapes {
        let lhs: Vec<f32> = (0..s.m * s.k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
        let rhs: Vec<f32> = (0..s.k * s.n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
        let flop = 2.0 * (s.m * s.n * s.k) as f64;
        let reps = ((1e9 / flop) as usize).clamp(1, 100_000);
        let mut dst = vec![0f32; s.m * s.n];
        let mut secs = vec![time(reps, || gemm_crate(s, &mut dst, &lhs, &rhs))];
        // the libraries must agree with the gemm crate
        let reference = {
            let mut d = vec![0f32; s.m * s.n];
            gemm_crate(s, &mut d, &lhs, &rhs);
            d
        };
        for l in &libs {
            let mut d = vec![0f32; s.m * s.n];
            l.run(s, &mut d, &lhs, &rhs);
            let err = d.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = reference.iter().map(|v| v.abs()).fold(1f32, f32::max);
            if err > 1e-4 * scale {
                bail!("{} differs from the gemm crate by {err} on {}x{}x{}", l.name, s.m, s.n, s.k);
            }
            secs.push(time(reps, || l.run(s, &mut dst, &lhs, &rhs)));
        }
        let mut row = format!("| {} | {} x {} x {} | {} ", s.what, s.m, s.n, s.k, s.calls);
        for (i, t) in secs.iter().enumerate() {
            row += &format!("| {:.1} ", flop / t / 1e9);
            totals[i] += t * s.calls as f64;
        }
        println!("{row}|");
    }
    let mut row = "| all of a step's Winograd GEMMs (half batch, one core) | | | ".to_string();
    totals.iter().enumerate().for_each(|(i, t)| row += &format!("{}{:.1} ms", if i > 0 { " | " } else { "" }, t * 1e3));
    println!("{row} |");
    Ok(())
}
