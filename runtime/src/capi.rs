//! C ABI (header: runtime/include/diffusion.h): open a model, generate into a caller buffer, read the last
//! error, free. Every entry point runs inside `guard`, which turns errors and panics into a return value
//! and a message for `dr_last_error`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::error::Error;
use crate::generator::{
    GenerateRequest, Generator, GeneratorOptions, GuidanceInterval, InitImage, Inpaint, Interpolation,
};
use crate::images::{from_u8_hwc, mask_from_u8};
use crate::onnx::{Provider, ProviderKind};
use crate::sampler::{SampleOptions, SamplerKind};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(msg.replace('\0', " ")).unwrap_or_default());
}

/// Runs an entry point's body: its value on success; `fail` and the message in `dr_last_error` on an error
/// or a panic (a panic must not unwind into C).
fn guard<T>(entry: &str, fail: T, body: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(e);
            fail
        }
        Err(_) => {
            set_error(format!("internal error (panic) in {entry}"));
            fail
        }
    }
}

/// A library error as the C caller reads it: request fields by their `dr_request` names.
fn message(e: Error) -> String {
    match e {
        Error::InvalidRequest { field, reason } => {
            let field = match field {
                "class" => "class_index",
                f => f,
            };
            format!("dr_request.{field} {reason}")
        }
        e => e.to_string(),
    }
}

/// An open generator, and its attribute schema as JSON (what dr_model_attributes returns).
pub struct DrGenerator(Generator, std::ffi::CString);

/// Mirrors `dr_request` in diffusion.h.
#[repr(C)]
pub struct DrRequest {
    /// sizeof(dr_request) as the caller compiled it: fields may be added at the end in later versions.
    pub size: u32,
    pub n: u32,
    /// "ddim", "ddpm" or "dpm++" (NULL: ddim; with steps 0, the model's recommended sampler).
    pub sampler: *const c_char,
    /// Sampling steps; 0: the model's recommended steps (a distilled student's own).
    pub steps: u32,
    pub eta: f32,
    /// Class index, or -1 for none.
    pub class_index: i32,
    pub guidance: f32,
    pub seed: u64,
    pub batch: u32,
    // Image-to-image (zero: unused). Pixels are 8-bit [size][size][channels] like dr_generate's output.
    /// A start image for SDEdit, or NULL.
    pub init: *const u8,
    /// The fraction of the steps run from `init`, in [0, 1].
    pub strength: f32,
    /// Nonzero: every image starts from one shared x_T.
    pub share_xt: u32,
    /// An image to inpaint, or NULL; needs `mask`.
    pub inpaint: *const u8,
    /// `[size][size]` bytes: >= 128 where the image is generated, below where `inpaint` is kept.
    pub mask: *const u8,
    /// RePaint resampling passes (0 or 1: none) over blocks of `jump` steps (0: 10).
    pub resample: u32,
    pub jump: u32,
    /// Guidance only at the timesteps guidance_lo..=guidance_hi (both 0: at every step).
    pub guidance_lo: u32,
    pub guidance_hi: u32,
    // Interpolation: the n images are frames from one end to the other.
    /// Two images noised to `strength` with the same noise, their latents mixed; or NULL.
    pub interpolate_a: *const u8,
    pub interpolate_b: *const u8,
    /// Nonzero: between the starts of `seed` and `seed_b` (slerp).
    pub interpolate_seeds: u32,
    pub seed_b: u64,
    // Multi-attribute models (see dr_model_attributes).
    /// "name=value,name=value" (values by name or index), or NULL: the attributes not named are unknown.
    pub attributes: *const c_char,
    /// "name=w,..." guidance weights of single attributes (default: `guidance`), or NULL.
    pub attribute_guidance: *const c_char,
}

/// The request as the caller compiled it: a shorter (older) struct is read up to its size, the fields it lacks
/// stay zero; a longer (newer) one up to the fields this library knows.
unsafe fn read_request(p: *const DrRequest) -> Result<DrRequest, String> {
    let size = std::ptr::read_unaligned(p as *const u32) as usize;
    let first = std::mem::offset_of!(DrRequest, batch) + std::mem::size_of::<u32>();
    if size < first {
        return Err(format!(
            "dr_request.size is {size}; set it to sizeof(dr_request) ({} in this library's header)",
            std::mem::size_of::<DrRequest>()
        ));
    }
    let mut r: DrRequest = std::mem::zeroed();
    std::ptr::copy_nonoverlapping(
        p as *const u8,
        &mut r as *mut DrRequest as *mut u8,
        size.min(std::mem::size_of::<DrRequest>()),
    );
    Ok(r)
}

unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, String> {
    if p.is_null() {
        return Ok(None);
    }
    CStr::from_ptr(p).to_str().map(Some).map_err(|_| format!("{what} is not valid UTF-8"))
}

/// Opens a model exported by `trainer export`. `provider`: "cpu", "cuda", "tensorrt", "auto" or NULL (cpu).
/// Returns NULL on failure (see dr_last_error).
///
/// # Safety
/// `model_path` must be a NUL-terminated string; `provider` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn dr_open(model_path: *const c_char, provider: *const c_char) -> *mut DrGenerator {
    guard("dr_open", std::ptr::null_mut(), || {
        let path = str_arg(model_path, "model_path")?.ok_or("model_path is NULL")?;
        let kind: ProviderKind =
            str_arg(provider, "provider")?.unwrap_or("cpu").parse().map_err(|e: Error| e.to_string())?;
        let options = GeneratorOptions { provider: Provider::of_kind(kind), threads: None };
        let g = Generator::open(Path::new(path), &options).map_err(message)?;
        let attrs = serde_json::to_string(&g.info().attributes).expect("attributes serialize to JSON");
        let attrs = std::ffi::CString::new(attrs).map_err(|_| "an attribute name holds a NUL byte")?;
        Ok(Box::into_raw(Box::new(DrGenerator(g, attrs))))
    })
}

/// Image geometry and class count of an open model. Returns 0 on success.
///
/// # Safety
/// `g` must come from dr_open; the out pointers may be NULL.
#[no_mangle]
pub unsafe extern "C" fn dr_model_info(
    g: *const DrGenerator,
    channels: *mut c_int,
    size: *mut c_int,
    num_classes: *mut c_int,
) -> c_int {
    guard("dr_model_info", -1, || {
        let info = g.as_ref().ok_or("generator is NULL")?.0.info();
        for (p, v) in [(channels, info.channels), (size, info.image_size), (num_classes, info.num_classes)] {
            if !p.is_null() {
                *p = v as c_int;
            }
        }
        Ok(0)
    })
}

/// The attributes of a multi-attribute model besides its class, as JSON: `[{"name": "position", "values":
/// ["0", "1", "2", "3"]}]` (`[]` for a class-only model). Valid until dr_free; NULL on failure.
///
/// # Safety
/// `g` must come from dr_open.
#[no_mangle]
pub unsafe extern "C" fn dr_model_attributes(g: *const DrGenerator) -> *const c_char {
    guard("dr_model_attributes", std::ptr::null(), || Ok(g.as_ref().ok_or("generator is NULL")?.1.as_ptr()))
}

/// "name=value,name=value" as pairs.
fn pairs<T: std::str::FromStr>(s: Option<&str>, what: &str) -> Result<Vec<(String, T)>, String> {
    let Some(s) = s.filter(|s| !s.trim().is_empty()) else { return Ok(vec![]) };
    s.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("dr_request.{what}: '{kv}' is not name=value"))?;
            let v = v.trim().parse().map_err(|_| format!("dr_request.{what}: '{v}' in '{kv}' does not parse"))?;
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

/// Generates `req->n` images into `out` as 8-bit pixels [n, size, size, channels]; `out_len` must be at
/// least that many bytes. Returns 0 on success, -1 on failure (see dr_last_error).
///
/// # Safety
/// `g` from dr_open, `req` valid for `req->size` bytes, `out` writable for `out_len` bytes; `init`,
/// `inpaint`, `interpolate_a` and `interpolate_b`, when set, hold one image (`[size][size][channels]` bytes),
/// `mask` `[size][size]` bytes.
#[no_mangle]
pub unsafe extern "C" fn dr_generate(
    g: *mut DrGenerator,
    req: *const DrRequest,
    out: *mut u8,
    out_len: usize,
) -> c_int {
    guard("dr_generate", -1, || {
        let g = g.as_mut().ok_or("generator is NULL")?;
        if req.is_null() {
            return Err("request is NULL".into());
        }
        let req = read_request(req)?;
        if out.is_null() {
            return Err("output buffer is NULL".into());
        }
        let info = g.0.info();
        let (c, size) = (info.channels, info.image_size);
        let per = c * size * size;
        let need = req.n as usize * per;
        if out_len < need {
            return Err(format!("output buffer holds {out_len} bytes, {need} are needed"));
        }
        // steps 0 (and no sampler): how the model's metadata recommends sampling it, e.g. a student's own steps
        let rec = info.recommended.clone().filter(|_| req.steps == 0);
        let sampler: SamplerKind = match str_arg(req.sampler, "sampler")? {
            Some(s) => s.parse().map_err(|e: Error| e.to_string())?,
            None => rec.as_ref().map_or(SamplerKind::Ddim, |r| r.sampler),
        };
        let gr = GenerateRequest {
            n: req.n as usize,
            sampler,
            steps: rec.as_ref().map_or(req.steps as usize, |r| r.steps),
            eta: req.eta as f64,
            class: (req.class_index >= 0).then(|| req.class_index.to_string()),
            guidance: req.guidance,
            attributes: pairs(str_arg(req.attributes, "attributes")?, "attributes")?,
            attribute_guidance: pairs(str_arg(req.attribute_guidance, "attribute_guidance")?, "attribute_guidance")?,
            options: SampleOptions {
                guidance_interval: (req.guidance_lo, req.guidance_hi)
                    .ne(&(0, 0))
                    .then_some(GuidanceInterval { lo: req.guidance_lo as usize, hi: req.guidance_hi as usize }),
                seed: req.seed,
                batch: req.batch as usize,
                init: (!req.init.is_null()).then(|| InitImage {
                    x0: from_u8_hwc(std::slice::from_raw_parts(req.init, per), c),
                    strength: req.strength,
                }),
                share_xt: req.share_xt != 0,
                inpaint: match (req.inpaint.is_null(), req.mask.is_null()) {
                    (true, true) => None,
                    (true, false) => return Err("dr_request.mask needs dr_request.inpaint".into()),
                    (false, true) => return Err("dr_request.inpaint needs dr_request.mask".into()),
                    (false, false) => Some(Inpaint {
                        x0: from_u8_hwc(std::slice::from_raw_parts(req.inpaint, per), c),
                        mask: mask_from_u8(std::slice::from_raw_parts(req.mask, size * size)),
                        resample: req.resample.max(1) as usize,
                        jump: if req.jump == 0 { 10 } else { req.jump as usize },
                    }),
                },
                ..Default::default()
            },
            interpolation: match (req.interpolate_a.is_null(), req.interpolate_b.is_null(), req.interpolate_seeds != 0)
            {
                (true, true, false) => None,
                (true, true, true) => Some(Interpolation::Seeds { a: req.seed, b: req.seed_b }),
                (false, false, false) => Some(Interpolation::Images {
                    a: from_u8_hwc(std::slice::from_raw_parts(req.interpolate_a, per), c),
                    b: from_u8_hwc(std::slice::from_raw_parts(req.interpolate_b, per), c),
                    strength: req.strength,
                }),
                (false, false, true) => {
                    return Err("dr_request.interpolate_seeds and interpolate_a/_b exclude each other".into())
                }
                _ => return Err("dr_request.interpolate_a and interpolate_b are set together".into()),
            },
            ..Default::default()
        };
        let images = g.0.generate(&gr, &mut |_| {}).map_err(message)?;
        std::slice::from_raw_parts_mut(out, need).copy_from_slice(&images.pixels);
        Ok(0)
    })
}

/// The last error of this thread ("" if none). Valid until the next call on this thread.
#[no_mangle]
pub extern "C" fn dr_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Frees a generator (NULL is ignored).
///
/// # Safety
/// `g` must come from dr_open and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn dr_free(g: *mut DrGenerator) {
    if !g.is_null() {
        drop(Box::from_raw(g));
    }
}
