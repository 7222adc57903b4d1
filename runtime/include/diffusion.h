/* C interface of the diffusion-rs runtime (libruntime.so): sample images from a model exported by
 * `trainer export`, on ONNX Runtime. ONNX Runtime 1.31.1 is loaded at run time from ORT_DYLIB_PATH,
 * next to the executable, or the project's .ort/ folder (scripts/setup.sh). */
#ifndef DIFFUSION_RS_H
#define DIFFUSION_RS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct DrGenerator dr_generator;

typedef struct dr_request {
    uint32_t n;          /* number of images */
    const char *sampler; /* "ddim", "ddpm", "dpm++" or NULL (ddim) */
    uint32_t steps;      /* sampling steps (ddim, dpm++) */
    float eta;           /* DDIM eta */
    int32_t class_index; /* class, or -1 for none (conditional models then cycle through the classes) */
    float guidance;      /* classifier-free guidance weight w (0: none) */
    uint64_t seed;
    uint32_t batch;      /* images per model call */
} dr_request;

/* Opens a model; provider "cpu", "cuda", "tensorrt", "auto" or NULL (cpu). NULL on failure. */
dr_generator *dr_open(const char *model_path, const char *provider);
/* Geometry of the model's images; out pointers may be NULL. 0 on success. */
int dr_model_info(const dr_generator *g, int *channels, int *size, int *num_classes);
/* Writes n * size * size * channels bytes (8-bit, [n][y][x][c]) into out. 0 on success, -1 on failure. */
int dr_generate(dr_generator *g, const dr_request *req, uint8_t *out, size_t out_len);
/* The calling thread's last error message ("" if none). */
const char *dr_last_error(void);
void dr_free(dr_generator *g);

#ifdef __cplusplus
}
#endif
#endif
