//! Embedding the generator in a Rust program.
//! cargo run --release -p runtime --example embed -- fixtures/tiny-mnist-f32.onnx out.png
use runtime::generator::{GenerateRequest, Generator, GeneratorOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).map(String::as_str).unwrap_or("fixtures/tiny-mnist-f32.onnx");
    let out = args.get(2).map(String::as_str).unwrap_or("embed.png");
    let mut g = Generator::open(model.as_ref(), &GeneratorOptions::default())?;
    println!(
        "model: {}x{} px, {} channel(s), {} classes, provider {}",
        g.info().image_size,
        g.info().image_size,
        g.info().channels,
        g.info().num_classes,
        g.provider()
    );
    let req = GenerateRequest { n: 8, steps: 20, sampler: "dpm++".into(), seed: 42, ..Default::default() };
    let images = g.generate(&req, &mut |s| {
        if s.step + 1 == s.num_steps {
            println!("chunk starting at image {} done", s.chunk_start);
        }
    })?;
    images.save_grid(out.as_ref())?;
    println!("wrote {out}");
    Ok(())
}
