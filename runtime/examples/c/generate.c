/* Generates images through the C ABI and writes the first one as a PGM/PPM file.
 * Build: cc -I runtime/include runtime/examples/c/generate.c -L target/release -lruntime -o generate_c
 * Run:   LD_LIBRARY_PATH=target/release ORT_DYLIB_PATH=.ort/cpu-1.31.1/libonnxruntime.so.1.31.1 \
 *          ./generate_c fixtures/tiny-mnist-f32.onnx out.pgm */
#include <stdio.h>
#include <stdlib.h>
#include "diffusion.h"

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.onnx OUT.pgm\n", argv[0]);
        return 2;
    }
    dr_generator *g = dr_open(argv[1], "cpu");
    if (!g) {
        fprintf(stderr, "error: %s\n", dr_last_error());
        return 1;
    }
    int channels = 0, size = 0, classes = 0;
    dr_model_info(g, &channels, &size, &classes);
    dr_request req = {.size = sizeof(dr_request), .n = 4, .sampler = "ddim", .steps = 10, .eta = 0.0f,
                      .class_index = classes > 0 ? 3 : -1, .guidance = classes > 0 ? 1.0f : 0.0f,
                      .seed = 1, .batch = 4};
    size_t len = (size_t)req.n * size * size * channels;
    uint8_t *buf = malloc(len);
    if (dr_generate(g, &req, buf, len) != 0) {
        fprintf(stderr, "error: %s\n", dr_last_error());
        dr_free(g);
        return 1;
    }
    /* an undersized buffer is refused with a message */
    if (dr_generate(g, &req, buf, 10) == 0) {
        fprintf(stderr, "expected an error for a short buffer\n");
        return 1;
    }
    /* inpainting: keep the left half of the first image, generate the right half */
    uint8_t *mask = malloc((size_t)size * size);
    for (int i = 0; i < size * size; i++) mask[i] = (i % size) < size / 2 ? 0 : 255;
    uint8_t *filled = malloc((size_t)size * size * channels);
    dr_request fill = req;
    fill.n = 1;
    fill.batch = 1;
    fill.inpaint = buf;
    fill.mask = mask;
    if (dr_generate(g, &fill, filled, (size_t)size * size * channels) != 0) {
        fprintf(stderr, "error: %s\n", dr_last_error());
        return 1;
    }
    int kept = 1;
    for (int i = 0; i < size * size * channels; i++)
        if ((i / channels) % size < size / 2 && filled[i] != buf[i]) kept = 0;
    printf("inpaint: left half %s\n", kept ? "kept" : "CHANGED");
    free(mask);
    free(filled);
    /* interpolation between the first two images: at strength 0 the frames are their pixel blends, so the ends
     * are the images themselves; at 0.5 the blends are noised and denoised */
    size_t per = (size_t)size * size * channels;
    uint8_t *frames = malloc(5 * per);
    dr_request mix = req;
    mix.n = 5;
    mix.batch = 5;
    mix.interpolate_a = buf;
    mix.interpolate_b = buf + per;
    mix.strength = 0.0f;
    int ends = dr_generate(g, &mix, frames, 5 * per) == 0;
    for (size_t i = 0; ends && i < per; i++)
        if (frames[i] != buf[i] || frames[4 * per + i] != buf[per + i]) ends = 0;
    mix.strength = 0.5f;
    ends = ends && dr_generate(g, &mix, frames, 5 * per) == 0;
    printf("interpolate: ends %s\n", ends ? "kept" : "CHANGED");
    /* between two seeds' starts: the first frame is seed 1's image with a shared start (DDIM eta 0) */
    dr_request seeds = req;
    seeds.n = 5;
    seeds.batch = 5;
    seeds.interpolate_seeds = 1;
    seeds.seed_b = 2;
    dr_request one = req;
    one.n = 1;
    one.share_xt = 1;
    uint8_t *first = malloc(per);
    int same = dr_generate(g, &seeds, frames, 5 * per) == 0 && dr_generate(g, &one, first, per) == 0;
    for (size_t i = 0; same && i < per; i++)
        if (frames[i] != first[i]) same = 0;
    printf("interpolate seeds: first frame %s\n", same ? "matches" : "DIFFERS");
    free(first);
    free(frames);
    FILE *f = fopen(argv[2], "wb");
    fprintf(f, "%s\n%d %d\n255\n", channels == 1 ? "P5" : "P6", size, size);
    fwrite(buf, 1, (size_t)size * size * channels, f);
    fclose(f);
    printf("ok: %d images %dx%dx%d, classes %d, short buffer: %s\n", req.n, channels, size, size, classes, dr_last_error());
    /* attributes (multi-attribute models): the schema as JSON, values by name; a model without one refuses it */
    printf("attributes: %s\n", dr_model_attributes(g));
    dr_request attr = req;
    attr.attributes = "position=3";
    if (dr_generate(g, &attr, buf, len) != 0)
        printf("attribute refused: %s\n", dr_last_error());
    else
        printf("attribute accepted\n");
    free(buf);
    dr_free(g);
    return 0;
}
