//! `generate serve` on the shipped models over real HTTP on 127.0.0.1: every endpoint, the errors, same-seed
//! identity with `generate`, the token off loopback, the queue, time and size limits, clients that go away or
//! misbehave, a graceful shutdown, and the page in a real headless browser (Debian's chromium and chromedriver,
//! which scripts/setup.sh installs).
//!
//! Requests are written by hand on a `TcpStream` (HTTP/1.1, `Connection: close`), so that the tests can also send
//! what no client library would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(format!("{name}.onnx"))
}

/// A `generate serve` process on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(models: &[&str], flags: &[&str]) -> Server {
        Self::try_start(models, flags).unwrap_or_else(|e| panic!("the server did not start: {e}"))
    }

    fn try_start(models: &[&str], flags: &[&str]) -> Result<Server, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_generate"));
        cmd.arg("serve");
        for m in models {
            cmd.arg("--model").arg(model(m));
        }
        let flags: Vec<&str> =
            if flags.contains(&"--addr") { flags.to_vec() } else { [flags, &["--addr", "127.0.0.1:0"]].concat() };
        let mut child = cmd.args(&flags).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        // the first line on stdout: "serving NAMES on http://ADDR/ (...)"
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let Some(addr) = line.split("http://").nth(1).and_then(|s| s.split('/').next()) else {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            let _ = child.wait();
            return Err(err);
        };
        let mut addr: SocketAddr = addr.parse().unwrap();
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        Ok(Server { child, addr })
    }

    fn get(&self, path: &str) -> Reply {
        http(self.addr, "GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        http(self.addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One request on a fresh connection.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_reply(&mut s).unwrap()
}

/// Reads one HTTP/1.1 answer: its body by Content-Length, by chunks, or to the end of the connection (a peer
/// may keep the connection open after the answer whatever `Connection: close` said).
fn read_reply(s: &mut TcpStream) -> std::io::Result<Reply> {
    let mut raw = vec![];
    let mut buf = [0u8; 65536];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&buf[..k]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))).collect();
    let find = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    let mut body = raw[split + 4..].to_vec();
    let complete = |body: &[u8]| match (find("content-length"), find("transfer-encoding")) {
        (Some(n), _) => body.len() >= n.parse::<usize>().unwrap(),
        (None, Some(te)) if te.contains("chunked") => body.ends_with(b"0\r\n\r\n"),
        _ => false,
    };
    while !complete(&body) {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        body.extend_from_slice(&buf[..k]);
    }
    if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        body = dechunk(&body);
    }
    Ok(Reply { status, headers, body })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

fn png(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap()
}

fn b64png(s: &Value) -> image::DynamicImage {
    use base64::Engine;
    png(&base64::engine::general_purpose::STANDARD.decode(s.as_str().unwrap()).unwrap())
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("serve-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The server-sent events of a stream: (name, data).
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event:"))?.trim().to_string();
            let data: String = block.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            Some((name, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[test]
fn every_endpoint_answers_on_the_shipped_models() {
    let s = Server::start(&["mnist", "shifted-mnist"], &[]);
    let h = s.get("/healthz");
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));

    let m = s.get("/v1/models").json();
    let names: Vec<&str> = m["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["mnist", "shifted-mnist"]);
    let mnist = &m["models"][0];
    assert_eq!((mnist["image_size"].as_u64(), mnist["channels"].as_u64()), (Some(28), Some(1)));
    assert_eq!(mnist["classes"].as_array().unwrap().len(), 10);
    assert_eq!(
        mnist["recommended"],
        json!({"sampler": "dpm++", "steps": 10, "guidance": 2.0, "guidance_interval": [82, 579]})
    );
    assert_eq!(m["models"][1]["attributes"][0]["name"], "position");
    assert_eq!(m["limits"]["max_n"], 64);

    // the grid: 4 images in 2 columns of 28 pixels with 2-pixel borders
    let r = s.post("/v1/generate", &json!({"model": "mnist", "n": 4, "class": "7", "seed": 3}));
    assert_eq!((r.status, r.header("content-type")), (200, Some("image/png")), "{}", r.text());
    let grid = png(&r.body).to_luma8();
    assert_eq!(grid.dimensions(), (62, 62));

    // the same seed gives the same images as `generate`
    let d = tmp("same-seed");
    let out = d.join("g.png");
    let o = Command::new(env!("CARGO_BIN_EXE_generate"))
        .arg("--model")
        .arg(model("mnist"))
        .args(["--n", "4", "--class", "7", "--seed", "3", "-q", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = image::open(&out).unwrap().to_luma8();
    assert!(cli == grid, "the server's grid differs from generate's for the same request and seed");
    assert!(grid.pixels().filter(|p| p.0[0] > 128).count() > 100, "the digits are drawn");

    // JSON: each image with its seed and index, image 1 the second tile of the grid
    let j = s.post("/v1/generate", &json!({"model": "mnist", "n": 4, "class": 7, "seed": 3, "format": "json"})).json();
    assert_eq!((j["n"].as_u64(), j["seed"].as_u64(), j["images"].as_array().unwrap().len()), (Some(4), Some(3), 4));
    assert_eq!((j["images"][1]["index"].as_u64(), j["images"][1]["class"].as_str()), (Some(1), Some("7")));
    let one = b64png(&j["images"][1]["png"]).to_luma8();
    assert_eq!(one.dimensions(), (28, 28));
    let tile = image::imageops::crop_imm(&grid, 2 + 28 + 2, 2, 28, 28).to_image();
    assert!(one == tile, "image 1 of the JSON answer is the grid's second image");
    assert!(b64png(&j["grid"]).to_luma8() == grid);

    // an attribute of the multi-attribute model
    let r = s.post(
        "/v1/generate",
        &json!({"model": "shifted-mnist", "n": 2, "class": "3", "attrs": {"position": "top-left"}, "steps": 5}),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // the reverse process as it happens: progress events with the predicted x0, then the answer
    let r = s.post("/v1/generate/stream", &json!({"model": "mnist", "n": 2, "steps": 10, "class": 1}));
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let ev = events(&r.text());
    let progress: Vec<&Value> = ev.iter().filter(|(n, _)| n == "progress").map(|(_, d)| d).collect();
    assert!(progress.len() >= 5, "a preview every few of the 10 steps: {}", progress.len());
    assert_eq!((progress[0]["num_steps"].as_u64(), progress.last().unwrap()["step"].as_u64()), (Some(10), Some(10)));
    assert_eq!(b64png(&progress[0]["png"]).width(), 2 * 28 + 3 * 2);
    let (last, done) = ev.last().unwrap();
    assert_eq!((last.as_str(), done["n"].as_u64()), ("done", Some(2)));

    let page = s.get("/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.text().contains("v1/generate/stream") && !page.text().contains("http://"), "self-contained");

    let r = s.get("/v2/nothing");
    assert_eq!((r.status, r.json()["error"].is_string()), (404, true));
    let r = s.get("/v1/generate");
    assert_eq!((r.status, r.json()["error"].is_string()), (405, true));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn hostile_input_gets_a_4xx_naming_the_field_and_the_server_stays_up() {
    let mut s = Server::start(&["mnist", "shifted-mnist"], &["--max-n", "16", "--read-timeout", "2"]);
    let cases: &[(&[u8], u16, &str)] = &[
        (br#"{"model": "mnist", "n": }"#, 400, ""),
        (br#"{"model": "mni"#, 400, ""),
        (b"", 400, "body"),
        (b"\xff\xfe\x00garbage", 400, ""),
        (br#"[1, 2, 3]"#, 400, "body"),
        (br#"{"n": 4}"#, 400, "model"),
        (br#"{"model": 5}"#, 400, "model"),
        (br#"{"model": "mnist", "n": "4"}"#, 400, "n"),
        (br#"{"model": "mnist", "n": 0}"#, 400, "n"),
        (br#"{"model": "mnist", "n": -1}"#, 400, "n"),
        (br#"{"model": "mnist", "n": 1000000000000}"#, 400, "n"),
        (br#"{"model": "mnist", "n": 1e12}"#, 400, "n"),
        (br#"{"model": "mnist", "n": 17}"#, 400, "n"),
        (br#"{"model": "mnist", "steps": 0}"#, 400, "steps"),
        (br#"{"model": "mnist", "steps": 1000000}"#, 400, "steps"),
        (br#"{"model": "mnist", "guidance": "high"}"#, 400, "guidance"),
        (br#"{"model": "mnist", "guidance": -1}"#, 400, "guidance"),
        (br#"{"model": "mnist", "class": "eleven"}"#, 400, "class"),
        (br#"{"model": "mnist", "class": 10}"#, 400, "class"),
        (br#"{"model": "mnist", "class": [7]}"#, 400, "class"),
        (br#"{"model": "mnist", "attrs": {"position": "top-left"}}"#, 400, "attrs"),
        (br#"{"model": "shifted-mnist", "attrs": {"colour": "red"}}"#, 400, "attrs"),
        (br#"{"model": "shifted-mnist", "attrs": {"position": "middle"}}"#, 400, "attrs"),
        (br#"{"model": "mnist", "sampler": "euler"}"#, 400, "sampler"),
        (br#"{"model": "mnist", "format": "gif"}"#, 400, "format"),
        (br#"{"model": "mnist", "seed": -5}"#, 400, "seed"),
        (br#"{"model": "mnist", "colour": "red"}"#, 400, ""),
        (br#"{"model": "cifar"}"#, 400, "model"),
    ];
    for (body, status, field) in cases {
        let r = http(s.addr, "POST", "/v1/generate", &[], body);
        let what = String::from_utf8_lossy(body);
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        let j = r.json();
        assert!(j["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {j}");
        if !field.is_empty() {
            assert_eq!(j["field"].as_str(), Some(*field), "{what}: {j}");
        }
    }
    let r = s.post("/v1/generate", &json!({"model": "mnist", "class": "eleven"})).json();
    assert!(r["error"].as_str().unwrap().contains("unknown class 'eleven'"), "{r}");

    // a 100 MB body: 413 before it is read, or the connection closed
    let mut c = TcpStream::connect(s.addr).unwrap();
    let head = format!("POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", 100 << 20);
    c.write_all(head.as_bytes()).unwrap();
    let mb = vec![b'{'; 1 << 20];
    for _ in 0..100 {
        if c.write_all(&mb).is_err() {
            break;
        }
    }
    if let Ok(r) = read_reply(&mut c) {
        assert_eq!(r.status, 413, "{}", r.text());
    }
    // the same without a length (chunked): cut at the limit
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    for _ in 0..100 {
        let chunk = [format!("{:x}\r\n", mb.len()).as_bytes(), &mb, b"\r\n"].concat();
        if c.write_all(&chunk).is_err() {
            break;
        }
    }
    if let Ok(r) = read_reply(&mut c) {
        assert_eq!(r.status, 413, "{}", r.text());
    }

    // a few hundred idle connections, and one that sends its headers a byte a second
    let idle: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(s.addr).unwrap()).collect();
    let mut slow = TcpStream::connect(s.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let fresh = s.get("/healthz");
    assert_eq!(fresh.status, 200);
    assert!(t.elapsed() < Duration::from_secs(5), "a fresh request waited {:?}", t.elapsed());
    let mut closed = false;
    for b in b"POST /v1/generate HTTP/1.1\r\nHost: x\r\n".iter() {
        if slow.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        if t.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    // the header time limit (2 s here) closed it, with a 408 or without a word; a read that times out means it
    // is still open
    if !closed {
        let mut rest = vec![];
        let read = slow.read_to_end(&mut rest);
        let timed_out = read
            .as_ref()
            .is_err_and(|e| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        assert!(!timed_out, "the slow connection was still open after {:?}", t.elapsed());
    }
    drop(idle);
    let r = s.post("/v1/generate", &json!({"model": "mnist", "n": 1, "steps": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(s.alive(), "the server is still up");
}

#[test]
fn off_loopback_every_request_needs_the_token() {
    let e = Server::try_start(&["mnist"], &["--addr", "0.0.0.0:0"]).err().expect("no token, no server");
    assert!(e.contains("needs a bearer token"), "{e}");

    let s = Server::start(&["mnist"], &["--addr", "0.0.0.0:0", "--token", "s3cret"]);
    for (auth, status) in
        [(None, 401), (Some("Bearer wrong"), 401), (Some("s3cret"), 401), (Some("Bearer s3cret"), 200)]
    {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        for path in ["/healthz", "/v1/models", "/"] {
            let r = http(s.addr, "GET", path, &headers, b"");
            assert_eq!(r.status, status, "{path} with {auth:?}");
            if status == 401 {
                assert_eq!(r.header("www-authenticate"), Some("Bearer"));
                assert!(r.json()["error"].as_str().unwrap().contains("bearer token"));
            }
        }
        let body = br#"{"model": "mnist", "n": 1, "steps": 2}"#;
        assert_eq!(http(s.addr, "POST", "/v1/generate", &headers, body).status, status);
    }
}

#[test]
fn a_full_queue_answers_503_and_a_request_past_its_time_is_stopped() {
    // one worker, one place in the queue: of 6 requests at once, at most 2 are taken
    let s = Server::start(&["mnist"], &["--workers", "1", "--queue", "1"]);
    let addr = s.addr;
    let body = json!({"model": "mnist", "n": 4, "steps": 60, "guidance": 0}).to_string();
    let replies: Vec<Reply> = std::thread::scope(|sc| {
        let hs: Vec<_> =
            (0..6).map(|_| sc.spawn(|| http(addr, "POST", "/v1/generate", &[], body.as_bytes()))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + busy.len(), 6, "{replies:?}");
    assert!((1..=2).contains(&ok) && !busy.is_empty(), "{ok} answered, {} busy", busy.len());
    assert_eq!(busy[0].header("retry-after"), Some("1"));
    assert!(busy[0].json()["error"].as_str().unwrap().contains("busy"));
    drop(s);

    let s = Server::start(&["mnist"], &["--workers", "1", "--timeout", "1"]);
    let t = Instant::now();
    let r = s.post("/v1/generate", &json!({"model": "mnist", "n": 64, "steps": 1000}));
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("limit of 1 s"), "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(10), "stopped within a step of its limit: {:?}", t.elapsed());
}

#[test]
fn work_for_a_client_that_went_away_is_dropped() {
    let s = Server::start(&["mnist"], &["--workers", "1"]);
    // about 2 minutes of sampling on one worker, abandoned after a moment
    let mut c = TcpStream::connect(s.addr).unwrap();
    let body = json!({"model": "mnist", "n": 64, "steps": 1000}).to_string();
    let req = format!("POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    c.write_all(req.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(c);
    // the only worker is free again within a step or two
    let t = Instant::now();
    let r = s.post("/v1/generate", &json!({"model": "mnist", "n": 1, "steps": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(20), "the abandoned request held the worker for {:?}", t.elapsed());
}

#[test]
fn sigterm_finishes_the_requests_in_flight_and_refuses_new_ones() {
    let mut s = Server::start(&["mnist"], &["--workers", "1"]);
    let addr = s.addr;
    let inflight = std::thread::spawn(move || {
        http(addr, "POST", "/v1/generate", &[], br#"{"model": "mnist", "n": 16, "steps": 60, "guidance": 0}"#)
    });
    std::thread::sleep(Duration::from_millis(500));
    let kill = Command::new("kill").args(["-TERM", &s.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!inflight.is_finished(), "the request takes longer than this");
    assert!(TcpStream::connect(addr).is_err(), "no new connection once shutting down");
    let r = inflight.join().unwrap();
    assert_eq!((r.status, r.header("content-type")), (200, Some("image/png")), "{}", r.text());
    let t = Instant::now();
    while s.alive() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!s.alive(), "the server exits once its requests are answered");
    assert!(s.child.wait().unwrap().success());
    assert!(TcpStream::connect(addr).is_err(), "nothing listens any more");
}

/// The page in headless chromium, driven through chromedriver's WebDriver API: load it, choose a class and a
/// count, generate, and read the result image's size and pixels in the page.
#[test]
fn the_page_generates_in_a_real_browser() {
    let driver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromedriver is missing: scripts/setup.sh installs Debian's chromium and chromium-driver");
    let s = Server::start(&["mnist", "fashion-mnist"], &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut chromedriver =
        Command::new(driver).arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let wd: SocketAddr = ([127, 0, 0, 1], port).into();
    let call = |method: &str, path: &str, body: Value| -> Value {
        let r = http(wd, method, path, &[("Content-Type", "application/json")], body.to_string().as_bytes());
        let v = r.json();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    };
    let t = Instant::now();
    while TcpStream::connect(wd).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]}}}});
        let session = call("POST", "/session", caps)["sessionId"].as_str().unwrap().to_string();
        let at = |p: &str| format!("/session/{session}{p}");
        let run = |script: &str| call("POST", &at("/execute/sync"), json!({"script": script, "args": []}));
        let until = |script: &str, secs: u64| -> Value {
            let t = Instant::now();
            loop {
                let v = run(script);
                if !v.is_null() && v != json!(false) {
                    return v;
                }
                assert!(t.elapsed() < Duration::from_secs(secs), "waited {secs} s for: {script}");
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let find = |css: &str| -> String {
            let e = call("POST", &at("/element"), json!({"using": "css selector", "value": css}));
            e.as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string()
        };
        call("POST", &at("/url"), json!({"url": format!("http://{}/", s.addr)}));
        until("return document.querySelectorAll('#class option').length === 11", 20);
        // the user's choices: fashion-mnist is listed too; class 7 of mnist, 4 images
        call("POST", &at(&format!("/element/{}/click", find("#class option[value='7']"))), json!({}));
        let n = find("#n");
        call("POST", &at(&format!("/element/{n}/clear")), json!({}));
        call("POST", &at(&format!("/element/{n}/value")), json!({"text": "4"}));
        call("POST", &at(&format!("/element/{}/click", find("#generate"))), json!({}));
        let size = until(
            "const i = document.getElementById('result'); \
             return i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null",
            60,
        );
        assert_eq!(size, json!([62, 62]), "4 images of 28x28 in 2 columns");
        let bright = run("const i = document.getElementById('result'); const c = document.createElement('canvas'); \
             c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0); \
             const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0; \
             for (let k = 0; k < d.length; k += 4) if (d[k] > 128) n++; return n;");
        assert!(bright.as_u64().unwrap() > 100, "the digits are drawn: {bright} bright pixels");
        let status = run("return document.getElementById('status').textContent");
        assert!(status.as_str().unwrap().starts_with("4 images in"), "{status}");
        let preview = run("return document.getElementById('preview').naturalWidth");
        assert_eq!(preview, json!(62), "the predicted x0 was shown while sampling");
        call("DELETE", &at(""), json!({}));
    }));
    let _ = chromedriver.kill();
    let _ = chromedriver.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
