//! C ABI (header: runtime/include/diffusion.h): open a model, generate into a caller buffer, read the last
//! error, free. Every function catches panics and reports failures through `dr_last_error`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use crate::generator::{GenerateRequest, Generator, GeneratorOptions};
use crate::onnx::Provider;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(msg.replace('\0', " ")).unwrap_or_default());
}

/// An open generator.
pub struct DrGenerator(Generator);

/// Mirrors `dr_request` in diffusion.h.
#[repr(C)]
pub struct DrRequest {
    pub n: u32,
    /// "ddim", "ddpm" or "dpm++" (NULL: ddim).
    pub sampler: *const c_char,
    pub steps: u32,
    pub eta: f32,
    /// Class index, or -1 for none.
    pub class_index: i32,
    pub guidance: f32,
    pub seed: u64,
    pub batch: u32,
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
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<*mut DrGenerator, String> {
        let path = str_arg(model_path, "model_path")?.ok_or("model_path is NULL")?;
        let provider =
            Provider::from_name(str_arg(provider, "provider")?.unwrap_or("cpu")).map_err(|e| e.to_string())?;
        let g = Generator::open(Path::new(path), &GeneratorOptions { provider, threads: None })
            .map_err(|e| format!("{e:#}"))?;
        Ok(Box::into_raw(Box::new(DrGenerator(g))))
    }));
    match r {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            set_error(e);
            std::ptr::null_mut()
        }
        Err(_) => {
            set_error("internal error (panic) in dr_open".into());
            std::ptr::null_mut()
        }
    }
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
    let Some(g) = g.as_ref() else {
        set_error("generator is NULL".into());
        return -1;
    };
    let info = g.0.info();
    for (p, v) in [(channels, info.channels), (size, info.image_size), (num_classes, info.num_classes)] {
        if !p.is_null() {
            *p = v as c_int;
        }
    }
    0
}

/// Generates `req->n` images into `out` as 8-bit pixels [n, size, size, channels]; `out_len` must be at
/// least that many bytes. Returns 0 on success, -1 on failure (see dr_last_error).
///
/// # Safety
/// `g` from dr_open, `req` valid, `out` writable for `out_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn dr_generate(
    g: *mut DrGenerator,
    req: *const DrRequest,
    out: *mut u8,
    out_len: usize,
) -> c_int {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let g = g.as_mut().ok_or("generator is NULL")?;
        let req = req.as_ref().ok_or("request is NULL")?;
        if out.is_null() {
            return Err("output buffer is NULL".into());
        }
        let info = g.0.info();
        let need = req.n as usize * info.channels * info.image_size * info.image_size;
        if out_len < need {
            return Err(format!("output buffer holds {out_len} bytes, {need} are needed"));
        }
        let gr = GenerateRequest {
            n: req.n as usize,
            sampler: str_arg(req.sampler, "sampler")?.unwrap_or("ddim").to_string(),
            steps: req.steps as usize,
            eta: req.eta as f64,
            class: (req.class_index >= 0).then(|| req.class_index.to_string()),
            guidance: req.guidance,
            seed: req.seed,
            batch: req.batch.max(1) as usize,
            ..Default::default()
        };
        let images = g.0.generate(&gr, &mut |_| {}).map_err(|e| format!("{e:#}"))?;
        std::slice::from_raw_parts_mut(out, need).copy_from_slice(&images.pixels);
        Ok(())
    }));
    match r {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            set_error(e);
            -1
        }
        Err(_) => {
            set_error("internal error (panic) in dr_generate".into());
            -1
        }
    }
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
