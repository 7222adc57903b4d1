/* C interface of the diffusion-rs runtime (libruntime.so): sample images from a model exported by
 * `trainer export`, on ONNX Runtime. ONNX Runtime 1.31.1 (libonnxruntime.so.1.31.1) is loaded at run time
 * from ORT_DYLIB_PATH, else from the executable's folder (scripts/setup.sh installs it under .ort/).
 * Errors: a NULL or -1 return, and the reason from dr_last_error(), which is kept per thread.
 * Threads: a dr_generator may be used from any thread, but by one at a time (guard a shared one with a mutex,
 * or open one per thread); either way a seed draws the same images as on one thread (tests/capi_threads_fuzz.rs). */
#ifndef DIFFUSION_RS_H
#define DIFFUSION_RS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct DrGenerator dr_generator;

typedef struct dr_request {
    uint32_t size;       /* sizeof(dr_request): later versions may add fields at the end */
    uint32_t n;          /* number of images */
    const char *sampler; /* "ddim", "ddpm", "dpm++" or NULL (ddim; with steps 0, the model's recommended) */
    uint32_t steps;      /* sampling steps (ddim, dpm++); 0: the model's recommended (a student's own) */
    float eta;           /* DDIM eta */
    int32_t class_index; /* class, or -1 for none (conditional models then cycle through the classes) */
    float guidance;      /* classifier-free guidance weight w (0: none) */
    uint64_t seed;
    uint32_t batch;      /* images per model call (>= 1) */
    /* image-to-image (zero: unused); images are 8-bit [size][size][channels] like dr_generate's output */
    const uint8_t *init;     /* SDEdit start image, or NULL */
    float strength;          /* fraction of the steps run from init, in [0, 1] (0: init itself, 1: plain) */
    uint32_t share_xt;       /* nonzero: every image starts from one shared x_T (variations) */
    const uint8_t *inpaint;  /* image to inpaint (RePaint), or NULL; needs mask */
    const uint8_t *mask;     /* [size][size] bytes: >= 128 generate, < 128 keep inpaint's pixel */
    uint32_t resample;       /* RePaint resampling passes (0/1: none) over blocks of jump steps (0: 10) */
    uint32_t jump;
    uint32_t guidance_lo;    /* guide only at timesteps guidance_lo..=guidance_hi (both 0: every step) */
    uint32_t guidance_hi;
    /* interpolation: the n images are frames from one end to the other (every frame has class_index;
     * with -1, on a conditional model, the null class and no guidance) */
    const uint8_t *interpolate_a; /* two images noised to strength with the same noise, latents mixed; or NULL */
    const uint8_t *interpolate_b;
    uint32_t interpolate_seeds;   /* nonzero: between the starts x_T of seed and seed_b (slerp) */
    uint64_t seed_b;
    /* multi-attribute models (see dr_model_attributes): "name=value,..." (values by name or index; attributes
     * not named are unknown), and "name=w,..." guidance weights of single attributes (default: guidance) */
    const char *attributes;
    const char *attribute_guidance;
} dr_request;

/* Opens a model; provider "cpu", "cuda", "tensorrt", "auto" or NULL (cpu). NULL on failure. */
dr_generator *dr_open(const char *model_path, const char *provider);
/* Geometry of the model's images; out pointers may be NULL. 0 on success. */
int dr_model_info(const dr_generator *g, int *channels, int *size, int *num_classes);
/* The model's attributes besides its class as JSON, [{"name": ..., "values": [...]}] ("[]": none); valid until
 * dr_free. NULL on failure. */
const char *dr_model_attributes(const dr_generator *g);
/* Writes n * size * size * channels bytes (8-bit, [n][y][x][c]) into out. 0 on success, -1 on failure. */
int dr_generate(dr_generator *g, const dr_request *req, uint8_t *out, size_t out_len);
/* The calling thread's last error message ("" if none). */
const char *dr_last_error(void);
void dr_free(dr_generator *g);

#ifdef __cplusplus
}
#endif
#endif
