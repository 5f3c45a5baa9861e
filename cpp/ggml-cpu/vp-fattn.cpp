// vp-gguf: GQA-aware flash-attention decode on the CPU (see vp-fattn.h for why).
//
// Work split: the KV cells are cut into one chunk per thread, as upstream's split-KV
// path does; each thread runs every KV head's group of query heads over its chunk and
// writes one partial (max, sum, unnormalised output) per query head; after a barrier
// the partials of a head are merged. Within a chunk the kept cells are taken in blocks, and
// each KV head takes the block's cells its group attends to (all of them with one mask row;
// its own with a row per head, as Quest's pages give): each K row converted to F32 once and
// dotted with the group's F32 queries, one vectorised exp per head and block, then each V row,
// converted to F32 once, is added into every head's accumulator.
#include "vp-fattn.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ops.h"
#include "vec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

std::atomic<bool> g_enabled{ true };

constexpr int64_t  BLOCK        = 64;                                   // kept cells scored together
constexpr uint16_t FP16_NEG_INF = 0xFC00;                               // a masked cell
constexpr uint64_t FOUR_MASKED  = 0x0001000100010001ull * FP16_NEG_INF; // four of them side by side

bool supported_kv_type(ggml_type t) {
    return t == GGML_TYPE_F16 || t == GGML_TYPE_Q8_0;
}

// The shapes this kernel takes: one query token (decode), F16/Q8_0 K and V, no ALiBi, one mask
// row shared by all heads or one per query head (VisionPulse's Quest layers: each KV head attends
// to its own cells). Everything else stays on upstream's kernel.
bool takes(const ggml_tensor * dst) {
    const ggml_tensor * q        = dst->src[0];
    const ggml_tensor * k        = dst->src[1];
    const ggml_tensor * v        = dst->src[2];
    const ggml_tensor * mask     = dst->src[3];
    float               max_bias = 0.0f;
    memcpy(&max_bias, (const float *) dst->op_params + 1, sizeof(float));
    return q->type == GGML_TYPE_F32 && q->ne[1] == 1 && q->ne[3] == 1 && supported_kv_type(k->type) &&
           supported_kv_type(v->type) && k->ne[3] == 1 && v->ne[3] == 1 && k->ne[2] == v->ne[2] &&
           q->ne[2] % k->ne[2] == 0 && max_bias == 0.0f &&
           (!mask || (mask->type == GGML_TYPE_F16 && (mask->ne[2] == 1 || mask->ne[2] == q->ne[2]) &&
                      mask->ne[3] == 1 && ggml_is_contiguous(mask))) &&
           q->nb[0] == sizeof(float) && k->nb[0] == ggml_type_size(k->type) && v->nb[0] == ggml_type_size(v->type) &&
           k->ne[0] % ggml_blck_size(k->type) == 0 && v->ne[0] % ggml_blck_size(v->type) == 0;
}

struct fattn_args {
    const ggml_tensor *q, *k, *v;
    const uint16_t *   mask;      // the query's mask row (the first head's), or null
    int64_t            mask_rows; // 1: one row for every head; n_head: a row per head
    int64_t            mask_nb2;  // elements from one head's row to the next
    const float *      sinks;
    int64_t            dk, dv, n_kv, n_head, n_head_kv, group;
    float              scale, softcap;
};

// one head's partial over a chunk of cells: M, S, acc[DV]
int64_t partial_floats(const fattn_args & a) {
    return 2 + a.dv;
}

// per-thread scratch, in floats: every head's accumulator, max and sum (the partials are written
// once, at the end: threads accumulating into neighbouring partials would share cache lines),
// a group's scores and probabilities for a block, one K or V row in F32, the block's cells and
// those of one KV head (an int64 each)
int64_t scratch_floats(const fattn_args & a) {
    const int64_t n  = a.n_head * partial_floats(a) + 2 * a.group * BLOCK + std::max(a.dk, a.dv) + 4 * BLOCK;
    const int64_t cl = (int64_t) CACHE_LINE_SIZE_F32;
    return (n + cl - 1) / cl * cl + cl; // whole cache lines: threads never share one
}

fattn_args read_args(const ggml_tensor * dst) {
    fattn_args a{};
    a.q         = dst->src[0];
    a.k         = dst->src[1];
    a.v         = dst->src[2];
    a.mask      = dst->src[3] ? (const uint16_t *) dst->src[3]->data : nullptr;
    a.mask_rows = dst->src[3] ? dst->src[3]->ne[2] : 1;
    a.mask_nb2  = dst->src[3] ? (int64_t) (dst->src[3]->nb[2] / sizeof(uint16_t)) : 0;
    a.sinks     = dst->src[4] ? (const float *) dst->src[4]->data : nullptr;
    a.dk        = a.k->ne[0];
    a.dv        = a.v->ne[0];
    a.n_kv      = a.k->ne[1];
    a.n_head    = a.q->ne[2];
    a.n_head_kv = a.k->ne[2];
    a.group     = a.n_head / a.n_head_kv;
    memcpy(&a.scale, (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&a.softcap, (const float *) dst->op_params + 2, sizeof(float));
    if (a.softcap != 0.0f) {
        a.scale /= a.softcap;
    }
    return a;
}

// next cell at or after ic that is not masked out; four cells at a time through long runs
int64_t next_kept_row(const uint16_t * mask, int64_t ic, int64_t end) {
    if (!mask) {
        return ic;
    }
    while (ic + 4 <= end) {
        uint64_t w;
        memcpy(&w, mask + ic, sizeof(w));
        if (w != FOUR_MASKED) {
            break;
        }
        ic += 4;
    }
    while (ic < end && mask[ic] == FP16_NEG_INF) {
        ic++;
    }
    return ic;
}

// next cell at or after ic that some head attends to; with a row per head, four cells of every
// row at a time through runs that all heads mask (Quest's dropped pages)
int64_t next_kept(const fattn_args & a, int64_t ic, int64_t end) {
    if (a.mask_rows == 1) {
        return next_kept_row(a.mask, ic, end);
    }
    for (; ic + 4 <= end; ic += 4) {
        bool all = true;
        for (int64_t h = 0; h < a.mask_rows && all; h++) {
            uint64_t w;
            memcpy(&w, a.mask + h * a.mask_nb2 + ic, sizeof(w));
            all = w == FOUR_MASKED;
        }
        if (!all) {
            break;
        }
    }
    for (; ic < end; ic++) {
        for (int64_t h = 0; h < a.mask_rows; h++) {
            if (a.mask[h * a.mask_nb2 + ic] != FP16_NEG_INF) {
                return ic;
            }
        }
    }
    return end;
}

// With a mask row per head: the cells of a block of kept cells that KV head ikv's group attends to,
// so that each KV head reads only its own cells.
int64_t group_cells(const fattn_args & a, int64_t ikv, const int64_t * cells, int64_t n, int64_t * out) {
    int64_t m = 0;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t h = 0; h < a.group; h++) {
            if (a.mask[(ikv * a.group + h) * a.mask_nb2 + cells[j]] != FP16_NEG_INF) {
                out[m++] = cells[j];
                break;
            }
        }
    }
    return m;
}

// out[h] = q_h . x for the group's G query rows (q_h = q + h * dq), x one K row in F32. Inline
// SIMD: a decode step makes G such dots per cell, too small for a call each.
inline void group_dots(int64_t n, int64_t G, const float * q, int64_t dq, const float * x, float * out,
                       int64_t out_stride) {
#if defined(GGML_SIMD) && !defined(__ARM_FEATURE_SVE) && !defined(__riscv_v_intrinsic)
    if (n % GGML_F32_STEP == 0) {
        for (int64_t h = 0; h < G; h++) {
            const float * qh = q + h * dq;
            GGML_F32_VEC  sum[GGML_F32_ARR];
            for (int r = 0; r < GGML_F32_ARR; r++) {
                sum[r] = GGML_F32_VEC_ZERO;
            }
            for (int64_t i = 0; i < n; i += GGML_F32_STEP) {
                for (int r = 0; r < GGML_F32_ARR; r++) {
                    sum[r] = GGML_F32_VEC_FMA(sum[r], GGML_F32_VEC_LOAD(x + i + r * GGML_F32_EPR),
                                              GGML_F32_VEC_LOAD(qh + i + r * GGML_F32_EPR));
                }
            }
            ggml_float s;
            GGML_F32_VEC_REDUCE(s, sum);
            out[h * out_stride] = (float) s;
        }
        return;
    }
#endif
    for (int64_t h = 0; h < G; h++) {
        ggml_vec_dot_f32((int) n, out + h * out_stride, 0, q + h * dq, 0, x, 0, 1);
    }
}

// A Q8_0 row in F32, inline: ggml's dequantize_row_q8_0 is a call per row and a scalar loop.
inline void q8_0_to_f32(const char * row, float * out, int64_t n) {
    constexpr int64_t QK = 32, BLOCK_BYTES = sizeof(ggml_fp16_t) + QK; // block_q8_0: scale, 32 int8
    for (int64_t b = 0; b < n / QK; b++) {
        const char *   blk = row + b * BLOCK_BYTES;
        const int8_t * qs  = (const int8_t *) (blk + sizeof(ggml_fp16_t));
        ggml_fp16_t    dh;
        memcpy(&dh, blk, sizeof(dh));
        const float d = GGML_CPU_FP16_TO_FP32(dh);
        float *     o = out + b * QK;
#if defined(__AVX512F__)
        const __m512 dv = _mm512_set1_ps(d);
        for (int i = 0; i < QK; i += 16) {
            const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *) (qs + i)));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_cvtepi32_ps(q), dv));
        }
#elif defined(__AVX2__)
        const __m256 dv = _mm256_set1_ps(d);
        for (int i = 0; i < QK; i += 8) {
            const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) (qs + i)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_cvtepi32_ps(q), dv));
        }
#else
        for (int i = 0; i < QK; i++) {
            o[i] = d * (float) qs[i];
        }
#endif
    }
}

// one K or V row in F32, whatever the cache's type
inline void row_to_f32(const ggml_tensor * t, const char * row, float * out) {
    if (t->type == GGML_TYPE_F16) {
        ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) row, out, t->ne[0]); // the SIMD conversion
    } else if (t->type == GGML_TYPE_Q8_0) {
        q8_0_to_f32(row, out, t->ne[0]);
    } else {
        ggml_get_type_traits(t->type)->to_float(row, out, t->ne[0]);
    }
}

// A row's cache lines, asked for ahead of use: the kept cells are known a block ahead, and
// VisionPulse's holes leave a stream the hardware prefetcher cannot follow.
inline void prefetch_row(const char * row, size_t bytes) {
    for (size_t o = 0; o < bytes; o += CACHE_LINE_SIZE) {
        __builtin_prefetch(row + o);
    }
}

// The query heads over the cells [ic0, ic1): partial (M, S, acc[DV]) per query head. The cells
// are taken a block at a time, every KV head of a cell within the block (a cell's heads sit side
// by side in the cache, so K and V are read as two forward streams).
void chunk_partials(const fattn_args & a, int64_t ic0, int64_t ic1, float * scratch, float * partials,
                    int64_t partial_stride) {
    const int64_t G     = a.group;
    const int64_t H     = a.n_head;
    float *       accs  = scratch;                                  // [H][DV]
    float *       M     = accs + H * a.dv;                          // [H]
    float *       S     = M + H;                                    // [H]
    float *       score = S + H;                                    // [G][BLOCK]
    float *       prob  = score + G * BLOCK;                        // [G][BLOCK]
    float *       row   = prob + G * BLOCK;                         // [max(DK, DV)]: a K or V row in F32
    int64_t *     all   = (int64_t *) (row + std::max(a.dk, a.dv)); // [BLOCK] (two floats each)
    int64_t *     own   = all + BLOCK;                              // [BLOCK]: KV head ikv's of them
    static_assert(sizeof(int64_t) == 2 * sizeof(float), "cell indices take two floats each");

    const int64_t dq      = a.q->nb[2] / sizeof(float);
    const size_t  k_bytes = ggml_row_size(a.k->type, a.dk);
    const size_t  v_bytes = ggml_row_size(a.v->type, a.dv);
    for (int64_t h = 0; h < H; h++) {
        M[h] = -INFINITY;
        S[h] = 0.0f;
    }
    memset(accs, 0, H * a.dv * sizeof(float));

    int64_t ic = ic0;
    while (true) {
        // the next block of kept cells
        int64_t n_all = 0;
        for (ic = next_kept(a, ic, ic1); ic < ic1 && n_all < BLOCK; ic = next_kept(a, ic + 1, ic1)) {
            all[n_all++] = ic;
        }
        if (n_all == 0) {
            break;
        }
        for (int64_t ikv = 0; ikv < a.n_head_kv; ikv++) {
            // one mask row: every head takes the whole block; a row per head: each KV head its own cells
            const int64_t * cells = a.mask_rows == 1 ? all : own;
            const int64_t   n     = a.mask_rows == 1 ? n_all : group_cells(a, ikv, all, n_all, own);
            if (n == 0) {
                continue;
            }
            const char *  kbase = (const char *) a.k->data + ikv * a.k->nb[2];
            const char *  vbase = (const char *) a.v->data + ikv * a.v->nb[2];
            const float * q     = (const float *) ((const char *) a.q->data + ikv * G * a.q->nb[2]);
            // scores: each K row is read and converted once for the whole group
            for (int64_t j = 0; j < n; j++) {
                if (j + 2 < n) {
                    prefetch_row(kbase + cells[j + 2] * a.k->nb[1], k_bytes);
                }
                prefetch_row(vbase + cells[j] * a.v->nb[1], v_bytes);
                row_to_f32(a.k, kbase + cells[j] * a.k->nb[1], row);
                group_dots(a.dk, G, q, dq, row, score + j, BLOCK);
                for (int64_t h = 0; h < G; h++) {
                    const int64_t row = a.mask_rows == 1 ? 0 : ikv * G + h;
                    const float   mv  = a.mask ? GGML_CPU_FP16_TO_FP32(a.mask[row * a.mask_nb2 + cells[j]]) : 0.0f;
                    float         sc  = score[h * BLOCK + j] * a.scale;
                    if (a.softcap != 0.0f) {
                        sc = a.softcap * tanhf(sc);
                    }
                    score[h * BLOCK + j] = sc + mv;
                }
            }
            // online softmax, a block at a time
            for (int64_t h = 0; h < G; h++) {
                const int64_t iq   = ikv * G + h;
                const float * sh   = score + h * BLOCK;
                float         mnew = M[iq];
                for (int64_t j = 0; j < n; j++) {
                    mnew = std::max(mnew, sh[j]);
                }
                if (mnew == -INFINITY) { // with a mask per head, this head may have none of the block's cells
                    memset(prob + h * BLOCK, 0, n * sizeof(float));
                    continue;
                }
                const float ms = M[iq] == -INFINITY ? 0.0f : expf(M[iq] - mnew);
                if (ms != 1.0f) {
                    ggml_vec_scale_f32((int) a.dv, accs + iq * a.dv, ms);
                }
                S[iq] = S[iq] * ms + (float) ggml_vec_soft_max_f32((int) n, prob + h * BLOCK, sh, mnew);
                M[iq] = mnew;
            }
            // values: each V row converted once, added into every head of the group
            for (int64_t j = 0; j < n; j++) {
                row_to_f32(a.v, vbase + cells[j] * a.v->nb[1], row);
                for (int64_t h = 0; h < G; h++) {
                    ggml_vec_mad_f32((int) a.dv, accs + (ikv * G + h) * a.dv, row, prob[h * BLOCK + j]);
                }
            }
        }
    }
    for (int64_t iq = 0; iq < H; iq++) {
        float * p = partials + iq * partial_stride;
        p[0]      = M[iq];
        p[1]      = S[iq];
        memcpy(p + 2, accs + iq * a.dv, a.dv * sizeof(float));
    }
}

// merge a head's partials over the chunks, fold in its sink, normalise, write dst
void reduce_head(const fattn_args & a, ggml_tensor * dst, int64_t iq, const float * partials, int64_t n_chunks,
                 float * out) {
    const int64_t part = partial_floats(a);
    float         M    = -INFINITY;
    float         S    = 0.0f;
    memset(out, 0, a.dv * sizeof(float));
    for (int64_t c = 0; c < n_chunks; c++) {
        const float * p = partials + (iq * n_chunks + c) * part;
        if (p[1] == 0.0f) {
            continue; // nothing kept in this chunk
        }
        const float mnew = std::max(M, p[0]);
        const float so   = M == -INFINITY ? 0.0f : expf(M - mnew);
        const float sn   = expf(p[0] - mnew);
        for (int64_t d = 0; d < a.dv; d++) {
            out[d] = out[d] * so + p[2 + d] * sn;
        }
        S = S * so + p[1] * sn;
        M = mnew;
    }
    if (a.sinks) { // a sink is a logit with no value: it only adds to the sum
        const float s = a.sinks[iq];
        if (s > M) {
            const float ms = M == -INFINITY ? 0.0f : expf(M - s);
            ggml_vec_scale_f32((int) a.dv, out, ms);
            S = S * ms + 1.0f;
        } else {
            S += expf(s - M);
        }
    }
    ggml_vec_scale_f32((int) a.dv, out, S == 0.0f ? 0.0f : 1.0f / S);
    // dst is [DV, n_head, n_tokens]: head iq of the only token
    memcpy((char *) dst->data + iq * dst->nb[1], out, a.dv * sizeof(float));
}

} // namespace

extern "C" void vp_fattn_set_enabled(bool enabled) {
    g_enabled.store(enabled);
}

extern "C" size_t vp_fattn_work_size(const ggml_tensor * node, int n_tasks) {
    if (!takes(node)) {
        return 0;
    }
    const fattn_args a = read_args(node);
    return sizeof(float) * (size_t) (n_tasks * scratch_floats(a) + a.n_head * n_tasks * partial_floats(a));
}

extern "C" bool vp_fattn_decode(const ggml_compute_params * params, ggml_tensor * dst) {
    if (params->use_ref || !g_enabled.load(std::memory_order_relaxed) || !takes(dst)) {
        return false;
    }
    const fattn_args a   = read_args(dst);
    const int        ith = params->ith;
    const int        nth = params->nth;

    const int64_t scratch_n = scratch_floats(a);
    float *       scratch   = (float *) params->wdata + ith * scratch_n;
    // partials: [query head][chunk][M, S, acc[DV]]
    float *       partials = (float *) params->wdata + nth * scratch_n;
    const int64_t part     = 2 + a.dv;

    const int64_t chunk = (a.n_kv + nth - 1) / nth;
    const int64_t ic0   = std::min(a.n_kv, ith * chunk);
    const int64_t ic1   = std::min(a.n_kv, ic0 + chunk);
    // this thread's chunk is partial `ith` of each head: heads are nth partials apart
    chunk_partials(a, ic0, ic1, scratch, partials + ith * part, nth * part);

    ggml_barrier(params->threadpool);

    for (int64_t iq = ith; iq < a.n_head; iq += nth) {
        reduce_head(a, dst, iq, partials, nth, scratch);
    }
    return true;
}
