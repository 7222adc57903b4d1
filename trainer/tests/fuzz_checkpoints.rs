//! Mutation fuzzing of checkpoint folders (a smoke run; `CKPT_FUZZ_CASES=5000 cargo test --release -p trainer
//! --test fuzz_checkpoints -- --nocapture` for a longer one): the newest checkpoint of a real run gets a
//! truncated or corrupted safetensors file (hostile header lengths included) or a state.json with wrong types,
//! missing keys or broken bytes. Reading it never panics, never allocates more than the files hold, and
//! `latest` always falls back to the intact checkpoint before it, saying which one it passed over.

mod common;

use candle_core::Device;
use common::*;
use rand::{Rng, SeedableRng};
use runtime::fuzz::{largest_allocation, report, Probe};
use trainer::train::checkpoint;

#[global_allocator]
static ALLOC: Probe = Probe;

fn mutate_safetensors(f: &mut Vec<u8>, rng: &mut impl Rng) {
    let header = 8 + u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
    match rng.gen_range(0..4) {
        0 => f.truncate(rng.gen_range(0..f.len())),
        // the declared header length: huge, past the file, zero, one off
        1 => {
            let lens = [u64::MAX, 1 << 40, f.len() as u64, 0, header as u64 - 7, header as u64 - 9];
            f[..8].copy_from_slice(&lens[rng.gen_range(0..lens.len())].to_le_bytes());
        }
        // the JSON header (dtypes, shapes, offsets)
        2 => {
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(8..header);
                f[i] = rng.gen_range(0x20..0x7f);
            }
        }
        _ => {
            let i = rng.gen_range(header..f.len());
            f[i] = rng.gen();
        }
    }
}

fn mutate_state(text: &str, rng: &mut impl Rng) -> Vec<u8> {
    let hostile: [serde_json::Value; 9] = [
        "x".into(),
        (-1).into(),
        1e308.into(),
        serde_json::Value::Null,
        serde_json::json!([]),
        serde_json::json!({}),
        true.into(),
        u64::MAX.into(),
        serde_json::json!([1, "a"]),
    ];
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    match rng.gen_range(0..4) {
        0 => {
            let mut b = text.as_bytes().to_vec();
            b.truncate(rng.gen_range(0..b.len()));
            b
        }
        1 => {
            let mut b = text.as_bytes().to_vec();
            let i = rng.gen_range(0..b.len());
            b[i] = rng.gen_range(0x20..0x7f);
            b
        }
        k => {
            // a value of the wrong type, or a key removed, at the top level or one level down
            let obj = v.as_object_mut().unwrap();
            let keys: Vec<String> = obj.keys().cloned().collect();
            let key = &keys[rng.gen_range(0..keys.len())];
            let target = match obj.get_mut(key).unwrap() {
                serde_json::Value::Object(inner) if rng.gen_bool(0.5) && !inner.is_empty() => {
                    let ks: Vec<String> = inner.keys().cloned().collect();
                    (inner, ks[rng.gen_range(0..ks.len())].clone())
                }
                _ => (obj, key.clone()),
            };
            if k == 2 {
                target.0.insert(target.1, hostile[rng.gen_range(0..hostile.len())].clone());
            } else {
                target.0.remove(&target.1);
            }
            serde_json::to_vec_pretty(&v).unwrap()
        }
    }
}

#[test]
fn checkpoint_fuzz_a_corrupt_newest_checkpoint_is_refused_and_the_one_before_loads() {
    data_dir("mnist");
    let dir = tmp_dir("ckpt-fuzz");
    let mut cfg = tiny("mnist");
    cfg.data.limit = 64;
    cfg.train.steps = 2;
    cfg.train.checkpoint_every = 1;
    cfg.train.keep_checkpoints = 3;
    let run = fit_run(&cfg, &dir);
    let steps = checkpoint::list(&run).unwrap();
    assert_eq!(steps.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2]);
    let newest = steps[1].1.clone();
    let files = ["model.safetensors", "ema.safetensors", "optim.safetensors", "state.json"];
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(newest.join(f)).unwrap()).collect();
    let biggest = originals.iter().map(Vec::len).max().unwrap();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let (mut ok, mut refused, mut largest) = (0, 0, 0);
    let cases: usize = std::env::var("CKPT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
    for case in 0..cases {
        let which = rng.gen_range(0..files.len());
        let mut f = originals[which].clone();
        if which == 3 {
            f = mutate_state(std::str::from_utf8(&f).unwrap(), &mut rng);
        } else {
            mutate_safetensors(&mut f, &mut rng);
        }
        std::fs::write(newest.join(files[which]), &f).unwrap();
        let (direct, bytes) = largest_allocation(|| checkpoint::load(&newest, &Device::Cpu, true));
        largest = largest.max(bytes);
        let (latest, bytes) = largest_allocation(|| checkpoint::load_which(&run, "latest", &Device::Cpu, true));
        largest = largest.max(bytes);
        let latest = latest.unwrap_or_else(|e| panic!("case {case} ({}): latest must fall back: {e:#}", files[which]));
        match direct {
            Ok(_) => {
                ok += 1;
                assert!(latest.state.step == 2 && latest.passed_over.is_empty());
            }
            Err(e) => {
                refused += 1;
                let e = format!("{e:#}");
                assert!(e.contains(&newest.display().to_string()), "case {case}: the error names the folder: {e}");
                assert_eq!(latest.state.step, 1, "case {case}");
                assert!(latest.passed_over.len() == 1 && latest.passed_over[0].contains("step-00000002"));
            }
        }
        std::fs::write(newest.join(files[which]), &originals[which]).unwrap();
    }
    report("checkpoint", ok, refused, largest);
    assert!(refused > cases / 2, "{ok} loaded, {refused} refused");
    // a header length of 2^64 - 1 sizes nothing: the largest buffer is a file that is really there
    assert!(largest <= 2 * biggest, "{largest} bytes for files of at most {biggest}");
    std::fs::remove_dir_all(&dir).unwrap();
}
