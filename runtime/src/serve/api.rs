//! The JSON API's shapes: the body of `POST /v1/generate`, its checks against the server's limits and the model,
//! the answers, and the errors (`{"error": "...", "field": "..."}` with a 4xx or 5xx status).

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Limits;
use crate::generator::{GenerateRequest, Images};
use crate::metadata::ModelMeta;
use crate::sampler::{GuidanceInterval, SamplerKind, Spacing};

/// An error answer: a status and a message naming the field at fault (when one is).
#[derive(Debug)]
pub(super) struct ApiError {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
    /// `Retry-After` seconds (503 when the queue is full).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, field: None, message: message.into(), retry_after: None }
    }

    /// A 400 about one field of the body.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        Self { field: Some(field.to_string()), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }

    /// A library error about a request, as a 400 naming the body's field (`attributes` is `attrs` here).
    pub fn from_runtime(e: crate::Error) -> Self {
        match e {
            crate::Error::InvalidRequest { field, reason } => {
                let field = if field == "attributes" { "attrs" } else { field };
                Self::field(field, format!("{field} {reason}"))
            }
            crate::Error::UnknownName { what, .. } => Self::field(what, e.to_string()),
            e => Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = &self.field {
            body["field"] = json!(f);
        }
        let mut r = (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The body of `POST /v1/generate`: every field but `model` is optional, the defaults those of `generate`
/// (the model's recommended sampler, steps, guidance and guidance interval; 64 images, seed 0).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GenerateBody {
    pub model: String,
    pub n: Option<usize>,
    /// A class name or index (a string or a number).
    pub class: Option<Value>,
    /// Attribute values by attribute name (names or indices).
    #[serde(default)]
    pub attrs: BTreeMap<String, Value>,
    pub guidance: Option<f32>,
    /// `"all"` or `[lo, hi]`.
    pub guidance_interval: Option<Value>,
    pub steps: Option<usize>,
    pub sampler: Option<SamplerKind>,
    pub eta: Option<f64>,
    pub spacing: Option<Spacing>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub format: Format,
}

/// How `POST /v1/generate` answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Format {
    /// The grid, `image/png`.
    #[default]
    Png,
    /// JSON: the grid and each image as base64 PNG, with its seed and index.
    Json,
}

/// Parses a body, naming the field at fault (`n: invalid type: string "x", expected usize at line 1 column 9`).
pub(super) fn parse_body(bytes: &[u8]) -> Result<GenerateBody, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = if inner.is_eof() { format!("the JSON body ends early: {inner}") } else { inner.to_string() };
        let missing = msg.strip_prefix("missing field `").and_then(|m| m.split('`').next());
        match (path.as_str(), missing) {
            (".", Some(field)) => ApiError::field(field, format!("{field} is required: {msg}")),
            (".", None) => ApiError::field("body", format!("the body is not a generate request: {msg}")),
            // the top-level field at fault; a path into a top-level array is the body's own fault
            (p, _) => match p.split(['.', '[']).next().filter(|f| !f.is_empty()) {
                Some(field) => ApiError::field(field, format!("{p}: {msg}")),
                None => ApiError::field("body", format!("the body is not a generate request: {p}: {msg}")),
            },
        }
    })
}

/// A label given as a string or a number.
fn label(field: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        v => Err(ApiError::field(field, format!("{field} must be a name or an index, not {v}"))),
    }
}

/// The library's request for a body on a model within the server's limits: checked here (sizes first, so
/// that nothing is allocated for a hostile n) and then against the model ([`crate::generator::plan`]).
pub(super) fn request(body: &GenerateBody, info: &ModelMeta, limits: &Limits) -> Result<GenerateRequest, ApiError> {
    let rec = GenerateRequest::recommended(info);
    let n = body.n.unwrap_or(limits.max_n.min(64));
    if n == 0 || n > limits.max_n {
        return Err(ApiError::field("n", format!("n must be 1..={} on this server, not {n}", limits.max_n)));
    }
    let steps = body.steps.unwrap_or(rec.steps);
    if steps > limits.max_steps {
        return Err(ApiError::field(
            "steps",
            format!("steps must be at most {} on this server, not {steps}", limits.max_steps),
        ));
    }
    let class = body.class.as_ref().map(|v| label("class", v)).transpose()?;
    let attributes =
        body.attrs.iter().map(|(k, v)| Ok((k.clone(), label("attrs", v)?))).collect::<Result<Vec<_>, ApiError>>()?;
    let guidance_interval = match &body.guidance_interval {
        None => rec.options.guidance_interval,
        Some(Value::String(s)) if s == "all" => None,
        Some(Value::Array(a)) if a.len() == 2 && a.iter().all(Value::is_u64) => {
            let (lo, hi) = (a[0].as_u64().unwrap_or(0) as usize, a[1].as_u64().unwrap_or(0) as usize);
            Some(
                format!("{lo},{hi}")
                    .parse::<GuidanceInterval>()
                    .map_err(|e| ApiError::field("guidance_interval", e))?,
            )
        }
        Some(v) => {
            return Err(ApiError::field(
                "guidance_interval",
                format!("guidance_interval must be \"all\" or [lo, hi], not {v}"),
            ))
        }
    };
    let mut req = GenerateRequest {
        n,
        sampler: body.sampler.unwrap_or(rec.sampler),
        steps,
        eta: body.eta.unwrap_or(0.0),
        spacing: body.spacing.unwrap_or(Spacing::Trailing),
        class,
        guidance: body.guidance.unwrap_or(rec.guidance),
        attributes,
        ..rec
    };
    req.options.guidance_interval = guidance_interval;
    req.options.seed = body.seed.unwrap_or(0);
    crate::generator::plan(info, &req).map_err(ApiError::from_runtime)?;
    Ok(req)
}

/// What `GET /v1/models` says of a model.
pub(super) fn describe(name: &str, info: &ModelMeta) -> Value {
    let classes: Vec<String> = if info.class_names.len() == info.num_classes {
        info.class_names.clone()
    } else {
        (0..info.num_classes).map(|i| i.to_string()).collect()
    };
    json!({
        "name": name,
        "image_size": info.image_size,
        "channels": info.channels,
        "classes": classes,
        "guidance": info.null_class.is_some(),
        "attributes": info.attributes,
        "recommended": GenerateRecommended::of(info),
        "prediction": info.prediction.to_string(),
        "dataset": info.dataset,
        "training_steps": info.training_steps,
    })
}

/// The sampling a request gets when it names none (the model's recommendation, else `generate`'s defaults).
#[derive(serde::Serialize)]
struct GenerateRecommended {
    sampler: SamplerKind,
    steps: usize,
    guidance: f32,
    guidance_interval: Option<[usize; 2]>,
}

impl GenerateRecommended {
    fn of(info: &ModelMeta) -> Self {
        let r = GenerateRequest::recommended(info);
        let guidance_interval = r.options.guidance_interval.map(|g| [g.lo, g.hi]);
        Self { sampler: r.sampler, steps: r.steps, guidance: r.guidance, guidance_interval }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The class name of a label (its index when the model names none).
fn class_name(info: &ModelMeta, label: i64) -> String {
    info.class_names.get(label as usize).cloned().unwrap_or_else(|| label.to_string())
}

/// The grid and every image as base64 PNGs, each with the seed and index that reproduce it (`generate --seed S`
/// draws image i from the i-th random stream of S, so image i of the answer is image i of `generate`'s).
pub(super) fn images_json(
    model: &str,
    info: &ModelMeta,
    req: &GenerateRequest,
    images: &Images,
) -> Result<Value, ApiError> {
    let fail = |e: crate::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let grid = images.grid_png(None).map_err(fail)?;
    let mut list = Vec::with_capacity(images.n);
    for i in 0..images.n {
        let class = images.labels.as_ref().and_then(|l| l.get(i)).map(|&c| class_name(info, c));
        list.push(
            json!({ "index": i, "seed": req.options.seed, "class": class, "png": b64(&images.png(i).map_err(fail)?) }),
        );
    }
    Ok(json!({
        "model": model,
        "n": images.n,
        "seed": req.options.seed,
        "sampler": req.sampler,
        "steps": req.steps,
        "guidance": req.guidance,
        "grid": b64(&grid),
        "images": list,
    }))
}

/// A progress event's JSON: the predicted x0 of the images in work.
pub(super) fn progress_json(first: usize, count: usize, step: usize, num_steps: usize, t: usize, png: &[u8]) -> Value {
    json!({ "first": first, "count": count, "step": step + 1, "num_steps": num_steps, "t": t, "png": b64(png) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_name_the_field_at_fault() {
        let e = parse_body(br#"{"model": "mnist", "n": "many"}"#).unwrap_err();
        assert_eq!((e.status, e.field.as_deref()), (StatusCode::BAD_REQUEST, Some("n")));
        assert!(e.message.starts_with("n: invalid type: string \"many\""), "{}", e.message);
        let e = parse_body(br#"{"model": "mnist", "n": -1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("n"));
        let e = parse_body(br#"{"model": "mnist", "sampler": "euler"}"#).unwrap_err();
        assert!(e.message.contains("unknown sampler 'euler'"), "{}", e.message);
        let e = parse_body(br#"{"model": "mnist", "colour": 1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{}", e.message);
        let e = parse_body(br#"{"model": "mni"#).unwrap_err();
        assert!(e.message.contains("ends early"), "{}", e.message);
        let e = parse_body(br#"{"n": 4}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("model"));
        assert!(e.message.contains("missing field `model`"), "{}", e.message);
        let e = parse_body(b"[1, 2]").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"));
        let ok = parse_body(br#"{"model": "mnist", "class": 7, "attrs": {"position": "top-left"}, "format": "json"}"#);
        let ok = ok.unwrap();
        assert_eq!((ok.format, ok.class, ok.attrs.len()), (Format::Json, Some(json!(7)), 1));
    }
}
