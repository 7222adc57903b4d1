use candle_core::{Device, Tensor, Var};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let x = Var::randn(0f32, 1.0, (32, 64, 28, 28), &dev)?;
    let w = Var::randn(0f32, 1.0, (64, 64, 3, 3), &dev)?;
    for _ in 0..3 {
        let s = Instant::now();
        let cols = x.as_tensor().contiguous()?;
        let y = trainer::model::ops::conv2d_gemm(&cols, &w, None, 1, 1)?;
        let f = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let g = y.sum_all()?.backward()?;
        let b = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let a = w.reshape((64, 576))?;
        let m = Tensor::randn(0f32, 1.0, (576, 25088), &dev)?;
        let s2 = Instant::now();
        let _p = a.matmul(&m)?;
        let mm = s2.elapsed().as_secs_f64();
        let _ = s;
        let s3 = Instant::now();
        let _n = x.as_tensor().conv2d(&w, 1, 1, 1, 1)?;
        let native = s3.elapsed().as_secs_f64();
        eprintln!(
            "ours fwd {f:.3}s bwd {b:.3}s | plain gemm 64x576x25088 {mm:.3}s | candle conv2d fwd {native:.3}s {}",
            g.get(&w).is_some()
        );
    }
    Ok(())
}
