// MUL_MAT_ID with masked (-1) and out-of-range ids on a chosen ggml backend (default: the first GPU),
// against a double-precision reference on the dequantised weights. Scratch test for the CUDA half of
// native/patches/0002-mcsharp-mmid-gpu.patch, derived from native/tests/test_mul_mat_id_mask.c with
// shapes chosen to reach every CUDA MUL_MAT_ID path on sm_90:
//   quantized, n_tokens <= 8   -> MMVQ (single-token kernel for 1, MoE multi-token kernel for 2..8)
//   quantized, n_tokens  > 8   -> MMQ (+ mmid.cu ids helper)
//   F32/F16/BF16, rows % 32 == 0, n_tokens <= 512 -> MMF (mul_mat_f<has_ids>, ids helper for larger n)
//   F32/F16/BF16, rows % 32 != 0 or n_tokens > 512 -> generic path (host mapping + cuBLAS)
//   gate/up/SWIGLU graph with 1 token -> fused MMVQ / MMVF (unless GGML_CUDA_DISABLE_FUSION=1)
// dst (and the gate/up intermediates) are pre-filled with NaN: a masked slot must give an exact zero row.
//
//   cc -O2 -std=c11 mmid_mask_gpu.c -I<llama.cpp>/ggml/include -L<libdir> -lggml -lggml-base -lm
//   ./a.out [gpu|cpu]

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

enum { MASK_NONE = 0, MASK_MIXED = 1, MASK_ALL = 2 };

// slot id for token t, slot j
static int32_t slot_id(int mask, int n_as, int n_ids, int t, int j) {
    if (mask == MASK_ALL) {
        return (t + j) % 2 ? -1 : n_as;
    }
    if (mask == MASK_MIXED) {
        switch ((t * n_ids + j) % 5) {
            case 1: return -1;
            case 3: return (t % 2) ? n_as : 1000; // out of range above
            default: break;
        }
        if (t % 11 == 10) { // some tokens fully masked
            return -1;
        }
    }
    return (t * 3 + j * 5) % n_as;
}

struct tcase {
    enum ggml_type type;
    int k, m, n_as, n_ids, ne11, n_tokens, mask, glu;
};

static float * make_weights(enum ggml_type type, int64_t k, int64_t rows, void ** wq_out, size_t * wbytes) {
    const int64_t nw = k * rows;
    float * w  = malloc(nw * sizeof(float));
    float * wd = malloc(nw * sizeof(float));
    for (int64_t i = 0; i < nw; ++i) {
        w[i] = frand();
    }
    *wbytes = ggml_row_size(type, k) * rows;
    void * wq = malloc(*wbytes);
    ggml_quantize_chunk(type, w, wq, 0, rows, k, NULL);
    if (type == GGML_TYPE_F32) {
        memcpy(wd, wq, nw * sizeof(float));
    } else {
        ggml_get_type_traits(type)->to_float(wq, wd, nw);
    }
    free(w);
    *wq_out = wq;
    return wd;
}

static void fill_nan(struct ggml_tensor * t) {
    const int64_t n = ggml_nelements(t);
    float * y = malloc(n * sizeof(float));
    for (int64_t i = 0; i < n; ++i) {
        y[i] = NAN;
    }
    ggml_backend_tensor_set(t, y, 0, n * sizeof(float));
    free(y);
}

static int n_skipped = 0;

// returns the number of failures
static int run_case(ggml_backend_t backend, const struct tcase * c) {
    const int64_t K = c->k, M = c->m;
    void * gq = NULL, * uq = NULL;
    size_t gbytes = 0, ubytes = 0;
    float * ud = make_weights(c->type, K, M * c->n_as, &uq, &ubytes);
    float * gd = c->glu ? make_weights(c->type, K, M * c->n_as, &gq, &gbytes) : NULL;

    const int64_t nx = K * c->ne11 * c->n_tokens;
    float * x = malloc(nx * sizeof(float));
    for (int64_t i = 0; i < nx; ++i) {
        x[i] = frand();
    }
    int32_t * ids = malloc(sizeof(int32_t) * c->n_ids * c->n_tokens);
    for (int t = 0; t < c->n_tokens; ++t) {
        for (int j = 0; j < c->n_ids; ++j) {
            ids[t * c->n_ids + j] = slot_id(c->mask, c->n_as, c->n_ids, t, j);
        }
    }

    struct ggml_init_params ip = { ggml_tensor_overhead() * 16 + ggml_graph_overhead(), NULL, true };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * up  = ggml_new_tensor_3d(ctx, c->type, K, M, c->n_as);
    struct ggml_tensor * gt  = c->glu ? ggml_new_tensor_3d(ctx, c->type, K, M, c->n_as) : NULL;
    struct ggml_tensor * b   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, K, c->ne11, c->n_tokens);
    struct ggml_tensor * idt = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, c->n_ids, c->n_tokens);
    struct ggml_tensor * yg  = c->glu ? ggml_mul_mat_id(ctx, gt, b, idt) : NULL;
    struct ggml_tensor * yu  = ggml_mul_mat_id(ctx, up, b, idt);
    struct ggml_tensor * out = c->glu ? ggml_swiglu_split(ctx, yg, yu) : yu;
    struct ggml_cgraph * gf  = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    char name[160];
    snprintf(name, sizeof(name), "%-7s k=%-4d m=%-4d n_as=%-3d n_ids=%d ne11=%d n_tok=%-4d mask=%s%s",
             ggml_type_name(c->type), c->k, c->m, c->n_as, c->n_ids, c->ne11, c->n_tokens,
             c->mask == MASK_NONE ? "none " : c->mask == MASK_MIXED ? "mixed" : "all  ", c->glu ? " swiglu(gate,up)" : "");

    int fails = 0;
    if (!ggml_backend_supports_op(backend, yu) || !ggml_backend_supports_op(backend, out)) {
        printf("skip %s: op not supported\n", name);
        n_skipped++;
        goto done_noalloc;
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    ggml_backend_tensor_set(up, uq, 0, ubytes);
    if (c->glu) {
        ggml_backend_tensor_set(gt, gq, 0, gbytes);
        fill_nan(yg);
    }
    ggml_backend_tensor_set(b, x, 0, nx * sizeof(float));
    ggml_backend_tensor_set(idt, ids, 0, sizeof(int32_t) * c->n_ids * c->n_tokens);
    fill_nan(yu);
    if (out != yu) {
        fill_nan(out);
    }

    if (getenv("MMID_TRACE")) { // a crash inside the backend then names its case
        printf("run  %s\n", name);
    }
    if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
        printf("FAIL %s: compute failed\n", name);
        fails++;
    }
    const int64_t nout = M * c->n_ids * c->n_tokens;
    float * y = malloc(nout * sizeof(float));
    ggml_backend_tensor_get(out, y, 0, nout * sizeof(float));

    // activations are quantised to the weight type's vec_dot type (q8_1 on CUDA), so the tolerance depends on it
    // F32 on CUDA sm_80+: MMF and cuBLAS run in TF32 (run 1 saw rel err up to 1.7e-3), exact only in MMVF
    const double tol = c->type == GGML_TYPE_F32 ? 3e-3 : (c->type == GGML_TYPE_F16 || c->type == GGML_TYPE_BF16) ? 1e-2 : 3e-2;
    double max_err = 0.0, max_ref = 0.0;
    int n_masked = 0, bad_rows = 0;
    for (int t = 0; t < c->n_tokens; ++t) {
        for (int j = 0; j < c->n_ids; ++j) {
            const int32_t id = ids[t * c->n_ids + j];
            const float * yr = y + ((int64_t) t * c->n_ids + j) * M;
            if (id < 0 || id >= c->n_as) {
                n_masked++;
                for (int r = 0; r < M; ++r) {
                    if (!(yr[r] == 0.0f)) {
                        if (bad_rows < 6) {
                            printf("FAIL %s: masked row t=%d j=%d id=%d has %g at r=%d\n", name, t, j, id, yr[r], r);
                        }
                        bad_rows++;
                        break;
                    }
                }
                continue;
            }
            const float * xr = x + ((int64_t) t * c->ne11 + (j % c->ne11)) * K;
            for (int r = 0; r < M; ++r) {
                const float * ur = ud + ((int64_t) id * M + r) * K;
                double ref = 0.0;
                for (int kk = 0; kk < K; ++kk) {
                    ref += (double) ur[kk] * xr[kk];
                }
                if (c->glu) {
                    const float * gr = gd + ((int64_t) id * M + r) * K;
                    double g = 0.0;
                    for (int kk = 0; kk < K; ++kk) {
                        g += (double) gr[kk] * xr[kk];
                    }
                    ref *= g / (1.0 + exp(-g));
                }
                max_ref = fmax(max_ref, fabs(ref));
                const double err = isnan(yr[r]) ? INFINITY : fabs(yr[r] - ref);
                max_err = fmax(max_err, err);
            }
        }
    }
    fails += bad_rows;
    if (max_ref > 0.0 && !(max_err <= tol * max_ref)) {
        printf("FAIL %s: max err %g vs max ref %g\n", name, max_err, max_ref);
        fails++;
    }
    if (fails == 0) {
        printf("ok   %s masked=%4d/%-4d rel err %.2e\n", name, n_masked, c->n_ids * c->n_tokens, max_ref > 0 ? max_err / max_ref : 0.0);
    }
    free(y);
    ggml_backend_buffer_free(buf);
done_noalloc:
    ggml_free(ctx);
    free(ud); free(uq); free(gd); free(gq); free(x); free(ids);
    return fails;
}

int main(int argc, char ** argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    const int want_cpu = argc > 1 && strcmp(argv[1], "cpu") == 0;
    const int quick = argc > 2 && strcmp(argv[2], "quick") == 0; // fewer cases (CPU dry run)
    ggml_backend_t backend = want_cpu ? ggml_backend_cpu_init() : ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, NULL);
    if (!backend) {
        printf("FAIL: no %s backend\n", want_cpu ? "CPU" : "GPU");
        return 2;
    }
    if (want_cpu) {
        ggml_backend_cpu_set_n_threads(backend, 1);
    }
    printf("backend: %s\n", ggml_backend_name(backend));

    int fails = 0, n_cases = 0;
    const int masks[] = { MASK_MIXED, MASK_NONE, MASK_ALL };

    // quantized: MMVQ (1..8 tokens), MMQ (> 8)
    const enum ggml_type qtypes[] = { GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K, GGML_TYPE_IQ4_NL, GGML_TYPE_MXFP4 };
    const int qtok[] = { 1, 2, 5, 8, 9, 16, 33, 64, 200, 600 };
    for (size_t it = 0; it < sizeof(qtypes) / sizeof(qtypes[0]); ++it) {
        for (size_t in = 0; in < sizeof(qtok) / sizeof(qtok[0]); ++in) {
            if (quick && (it > 1 || (in != 0 && in != 4 && in != 6))) continue;
            for (int mi = 0; mi < 3; ++mi) {
                if (masks[mi] == MASK_ALL && qtok[in] > 64) continue;
                for (int ne11 = 1; ne11 <= 4; ne11 += 3) {
                    struct tcase c = { qtypes[it], 256, 40, 6, 4, ne11, qtok[in], masks[mi], 0 };
                    fails += run_case(backend, &c); n_cases++;
                }
            }
        }
    }
    // float: MMF (m % 32 == 0, n <= 512), generic (m % 32 != 0 or n > 512)
    const enum ggml_type ftypes[] = { GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16 };
    const int ftok[] = { 1, 2, 7, 16, 33, 100, 600 };
    const int fm[] = { 64, 40 };
    for (size_t it = 0; it < sizeof(ftypes) / sizeof(ftypes[0]); ++it) {
        for (size_t im = 0; im < 2; ++im) {
            for (size_t in = 0; in < sizeof(ftok) / sizeof(ftok[0]); ++in) {
                if (quick && (it > 1 || (in != 0 && in != 4))) continue;
                for (int mi = 0; mi < 3; ++mi) {
                    if (masks[mi] == MASK_ALL && ftok[in] > 64) continue;
                    for (int ne11 = 1; ne11 <= 4; ne11 += 3) {
                        struct tcase c = { ftypes[it], 256, fm[im], 6, 4, ne11, ftok[in], masks[mi], 0 };
                        fails += run_case(backend, &c); n_cases++;
                    }
                }
            }
        }
    }
    // a larger MoE-like shape (more experts than slots, wider rows)
    {
        const enum ggml_type lt[] = { GGML_TYPE_Q4_K, GGML_TYPE_Q8_0, GGML_TYPE_F16 };
        const int ltok[] = { 1, 4, 32, 300 };
        for (size_t it = 0; it < 3; ++it) {
            for (size_t in = 0; in < 4; ++in) {
                if (quick && in != 0) continue;
                struct tcase c = { lt[it], 1024, 256, 32, 8, 1, ltok[in], MASK_MIXED, 0 };
                fails += run_case(backend, &c); n_cases++;
            }
        }
    }
    // gate/up + SWIGLU graph: 1 token is the fused mat-vec path (MMVQ / MMVF), more tokens the plain paths
    {
        const enum ggml_type gtypes[] = { GGML_TYPE_Q4_K, GGML_TYPE_Q8_0, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_BF16 };
        const int gtok[] = { 1, 3, 20 };
        for (size_t it = 0; it < sizeof(gtypes) / sizeof(gtypes[0]); ++it) {
            for (size_t in = 0; in < 3; ++in) {
                if (quick && (it > 2 || in == 2)) continue;
                for (int mi = 0; mi < 2; ++mi) {
                    struct tcase c = { gtypes[it], 256, 64, 6, 4, 1, gtok[in], masks[mi], 1 };
                    fails += run_case(backend, &c); n_cases++;
                }
            }
        }
    }
    ggml_backend_free(backend);
    printf("cases: %d, skipped: %d, failures: %d\n", n_cases, n_skipped, fails);
    return fails == 0 ? 0 : 1;
}
