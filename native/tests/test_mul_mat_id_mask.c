// MUL_MAT_ID with masked (-1) and out-of-range ids on the CPU backend, against a double-precision
// reference on the dequantised weights. Masked slots must give exact zero rows (dst is pre-filled
// with NaN), the others the expert's product. Weights go to the plain CPU buffer and, where the
// type has one on this CPU, to each extra (repack) buffer type. The experts are one tensor, or three
// parts (type groups) computed in place as llama-graph's build_mcsharp_mm_id_groups builds them.
//
// Build (tests/test_native_patch.py does this against the patched libs):
//   cc -O2 -std=c11 test_mul_mat_id_mask.c -I<llama.cpp>/ggml/include -L<libdir> -lggml -lggml-base -lggml-cpu -lm

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 42;
static float frand(void) { // uniform in [-1, 1)
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float) ((rng_state >> 40) & 0xFFFFFF) / (float) 0x800000 - 1.0f;
}

enum { NE00 = 256, NE01 = 40, N_AS = 6, N_IDS = 4 };

// slot value for token t, slot j: a valid expert, or one of the masked values
static int32_t slot_id(int t, int j) {
    switch ((t * N_IDS + j) % 5) {
        case 1:  return -1;
        case 3:  return (t % 2) ? N_AS : 1000; // out of range above
        default: return (t * 3 + j * 5) % N_AS;
    }
}

enum { MAX_PARTS = 3 };
static const int ALL_LO[2] = { 0, N_AS };                 // the experts as one tensor
static const int PART_LO[MAX_PARTS + 1] = { 0, 2, 4, N_AS }; // as three parts (each of ≥ 2: repack takes only 3-d weights)

// Experts [lo[p], lo[p+1]) live in part p's own tensor of type types[p]. One part: an ordinary MUL_MAT_ID
// (op_params zero). Several: one op per part on the layer's ids with op_params {lo[p], N_AS}, the later parts
// writing into the first part's result in place (a view of it, ordered by src[3]). Returns the failures.
static int run_case(ggml_backend_t backend, ggml_backend_buffer_type_t wbuft, int n_parts, const int lo[],
                    const enum ggml_type types[], int ne11, int n_tokens, const char * where) {
    char name[64] = "";
    float * wd = malloc((int64_t) NE00 * NE01 * N_AS * sizeof(float)); // dequantised, all experts
    void * wq[MAX_PARTS];
    size_t wbytes[MAX_PARTS];
    double tol = 0.0; // activations are quantised to each weight type's vec_dot type
    for (int p = 0; p < n_parts; ++p) {
        const int n = lo[p + 1] - lo[p];
        const int64_t nw = (int64_t) NE00 * NE01 * n;
        float * w = malloc(nw * sizeof(float));
        for (int64_t i = 0; i < nw; ++i) {
            w[i] = frand();
        }
        wbytes[p] = ggml_row_size(types[p], NE00) * NE01 * n;
        wq[p] = malloc(wbytes[p]);
        ggml_quantize_chunk(types[p], w, wq[p], 0, NE01 * n, NE00, NULL);
        float * deq = wd + (int64_t) lo[p] * NE00 * NE01;
        if (types[p] == GGML_TYPE_F32) {
            memcpy(deq, wq[p], nw * sizeof(float));
        } else {
            ggml_get_type_traits(types[p])->to_float(wq[p], deq, nw);
        }
        free(w);
        tol = fmax(tol, types[p] == GGML_TYPE_F32 ? 1e-5 : types[p] == GGML_TYPE_F16 ? 2e-3 : 2e-2);
        strcat(name, p ? "+" : "");
        strcat(name, ggml_type_name(types[p]));
    }
    const int64_t nx = (int64_t) NE00 * ne11 * n_tokens;
    float * x = malloc(nx * sizeof(float));
    for (int64_t i = 0; i < nx; ++i) {
        x[i] = frand();
    }
    int32_t * ids = malloc(sizeof(int32_t) * N_IDS * n_tokens);
    for (int t = 0; t < n_tokens; ++t) {
        for (int j = 0; j < N_IDS; ++j) {
            ids[t * N_IDS + j] = slot_id(t, j);
        }
    }

    struct ggml_init_params ip = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), NULL, true };
    struct ggml_context * ctx  = ggml_init(ip);
    struct ggml_context * wctx = ggml_init(ip);
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, NE00, ne11, n_tokens);
    struct ggml_tensor * idt = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, N_IDS, n_tokens);
    struct ggml_tensor * as[MAX_PARTS];
    for (int p = 0; p < n_parts; ++p) {
        as[p] = ggml_new_tensor_3d(wctx, types[p], NE00, NE01, lo[p + 1] - lo[p]);
    }
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, wbuft);
    struct ggml_tensor * first = NULL, * out = NULL;
    bool supported = true;
    for (int p = 0; p < n_parts; ++p) {
        struct ggml_tensor * t = ggml_mul_mat_id(ctx, as[p], b, idt);
        if (n_parts > 1) {
            t->op_params[0] = lo[p];
            t->op_params[1] = N_AS;
        }
        if (first == NULL) {
            first = t;
        } else {
            t->view_src  = first;
            t->view_offs = 0;
            t->src[3]    = out;
        }
        supported = supported && ggml_backend_supports_op(backend, t); // e.g. a repack buffer without a layout
        out = t;
    }
    int fails = 0;
    if (!supported) {
        goto done;
    }
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend); // the other tensors

    for (int p = 0; p < n_parts; ++p) {
        ggml_backend_tensor_set(as[p], wq[p], 0, wbytes[p]);
    }
    ggml_backend_tensor_set(b, x, 0, nx * sizeof(float));
    ggml_backend_tensor_set(idt, ids, 0, sizeof(int32_t) * N_IDS * n_tokens);
    const int64_t nout = (int64_t) NE01 * N_IDS * n_tokens;
    float * y = malloc(nout * sizeof(float));
    for (int64_t i = 0; i < nout; ++i) {
        y[i] = NAN;
    }
    ggml_backend_tensor_set(first, y, 0, nout * sizeof(float));

    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        printf("FAIL %s %s: compute failed\n", name, where);
        fails++;
    }
    ggml_backend_tensor_get(out, y, 0, nout * sizeof(float));

    double max_err = 0.0, max_ref = 0.0;
    int n_masked = 0;
    for (int t = 0; t < n_tokens; ++t) {
        for (int j = 0; j < N_IDS; ++j) {
            const int32_t id = ids[t * N_IDS + j];
            const float * yr = y + ((int64_t) t * N_IDS + j) * NE01;
            if (id < 0 || id >= N_AS) {
                n_masked++;
                for (int r = 0; r < NE01; ++r) {
                    if (!(yr[r] == 0.0f)) {
                        if (fails < 8) {
                            printf("FAIL %s %s: masked row t=%d j=%d id=%d has %g\n", name, where, t, j, id, yr[r]);
                        }
                        fails++;
                        break;
                    }
                }
                continue;
            }
            const float * xr = x + ((int64_t) t * ne11 + (j % ne11)) * NE00;
            for (int r = 0; r < NE01; ++r) {
                const float * wr = wd + ((int64_t) id * NE01 + r) * NE00;
                double ref = 0.0;
                for (int k = 0; k < NE00; ++k) {
                    ref += (double) wr[k] * xr[k];
                }
                max_ref = fmax(max_ref, fabs(ref));
                max_err = fmax(max_err, isnan(yr[r]) ? INFINITY : fabs(yr[r] - ref));
            }
        }
    }
    if (!(max_err <= tol * max_ref)) {
        printf("FAIL %s %s ne11=%d n_tokens=%d: max err %g vs max ref %g\n", name, where, ne11, n_tokens, max_err, max_ref);
        fails++;
    } else {
        printf("ok   %-16s %-10s ne11=%d n_tokens=%2d masked=%2d rel err %.2e\n", name, where, ne11, n_tokens, n_masked, max_err / max_ref);
    }
    ggml_backend_buffer_free(buf);
    free(y);
done:
    ggml_backend_buffer_free(wbuf);
    ggml_free(wctx);
    ggml_free(ctx);
    for (int p = 0; p < n_parts; ++p) {
        free(wq[p]);
    }
    free(wd); free(x); free(ids);
    return fails;
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    const enum ggml_type types[] = {
        GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K, GGML_TYPE_IQ4_NL,
    };
    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, 2);
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    ggml_backend_dev_get_extra_bufts_t get_extra =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    ggml_backend_buffer_type_t bufts[8] = { ggml_backend_get_default_buffer_type(backend) };
    int n_bufts = 1;
    for (ggml_backend_buffer_type_t * extra = get_extra ? get_extra(dev) : NULL; extra && *extra && n_bufts < 8; ++extra) {
        bufts[n_bufts++] = *extra;
    }

    int fails = 0, n_types = 0, n_parts = 0;
    for (size_t it = 0; it < sizeof(types) / sizeof(types[0]); ++it) {
        const enum ggml_type type = types[it];
        n_types++;
        const int shapes[][2] = { {1, 1}, {1, 7}, {N_IDS, 7}, {1, 33} }; // {ne11, n_tokens}: mat-vec, batched, per-slot input
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); ++s) {
            for (int ib = 0; ib < n_bufts; ++ib) {
                const char * where = ib ? ggml_backend_buft_name(bufts[ib]) : "CPU";
                fails += run_case(backend, bufts[ib], 1, ALL_LO, &type, shapes[s][0], shapes[s][1], where);
            }
        }
        // the experts as three parts: the type alone, and mixed with F16 / Q8_0 as the planner's groups are
        const enum ggml_type same[MAX_PARTS]  = { type, type, type };
        const enum ggml_type mixed[MAX_PARTS] = { GGML_TYPE_F16, type, GGML_TYPE_Q8_0 };
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); ++s) {
            if (s == 1) {
                continue; // {1, 7}: covered by the other batched shapes
            }
            for (int m = 0; m < 2; ++m) {
                for (int ib = 0; ib < n_bufts; ++ib) {
                    const char * where = ib ? ggml_backend_buft_name(bufts[ib]) : "CPU";
                    fails += run_case(backend, bufts[ib], MAX_PARTS, PART_LO, m ? mixed : same, shapes[s][0], shapes[s][1], where);
                }
                n_parts++;
            }
        }
    }
    ggml_backend_free(backend);
    printf("parts cases: %d\n", n_parts);
    printf("types tested: %d, failures: %d\n", n_types, fails);
    return fails == 0 ? 0 : 1;
}
