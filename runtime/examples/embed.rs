//! Embedding the generator in a Rust program.
//! cargo run --release -p runtime --example embed -- fixtures/tiny-mnist-f32.onnx out.png
use runtime::generator::{GenerateRequest, Generator, GeneratorOptions, InitImage, Inpaint, SampleOptions};
use runtime::sampler::SamplerKind;

fn main() -> runtime::Result<()> {
    // ONNX Runtime: ORT_DYLIB_PATH, the executable's folder, or where scripts/setup.sh put it in this checkout
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(
        concat!(env!("CARGO_MANIFEST_DIR"), "/..").as_ref(),
    ));
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
    let req = GenerateRequest {
        n: 8,
        steps: 20,
        sampler: SamplerKind::DpmSolverPP,
        options: SampleOptions { seed: 42, ..Default::default() },
        ..Default::default()
    };
    let images = g.generate(&req, &mut |s| {
        if s.step + 1 == s.num_steps {
            println!("chunk starting at image {} done", s.chunk_start);
        }
    })?;
    images.save_grid(out.as_ref())?;
    println!("wrote {out}");
    // image-to-image: the first image, half redrawn, and its right half inpainted
    let c = g.info().channels;
    let first = runtime::images::from_u8_hwc(images.image(0), c);
    let size = g.info().image_size;
    let mask: Vec<f32> = (0..size * size).map(|i| if i % size < size / 2 { 1.0 } else { 0.0 }).collect();
    let redraw = GenerateRequest {
        n: 4,
        options: SampleOptions { init: Some(InitImage { x0: first.clone(), strength: 0.5 }), ..req.options.clone() },
        ..req.clone()
    };
    g.generate(&redraw, &mut |_| {})?.save_grid("embed-img2img.png".as_ref())?;
    let fill = GenerateRequest {
        n: 4,
        options: SampleOptions {
            inpaint: Some(Inpaint { x0: first, mask, resample: 2, jump: 5 }),
            ..req.options.clone()
        },
        ..req
    };
    g.generate(&fill, &mut |_| {})?.save_grid("embed-inpaint.png".as_ref())?;
    println!("wrote embed-img2img.png and embed-inpaint.png");
    Ok(())
}
