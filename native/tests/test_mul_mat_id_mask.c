// MUL_MAT_ID with masked (-1) and out-of-range ids on the CPU backend, against a double-precision
// reference on the dequantised weights. Masked slots must give exact zero rows (dst is pre-filled
// with NaN), the others the expert's product. Weights go to the plain CPU buffer and, where the
// type has one on this CPU, to each extra (repack) buffer type.
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

// returns the number of failures
static int run_case(ggml_backend_t backend, ggml_backend_buffer_type_t wbuft, enum ggml_type type,
                    int ne11, int n_tokens, const char * where) {
    const int64_t nw = (int64_t) NE00 * NE01 * N_AS;
    float * w  = malloc(nw * sizeof(float));
    float * wd = malloc(nw * sizeof(float));
    for (int64_t i = 0; i < nw; ++i) {
        w[i] = frand();
    }
    const size_t wbytes = ggml_row_size(type, NE00) * NE01 * N_AS;
    void * wq = malloc(wbytes);
    ggml_quantize_chunk(type, w, wq, 0, NE01 * N_AS, NE00, NULL);
    if (type == GGML_TYPE_F32) {
        memcpy(wd, wq, nw * sizeof(float));
    } else {
        ggml_get_type_traits(type)->to_float(wq, wd, nw);
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
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * as  = ggml_new_tensor_3d(ctx, type, NE00, NE01, N_AS);
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, NE00, ne11, n_tokens);
    struct ggml_tensor * idt = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, N_IDS, n_tokens);
    struct ggml_tensor * out = ggml_mul_mat_id(ctx, as, b, idt);
    struct ggml_cgraph * gf  = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    ggml_backend_buffer_t wbuf = ggml_backend_buft_alloc_buffer(wbuft, ggml_backend_buft_get_alloc_size(wbuft, as) + 256);
    struct ggml_tallocr talloc = ggml_tallocr_new(wbuf);
    ggml_tallocr_alloc(&talloc, as);
    if (!ggml_backend_supports_op(backend, out)) { // e.g. a repack buffer without a layout for this type
        ggml_backend_buffer_free(wbuf);
        ggml_free(ctx);
        free(w); free(wd); free(wq); free(x); free(ids);
        return 0;
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend); // the other tensors

    ggml_backend_tensor_set(as, wq, 0, wbytes);
    ggml_backend_tensor_set(b, x, 0, nx * sizeof(float));
    ggml_backend_tensor_set(idt, ids, 0, sizeof(int32_t) * N_IDS * n_tokens);
    const int64_t nout = (int64_t) NE01 * N_IDS * n_tokens;
    float * y = malloc(nout * sizeof(float));
    for (int64_t i = 0; i < nout; ++i) {
        y[i] = NAN;
    }
    ggml_backend_tensor_set(out, y, 0, nout * sizeof(float));

    int fails = 0;
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        printf("FAIL %s %s: compute failed\n", ggml_type_name(type), where);
        fails++;
    }
    ggml_backend_tensor_get(out, y, 0, nout * sizeof(float));

    // activations are quantised to the weight type's vec_dot type, so the tolerance depends on it
    const double tol = type == GGML_TYPE_F32 ? 1e-5 : type == GGML_TYPE_F16 ? 2e-3 : 2e-2;
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
                            printf("FAIL %s %s: masked row t=%d j=%d id=%d has %g\n", ggml_type_name(type), where, t, j, id, yr[r]);
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
                const double err = isnan(yr[r]) ? INFINITY : fabs(yr[r] - ref);
                max_err = fmax(max_err, err);
            }
        }
    }
    if (!(max_err <= tol * max_ref)) {
        printf("FAIL %s %s ne11=%d n_tokens=%d: max err %g vs max ref %g\n", ggml_type_name(type), where, ne11, n_tokens, max_err, max_ref);
        fails++;
    } else {
        printf("ok   %-6s %-10s ne11=%d n_tokens=%2d masked=%2d rel err %.2e\n", ggml_type_name(type), where, ne11, n_tokens, n_masked, max_err / max_ref);
    }

    ggml_backend_buffer_free(buf);
    ggml_backend_buffer_free(wbuf);
    ggml_free(ctx);
    free(w); free(wd); free(wq); free(x); free(ids); free(y);
    return fails;
}

// The experts as parts (type groups, llama-graph's build_mcsharp_mm_id_groups): expert ids
// [PART_LO[p], PART_LO[p+1]) live in part p's own tensor of type ptypes[p]; one MUL_MAT_ID per part on the
// layer's ids with op_params {offset, N_AS}, the later parts writing into the first part's result in place.
// Every valid slot must get its expert's product, every masked one an exact zero row.
enum { N_PARTS = 3 };
static const int PART_LO[N_PARTS + 1] = { 0, 2, 3, N_AS };

static int run_parts_case(ggml_backend_t backend, ggml_backend_buffer_type_t wbuft, const enum ggml_type ptypes[N_PARTS],
                          int ne11, int n_tokens, const char * where) {
    float * wd = malloc((int64_t) NE00 * NE01 * N_AS * sizeof(float)); // dequantised, all experts
    void * wq[N_PARTS];
    size_t wbytes[N_PARTS];
    for (int p = 0; p < N_PARTS; ++p) {
        const int n = PART_LO[p + 1] - PART_LO[p];
        const int64_t nw = (int64_t) NE00 * NE01 * n;
        float * w = malloc(nw * sizeof(float));
        for (int64_t i = 0; i < nw; ++i) {
            w[i] = frand();
        }
        wbytes[p] = ggml_row_size(ptypes[p], NE00) * NE01 * n;
        wq[p] = malloc(wbytes[p]);
        ggml_quantize_chunk(ptypes[p], w, wq[p], 0, NE01 * n, NE00, NULL);
        float * dst = wd + (int64_t) PART_LO[p] * NE00 * NE01;
        if (ptypes[p] == GGML_TYPE_F32) {
            memcpy(dst, wq[p], nw * sizeof(float));
        } else {
            ggml_get_type_traits(ptypes[p])->to_float(wq[p], dst, nw);
        }
        free(w);
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
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_context * wctx = ggml_init(ip);
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, NE00, ne11, n_tokens);
    struct ggml_tensor * idt = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, N_IDS, n_tokens);
    struct ggml_tensor * as[N_PARTS];
    struct ggml_tensor * first = NULL, * prev = NULL;
    int supported = 1;
    for (int p = 0; p < N_PARTS; ++p) {
        as[p] = ggml_new_tensor_3d(wctx, ptypes[p], NE00, NE01, PART_LO[p + 1] - PART_LO[p]);
    }
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, wbuft);
    for (int p = 0; p < N_PARTS; ++p) {
        struct ggml_tensor * t = ggml_mul_mat_id(ctx, as[p], b, idt);
        t->op_params[0] = PART_LO[p];
        t->op_params[1] = N_AS;
        if (first == NULL) {
            first = t;
        } else {
            t->view_src = first; // in place, as llama-graph builds it
            t->view_offs = 0;
            t->src[3] = prev;
        }
        supported &= ggml_backend_supports_op(backend, t);
        prev = t;
    }
    if (!supported) {
        ggml_backend_buffer_free(wbuf);
        ggml_free(wctx);
        ggml_free(ctx);
        for (int p = 0; p < N_PARTS; ++p) {
            free(wq[p]);
        }
        free(wd); free(x); free(ids);
        return 0;
    }
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, prev);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);

    for (int p = 0; p < N_PARTS; ++p) {
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

    int fails = 0;
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        printf("FAIL parts %s: compute failed\n", where);
        fails++;
    }
    ggml_backend_tensor_get(prev, y, 0, nout * sizeof(float));

    double tol = 0.0;
    for (int p = 0; p < N_PARTS; ++p) {
        tol = fmax(tol, ptypes[p] == GGML_TYPE_F32 ? 1e-5 : ptypes[p] == GGML_TYPE_F16 ? 2e-3 : 2e-2);
    }
    double max_err = 0.0, max_ref = 0.0;
    for (int t = 0; t < n_tokens; ++t) {
        for (int j = 0; j < N_IDS; ++j) {
            const int32_t id = ids[t * N_IDS + j];
            const float * yr = y + ((int64_t) t * N_IDS + j) * NE01;
            if (id < 0 || id >= N_AS) {
                for (int r = 0; r < NE01; ++r) {
                    if (!(yr[r] == 0.0f)) {
                        if (fails < 8) {
                            printf("FAIL parts %s: masked row t=%d j=%d id=%d has %g\n", where, t, j, id, yr[r]);
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
        printf("FAIL parts %s+%s+%s %s ne11=%d n_tokens=%d: max err %g vs max ref %g\n", ggml_type_name(ptypes[0]),
               ggml_type_name(ptypes[1]), ggml_type_name(ptypes[2]), where, ne11, n_tokens, max_err, max_ref);
        fails++;
    } else {
        printf("ok   parts %s+%s+%s %-10s ne11=%d n_tokens=%2d rel err %.2e\n", ggml_type_name(ptypes[0]),
               ggml_type_name(ptypes[1]), ggml_type_name(ptypes[2]), where, ne11, n_tokens, max_err / max_ref);
    }

    ggml_backend_buffer_free(buf);
    ggml_backend_buffer_free(wbuf);
    ggml_free(wctx);
    ggml_free(ctx);
    for (int p = 0; p < N_PARTS; ++p) {
        free(wq[p]);
    }
    free(wd); free(x); free(ids); free(y);
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

    int fails = 0, n_types = 0;
    for (size_t it = 0; it < sizeof(types) / sizeof(types[0]); ++it) {
        const enum ggml_type type = types[it];
        n_types++;
        const int shapes[][2] = { {1, 1}, {1, 7}, {N_IDS, 7}, {1, 33} }; // {ne11, n_tokens}: mat-vec, batched, per-slot input
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); ++s) {
            fails += run_case(backend, ggml_backend_get_default_buffer_type(backend), type, shapes[s][0], shapes[s][1], "CPU");
            for (ggml_backend_buffer_type_t * extra = get_extra ? get_extra(dev) : NULL; extra && *extra; ++extra) {
                fails += run_case(backend, *extra, type, shapes[s][0], shapes[s][1], ggml_backend_buft_name(*extra));
            }
        }
    }
    // parts: each type with itself, and mixed with F16 / Q8_0 as the planner's groups are
    int n_parts = 0;
    for (size_t it = 0; it < sizeof(types) / sizeof(types[0]); ++it) {
        const enum ggml_type same[N_PARTS]  = { types[it], types[it], types[it] };
        const enum ggml_type mixed[N_PARTS] = { GGML_TYPE_F16, types[it], GGML_TYPE_Q8_0 };
        const int shapes[][2] = { {1, 1}, {N_IDS, 7}, {1, 33} };
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); ++s) {
            for (int m = 0; m < 2; ++m) {
                const enum ggml_type * pt = m ? mixed : same;
                fails += run_parts_case(backend, ggml_backend_get_default_buffer_type(backend), pt, shapes[s][0], shapes[s][1], "CPU");
                for (ggml_backend_buffer_type_t * extra = get_extra ? get_extra(dev) : NULL; extra && *extra; ++extra) {
                    fails += run_parts_case(backend, *extra, pt, shapes[s][0], shapes[s][1], ggml_backend_buft_name(*extra));
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
