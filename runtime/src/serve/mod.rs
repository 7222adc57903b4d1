//! `generate serve`: exported models behind a JSON API and a web page (feature `serve`).
//!
//! - `GET /`: the page (served from the binary, no external resources).
//! - `GET /healthz`, `GET /v1/models`.
//! - `POST /v1/generate`: a JSON body (`{"model": "mnist", "n": 16, "class": "7", "guidance": 2, "seed": 1}`)
//!   answered with the grid as `image/png`, or with `"format": "json"` the images as base64 PNGs.
//! - `POST /v1/generate/stream`: the same body answered with server-sent events: `progress` (the predicted x0 of
//!   the images in work every few steps) and then `done` (the JSON answer) or `error`.
//!
//! HTTP is hyper's (axum routes it); the sampling runs on worker threads that each own an open copy of every
//! model ([`pool`]), fed by one bounded queue: a request that finds it full is answered 503 with `Retry-After`
//! at once. Bodies, headers, n, steps and each request's time are capped ([`Limits`]); a request whose client
//! went away is dropped between two model calls. Off loopback every request needs a bearer token.

mod api;
mod pool;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::json;
use tokio_stream::StreamExt;

use self::api::{ApiError, Format};
use self::pool::{Event, Failure, Job, Pool, Refused};
use crate::error::{Error, Result};
use crate::generator::{Generator, GeneratorOptions};
use crate::metadata::ModelMeta;
use crate::sampler::Cancel;

/// The page, one self-contained file.
const PAGE: &str = include_str!("page.html");

/// What the server allows; `generate serve`'s flags, with their defaults here.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Images per request.
    pub max_n: usize,
    /// Sampling steps per request.
    pub max_steps: usize,
    /// Bytes of a request body.
    pub max_body: usize,
    /// Requests waiting for a worker; one more is answered 503.
    pub queue: usize,
    /// A request's time, from its arrival to its last image; past it the run stops and the answer is 503.
    pub request_time: Duration,
    /// Time to send a request's headers, and then its body.
    pub read_time: Duration,
    /// Open connections; more are closed as they come.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_n: 64,
            max_steps: 1000,
            max_body: 64 * 1024,
            queue: 16,
            request_time: Duration::from_secs(120),
            read_time: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// The bearer token every request must carry; required when `addr` is not a loopback address.
    pub token: Option<String>,
    pub limits: Limits,
    /// Sampling threads, each with its own open copy of every model.
    pub workers: usize,
    /// How each worker opens the models (provider, ONNX Runtime threads).
    pub generator: GeneratorOptions,
}

impl Default for ServeOptions {
    /// 127.0.0.1:8787, no token, one worker per core with one ONNX Runtime thread each.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8787)),
            token: None,
            limits: Limits::default(),
            workers: cores,
            generator: GeneratorOptions { threads: Some(1), ..Default::default() },
        }
    }
}

/// A model the server offers: its name (the file stem) and metadata.
struct Model {
    name: String,
    info: ModelMeta,
}

/// What every handler shares.
struct App {
    models: Vec<Model>,
    pool: Pool,
    limits: Limits,
    token: Option<String>,
}

/// Opens the models (one copy per worker), binds `options.addr`, calls `ready` with the address bound (port 0
/// picks one) and serves until SIGTERM or Ctrl-C; then it stops listening, lets the requests in flight finish
/// (for at most their time limit) and returns.
pub fn run(models: &[PathBuf], options: &ServeOptions, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let token = options.token.clone().filter(|t| !t.is_empty());
    if !options.addr.ip().is_loopback() && token.is_none() {
        return Err(Error::Serve(format!(
            "listening on {} (not a loopback address) needs a bearer token: --token or GENERATE_TOKEN",
            options.addr
        )));
    }
    let (models, generators) = open(models, options)?;
    let app = Arc::new(App {
        models,
        pool: Pool::start(generators, options.limits.queue),
        limits: options.limits.clone(),
        token,
    });
    // `::tokio`, not `tokio`: the relative path makes rustc load the extern crate named `runtime` (this crate's
    // own rlib, a dev-dependency of its tests) into the unit tests, whose link then sees the C ABI twice
    let rt = ::tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Serve(format!("cannot start the async runtime: {e}")))?;
    let served = rt.block_on(serve(Arc::clone(&app), options.addr, ready));
    // new jobs are refused; the queued ones finish (their clients are gone or waiting)
    app.pool.close();
    served
}

/// Names and metadata of the models, and `workers` open copies of them.
fn open(paths: &[PathBuf], options: &ServeOptions) -> Result<(Vec<Model>, Vec<Vec<Generator>>)> {
    if paths.is_empty() {
        return Err(Error::Serve("no model to serve: give --model FILE at least once".into()));
    }
    let names: Vec<String> =
        paths.iter().map(|p| p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string()).collect();
    if let Some((_, name)) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)) {
        return Err(Error::Serve(format!("two models are named '{name}' (their file stem): rename one")));
    }
    let generators = (0..options.workers.max(1))
        .map(|_| paths.iter().map(|p| Generator::open(p, &options.generator)).collect::<Result<Vec<_>>>())
        .collect::<Result<Vec<_>>>()?;
    // the metadata is the first worker's copy's: each file is opened once per worker, no more
    let models =
        names.into_iter().zip(&generators[0]).map(|(name, g)| Model { name, info: g.info().clone() }).collect();
    Ok((models, generators))
}

/// The accept loop: one task per connection (at most `max_connections`), HTTP/1.1 with a header time limit,
/// until a shutdown signal.
async fn serve(app: Arc<App>, addr: SocketAddr, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::Serve(format!("cannot listen on {addr}: {e}")))?;
    ready(listener.local_addr().map_err(|e| Error::Serve(e.to_string()))?);
    let limits = app.limits.clone();
    let router = router(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.read_time).max_buf_size(64 * 1024);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                // out of file descriptors and the like: wait instead of spinning
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue }
            },
            _ = &mut stop => break,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            continue; // dropped: the connection is closed
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    eprintln!("shutting down: finishing the requests in flight");
    let grace = limits.request_time + limits.read_time;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        eprintln!("some connections were still open after {} s; closing them", grace.as_secs());
    }
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(healthz))
        .route("/v1/models", get(models))
        .route("/v1/generate", post(generate))
        .route("/v1/generate/stream", post(generate_stream))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint: see GET /v1/models") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint")
        })
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&app), authorize))
        .with_state(app)
}

/// With a token, every request must carry it (`Authorization: Bearer <token>`), compared in constant time.
async fn authorize(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.trim().as_bytes(), token.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this server needs a bearer token: Authorization: Bearer <token>",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    std::hint::black_box(diff) == 0
}

async fn healthz(State(app): State<Arc<App>>) -> impl IntoResponse {
    axum::Json(json!({ "status": "ok", "models": app.models.len() }))
}

async fn models(State(app): State<Arc<App>>) -> impl IntoResponse {
    let l = &app.limits;
    axum::Json(json!({
        "models": app.models.iter().map(|m| api::describe(&m.name, &m.info)).collect::<Vec<_>>(),
        "limits": {
            "max_n": l.max_n,
            "max_steps": l.max_steps,
            "max_body_bytes": l.max_body,
            "queue": l.queue,
            "request_seconds": l.request_time.as_secs_f64(),
        },
    }))
}

/// A request admitted to the queue: what its answer needs.
struct Admitted {
    model: usize,
    req: crate::generator::GenerateRequest,
    format: Format,
    events: tokio::sync::mpsc::Receiver<Event>,
    /// Raised when the answer is dropped (the client went away), so the workers drop the job.
    _cancel: CancelOnDrop,
}

/// Raises a [`Cancel`] when dropped.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Reads, checks and queues a generate request; `previews` asks for the predicted x0 of every few steps.
async fn admit(app: &App, req: Request, previews: bool) -> Result<Admitted, ApiError> {
    let arrived = Instant::now();
    let bytes = read_body(req, &app.limits).await?;
    let body = api::parse_body(&bytes)?;
    let model = app.models.iter().position(|m| m.name == body.model).ok_or_else(|| {
        let names: Vec<&str> = app.models.iter().map(|m| m.name.as_str()).collect();
        ApiError::field("model", format!("unknown model '{}': this server has {}", body.model, names.join(", ")))
    })?;
    let mut req = api::request(&body, &app.models[model].info, &app.limits)?;
    let cancel = Cancel::new();
    req.options.cancel = Some(cancel.clone());
    let (tx, events) = tokio::sync::mpsc::channel(8);
    let done =
        tx.clone().try_reserve_owned().map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no slot"))?;
    let every = req.steps.div_ceil(10).max(1);
    let job = Job {
        model,
        req: req.clone(),
        cancel: cancel.clone(),
        deadline: arrived + app.limits.request_time,
        progress: previews.then_some((tx, every)),
        done,
    };
    match app.pool.submit(job) {
        Ok(()) => Ok(Admitted { model, req, format: body.format, events, _cancel: CancelOnDrop(cancel) }),
        Err(Refused::Full) => Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is busy: every worker and queue slot is taken")
        }),
        Err(Refused::Closed) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")),
    }
}

/// The body, at most `max_body` bytes (refused before reading when its length says more), read within
/// `read_time`.
async fn read_body(req: Request, limits: &Limits) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over this server's limit of {} bytes", limits.max_body),
        )
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(req.into_body(), limits.max_body);
    match tokio::time::timeout(limits.read_time, limited.collect()).await {
        Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "the body took too long to arrive")),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}"))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// A job's failure as an answer.
fn failure(f: Failure, limits: &Limits) -> ApiError {
    match f {
        Failure::TimedOut => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request ran past this server's limit of {} s: ask for fewer images or steps",
                limits.request_time.as_secs_f64()
            ),
        ),
        Failure::Gone => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the request was dropped"),
        Failure::Failed(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

/// `POST /v1/generate`: the grid as a PNG, or the images as JSON.
async fn generate(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let mut a = admit(&app, req, false).await?;
    let images = loop {
        match a.events.recv().await {
            Some(Event::Done(r)) => break r.map_err(|f| failure(f, &app.limits))?,
            Some(Event::Progress { .. }) => continue,
            None => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the worker stopped")),
        }
    };
    let m = &app.models[a.model];
    Ok(match a.format {
        Format::Png => {
            let png =
                images.grid_png(None).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            ([(header::CONTENT_TYPE, "image/png")], png).into_response()
        }
        Format::Json => axum::Json(api::images_json(&m.name, &m.info, &a.req, &images)?).into_response(),
    })
}

/// `POST /v1/generate/stream`: `progress` events, then `done` with the JSON answer (or `error`).
async fn generate_stream(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let a = admit(&app, req, true).await?;
    let Admitted { model, req, events, _cancel, .. } = a;
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).map(move |ev| {
        // the stream owns the guard: a client that goes away drops both, and the job with them
        let _owned = &_cancel;
        let m = &app.models[model];
        let ev = match ev {
            Event::Progress { first, count, step, num_steps, t, png } => SseEvent::default()
                .event("progress")
                .data(api::progress_json(first, count, step, num_steps, t, &png).to_string()),
            Event::Done(Ok(images)) => match api::images_json(&m.name, &m.info, &req, &images) {
                Ok(v) => SseEvent::default().event("done").data(v.to_string()),
                Err(e) => SseEvent::default().event("error").data(json!({ "error": e.message }).to_string()),
            },
            Event::Done(Err(f)) => {
                SseEvent::default().event("error").data(json!({ "error": failure(f, &app.limits).message }).to_string())
            }
        };
        Ok::<_, std::convert::Infallible>(ev)
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        for other in [&b"s3creT"[..], b"s3cre", b"s3cret!", b"", b"\xff\xff\xff\xff\xff\xff"] {
            assert!(!same_secret(other, b"s3cret"), "{other:?}");
        }
    }
}
