// Equivalence test for vp-gguf's CPU flash-attention decode kernel (cpp/ggml-cpu/vp-fattn.cpp),
// in the style of llama.cpp's test-backend-ops: one GGML_OP_FLASH_ATTN_EXT node per case,
// computed by our kernel and by upstream's reference path of the same backend (use_ref),
// compared by normalised mean squared error. A float64 evaluation of the same attention is a
// third opinion: our kernel must not be further from it than upstream's kernel is.
//
//   vp-test-vp-fattn            every case; exit status 0 when all pass
//   vp-test-vp-fattn --bench    also times ours against upstream's optimised kernel
#include "ggml-cpu.h"
#include "ggml.h"
#include "vp-fattn.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

enum class mask_kind { none, causal_tail, holes, one_kept, all_masked };

const char * mask_name(mask_kind m) {
    switch (m) {
        case mask_kind::none:        return "none";
        case mask_kind::causal_tail: return "tail";
        case mask_kind::holes:       return "holes";
        case mask_kind::one_kept:    return "one";
        case mask_kind::all_masked:  return "all-inf";
    }
    return "?";
}

struct fa_case {
    int64_t   d;          // head dim (K and V)
    int64_t   group;      // query heads per KV head
    int64_t   n_head_kv;
    int64_t   n_kv;
    ggml_type k_type, v_type;
    mask_kind mask;
    int       threads;
    float     softcap  = 0.0f;
    bool      sinks    = false;
    bool      per_head = false; // a mask row per query head (VisionPulse's Quest layers): each head its own
                                // kind, cycling through them from `mask`
};

struct graph {
    ggml_context * ctx = nullptr;
    ggml_tensor *  out = nullptr;
    ggml_cgraph *  gf  = nullptr;
    std::vector<float> kf, vf, q, sink;  // the inputs as float, for the float64 evaluation
    std::vector<float> mask;             // 0 or -inf per cell (empty: no mask), per head if per_head
    ~graph() { ggml_free(ctx); }
};

// a tensor of `type` filled from floats (quantized through the type's own from_float)
void fill(ggml_tensor * t, const std::vector<float> & x) {
    const int64_t n_per_row = t->ne[0];
    const int64_t rows      = ggml_nelements(t) / n_per_row;
    for (int64_t r = 0; r < rows; r++) {
        const float * src = x.data() + r * n_per_row;
        char *        dst = (char *) t->data + r * ggml_row_size(t->type, n_per_row);
        if (t->type == GGML_TYPE_F32) {
            memcpy(dst, src, n_per_row * sizeof(float));
        } else {
            ggml_get_type_traits_cpu(t->type)->from_float(src, dst, n_per_row);
        }
    }
}

// read back what a quantized tensor actually holds, so the float64 evaluation sees the same K/V
std::vector<float> as_float(const ggml_tensor * t) {
    std::vector<float> y(ggml_nelements(t));
    const int64_t n_per_row = t->ne[0];
    for (int64_t r = 0; r < (int64_t) y.size() / n_per_row; r++) {
        const char * src = (const char *) t->data + r * ggml_row_size(t->type, n_per_row);
        if (t->type == GGML_TYPE_F32) {
            memcpy(y.data() + r * n_per_row, src, n_per_row * sizeof(float));
        } else {
            ggml_get_type_traits(t->type)->to_float(src, y.data() + r * n_per_row, n_per_row);
        }
    }
    return y;
}

std::vector<float> make_mask(const fa_case & c, std::mt19937 & rng) {
    std::vector<float> m(c.n_kv, 0.0f);
    const float        ninf = -INFINITY;
    switch (c.mask) {
        case mask_kind::none:
            return {};
        case mask_kind::causal_tail:  // llama.cpp pads the KV to 256 cells with -inf
            for (int64_t i = c.n_kv - c.n_kv / 5; i < c.n_kv; i++) {
                m[i] = ninf;
            }
            break;
        case mask_kind::holes: {
            // VisionPulse's shape: a few text cells, a visual span of which ~3% is kept in
            // scattered cells and short runs, text after it, the padded tail masked
            const int64_t v0 = std::min<int64_t>(c.n_kv, 5), v1 = std::max(v0, c.n_kv - c.n_kv / 8);
            std::uniform_real_distribution<float> u(0.0f, 1.0f);
            for (int64_t i = v0; i < v1; i++) {
                m[i] = ninf;
            }
            for (int64_t i = v0; i < v1; i++) {
                if (u(rng) < 0.02f) {
                    const int64_t run = 1 + (int64_t) (u(rng) * 6);
                    for (int64_t j = i; j < std::min(v1, i + run); j++) {
                        m[j] = 0.0f;
                    }
                }
            }
            for (int64_t i = c.n_kv - c.n_kv / 32; i < c.n_kv; i++) {
                m[i] = ninf;
            }
            break;
        }
        case mask_kind::one_kept:
            std::fill(m.begin(), m.end(), ninf);
            m[c.n_kv / 3] = 0.0f;
            break;
        case mask_kind::all_masked:
            std::fill(m.begin(), m.end(), ninf);
            break;
    }
    return m;
}

void build(graph & g, const fa_case & c, uint32_t seed) {
    const int64_t n_head = c.group * c.n_head_kv;
    const size_t  kv_bytes =
        ggml_row_size(c.k_type, c.d) * c.n_kv * c.n_head_kv + ggml_row_size(c.v_type, c.d) * c.n_kv * c.n_head_kv;
    ggml_init_params ip = { kv_bytes + (size_t) (n_head * c.d * 8 + c.n_kv * 2 + n_head * 8) + 16 * 1024 * 1024, nullptr,
                            false };
    g.ctx               = ggml_init(ip);

    std::mt19937                    rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto                            randn = [&](int64_t n, float s) {
        std::vector<float> x(n);
        for (auto & e : x) {
            e = s * nd(rng);
        }
        return x;
    };
    // as llama.cpp lays them out: q permuted to [d, n_tokens, n_head], the cache [d, n_kv, n_head_kv]
    ggml_tensor * q = ggml_new_tensor_4d(g.ctx, GGML_TYPE_F32, c.d, 1, n_head, 1);
    // the cache holds a cell's heads side by side; attention sees it permuted to [d, n_kv, n_head_kv]
    ggml_tensor * k_cells = ggml_new_tensor_3d(g.ctx, c.k_type, c.d, c.n_head_kv, c.n_kv);
    ggml_tensor * v_cells = ggml_new_tensor_3d(g.ctx, c.v_type, c.d, c.n_head_kv, c.n_kv);
    g.q                   = randn(ggml_nelements(q), 1.0f);
    fill(q, g.q);
    fill(k_cells, randn(ggml_nelements(k_cells), 1.0f));
    fill(v_cells, randn(ggml_nelements(v_cells), 1.0f));
    g.kf            = as_float(k_cells);
    g.vf            = as_float(v_cells);
    ggml_tensor * k = ggml_permute(g.ctx, k_cells, 0, 2, 1, 3);
    ggml_tensor * v = ggml_permute(g.ctx, v_cells, 0, 2, 1, 3);

    ggml_tensor * mask = nullptr;
    g.mask             = make_mask(c, rng);
    if (c.per_head) {
        g.mask.clear();
        for (int64_t h = 0; h < n_head; h++) {
            fa_case ch = c;
            ch.mask    = (mask_kind) (((int) c.mask + h) % 5);
            if (ch.mask == mask_kind::holes && c.n_kv < 64) ch.mask = mask_kind::causal_tail;
            std::vector<float> m = make_mask(ch, rng);
            if (m.empty()) m.assign(c.n_kv, 0.0f);
            g.mask.insert(g.mask.end(), m.begin(), m.end());
        }
    }
    if (!g.mask.empty()) {
        mask = ggml_new_tensor_4d(g.ctx, GGML_TYPE_F16, c.n_kv, 1, c.per_head ? n_head : 1, 1);
        for (size_t i = 0; i < g.mask.size(); i++) {
            ((ggml_fp16_t *) mask->data)[i] = ggml_fp32_to_fp16(g.mask[i]);
        }
    }
    const float scale = 1.0f / std::sqrt((float) c.d);
    g.out             = ggml_flash_attn_ext(g.ctx, q, k, v, mask, scale, 0.0f, c.softcap);
    ggml_flash_attn_ext_set_prec(g.out, GGML_PREC_F32);
    if (c.sinks) {
        ggml_tensor * s = ggml_new_tensor_1d(g.ctx, GGML_TYPE_F32, n_head);
        g.sink          = randn(n_head, 2.0f);
        memcpy(s->data, g.sink.data(), n_head * sizeof(float));
        ggml_flash_attn_ext_add_sinks(g.out, s);
    }
    g.gf = ggml_new_graph(g.ctx);
    ggml_build_forward_expand(g.gf, g.out);
}

std::vector<float> compute(graph & g, int threads, bool use_ref) {
    ggml_cplan plan = ggml_graph_plan(g.gf, threads, nullptr);
    std::vector<uint8_t> work(plan.work_size + 64);
    plan.work_data = work.data();
    plan.use_ref   = use_ref;
    if (ggml_graph_compute(g.gf, &plan) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "ggml_graph_compute failed\n");
        exit(2);
    }
    const float * o = (const float *) g.out->data;
    return std::vector<float>(o, o + ggml_nelements(g.out));
}

// the same attention in float64 from what the tensors hold (no online softmax, no chunks)
std::vector<float> evaluate(const graph & g, const fa_case & c) {
    const int64_t      n_head = c.group * c.n_head_kv;
    const double       scale  = 1.0 / std::sqrt((double) c.d);
    std::vector<float> out(n_head * c.d, 0.0f);
    std::vector<double> s(c.n_kv);
    for (int64_t h = 0; h < n_head; h++) {
        const int64_t hk = h / c.group;
        const float * qh = g.q.data() + h * c.d;
        double        mx = -INFINITY;
        for (int64_t i = 0; i < c.n_kv; i++) {
            const float * kr  = g.kf.data() + (i * c.n_head_kv + hk) * c.d;
            double        dot = 0.0;
            for (int64_t d = 0; d < c.d; d++) {
                dot += (double) qh[d] * kr[d];
            }
            dot *= scale;
            if (c.softcap != 0.0f) {
                dot = c.softcap * std::tanh(dot / c.softcap);
            }
            s[i] = g.mask.empty() ? dot : dot + g.mask[(c.per_head ? h * c.n_kv : 0) + i];
            mx   = std::max(mx, s[i]);
        }
        if (!g.sink.empty()) {
            mx = std::max(mx, (double) g.sink[h]);
        }
        if (mx == -INFINITY) {
            continue;  // nothing to attend to: zeros, as upstream writes
        }
        double              sum = g.sink.empty() ? 0.0 : std::exp(g.sink[h] - mx);
        std::vector<double> acc(c.d, 0.0);
        for (int64_t i = 0; i < c.n_kv; i++) {
            if (s[i] == -INFINITY) {
                continue;
            }
            const double  p  = std::exp(s[i] - mx);
            const float * vr = g.vf.data() + (i * c.n_head_kv + hk) * c.d;
            sum += p;
            for (int64_t d = 0; d < c.d; d++) {
                acc[d] += p * vr[d];
            }
        }
        for (int64_t d = 0; d < c.d; d++) {
            out[h * c.d + d] = (float) (acc[d] / sum);
        }
    }
    return out;
}

double nmse(const std::vector<float> & a, const std::vector<float> & b) {
    double err = 0.0, ref = 0.0;
    for (size_t i = 0; i < a.size(); i++) {
        if (!std::isfinite(a[i]) || !std::isfinite(b[i])) {
            return INFINITY;
        }
        err += (double) (a[i] - b[i]) * (a[i] - b[i]);
        ref += (double) b[i] * b[i];
    }
    return ref == 0.0 ? (err == 0.0 ? 0.0 : INFINITY) : err / ref;
}

std::vector<fa_case> cases() {
    std::vector<fa_case> out;
    const ggml_type      types[][2] = {
        { GGML_TYPE_F16,  GGML_TYPE_F16  },
        { GGML_TYPE_Q8_0, GGML_TYPE_Q8_0 },
        { GGML_TYPE_Q8_0, GGML_TYPE_F16  },
    };
    const mask_kind masks[] = { mask_kind::none, mask_kind::causal_tail, mask_kind::holes, mask_kind::one_kept,
                                mask_kind::all_masked };
    // every head dim x GQA x KV type x mask over short and medium KV lengths, 1..3 threads
    int i = 0;
    for (int64_t d : { 64, 128, 256 }) {
        for (int64_t group : { 1, 2, 4, 8 }) {
            for (auto & t : types) {
                for (int64_t n_kv : { 1, 7, 64, 333, 1024, 4096 }) {
                    for (mask_kind m : masks) {
                        if (n_kv < 64 && m == mask_kind::holes) {
                            continue;
                        }
                        out.push_back({ d, group, 2, n_kv, t[0], t[1], m, 1 + (i++ % 3) });
                    }
                }
            }
        }
    }
    // long contexts at the shapes of the models we run (Qwen2.5-VL-3B: 16/2 heads of 128)
    for (int64_t n_kv : { 16384, 32768, 65536 }) {
        for (auto & t : types) {
            for (mask_kind m : { mask_kind::causal_tail, mask_kind::holes }) {
                out.push_back({ 128, 8, 2, n_kv, t[0], t[1], m, 2 });
            }
        }
    }
    out.push_back({ 256, 4, 1, 65536, GGML_TYPE_F16, GGML_TYPE_F16, mask_kind::holes, 2 });
    // a mask row per query head, each head another kind (Quest's gathered cells; one head may keep none)
    for (int64_t group : { 1, 2, 8 }) {
        for (auto & t : types) {
            for (int64_t n_kv : { 7, 64, 333, 1024, 4096 }) {
                for (mask_kind m : masks) {
                    out.push_back({ 128, group, 2, n_kv, t[0], t[1], m, 1 + (i++ % 3), 0.0f, false, true });
                }
            }
        }
    }
    // logit soft-capping and attention sinks (Gemma 2, gpt-oss)
    for (mask_kind m : masks) {
        out.push_back({ 128, 4, 2, 777, GGML_TYPE_F16, GGML_TYPE_F16, m, 2, 30.0f, false });
        out.push_back({ 64, 8, 1, 2048, GGML_TYPE_Q8_0, GGML_TYPE_Q8_0, m, 3, 0.0f, true });
    }
    return out;
}

double ms_one(graph & g, int threads) {
    const auto t0 = std::chrono::steady_clock::now();
    compute(g, threads, false);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// median of interleaved runs: drift on a shared machine hits both kernels alike
void bench() {
    printf("\n| n_kv | KV type | mask | upstream ms | ours ms | speedup |\n|---|---|---|---|---|---|\n");
    for (int64_t n_kv : { 4096, 16384, 32768 }) {
        for (ggml_type t : { GGML_TYPE_F16, GGML_TYPE_Q8_0 }) {
            for (mask_kind m : { mask_kind::causal_tail, mask_kind::holes }) {
                const fa_case c{ 128, 8, 2, n_kv, t, t, m, 2 };
                graph         g;
                build(g, c, 7);
                std::vector<double> up, ours;
                for (int r = 0; r < 31; r++) {
                    vp_fattn_set_enabled(false);
                    up.push_back(ms_one(g, 2));
                    vp_fattn_set_enabled(true);
                    ours.push_back(ms_one(g, 2));
                }
                std::sort(up.begin(), up.end());
                std::sort(ours.begin(), ours.end());
                printf("| %lld | %s | %s | %.3f | %.3f | %.2fx |\n", (long long) n_kv, ggml_type_name(t), mask_name(m),
                       up[15], ours[15], up[15] / ours[15]);
            }
        }
    }
}

// A decode step's attention over a model's worth of layers, each with its own cache (so, as in a
// model, no layer finds its K/V in the CPU's caches): ours, upstream's kernel, and the path
// without flash attention (K.Q, softmax, V^T.P with V stored transposed, as llama.cpp keeps it).
void bench_layers(int64_t n_kv, int n_layer, int threads) {
    const int64_t d = 128, G = 8, n_head_kv = 2, n_head = G * n_head_kv;
    struct layer {
        graph         fa;
        ggml_context * ctx = nullptr;
        ggml_cgraph *  gf  = nullptr;
        ~layer() { ggml_free(ctx); }
    };
    std::vector<std::unique_ptr<layer>> layers;
    for (int il = 0; il < n_layer; il++) {
        auto L = std::make_unique<layer>();
        build(L->fa, { d, G, n_head_kv, n_kv, GGML_TYPE_F16, GGML_TYPE_F16, mask_kind::causal_tail, threads }, il);
        ggml_init_params ip = { (size_t) (n_kv * d * n_head_kv * 4 + n_kv * n_head * 8 + n_kv * 4) + 64 * 1024 * 1024,
                                nullptr, false };
        L->ctx              = ggml_init(ip);
        ggml_tensor * q     = ggml_new_tensor_4d(L->ctx, GGML_TYPE_F32, d, 1, n_head, 1);
        ggml_tensor * kc    = ggml_new_tensor_3d(L->ctx, GGML_TYPE_F16, d, n_head_kv, n_kv);
        ggml_tensor * vt    = ggml_new_tensor_3d(L->ctx, GGML_TYPE_F16, n_kv, d, n_head_kv);  // V transposed
        ggml_tensor * mask  = ggml_new_tensor_4d(L->ctx, GGML_TYPE_F16, n_kv, 1, 1, 1);
        memset(kc->data, 0, ggml_nbytes(kc));
        memset(vt->data, 0, ggml_nbytes(vt));
        memset(mask->data, 0, ggml_nbytes(mask));
        memset(q->data, 0, ggml_nbytes(q));
        ggml_tensor * k  = ggml_permute(L->ctx, kc, 0, 2, 1, 3);
        ggml_tensor * kq = ggml_mul_mat(L->ctx, k, q);
        kq               = ggml_soft_max_ext(L->ctx, kq, mask, 0.088f, 0.0f);
        ggml_tensor * o  = ggml_mul_mat(L->ctx, vt, kq);
        L->gf            = ggml_new_graph(L->ctx);
        ggml_build_forward_expand(L->gf, o);
        layers.push_back(std::move(L));
    }
    auto run = [&](int which) {
        const auto t0 = std::chrono::steady_clock::now();
        for (auto & L : layers) {
            if (which == 2) {
                ggml_cplan plan = ggml_graph_plan(L->gf, threads, nullptr);
                std::vector<uint8_t> work(plan.work_size + 64);
                plan.work_data = work.data();
                ggml_graph_compute(L->gf, &plan);
            } else {
                vp_fattn_set_enabled(which == 0);
                compute(L->fa, threads, false);
            }
        }
        return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    };
    std::vector<double> t[3];
    for (int r = 0; r < 7; r++) {
        for (int w = 0; w < 3; w++) {
            t[w].push_back(run(w));
        }
    }
    vp_fattn_set_enabled(true);
    for (auto & x : t) {
        std::sort(x.begin(), x.end());
    }
    printf("| %lld | %d | %.1f | %.1f | %.1f |\n", (long long) n_kv, n_layer, t[0][3], t[1][3], t[2][3]);
}

}  // namespace

int main(int argc, char ** argv) {
    ggml_cpu_init();
    const bool do_bench = argc > 1 && std::string(argv[1]) == "--bench";
    if (argc > 1 && std::string(argv[1]) == "--bench-layers") {
        const int threads = argc > 2 ? atoi(argv[2]) : 2;
        printf("| n_kv | layers | ours ms | upstream FA ms | without FA ms |\n|---|---|---|---|---|\n");
        for (int64_t n_kv : { 4096, 16384 }) {
            bench_layers(n_kv, 36, threads);
        }
        return 0;
    }
    int        n_fail = 0, n = 0;
    for (const fa_case & c : cases()) {
        graph g;
        build(g, c, 1234 + n);
        const std::vector<float> ours = compute(g, c.threads, false);
        const std::vector<float> ref  = compute(g, c.threads, true);
        const std::vector<float> f64  = evaluate(g, c);
        const double e_ref = nmse(ours, ref), e_ours = nmse(ours, f64), e_up = nmse(ref, f64);
        // Flash attention's own tolerance (test-backend-ops: 5e-4) from the float64 answer, no
        // further from it than upstream's kernel, and within the tolerance of upstream's result
        // wherever upstream is itself well within it: its reference path accumulates F16 V in
        // F16, which over tens of thousands of unmasked cells drifts past 5e-4 on its own.
        const bool ok = e_ours < 5e-4 && e_ours <= 2.0 * e_up + 1e-7 && (e_ref < 5e-4 || e_up > 2.5e-4);
        n++;
        if (!ok) {
            n_fail++;
        }
        if (!ok || c.n_kv >= 16384) {
            printf("%s d=%lld group=%lld heads_kv=%lld n_kv=%lld K=%s V=%s mask=%s%s threads=%d softcap=%g sinks=%d: "
                   "nmse vs upstream %.3g, vs float64 ours %.3g upstream %.3g\n",
                   ok ? "ok  " : "FAIL", (long long) c.d, (long long) c.group, (long long) c.n_head_kv,
                   (long long) c.n_kv, ggml_type_name(c.k_type), ggml_type_name(c.v_type), mask_name(c.mask),
                   c.per_head ? " per head" : "", c.threads,
                   c.softcap, c.sinks ? 1 : 0, e_ref, e_ours, e_up);
        }
    }
    printf("vp-fattn: %d/%d cases match upstream's kernel\n", n - n_fail, n);
    if (do_bench) {
        bench();
    }
    return n_fail == 0 ? 0 : 1;
}
