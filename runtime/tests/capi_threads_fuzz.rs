//! The C ABI under threads and hostile requests: generators opened per thread, or one shared behind a lock,
//! draw what one thread draws per seed; errors are per thread; a fuzzed `dr_request` (any field values, any
//! declared size, null pointers) is answered 0 or -1 with a message, never a panic or a crash, and never an
//! allocation sized by a field alone (the output buffer bounds `n`).
//! `CAPI_FUZZ_CASES=100000 cargo test --release -p runtime --test capi_threads_fuzz` for a longer run.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use runtime::capi::{dr_free, dr_generate, dr_last_error, dr_open, DrGenerator, DrRequest};
use runtime::fuzz::{largest_allocation, report, Probe};

#[global_allocator]
static ALLOC: Probe = Probe;

const SIZE: usize = 28 * 28;

fn model() -> CString {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    runtime::onnx::add_library_candidate(runtime::onnx::setup_library_path(root));
    CString::new(root.join("fixtures/tiny-mnist-f32.onnx").to_str().unwrap()).unwrap()
}

fn request(seed: u64) -> DrRequest {
    let mut r: DrRequest = unsafe { std::mem::zeroed() };
    r.size = std::mem::size_of::<DrRequest>() as u32;
    (r.n, r.steps, r.class_index, r.seed, r.batch) = (2, 4, -1, seed, 2);
    r
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(dr_last_error()) }.to_string_lossy().into_owned()
}

/// A generator handle that may move between threads: the C contract is one call at a time per handle.
struct Handle(*mut DrGenerator);
unsafe impl Send for Handle {}

fn generate(g: *mut DrGenerator, req: &DrRequest) -> Vec<u8> {
    let mut out = vec![0u8; req.n as usize * SIZE];
    let rc = unsafe { dr_generate(g, req, out.as_mut_ptr(), out.len()) };
    assert_eq!(rc, 0, "dr_generate failed: {}", last_error());
    out
}

#[test]
fn c_abi_from_several_threads_draws_what_one_thread_draws_with_errors_per_thread() {
    let path = model();
    let g = unsafe { dr_open(path.as_ptr(), std::ptr::null()) };
    assert!(!g.is_null(), "{}", last_error());
    let alone: Vec<Vec<u8>> = (0..6).map(|s| generate(g, &request(s))).collect();
    // one handle shared by 6 threads behind a lock
    let shared = Arc::new(Mutex::new(Handle(g)));
    let handles: Vec<_> = (0..6u64)
        .map(|s| {
            let h = Arc::clone(&shared);
            std::thread::spawn(move || generate(h.lock().unwrap().0, &request(s)))
        })
        .collect();
    for (s, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[s], "seed {s} through the shared handle");
    }
    // one handle per thread, opened and freed there; odd threads also make a bad request first, whose error
    // stays on their own thread
    let own: Vec<_> = (0..4u64)
        .map(|s| {
            let path = path.clone();
            std::thread::spawn(move || {
                let g = unsafe { dr_open(path.as_ptr(), std::ptr::null()) };
                assert!(!g.is_null(), "{}", last_error());
                if s % 2 == 1 {
                    let bad = DrRequest { class_index: 99, ..request(s) };
                    let mut out = vec![0u8; 2 * SIZE];
                    assert_eq!(unsafe { dr_generate(g, &bad, out.as_mut_ptr(), out.len()) }, -1);
                    assert!(last_error().contains("class_index"), "{}", last_error());
                } else {
                    assert_eq!(last_error(), "", "another thread's error leaked here");
                }
                let pixels = generate(g, &request(s));
                unsafe { dr_free(g) };
                pixels
            })
        })
        .collect();
    for (s, h) in own.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[s], "seed {s} through a handle of its own");
    }
    assert_eq!(last_error(), "");
    unsafe { dr_free(Arc::try_unwrap(shared).ok().unwrap().into_inner().unwrap().0) };
}

#[test]
fn capi_fuzz_hostile_requests_are_answered_never_panic() {
    let cases: usize = std::env::var("CAPI_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let path = model();
    let g = unsafe { dr_open(path.as_ptr(), std::ptr::null()) };
    assert!(!g.is_null(), "{}", last_error());
    let samplers: Vec<CString> = ["ddim", "ddpm", "dpm++", "", "DDIM", "euler", "dpm++\u{ff}"]
        .iter()
        .map(|s| CString::new(*s).unwrap())
        .collect();
    let image = vec![128u8; SIZE];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut ok, mut refused, mut largest) = (0, 0, 0);
    let full = std::mem::size_of::<DrRequest>() as u32;
    for case in 0..cases {
        // a valid request, then up to 3 fields mutated: most cases reach the sampler, the rest its checks
        let mut r = request(case as u64);
        (r.n, r.batch, r.steps) = (rng.gen_range(1..=3), rng.gen_range(1..=3), rng.gen_range(1..=5));
        r.sampler = samplers[rng.gen_range(0..3)].as_ptr();
        let mut images = r.n as usize;
        let extreme =
            |rng: &mut rand_chacha::ChaCha8Rng| [0, 1, u32::MAX, u32::MAX / 2, 1 << 31, 40][rng.gen_range(0..6)];
        let img = image.as_ptr();
        for _ in 0..rng.gen_range(0..=3) {
            match rng.gen_range(0..17) {
                0 => r.size = [0, 4, 20, full / 2, full + 64, u32::MAX][rng.gen_range(0..6)],
                1 => r.n = extreme(&mut rng),
                2 => r.steps = extreme(&mut rng),
                3 => r.batch = extreme(&mut rng),
                4 => r.class_index = [0, 9, 10, 11, -2, i32::MIN, i32::MAX][rng.gen_range(0..7)],
                5 => r.guidance = [1.0, 4.0, -1.0, 1e30, f32::NAN, f32::INFINITY][rng.gen_range(0..6)],
                6 => r.eta = [0.5, 1.0, -3.0, f32::NAN][rng.gen_range(0..4)],
                7 => (r.init, r.strength) = (img, [0.0, 0.5, 1.0, 1.5, -0.1, f32::NAN][rng.gen_range(0..6)]),
                8 => r.inpaint = img,
                9 => r.mask = img,
                10 => r.interpolate_a = img,
                11 => (r.interpolate_a, r.interpolate_b) = (img, img),
                12 => (r.interpolate_seeds, r.seed_b) = (1, rng.gen()),
                13 => r.share_xt = rng.gen_range(1..3),
                14 => (r.resample, r.jump) = (rng.gen_range(0..4), [0, 1, 3, u32::MAX][rng.gen_range(0..4)]),
                15 => (r.guidance_lo, r.guidance_hi) = (rng.gen_range(0..1100), rng.gen_range(0..1100)),
                _ => {
                    r.sampler = if rng.gen_bool(0.3) {
                        std::ptr::null()
                    } else {
                        samplers[rng.gen_range(0..samplers.len())].as_ptr()
                    }
                }
            }
        }
        if rng.gen_bool(0.1) {
            images = rng.gen_range(0..=8);
        }
        // the buffer holds what the request's n needs (at most 8 images): a huge n must be refused by the size
        // check, not allocated
        let mut out = vec![0u8; images.min(8) * SIZE];
        // a request read beyond its size would read past this copy: give it only `size` bytes when shorter
        let bytes = unsafe {
            std::slice::from_raw_parts(&r as *const DrRequest as *const u8, std::mem::size_of::<DrRequest>())
        };
        let mut copy = bytes.to_vec();
        copy.resize(copy.len().max(r.size.min(full + 64) as usize), 0);
        let (rc, bytes) = largest_allocation(|| unsafe {
            dr_generate(g, copy.as_ptr() as *const DrRequest, out.as_mut_ptr(), out.len())
        });
        largest = largest.max(bytes);
        match rc {
            0 => ok += 1,
            -1 => {
                let e = last_error();
                assert!(!e.is_empty() && !e.contains("panic"), "case {case}: {e}");
                refused += 1;
            }
            other => panic!("case {case}: dr_generate returned {other}"),
        }
    }
    unsafe { dr_free(g) };
    report("C ABI request", ok, refused, largest);
    // at most 3 images of 28x28 are drawn: no buffer is sized by a hostile n, steps or batch
    assert!(largest < 16 << 20, "a {largest}-byte allocation for a request of at most 3 small images");
    assert!(ok > 0 && refused > 0, "the fuzzer must reach both outcomes: {ok} ok, {refused} refused");
}
