//! The embedding contract under threads: a `Generator` is `Send`, and one shared behind a `Mutex` by 8 threads
//! (or one per thread) gives each seed the same images as a single thread does.

use std::path::Path;
use std::sync::{Arc, Mutex};

use runtime::generator::{GenerateRequest, Generator, GeneratorOptions, SampleOptions};

fn open() -> Generator {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(root));
    let model = root.join("fixtures/tiny-mnist-f32.onnx");
    Generator::open(&model, &GeneratorOptions { threads: Some(1), ..Default::default() }).unwrap()
}

fn request(seed: u64) -> GenerateRequest {
    GenerateRequest {
        n: 2,
        steps: 4,
        options: SampleOptions { seed, batch: 2, ..Default::default() },
        ..Default::default()
    }
}

#[test]
fn threads_sharing_a_generator_or_each_opening_one_draw_what_one_thread_draws() {
    fn assert_send<T: Send>() {}
    assert_send::<Generator>();
    let mut g = open();
    let alone: Vec<Vec<u8>> = (0..8).map(|s| g.generate(&request(s), &mut |_| {}).unwrap().pixels).collect();
    let shared = Arc::new(Mutex::new(g));
    let handles: Vec<_> = (0..8u64)
        .map(|s| {
            let g = Arc::clone(&shared);
            std::thread::spawn(move || g.lock().unwrap().generate(&request(s), &mut |_| {}).unwrap().pixels)
        })
        .collect();
    for (s, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[s], "seed {s} through the shared generator");
    }
    let own: Vec<_> = (0..4u64)
        .map(|s| std::thread::spawn(move || open().generate(&request(s), &mut |_| {}).unwrap().pixels))
        .collect();
    for (s, h) in own.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[s], "seed {s} through a generator of its own");
    }
}
