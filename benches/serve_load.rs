//! Load on `generate serve` (not a timed test): for each count of clients C, a fresh server on the model, C
//! clients that each send `POST /v1/generate` (N images of a class, the model's recommended sampling) one after
//! another for S seconds, and a line of: images/s, p50 and p99 latency of the answered requests, the count of
//! each status, and the server's peak RSS. A client answered 503 waits the `Retry-After` it was given, as a
//! polite client would, capped at 0.2 s so the server stays under pressure. `generate`'s own rate on the same
//! model, with the same images per call, is printed first for comparison.
//!
//! ```sh
//! cargo bench -p runtime --features cli --bench serve_load -- --clients 1,4,32,256 --seconds 30
//! cargo bench -p runtime --features cli --bench serve_load -- --model models/mnist.onnx --n 16 --workers 1 --threads 2
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    model: String,
    clients: Vec<usize>,
    seconds: f64,
    n: usize,
    /// Extra flags for `generate serve` (--workers, --threads, --queue).
    serve: Vec<String>,
}

fn opts() -> Opts {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut o = Opts {
        model: format!("{root}/models/mnist.onnx"),
        clients: vec![1, 4, 32, 256],
        seconds: 30.0,
        n: 16,
        serve: vec![],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--model" => o.model = v,
            "--clients" => o.clients = v.split(',').map(|c| c.parse().expect("--clients C,C,...")).collect(),
            "--seconds" => o.seconds = v.parse().expect("--seconds S"),
            "--n" => o.n = v.parse().expect("--n N"),
            "--workers" | "--threads" | "--queue" => o.serve.extend([args[i].clone(), v]),
            _ => {
                i += 1; // cargo's own flags (--bench)
                continue;
            }
        }
        i += 2;
    }
    o
}

/// One request on a fresh connection: (status, Retry-After).
fn post(addr: SocketAddr, body: &str) -> std::io::Result<(u16, Option<f64>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let req = format!(
        "POST /v1/generate HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut raw = vec![];
    s.read_to_end(&mut raw)?;
    let head = String::from_utf8_lossy(&raw[..raw.len().min(1024)]).into_owned();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let retry = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok());
    Ok((status, retry))
}

/// Peak resident memory of a process, MiB (Linux).
fn peak_rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `generate`'s images/s on the model (its summary line), same images per call.
fn generate_rate(o: &Opts) -> String {
    let out = std::env::temp_dir().join("serve-load-generate.png");
    let r = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["--model", &o.model, "--n", "64", "--class", "7", "-q", "--out"])
        .arg(&out)
        .output()
        .expect("generate runs");
    let line = String::from_utf8_lossy(&r.stdout).into_owned();
    line.split(" | ").find(|p| p.ends_with("images/s")).unwrap_or("?").to_string()
}

/// The count of each status and the latencies of the answered requests, seconds.
type Stats = (BTreeMap<String, usize>, Vec<f64>);

fn run(o: &Opts, clients: usize) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_generate"))
        .args(["serve", "--model", &o.model, "--addr", "127.0.0.1:0"])
        .args(&o.serve)
        .stdout(Stdio::piped())
        .spawn()
        .expect("generate serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: SocketAddr = line.split("http://").nth(1).and_then(|s| s.split('/').next()).unwrap().parse().unwrap();
    let name = std::path::Path::new(&o.model).file_stem().unwrap().to_string_lossy().into_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let stats: Arc<Mutex<Stats>> = Arc::default();
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, stats, name, n) = (Arc::clone(&stop), Arc::clone(&stats), name.clone(), o.n);
            std::thread::spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let body = format!(
                        r#"{{"model": "{name}", "n": {n}, "class": {}, "seed": {}}}"#,
                        (c + k as usize) % 10,
                        k
                    );
                    let t = Instant::now();
                    let r = post(addr, &body);
                    let secs = t.elapsed().as_secs_f64();
                    let mut s = stats.lock().unwrap();
                    let (key, wait) = match r {
                        Ok((200, _)) => {
                            s.1.push(secs);
                            ("200".to_string(), 0.0)
                        }
                        Ok((code, retry)) => (code.to_string(), retry.unwrap_or(0.1).min(0.2)),
                        Err(e) => (format!("error ({:?})", e.kind()), 0.1),
                    };
                    *s.0.entry(key).or_default() += 1;
                    drop(s);
                    std::thread::sleep(Duration::from_secs_f64(wait));
                    k += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(o.seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let wall = start.elapsed().as_secs_f64();
    let rss = peak_rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let (counts, mut lat) = std::mem::take(&mut *stats.lock().unwrap());
    lat.sort_by(|a, b| a.total_cmp(b));
    let statuses: Vec<String> = counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!(
        "| {clients} | {:.1} | {:.2} | {:.2} | {} | {:.0} |",
        (lat.len() * o.n) as f64 / wall,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        statuses.join(", "),
        rss
    );
}

fn main() {
    let o = opts();
    println!("model {}, {} images a request, {} s per row, serve flags {:?}", o.model, o.n, o.seconds, o.serve);
    println!("generate --n 64 --class 7 on the same model: {}", generate_rate(&o));
    println!("| clients | images/s | p50 s | p99 s | statuses | server peak RSS, MiB |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for &c in &o.clients {
        run(&o, c);
    }
}
