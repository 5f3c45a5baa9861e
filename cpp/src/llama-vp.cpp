// VisionPulse: per-decode-step visual token selection, built into the step's own graph.
//
// At the anchor layer of a decode step (one query token per sequence):
//   scores  = q.k * kq_scale                                   [n_kv, rows, n_head, streams]
//   mass_h  = sum over visual keys of softmax(scores/tau + mask) (all visible keys)
//   mass    = max_h mass_h;  K = max(1, floor(clamp(mass, b_min, b_max) * N_v))
//   rank    = argsort(mean_h scores + (visual ? 0 : -inf)), descending; the first K are kept
//   mask'   = mask + (visual and not kept ? -BIG : 0)          used by every layer after the anchor
// All with standard ggml ops, so it runs wherever the graph runs (CPU, CUDA, Metal).
// K is data dependent, so the argsort keeps a static k_max = max over rows of the budget's
// upper bound, and ranks >= K are switched off with step(K - rank).
//
// Two ways for the layers after the anchor to skip the dropped cells (enum llama_vp_attn):
// MASK adds -inf to them (CPU flash attention skips such cells; Metal gets the n_kv_max hint);
// GATHER copies the selected K/V rows (text cells and kept visual cells, in ascending cell
// order, so flash attention sees them in the same order as MASK) and attends to the copy.

#include "llama-vp.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cells.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_map>

// Masked-out value: finite so that (1 - keep) * BIG stays a number; -1e30 is -inf in F16
// and exp(-1e30 - max) is exactly 0 in F32.
static constexpr float VP_BIG = 1e30f;

static thread_local std::string g_vp_error;

static int32_t vp_fail(int32_t code, const std::string & msg) {
    g_vp_error = msg;
    return code;
}

//
// which cells are visual
//

// marks: the seq's explicit ranges, or null to use the auto marks (cells written from embeddings)
static bool vp_cell_is_visual(const llama_vp_context & vp, const std::vector<std::pair<llama_pos, llama_pos>> * marks,
                              const llama_kv_cells & cells, uint32_t i, llama_seq_id seq) {
    if (cells.is_empty(i) || !cells.seq_has(i, seq)) {
        return false;
    }
    if (marks) {
        const llama_pos p = cells.pos_get(i);
        for (const auto & r : *marks) {
            if (p >= r.first && p < r.second) {
                return true;
            }
        }
        return false;
    }
    return vp.params.auto_mark && cells.ext_get(i).tok == LLAMA_TOKEN_NULL;
}

// The visual cells of seq among the first n_kv cells, in ordinal order: (pos, y, x),
// i.e. images in prompt order, each row-major (M-RoPE images share pos, differ in y/x).
static std::vector<int32_t> vp_visual_cells(const llama_vp_context & vp, const llama_kv_cells & cells, uint32_t n_kv,
                                            llama_seq_id seq) {
    std::vector<int32_t> res;
    const auto           it    = vp.seqs.find(seq); // once per sequence, not per cell
    const auto *         marks = it != vp.seqs.end() && !it->second.marks.empty() ? &it->second.marks : nullptr;
    const uint32_t       n     = std::min<uint32_t>(n_kv, cells.size());
    for (uint32_t i = 0; i < n; ++i) {
        if (vp_cell_is_visual(vp, marks, cells, i, seq)) {
            res.push_back((int32_t) i);
        }
    }
    const auto before = [&](int32_t a, int32_t b) {
        const llama_pos pa = cells.pos_get(a), pb = cells.pos_get(b);
        if (pa != pb) return pa < pb;
        const auto & ea = cells.ext_get(a);
        const auto & eb = cells.ext_get(b);
        if (ea.y != eb.y) return ea.y < eb.y;
        return ea.x < eb.x;
    };
    if (!std::is_sorted(res.begin(), res.end(), before)) { // cells usually are in order already
        std::stable_sort(res.begin(), res.end(), before);
    }
    return res;
}

//
// the graph input: per-row visual flags and budgets, set on the host before each step
//

class llm_graph_input_vp : public llm_graph_input_i {
public:
    struct row {
        llama_seq_id         seq = -1;
        std::vector<int32_t> vis;     // visual cells of the base cache, ordinal order
        std::vector<int32_t> vis_swa; // visual cells of the SWA cache (for the map)
        std::vector<int32_t> swa_to_base;
    };

    llama_vp_context * vp        = nullptr;
    int32_t            mode      = 0;     // effective mode of this step (STATIC becomes FIXED or FORCED)
    bool               rank_only = false; // STATIC's first step: rank and remember, mask nothing
    int64_t            n_kv = 0, n_kv_swa = 0, n_rows = 0, n_stream = 1, k_max = 0, n_head = 0;
    std::vector<row>   rows;

    ggml_tensor * t_vis     = nullptr; // F32 [n_kv, n_rows, 1, n_stream]: 1 visual
    ggml_tensor * t_vis_neg = nullptr; // F32 [n_kv, n_rows, 1, n_stream]: 0 visual, -inf not
    ggml_tensor * t_nv      = nullptr; // F32 [1, n_rows, 1, n_stream]: N_v
    ggml_tensor * t_k       = nullptr; // F32 [1, n_rows, 1, n_stream]: K (FIXED)
    ggml_tensor * t_rand    = nullptr; // F32 [n_kv, n_rows, 1, n_stream]: RANDOM ranking
    ggml_tensor * t_rank    = nullptr; // F32 [k_max]: 0, 1, ..., k_max-1
    ggml_tensor * t_drop    = nullptr; // F32 [n_kv, n_rows, 1, n_stream]: FORCED drop mask
    ggml_tensor * t_swa_map = nullptr; // I32 [n_kv_swa, n_rows, n_stream]: base cell, n_kv if none
    ggml_tensor * t_vis_swa = nullptr; // F32 [n_kv_swa, n_rows, 1, n_stream]

    // outputs read back after the step
    ggml_tensor *o_mass = nullptr, *o_idx = nullptr, *o_keep = nullptr;
    ggml_tensor *o_cov_num = nullptr, *o_cov_den = nullptr;

    // built at the anchor, used by the layers after it
    ggml_tensor * keep_full     = nullptr; // F32 [1, n_kv + 1, n_rows, n_stream]
    ggml_tensor * mask_base     = nullptr;
    ggml_tensor * mask_base_f32 = nullptr;
    ggml_tensor * kq_mask_f32   = nullptr; // the layers' own mask in F32 (cast once)
    ggml_tensor * mask_swa      = nullptr;
    bool          anchor_built  = false;

    // GATHER path
    int32_t              path         = -1;      // resolved llama_vp_attn of this step (MASK or GATHER)
    int64_t              n_nonvis_max = 0;       // most non-visual cells among the rows
    int64_t              n_sel        = 0;       // gathered cells per stream after the anchor
    ggml_tensor *        t_negcell    = nullptr; // F32 [n_kv]: -cell, the ascending-order key
    ggml_tensor *        sel_idx      = nullptr; // I32 [n_sel, n_stream]: gathered cells after the anchor
    ggml_tensor *        mask_gath    = nullptr; // their mask (mask type) [n_sel, 1, 1, n_stream]
    std::vector<int32_t> h_idx;                  // FORCED: host-built selection [n_sel, n_stream]
    ggml_tensor *        t_hidx = nullptr;

    // lagged selection below the anchor: the previous step's kept set
    bool                             lag       = false;
    int64_t                          n_lag_sel = 0;
    std::vector<float>               h_lag_drop; // [n_kv, n_rows, 1, n_stream]
    std::vector<int32_t>             h_lag_idx;  // [n_lag_sel, n_stream]
    ggml_tensor *                    t_lag_drop = nullptr, *t_lag_idx = nullptr;
    std::map<int64_t, ggml_tensor *> t_iota; // I32 [n, n_stream]: 0..n-1, by n
    ggml_tensor *                    mask_lag = nullptr, *mask_lag_f32 = nullptr, *mask_lag_gath = nullptr;

    // without flash attention (llama_vp_attn_scores sees this layer's kq):
    // the anchor waits for its own layer's scores instead of probing,
    ggml_tensor *anchor_q = nullptr, *anchor_k = nullptr, *anchor_mask = nullptr;
    float        anchor_scale = 0.0f;
    // and a GATHER layer's scores of its gathered K rows go back to their cells
    int                                    scatter_il  = -1;
    ggml_tensor *                          scatter_idx = nullptr;
    std::map<ggml_tensor *, ggml_tensor *> scatter_buf; // by index list (lagged and anchor selections differ)

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;
};

// inputs that no op of this graph ended up using have no buffer
static void vp_set(ggml_tensor * t, const void * data) {
    if (t && t->buffer) {
        ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
    }
}

void llm_graph_input_vp::set_input(const llama_ubatch * ubatch) {
    GGML_UNUSED(ubatch);
    const int64_t      R = n_rows * n_stream;
    std::vector<float> vis(n_kv * R, 0.0f), vis_neg(n_kv * R, -INFINITY), nv(R, 0.0f), kk(R, 1.0f);
    std::vector<float> drop;
    if (t_drop) drop.assign(n_kv * R, 0.0f);
    for (int64_t r = 0; r < R; ++r) {
        const auto & rw = rows[r];
        for (int32_t c : rw.vis) {
            vis[r * n_kv + c]     = 1.0f;
            vis_neg[r * n_kv + c] = 0.0f;
        }
        nv[r]             = (float) rw.vis.size();
        const float ratio = vp->params.ratio;
        kk[r]             = std::max(1.0f, std::floor(ratio * (float) rw.vis.size()));
        if (t_drop) {
            const auto        it = vp->seqs.find(rw.seq);
            std::vector<char> keep(rw.vis.size(), 0);
            if (it != vp->seqs.end()) {
                for (int32_t o : it->second.forced) {
                    if (o >= 0 && o < (int32_t) keep.size()) keep[o] = 1;
                }
            }
            for (size_t o = 0; o < rw.vis.size(); ++o) {
                if (!keep[o]) drop[r * n_kv + rw.vis[o]] = -VP_BIG;
            }
        }
    }
    vp_set(t_vis, vis.data());
    vp_set(t_vis_neg, vis_neg.data());
    vp_set(t_nv, nv.data());
    vp_set(t_k, kk.data());
    vp_set(t_drop, drop.data());
    if (t_rank) {
        std::vector<float> rk(k_max);
        for (int64_t i = 0; i < k_max; ++i)
            rk[i] = (float) i;
        vp_set(t_rank, rk.data());
    }
    if (t_rand) {
        std::uniform_real_distribution<float> u(0.0f, 1.0f);
        std::vector<float>                    rnd(n_kv * R);
        for (auto & x : rnd)
            x = u(vp->rng);
        vp_set(t_rand, rnd.data());
    }
    if (t_negcell) {
        std::vector<float> nc(n_kv);
        for (int64_t i = 0; i < n_kv; ++i)
            nc[i] = -(float) i;
        vp_set(t_negcell, nc.data());
    }
    vp_set(t_hidx, h_idx.data());
    vp_set(t_lag_drop, h_lag_drop.data());
    vp_set(t_lag_idx, h_lag_idx.data());
    for (auto & [n, t] : t_iota) {
        std::vector<int32_t> io(n * n_stream);
        for (int64_t i = 0; i < (int64_t) io.size(); ++i)
            io[i] = (int32_t) (i % n);
        vp_set(t, io.data());
    }
    if (t_swa_map) {
        std::vector<int32_t> map(n_kv_swa * R, (int32_t) n_kv);
        std::vector<float>   vs(n_kv_swa * R, 0.0f);
        for (int64_t r = 0; r < R; ++r) {
            const auto & rw = rows[r];
            for (size_t j = 0; j < rw.vis_swa.size(); ++j) {
                map[r * n_kv_swa + rw.vis_swa[j]] = rw.swa_to_base[j];
                vs[r * n_kv_swa + rw.vis_swa[j]]  = 1.0f;
            }
        }
        vp_set(t_swa_map, map.data());
        vp_set(t_vis_swa, vs.data());
    }
}

//
// graph building
//

static ggml_tensor * vp_input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                              const char * name) {
    ggml_tensor * t = ggml_new_tensor_4d(ctx, type, ne0, ne1, ne2, ne3);
    ggml_set_input(t);
    ggml_set_name(t, name);
    return t;
}

static ggml_tensor * vp_output(ggml_cgraph * gf, ggml_tensor * t, const char * name) {
    ggml_set_name(t, name);
    ggml_set_output(t);
    ggml_build_forward_expand(gf, t);
    return t;
}

static std::vector<char> vp_keep_flags(size_t n_vis, const std::vector<int32_t> * ordinals) {
    std::vector<char> keep(n_vis, 0);
    if (ordinals) {
        for (int32_t o : *ordinals) {
            if (o >= 0 && o < (int32_t) n_vis) keep[o] = 1;
        }
    }
    return keep;
}

// A selection known before the step (FORCED, or the lagged previous one), one row per stream:
// the cells each stream attends to in ascending order (non-visual and kept visual), padded
// with its dropped visual cells (masked, so skipped) to the common count, which is returned.
// drop (optional): the -BIG mask of the dropped visual cells, [n_kv, n_rows, 1, n_stream].
static int64_t vp_host_selection(const llm_graph_input_vp & inp, const std::vector<std::vector<char>> & keep,
                                 std::vector<int32_t> & idx, std::vector<float> * drop) {
    const int64_t                     n_kv = inp.n_kv, R = (int64_t) inp.rows.size();
    std::vector<std::vector<int32_t>> sel(R), pad(R);
    int64_t                           n_sel = 0;
    if (drop) drop->assign(n_kv * R, 0.0f);
    for (int64_t r = 0; r < R; ++r) {
        std::vector<char> state(n_kv, 1); // 1 attend, 0 dropped visual
        const auto &      vis = inp.rows[r].vis;
        for (size_t o = 0; o < vis.size(); ++o) {
            if (!keep[r][o]) {
                state[vis[o]] = 0;
                if (drop) (*drop)[r * n_kv + vis[o]] = -VP_BIG;
            }
        }
        for (int64_t c = 0; c < n_kv; ++c)
            (state[c] ? sel[r] : pad[r]).push_back((int32_t) c);
        n_sel = std::max<int64_t>(n_sel, (int64_t) sel[r].size());
    }
    n_sel = std::max<int64_t>(n_sel, 1);
    idx.assign(n_sel * R, 0);
    for (int64_t r = 0; r < R; ++r) {
        size_t j = 0;
        for (int32_t c : sel[r])
            idx[r * n_sel + j++] = c;
        for (int32_t c : pad[r]) {
            if ((int64_t) j >= n_sel) break;
            idx[r * n_sel + j++] = c;
        }
    }
    return n_sel;
}

// The step's input object (its shapes and host data) when the step is a decode step with
// visual cells, else null. Used to build a graph and to decide whether one can be reused.
static std::unique_ptr<llm_graph_input_vp> vp_plan(const llama_cparams & cparams, const llama_ubatch & ub,
                                                   int64_t n_head, const llama_kv_cache_context * base,
                                                   const llama_kv_cache_context * swa) {
    llama_vp_context * vp = cparams.vp;
    if (!vp || !vp->enabled || !ub.token || ub.n_tokens == 0 || !cparams.causal_attn || !base) {
        return nullptr;
    }
    // a decode step: at most one token per sequence (prefill stays dense)
    std::vector<char> seen(LLAMA_MAX_SEQ, 0);
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        const llama_seq_id s = ub.seq_id[i][0];
        if (ub.n_seq_id[i] != 1 || seen[s]) {
            return nullptr;
        }
        seen[s] = 1;
    }
    const llama_kv_cache * kv  = base->get_kv();
    auto                   inp = std::make_unique<llm_graph_input_vp>();
    inp->vp                    = vp;
    inp->mode                  = vp->params.mode;
    inp->n_kv                  = base->get_n_kv();
    inp->n_stream              = cparams.kv_unified ? 1 : ub.n_seqs_unq;
    inp->n_rows                = ub.n_tokens / inp->n_stream;
    inp->n_head                = n_head;
    inp->rows.resize(ub.n_tokens);
    bool    any    = false;
    int64_t nv_max = 0;
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        auto & rw = inp->rows[i];
        rw.seq    = ub.seq_id[i][0];
        rw.vis    = vp_visual_cells(*vp, kv->get_cells(rw.seq), (uint32_t) inp->n_kv, rw.seq);
        nv_max    = std::max<int64_t>(nv_max, (int64_t) rw.vis.size());
        any |= !rw.vis.empty();
    }
    if (!any) {
        return nullptr;
    }
    if (inp->mode == LLAMA_VP_MODE_STATIC) {
        // ranked once, at the first step after a reset (the caller makes that the last prompt
        // token), then that set is kept for good
        bool all_ranked = true;
        for (const auto & rw : inp->rows) {
            auto it = vp->seqs.find(rw.seq);
            all_ranked &= it != vp->seqs.end() && it->second.has_forced;
        }
        inp->rank_only = !all_ranked;
        inp->mode      = all_ranked ? LLAMA_VP_MODE_FORCED : LLAMA_VP_MODE_FIXED;
    }
    float frac = 1.0f;
    switch (inp->mode) {
    case LLAMA_VP_MODE_DYNAMIC:
    case LLAMA_VP_MODE_RANDOM:
        frac = vp->params.budget_max;
        break;
    case LLAMA_VP_MODE_FIXED:
        frac = vp->params.ratio;
        break;
    default:
        break;
    }
    inp->k_max = std::clamp<int64_t>((int64_t) std::ceil(frac * (double) nv_max), 1, nv_max);
    if (swa && vp->params.prune_swa) { // the window's cells map to base cells only when it is pruned
        inp->n_kv_swa              = swa->get_n_kv();
        const llama_kv_cache * kvs = swa->get_kv();
        for (auto & rw : inp->rows) {
            std::unordered_map<llama_pos, int32_t> base_of;
            const auto &                           cb = kv->get_cells(rw.seq);
            for (int32_t c : rw.vis)
                base_of[cb.pos_get(c)] = c;
            const auto & cs = kvs->get_cells(rw.seq);
            for (uint32_t j = 0; j < std::min<uint32_t>((uint32_t) inp->n_kv_swa, cs.size()); ++j) {
                if (cs.is_empty(j) || !cs.seq_has(j, rw.seq)) continue;
                auto it = base_of.find(cs.pos_get(j));
                if (it != base_of.end()) {
                    rw.vis_swa.push_back((int32_t) j);
                    rw.swa_to_base.push_back(it->second);
                }
            }
        }
    }
    for (const auto & rw : inp->rows) {
        inp->n_nonvis_max = std::max<int64_t>(inp->n_nonvis_max, inp->n_kv - (int64_t) rw.vis.size());
    }
    inp->n_sel = std::min<int64_t>(inp->n_kv, inp->n_nonvis_max + inp->k_max);
    if (inp->mode == LLAMA_VP_MODE_FORCED && inp->n_rows == 1) {
        std::vector<std::vector<char>> keep;
        for (const auto & rw : inp->rows) {
            auto it = vp->seqs.find(rw.seq);
            keep.push_back(vp_keep_flags(rw.vis.size(), it != vp->seqs.end() ? &it->second.forced : nullptr));
        }
        inp->n_sel = vp_host_selection(*inp, keep, inp->h_idx, nullptr);
    }
    const bool lag_mode =
        inp->mode == LLAMA_VP_MODE_DYNAMIC || inp->mode == LLAMA_VP_MODE_FIXED || inp->mode == LLAMA_VP_MODE_RANDOM;
    if (vp->params.lagged && lag_mode && !inp->rank_only) {
        // every row needs a previous step over the same visual cells
        std::vector<std::vector<char>> keep;
        bool                           ok = true;
        for (const auto & rw : inp->rows) {
            auto it = vp->seqs.find(rw.seq);
            ok      = ok && it != vp->seqs.end() && it->second.has_stats &&
                      it->second.stats.n_visual == (int32_t) rw.vis.size();
            if (!ok) break;
            keep.push_back(vp_keep_flags(rw.vis.size(), &it->second.kept));
        }
        if (ok) {
            inp->lag       = true;
            inp->n_lag_sel = vp_host_selection(*inp, keep, inp->h_lag_idx, &inp->h_lag_drop);
        }
    }
    return inp;
}

// The memory context's full-attention and sliding-window caches.
static void vp_caches(const llama_memory_context_i * mctx, const llama_kv_cache_context *& base,
                      const llama_kv_cache_context *& swa) {
    base = dynamic_cast<const llama_kv_cache_context *>(mctx);
    swa  = nullptr;
    if (!base) {
        if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(mctx)) {
            base = iswa->get_base();
            swa  = iswa->get_swa();
        }
    }
}

// The graph of the previous step serves this one when every shape is the same; the host
// data (visual cells, forced and lagged selections) is taken from the new plan.
bool llm_graph_input_vp::can_reuse(const llm_graph_params & params) {
    const llama_kv_cache_context *base, *swa;
    vp_caches(params.mctx, base, swa);
    auto nw = vp_plan(params.cparams, params.ubatch, n_head, base, swa);
    if (!nw || nw->mode != mode || nw->rank_only != rank_only || nw->n_kv != n_kv || nw->n_kv_swa != n_kv_swa ||
        nw->n_rows != n_rows || nw->n_stream != n_stream || nw->k_max != k_max || nw->n_sel != n_sel ||
        nw->lag != lag || nw->n_lag_sel != n_lag_sel) {
        return false;
    }
    vp         = nw->vp;
    rows       = std::move(nw->rows);
    h_idx      = std::move(nw->h_idx);
    h_lag_drop = std::move(nw->h_lag_drop);
    h_lag_idx  = std::move(nw->h_lag_idx);
    return true;
}

static llm_graph_input_vp * vp_begin_graph(const llm_graph_context & g, const llama_kv_cache_context * base,
                                           const llama_kv_cache_context * swa) {
    auto inp = vp_plan(g.cparams, g.ubatch, g.n_head, base, swa);
    if (!inp) {
        return nullptr;
    }
    auto * raw = inp.get();
    g.res->add_input(std::move(inp));
    return raw;
}

static ggml_tensor * vp_forced_drop(const llm_graph_context & g, llm_graph_input_vp * inp) {
    if (!inp->t_drop) {
        inp->t_drop = vp_input(g.ctx0, GGML_TYPE_F32, inp->n_kv, inp->n_rows, 1, inp->n_stream, "vp_drop");
    }
    return inp->t_drop;
}

static ggml_tensor * vp_f32(ggml_context * ctx, ggml_tensor * m) {
    return m->type == GGML_TYPE_F32 ? m : ggml_cast(ctx, m, GGML_TYPE_F32);
}

// The step's full-attention mask in F32, cast once for the anchor, FORCED and lagged masks alike.
static ggml_tensor * vp_base_mask_f32(ggml_context * ctx, llm_graph_input_vp * inp, ggml_tensor * kq_mask) {
    if (!inp->kq_mask_f32) {
        inp->kq_mask_f32 = vp_f32(ctx, kq_mask);
    }
    return inp->kq_mask_f32;
}

static ggml_tensor * vp_as_mask_type(ggml_context * ctx, ggml_tensor * m, const ggml_tensor * like) {
    return like->type == GGML_TYPE_F32 ? m : ggml_cast(ctx, m, like->type);
}

// The probe and the selection, at the anchor layer.
// kq_own: the anchor layer's own pre-softmax scores [n_kv, R, H, S] (soft-capped), or null to probe.
static void vp_build_anchor(const llm_graph_context & g, llm_graph_input_vp * inp, ggml_tensor * q, ggml_tensor * k,
                            ggml_tensor * kq_mask, float kq_scale, ggml_tensor * kq_own) {
    ggml_context * ctx  = g.ctx0;
    const auto &   p    = inp->vp->params;
    const int64_t  n_kv = inp->n_kv, R = inp->n_rows, S = inp->n_stream, H = g.n_head;

    inp->t_vis     = vp_input(ctx, GGML_TYPE_F32, n_kv, R, 1, S, "vp_vis");
    inp->t_vis_neg = vp_input(ctx, GGML_TYPE_F32, n_kv, R, 1, S, "vp_vis_neg");
    inp->t_nv      = vp_input(ctx, GGML_TYPE_F32, 1, R, 1, S, "vp_nv");

    // scores of the current queries against every cell, per head
    ggml_tensor * kp   = ggml_permute(ctx, k, 0, 2, 1, 3); // [d, n_kv, H_kv, S]
    const int64_t H_kv = k->ne[1], G = H / H_kv;
    ggml_tensor * kq;
    inp->vp->last_probe = kq_own ? 1 : 0;
    if (kq_own) {
        kq = kq_own;
    } else if (R == 1) {
        // GQA-aware: the G query heads of a KV head are one matrix, so each K row is read once
        ggml_tensor * qg = ggml_view_4d(ctx, q, q->ne[0], G, H_kv, S, q->nb[1], q->nb[1] * G, q->nb[2], 0);
        kq               = ggml_mul_mat(ctx, kp, qg); // [n_kv, G, H_kv, S]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        kq = ggml_reshape_4d(ctx, kq, n_kv, 1, H, S); // [n_kv, R, H, S]
    } else {
        ggml_tensor * q4 = ggml_view_4d(ctx, q, q->ne[0], q->ne[1], R, S, q->nb[1], q->nb[2], q->nb[2] * R, 0);
        q4               = ggml_permute(ctx, q4, 0, 2, 1, 3); // [d, R, H, S]
        kq               = ggml_mul_mat(ctx, kp, q4);         // [n_kv, R, H, S] (GQA by broadcast)
        ggml_prec_set_acc(kq, GGML_PREC_F32);
    }
    if (g.hparams.attn_soft_cap && !kq_own) {
        kq = ggml_scale(ctx, kq, 1.0f / g.hparams.f_attn_logit_softcapping);
        kq = ggml_tanh(ctx, kq);
        kq = ggml_scale(ctx, kq, g.hparams.f_attn_logit_softcapping);
    }
    ggml_tensor * mask = vp_base_mask_f32(ctx, inp, kq_mask);

    // visual mass: max over heads of the tau-softmax share on visual cells
    ggml_tensor * pr     = ggml_soft_max_ext(ctx, kq, mask, kq_scale / p.tau, 0.0f); // [n_kv, R, H, S]
    ggml_tensor * mass_h = ggml_sum_rows(ctx, ggml_mul(ctx, pr, inp->t_vis));        // [1, R, H, S]
    ggml_tensor * mh     = ggml_cont(ctx, ggml_permute(ctx, mass_h, 2, 1, 0, 3));    // [H, R, 1, S]
    mh                   = ggml_reshape_2d(ctx, mh, H, R * S);
    ggml_tensor * mass   = ggml_pool_2d(ctx, mh, GGML_OP_POOL_MAX, (int) H, 1, (int) H, 1, 0, 0); // [1, R*S]
    mass                 = ggml_reshape_4d(ctx, mass, 1, R, 1, S);
    inp->o_mass          = vp_output(g.gf, mass, "vp_mass");

    // head-mean of the tau-softmax, for the share of mass the kept cells cover
    ggml_tensor * pmean = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, pr, 1, 2, 0, 3))); // [1, n_kv, R, S]
    pmean               = ggml_reshape_4d(ctx, pmean, n_kv, R, 1, S);

    ggml_tensor * keep_base = nullptr; // F32 [n_kv, R, 1, S]: 1 = visual and kept
    if (inp->mode == LLAMA_VP_MODE_FORCED) {
        // keep = visual * (1 + drop/BIG); the mask itself may already exist (pruning from below the anchor)
        ggml_tensor * drop = vp_forced_drop(g, inp);
        keep_base          = ggml_mul(ctx, inp->t_vis, ggml_scale_bias(ctx, drop, 1.0f / VP_BIG, 1.0f));
        if (!inp->mask_base) {
            inp->mask_base_f32 = ggml_add(ctx, mask, drop);
            inp->mask_base     = vp_as_mask_type(ctx, inp->mask_base_f32, kq_mask);
        }
    } else if (inp->mode != LLAMA_VP_MODE_DENSE) {
        const int64_t KM = inp->k_max;
        ggml_tensor * K;
        if (inp->mode == LLAMA_VP_MODE_FIXED) {
            inp->t_k = vp_input(ctx, GGML_TYPE_F32, 1, R, 1, S, "vp_k");
            K        = inp->t_k;
        } else {
            K = ggml_clamp(ctx, mass, p.budget_min, p.budget_max);
            K = ggml_floor(ctx, ggml_mul(ctx, K, inp->t_nv));
            K = ggml_clamp(ctx, K, 1.0f, 1e9f);
        }
        ggml_set_name(K, "vp_k");

        // ranking: head-mean pre-softmax score (or random), visual cells only
        ggml_tensor * score;
        if (inp->mode == LLAMA_VP_MODE_RANDOM) {
            inp->t_rand = vp_input(ctx, GGML_TYPE_F32, n_kv, R, 1, S, "vp_rand");
            score       = inp->t_rand;
        } else {
            score = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, kq, 1, 2, 0, 3))); // [1, n_kv, R, S]
            score = ggml_reshape_4d(ctx, score, n_kv, R, 1, S);
            score = ggml_scale(ctx, score, kq_scale / (float) H);
        }
        ggml_tensor * order = ggml_argsort(ctx, ggml_add(ctx, score, inp->t_vis_neg), GGML_SORT_ORDER_DESC);
        ggml_tensor * idx =
            ggml_cont(ctx, ggml_view_4d(ctx, order, KM, R, 1, S, order->nb[1], order->nb[2], order->nb[3], 0));
        inp->o_idx = vp_output(g.gf, idx, "vp_idx");

        // keep rank r iff r < K
        inp->t_rank          = vp_input(ctx, GGML_TYPE_F32, KM, 1, 1, 1, "vp_rank");
        ggml_tensor * keep_r = ggml_sub(ctx, ggml_repeat_4d(ctx, K, KM, R, 1, S), inp->t_rank);
        keep_r               = ggml_step(ctx, keep_r); // [KM, R, 1, S]
        inp->o_keep          = vp_output(g.gf, keep_r, "vp_keep");

        // scatter the per-rank flags to cells; slot n_kv collects nothing (SWA map's "none")
        ggml_tensor * full = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, n_kv + 1, R, S);
        full               = ggml_fill(ctx, full, 0.0f);
        full =
            ggml_set_rows(ctx, full, ggml_reshape_4d(ctx, keep_r, 1, KM, R, S), ggml_reshape_4d(ctx, idx, KM, R, S, 1));
        inp->keep_full = full;
        keep_base = ggml_cont(ctx, ggml_view_4d(ctx, full, 1, n_kv, R, S, full->nb[1], full->nb[2], full->nb[3], 0));
        keep_base = ggml_mul(ctx, ggml_reshape_4d(ctx, keep_base, n_kv, R, 1, S), inp->t_vis);
        if (!inp->rank_only) {
            // drop = visual and not kept
            ggml_tensor * drop = ggml_scale(ctx, ggml_sub(ctx, inp->t_vis, keep_base), -VP_BIG);
            inp->mask_base = inp->mask_base_f32 = ggml_add(ctx, mask, drop);
            if (inp->n_rows == 1) {
                // the cells to gather: text and kept visual first, in ascending cell order
                // (key = attended * 2 n_kv - cell), then dropped visual cells as padding
                inp->t_negcell    = vp_input(ctx, GGML_TYPE_F32, n_kv, 1, 1, 1, "vp_negcell");
                ggml_tensor * att = ggml_add(ctx, ggml_scale_bias(ctx, inp->t_vis, -1.0f, 1.0f), keep_base);
                ggml_tensor * key = ggml_add(ctx, ggml_scale(ctx, att, 2.0f * (float) n_kv), inp->t_negcell);
                ggml_tensor * ord = ggml_argsort(ctx, key, GGML_SORT_ORDER_DESC); // [n_kv, 1, 1, S]
                ord =
                    ggml_cont(ctx, ggml_view_4d(ctx, ord, inp->n_sel, 1, 1, S, ord->nb[1], ord->nb[2], ord->nb[3], 0));
                inp->sel_idx = ggml_reshape_2d(ctx, ord, inp->n_sel, S);
            }
        }
    }

    if (keep_base) {
        ggml_tensor * num = ggml_sum_rows(ctx, ggml_mul(ctx, pmean, keep_base));
        inp->o_cov_num    = vp_output(g.gf, num, "vp_cov_num");
    }
    inp->o_cov_den = vp_output(g.gf, ggml_sum_rows(ctx, ggml_mul(ctx, pmean, inp->t_vis)), "vp_cov_den");

    if (inp->mask_base && inp->mode != LLAMA_VP_MODE_FORCED) {
        inp->mask_base = vp_as_mask_type(ctx, inp->mask_base, kq_mask);
    }
    inp->anchor_built = true;
}

// The sliding-window layers' view of the same selection (their cells are indexed differently).
static ggml_tensor * vp_build_swa_mask(const llm_graph_context & g, llm_graph_input_vp * inp,
                                       ggml_tensor * kq_mask_swa) {
    ggml_context * ctx = g.ctx0;
    const int64_t  R = inp->n_rows, S = inp->n_stream, NS = inp->n_kv_swa;
    inp->t_swa_map     = vp_input(ctx, GGML_TYPE_I32, NS, R, S, 1, "vp_swa_map");
    inp->t_vis_swa     = vp_input(ctx, GGML_TYPE_F32, NS, R, 1, S, "vp_vis_swa");
    ggml_tensor * mask = vp_f32(ctx, kq_mask_swa);
    ggml_tensor * keep;
    if (inp->mode == LLAMA_VP_MODE_FORCED) {
        // FORCED keeps per base cell in t_drop: gather it through the map
        ggml_tensor * kd    = ggml_scale_bias(ctx, vp_forced_drop(g, inp), 1.0f / VP_BIG, 1.0f); // 1 keep, 0 drop
        ggml_tensor * kfull = ggml_concat(ctx, ggml_reshape_4d(ctx, kd, 1, inp->n_kv, R, S),
                                          ggml_fill(ctx, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, 1, R, S), 0.0f), 1);
        keep                = ggml_get_rows(ctx, kfull, inp->t_swa_map);
    } else {
        keep = ggml_get_rows(ctx, inp->keep_full, inp->t_swa_map); // [1, NS, R, S]
    }
    keep               = ggml_mul(ctx, ggml_reshape_4d(ctx, keep, NS, R, 1, S), inp->t_vis_swa);
    ggml_tensor * drop = ggml_scale(ctx, ggml_sub(ctx, inp->t_vis_swa, keep), -VP_BIG);
    ggml_tensor * res  = ggml_add(ctx, mask, drop);
    if (kq_mask_swa->type != GGML_TYPE_F32) {
        res = ggml_cast(ctx, res, kq_mask_swa->type);
    }
    return res;
}

// MASK or GATHER for this step (AUTO: MASK where masked cells cost nothing, GATHER elsewhere).
static int32_t vp_resolve_path(const llm_graph_context & g, const llm_graph_input_vp & inp, const ggml_tensor * k) {
    if (inp.n_rows != 1) {
        return LLAMA_VP_ATTN_MASK; // queries of several sequences share the stream's cells
    }
    if (inp.vp->params.attn != LLAMA_VP_ATTN_AUTO) {
        return inp.vp->params.attn;
    }
    const ggml_tensor *   src = k->view_src ? k->view_src : k;
    ggml_backend_buffer_t buf = src->buffer;
    if (!buf || ggml_backend_buffer_is_host(buf)) {
        // CPU flash attention skips -inf cells; the non-FA CPU path reads every cell
        return g.cparams.flash_attn ? LLAMA_VP_ATTN_MASK : LLAMA_VP_ATTN_GATHER;
    }
    const char * name = ggml_backend_buft_name(ggml_backend_buffer_get_type(buf));
    if (g.cparams.flash_attn && name && std::strncmp(name, "MTL", 3) == 0) {
        return LLAMA_VP_ATTN_MASK; // Metal's flash attention takes the n_kv_max hint
    }
    return LLAMA_VP_ATTN_GATHER;
}

// get_rows yields F32; F16/BF16 rows survive the cast back bit for bit, and so do
// quantized rows re-quantized into the same type (the block scale is recovered exactly),
// so the attention kernel runs the same dot products as on the cache itself.
static ggml_tensor * vp_to_cache_type(ggml_context * ctx, ggml_tensor * rows, ggml_type type, ggml_tensor * iota) {
    if (!ggml_is_quantized(type)) {
        return type == GGML_TYPE_F32 ? rows : ggml_cast(ctx, rows, type);
    }
    ggml_tensor * dst = ggml_new_tensor_3d(ctx, type, rows->ne[0], rows->ne[1], rows->ne[2]);
    return ggml_set_rows(ctx, dst, rows, iota);
}

// Rows idx ([n_sel, S]) of a cache view laid out [d, H_kv, n_kv, S] (one contiguous row per cell).
static ggml_tensor * vp_gather_rows(ggml_context * ctx, ggml_tensor * t, ggml_tensor * idx, ggml_tensor * iota) {
    const int64_t n_sel = idx->ne[0];
    ggml_tensor * t3    = ggml_view_3d(ctx, t, t->ne[0] * t->ne[1], t->ne[2], t->ne[3], t->nb[2], t->nb[3], 0);
    ggml_tensor * r     = vp_to_cache_type(ctx, ggml_get_rows(ctx, t3, idx), t->type, iota);
    return ggml_reshape_4d(ctx, r, t->ne[0], t->ne[1], n_sel, t->ne[3]);
}

// The mask of the gathered cells: mask_f32 [n_kv, 1, 1, S] -> [n_sel, 1, 1, S], in the mask's type.
static ggml_tensor * vp_gather_mask(ggml_context * ctx, ggml_tensor * mask_f32, ggml_tensor * idx,
                                    const ggml_tensor * like) {
    const int64_t n_sel = idx->ne[0], S = idx->ne[1];
    ggml_tensor * m = ggml_reshape_4d(ctx, mask_f32, 1, mask_f32->ne[0], S, 1);
    m               = ggml_reshape_4d(ctx, ggml_get_rows(ctx, m, idx), n_sel, 1, 1, S);
    return vp_as_mask_type(ctx, m, like);
}

// Swap k/v for their selected rows (GATHER) and return the matching mask (mask: the layer's
// full-size mask with the dropped cells at -inf; mask_f32: the same in F32).
// A transposed V (the cache's layout without flash attention) keeps a cell's values one per
// row, so its kept columns touch about as many cache lines as reading all of it at a 5%
// selection: it stays whole, only K is gathered, and llama_vp_attn_scores puts the scores of
// the gathered rows back at their cells (0 elsewhere, where the full mask is -inf).
static ggml_tensor * vp_apply_gather(llm_graph_input_vp & inp, ggml_context * ctx, ggml_tensor ** k, ggml_tensor ** v,
                                     ggml_tensor * idx, ggml_tensor *& mask_cache, ggml_tensor * mask,
                                     ggml_tensor * mask_f32, int il) {
    ggml_tensor * iota    = nullptr; // row numbers 0..n_sel-1 for re-quantizing (host input, shared)
    const bool    v_trans = (*v)->nb[1] > (*v)->nb[2];
    if (ggml_is_quantized((*k)->type) || (!v_trans && ggml_is_quantized((*v)->type))) {
        auto & t = inp.t_iota[idx->ne[0]];
        if (!t) t = vp_input(ctx, GGML_TYPE_I32, idx->ne[0], idx->ne[1], 1, 1, "vp_iota");
        iota = t;
    }
    *k = vp_gather_rows(ctx, *k, idx, iota);
    if (v_trans) {
        inp.scatter_il  = il;
        inp.scatter_idx = idx;
        return mask;
    }
    *v = vp_gather_rows(ctx, *v, idx, iota);
    if (!mask_cache) {
        mask_cache = vp_gather_mask(ctx, mask_f32, idx, mask);
    }
    return mask_cache;
}

ggml_tensor * llama_vp_build_attn(const llm_graph_context & g, const llama_kv_cache_context * base,
                                  const llama_kv_cache_context * swa, bool is_swa, ggml_tensor * q, ggml_tensor ** k,
                                  ggml_tensor ** v, ggml_tensor * kq_mask, float kq_scale, int il, int64_t * n_kv_max) {
    llama_vp_context * vp = g.cparams.vp;
    if (!vp || !vp->enabled) {
        return kq_mask;
    }
    if (!g.vp_graph_checked) {
        g.vp_graph_checked = true;
        g.vp_graph         = vp_begin_graph(g, base, swa);
    }
    llm_graph_input_vp * inp = g.vp_graph;
    if (!inp) {
        return kq_mask;
    }
    ggml_context * ctx    = g.ctx0;
    ggml_tensor *  k_full = *k; // the anchor probes every cell
    if (inp->path < 0) {
        inp->path     = vp_resolve_path(g, *inp, *k);
        vp->last_attn = inp->path;
    }
    const bool gather = inp->path == LLAMA_VP_ATTN_GATHER;
    const bool hint   = kq_mask->type == GGML_TYPE_F16; // flash attention

    const bool pruned = il >= vp->first_pruned;
    if (pruned && inp->mode == LLAMA_VP_MODE_FORCED && !is_swa && !inp->mask_base) {
        // FORCED needs no probe: its mask can serve layers below the anchor too
        inp->mask_base_f32 = ggml_add(ctx, vp_base_mask_f32(ctx, inp, kq_mask), vp_forced_drop(g, inp));
        inp->mask_base     = vp_as_mask_type(ctx, inp->mask_base_f32, kq_mask);
    }
    ggml_tensor * res = kq_mask;
    if (pruned && (inp->mode == LLAMA_VP_MODE_FORCED || inp->anchor_built)) {
        if (is_swa) {
            if (!vp->params.prune_swa) {
                return kq_mask;
            }
            if (!inp->mask_swa && (inp->mode == LLAMA_VP_MODE_FORCED || inp->keep_full)) {
                inp->mask_swa = vp_build_swa_mask(g, inp, kq_mask);
            }
            res = inp->mask_swa ? inp->mask_swa : kq_mask;
        } else if (inp->mask_base) {
            res = inp->mask_base;
            if (gather && inp->mode == LLAMA_VP_MODE_FORCED) {
                if (!inp->t_hidx) {
                    inp->t_hidx = vp_input(ctx, GGML_TYPE_I32, inp->n_sel, inp->n_stream, 1, 1, "vp_hidx");
                }
                res = vp_apply_gather(*inp, ctx, k, v, inp->t_hidx, inp->mask_gath, inp->mask_base, inp->mask_base_f32,
                                      il);
            } else if (gather && inp->sel_idx) {
                res = vp_apply_gather(*inp, ctx, k, v, inp->sel_idx, inp->mask_gath, inp->mask_base, inp->mask_base_f32,
                                      il);
            } else if (hint) {
                *n_kv_max = inp->n_sel;
            }
        }
    } else if (inp->lag && !is_swa && il < vp->anchor) {
        // lagged: the previous step's selection, below the anchor
        if (!inp->mask_lag) {
            inp->t_lag_drop   = vp_input(ctx, GGML_TYPE_F32, inp->n_kv, inp->n_rows, 1, inp->n_stream, "vp_lag_drop");
            inp->mask_lag_f32 = ggml_add(ctx, vp_base_mask_f32(ctx, inp, kq_mask), inp->t_lag_drop);
            inp->mask_lag     = vp_as_mask_type(ctx, inp->mask_lag_f32, kq_mask);
        }
        res = inp->mask_lag;
        if (gather) {
            if (!inp->t_lag_idx) {
                inp->t_lag_idx = vp_input(ctx, GGML_TYPE_I32, inp->n_lag_sel, inp->n_stream, 1, 1, "vp_lag_idx");
            }
            res = vp_apply_gather(*inp, ctx, k, v, inp->t_lag_idx, inp->mask_lag_gath, inp->mask_lag, inp->mask_lag_f32,
                                  il);
        } else if (hint) {
            *n_kv_max = inp->n_lag_sel;
        }
    }
    if (il == vp->anchor) {
        GGML_ASSERT(!is_swa && "the VisionPulse anchor must be a full-attention layer");
        if (!g.cparams.flash_attn && *k == k_full) {
            // the layer's own kq will exist: llama_vp_attn_scores builds the selection from it
            inp->anchor_q     = q;
            inp->anchor_k     = k_full;
            inp->anchor_mask  = kq_mask;
            inp->anchor_scale = kq_scale;
        } else {
            vp_build_anchor(g, inp, q, k_full, kq_mask, kq_scale, nullptr); // probes the dense attention
        }
    }
    return res;
}

ggml_tensor * llama_vp_attn_scores(const llm_graph_context & g, ggml_tensor * kq, int il) {
    llm_graph_input_vp * inp = g.vp_graph_checked ? g.vp_graph : nullptr;
    if (!inp) {
        return kq;
    }
    ggml_context * ctx = g.ctx0;
    if (inp->scatter_idx && inp->scatter_il == il) {
        // [n_sel, 1, H, S] -> [n_kv, 1, H, S]: one-value rows, the stream's index list for every head.
        // The layers share one zeroed buffer: they all write the same cells (the step's selection),
        // and each layer's write depends on the previous layer's output, so on its softmax too.
        ggml_tensor *  idx = inp->scatter_idx;
        const int64_t  H = kq->ne[2], S = kq->ne[3];
        ggml_tensor *& buf = inp->scatter_buf[idx];
        if (!buf) {
            buf = ggml_fill(ctx, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, inp->n_kv, H, S), 0.0f);
        }
        buf              = ggml_set_rows(ctx, buf, ggml_reshape_4d(ctx, ggml_cont(ctx, kq), 1, kq->ne[0], H, S),
                                         ggml_reshape_3d(ctx, idx, idx->ne[0], 1, idx->ne[1]));
        kq               = ggml_reshape_4d(ctx, buf, inp->n_kv, 1, H, S);
        inp->scatter_idx = nullptr;
    }
    if (inp->anchor_q && il == inp->vp->anchor) {
        const bool same =
            kq->ne[0] == inp->n_kv && kq->ne[1] == inp->n_rows && kq->ne[2] == g.n_head && kq->ne[3] == inp->n_stream;
        vp_build_anchor(g, inp, inp->anchor_q, inp->anchor_k, inp->anchor_mask, inp->anchor_scale, same ? kq : nullptr);
        inp->anchor_q = nullptr;
    }
    return kq;
}

//
// after the step: stats and kept sets
//

static std::vector<float> vp_get_f32(ggml_tensor * t) {
    std::vector<float> v(t ? ggml_nelements(t) : 0);
    if (t) ggml_backend_tensor_get(t, v.data(), 0, ggml_nbytes(t));
    return v;
}

void llama_vp_after_compute(llama_vp_context * vp, const llm_graph_result * res) {
    if (!vp || !res) return;
    llm_graph_input_vp * inp = nullptr;
    for (auto & in : res->inputs) {
        if ((inp = dynamic_cast<llm_graph_input_vp *>(in.get()))) break;
    }
    if (!inp || !inp->anchor_built) return;
    const int64_t        R = inp->n_rows * inp->n_stream, KM = inp->k_max;
    const auto           mass = vp_get_f32(inp->o_mass);
    const auto           keep = vp_get_f32(inp->o_keep);
    const auto           num  = vp_get_f32(inp->o_cov_num);
    const auto           den  = vp_get_f32(inp->o_cov_den);
    std::vector<int32_t> idx(inp->o_idx ? ggml_nelements(inp->o_idx) : 0);
    if (inp->o_idx) ggml_backend_tensor_get(inp->o_idx, idx.data(), 0, ggml_nbytes(inp->o_idx));

    for (int64_t r = 0; r < R; ++r) {
        const auto &         rw = inp->rows[r];
        auto &               st = vp->seqs[rw.seq];
        const int32_t        nv = (int32_t) rw.vis.size();
        std::vector<int32_t> kept;
        if (inp->mode == LLAMA_VP_MODE_DENSE || nv == 0) {
            for (int32_t o = 0; o < nv; ++o)
                kept.push_back(o);
        } else if (inp->mode == LLAMA_VP_MODE_FORCED) {
            for (int32_t o : st.forced)
                if (o >= 0 && o < nv) kept.push_back(o);
        } else {
            std::unordered_map<int32_t, int32_t> ord;
            for (int32_t o = 0; o < nv; ++o)
                ord[rw.vis[o]] = o;
            for (int64_t j = 0; j < KM; ++j) {
                if (keep[r * KM + j] > 0.5f) {
                    auto it = ord.find(idx[r * KM + j]);
                    if (it != ord.end()) kept.push_back(it->second);
                }
            }
        }
        std::sort(kept.begin(), kept.end());
        kept.erase(std::unique(kept.begin(), kept.end()), kept.end());
        st.stats.step += 1;
        st.stats.n_kv      = (int32_t) inp->n_kv;
        st.stats.n_visual  = nv;
        st.stats.n_kept    = (int32_t) kept.size();
        st.stats.mass      = mass.empty() ? 0.0f : mass[r];
        st.stats.mass_kept = (num.empty() || den.empty() || den[r] <= 0.0f) ? 1.0f : num[r] / den[r];
        if (inp->rank_only) {
            st.forced     = kept;
            st.has_forced = true;
        }
        st.kept      = std::move(kept);
        st.has_stats = true;
    }
}

void llama_vp_free(llama_vp_context * vp) {
    delete vp;
}

//
// C API
//

static llama_vp_context * vp_of(const llama_context * ctx) {
    return ctx ? ctx->get_cparams().vp : nullptr;
}

struct llama_vp_params llama_vp_default_params(void) {
    return llama_vp_preset_params(5);
}

struct llama_vp_params llama_vp_preset_params(int32_t preset) {
    llama_vp_params p    = {};
    p.mode               = LLAMA_VP_MODE_DYNAMIC;
    p.anchor_layer       = -1;
    p.tau                = 0.1f;
    p.budget_min         = 0.01f;
    p.budget_max         = 0.05f;
    p.ratio              = 0.05f;
    p.seed               = 0;
    p.auto_mark          = true;
    p.first_pruned_layer = -1;
    p.attn               = LLAMA_VP_ATTN_AUTO;
    p.lagged             = false;
    p.prune_swa          = false;
    if (preset == 10) {
        p.tau        = 0.4f;
        p.budget_min = 0.05f;
        p.budget_max = 0.10f;
        p.ratio      = 0.10f;
    } else if (preset != 5) {
        p.mode = -1;
    }
    return p;
}

int32_t llama_vp_last_probe(const struct llama_context * ctx) {
    const llama_vp_context * vp = vp_of(ctx);
    return vp ? vp->last_probe : -1;
}

int32_t llama_vp_last_attn(const struct llama_context * ctx) {
    const llama_vp_context * vp = vp_of(ctx);
    return vp ? vp->last_attn : -1;
}

const char * llama_vp_last_error(void) {
    return g_vp_error.c_str();
}

static bool vp_frac_ok(float x) {
    return std::isfinite(x) && x > 0.0f && x <= 1.0f;
}

int32_t llama_vp_enable(struct llama_context * ctx, const struct llama_vp_params * params) {
    if (!ctx || !params) return vp_fail(-1, "null context or parameters");
    const llama_vp_params & p = *params;
    if (p.mode < LLAMA_VP_MODE_DENSE || p.mode > LLAMA_VP_MODE_FORCED) {
        return vp_fail(-1, "unknown mode " + std::to_string(p.mode));
    }
    if (!std::isfinite(p.tau) || p.tau <= 0.0f) return vp_fail(-1, "tau must be a finite number > 0");
    if (!vp_frac_ok(p.budget_min) || !vp_frac_ok(p.budget_max))
        return vp_fail(-1, "budget_min and budget_max must be in (0, 1]");
    if (p.budget_min > p.budget_max) return vp_fail(-1, "budget_min must not exceed budget_max");
    if (!vp_frac_ok(p.ratio)) return vp_fail(-1, "ratio must be in (0, 1]");
    if (p.attn < LLAMA_VP_ATTN_AUTO || p.attn > LLAMA_VP_ATTN_GATHER) {
        return vp_fail(-1, "unknown attention path " + std::to_string(p.attn) + " (0 auto, 1 mask, 2 gather)");
    }

    const auto &  hp      = ctx->get_model().hparams;
    const int32_t n_layer = (int32_t) hp.n_layer();
    if (hp.f_max_alibi_bias != 0.0f) return vp_fail(-2, "models with ALiBi are not supported");
    int32_t anchor = p.anchor_layer;
    if (anchor < 0) {
        // the full-attention layer nearest 47% of depth (17 of 36 in the reference)
        const double target = 0.47 * n_layer;
        double       best   = 1e9;
        for (int32_t il = 0; il < n_layer; ++il) {
            if (hp.is_swa(il)) continue;
            if (std::fabs(il - target) < best) {
                best   = std::fabs(il - target);
                anchor = il;
            }
        }
        if (anchor < 0) return vp_fail(-2, "the model has no full-attention layer to anchor on");
    } else if (anchor >= n_layer) {
        return vp_fail(-1,
                       "anchor_layer " + std::to_string(anchor) + " out of range [0, " + std::to_string(n_layer) + ")");
    } else if (hp.is_swa(anchor)) {
        return vp_fail(-1, "anchor_layer " + std::to_string(anchor) +
                               " is a sliding-window layer; pick a full-attention layer");
    }
    int32_t first = p.first_pruned_layer < 0 ? anchor + 1 : p.first_pruned_layer;
    if (first > n_layer) {
        return vp_fail(-1, "first_pruned_layer out of range");
    }
    if (first <= anchor && p.mode != LLAMA_VP_MODE_FORCED) {
        return vp_fail(-1, "only FORCED mode can prune at or below the anchor layer (the selection is made there)");
    }
    llama_vp_context * vp = vp_of(ctx);
    if (!vp) vp = new llama_vp_context();
    vp->params       = p;
    vp->anchor       = anchor;
    vp->first_pruned = first;
    vp->enabled      = true;
    vp->rng.seed(p.seed);
    ctx->set_vp(vp);
    return 0;
}

void llama_vp_disable(struct llama_context * ctx) {
    llama_vp_context * vp = vp_of(ctx);
    if (vp && vp->enabled) {
        vp->enabled = false;
        ctx->set_vp(vp);
    }
}

bool llama_vp_enabled(const struct llama_context * ctx) {
    const llama_vp_context * vp = vp_of(ctx);
    return vp && vp->enabled;
}

int32_t llama_vp_anchor_layer(const struct llama_context * ctx) {
    const llama_vp_context * vp = vp_of(ctx);
    return vp && vp->enabled ? vp->anchor : -1;
}

static llama_vp_context * vp_state(struct llama_context * ctx) {
    llama_vp_context * vp = vp_of(ctx);
    if (!vp) {
        vp         = new llama_vp_context();
        vp->params = llama_vp_default_params();
        ctx->set_vp(vp);
    }
    return vp;
}

int32_t llama_vp_mark_visual(struct llama_context * ctx, llama_seq_id seq, llama_pos p0, llama_pos p1) {
    if (!ctx || seq < 0 || seq >= LLAMA_MAX_SEQ) return vp_fail(-1, "invalid sequence id");
    if (p1 <= p0 || p0 < 0) return vp_fail(-1, "empty or negative position range");
    llama_vp_context * vp = vp_state(ctx);
    vp->seqs[seq].marks.emplace_back(p0, p1);
    ctx->set_vp(vp); // graphs built before the marks are not reused
    return 0;
}

int32_t llama_vp_clear_marks(struct llama_context * ctx, llama_seq_id seq) {
    if (!ctx) return vp_fail(-1, "null context");
    llama_vp_context * vp = vp_of(ctx);
    if (!vp) return 0;
    for (auto & [s, st] : vp->seqs) {
        if (seq < 0 || s == seq) st.marks.clear();
    }
    ctx->set_vp(vp);
    return 0;
}

int32_t llama_vp_n_visual(struct llama_context * ctx, llama_seq_id seq) {
    if (!ctx || seq < 0 || seq >= LLAMA_MAX_SEQ) return vp_fail(-1, "invalid sequence id");
    llama_vp_context *     vp  = vp_state(ctx);
    auto *                 mem = ctx->get_memory();
    const llama_kv_cache * kv  = dynamic_cast<const llama_kv_cache *>(mem);
    if (!kv) {
        if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem)) kv = iswa->get_base();
    }
    if (!kv) return vp_fail(-2, "the context's memory is not a KV cache");
    const auto & cells = kv->get_cells(seq);
    return (int32_t) vp_visual_cells(*vp, cells, cells.size(), seq).size();
}

int32_t llama_vp_set_forced(struct llama_context * ctx, llama_seq_id seq, const int32_t * ordinals, int32_t n) {
    if (!ctx || seq < 0 || seq >= LLAMA_MAX_SEQ) return vp_fail(-1, "invalid sequence id");
    if (n < 0 || (n > 0 && !ordinals)) return vp_fail(-1, "invalid ordinals");
    auto & st = vp_state(ctx)->seqs[seq];
    st.forced.assign(ordinals, ordinals + n);
    std::sort(st.forced.begin(), st.forced.end());
    st.forced.erase(std::unique(st.forced.begin(), st.forced.end()), st.forced.end());
    st.has_forced = true;
    ctx->set_vp(vp_of(ctx));
    return 0;
}

int32_t llama_vp_get_stats(const struct llama_context * ctx, llama_seq_id seq, struct llama_vp_stats * out) {
    const llama_vp_context * vp = vp_of(ctx);
    if (!vp || !out) return -1;
    auto it = vp->seqs.find(seq);
    if (it == vp->seqs.end() || !it->second.has_stats) return -1;
    *out = it->second.stats;
    return 0;
}

int32_t llama_vp_get_kept(const struct llama_context * ctx, llama_seq_id seq, int32_t * ordinals, int32_t cap) {
    const llama_vp_context * vp = vp_of(ctx);
    if (!vp) return 0;
    auto it = vp->seqs.find(seq);
    if (it == vp->seqs.end()) return 0;
    const auto & kept = it->second.kept;
    for (int32_t i = 0; i < cap && i < (int32_t) kept.size(); ++i)
        ordinals[i] = kept[i];
    return (int32_t) kept.size();
}

void llama_vp_reset(struct llama_context * ctx, llama_seq_id seq) {
    llama_vp_context * vp = vp_of(ctx);
    if (!vp) return;
    for (auto & [s, st] : vp->seqs) {
        if (seq >= 0 && s != seq) continue;
        st.stats     = {};
        st.has_stats = false;
        st.kept.clear();
        // A new prompt: nothing ranked, nothing forced. Not only in STATIC mode: the mode at reset
        // time is the previous generation's, and a set FORCED left behind was read by a following
        // STATIC generation as its own ranking (the replay oracle found it).
        st.forced.clear();
        st.has_forced = false;
    }
}
