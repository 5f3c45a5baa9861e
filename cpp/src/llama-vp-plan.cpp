// The host side of a step: which cells are visual, the plan of a decode step (its shapes and
// the selections known before it), and the inputs filled from that plan.

#include "llama-vp-step.h"

#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cells.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

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

// Ordinal order is (pos, y, x): images in prompt order, each row-major (M-RoPE images share
// pos and differ in y/x).
std::vector<int32_t> llama_vp_visual_cells(const llama_vp_context & vp, const llama_kv_cells & cells, uint32_t n_kv,
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
// selections known before the step
//

// From per-row kept ordinals: the keep flags per cell and, one row per stream, the cells each
// stream attends to in ascending order (non-visual and kept visual), padded with its dropped
// visual cells (masked, so skipped) to the common count n_sel.
static vp_host_set vp_host_set_of(const vp_step_plan & plan, std::vector<std::vector<int32_t>> kept) {
    const int64_t n_kv = plan.n_kv, R = (int64_t) plan.rows.size();
    vp_host_set   hs;
    hs.kept = std::move(kept);
    hs.keep_full.assign((n_kv + 1) * R, 0.0f);
    std::vector<std::vector<int32_t>> sel(R), pad(R);
    for (int64_t r = 0; r < R; ++r) {
        const auto &      vis = plan.rows[r].vis;
        std::vector<char> attend(n_kv, 1);
        for (int32_t c : vis) {
            attend[c] = 0;
        }
        for (int32_t o : hs.kept[r]) {
            attend[vis[o]]                        = 1;
            hs.keep_full[r * (n_kv + 1) + vis[o]] = 1.0f;
        }
        for (int64_t c = 0; c < n_kv; ++c) {
            (attend[c] ? sel[r] : pad[r]).push_back((int32_t) c);
        }
        hs.n_sel = std::max<int64_t>(hs.n_sel, (int64_t) sel[r].size());
    }
    hs.n_sel = std::max<int64_t>(hs.n_sel, 1);
    hs.idx.assign(hs.n_sel * R, 0);
    for (int64_t r = 0; r < R; ++r) {
        size_t j = 0;
        for (int32_t c : sel[r]) {
            hs.idx[r * hs.n_sel + j++] = c;
        }
        for (size_t i = 0; i < pad[r].size() && (int64_t) j < hs.n_sel; ++i) {
            hs.idx[r * hs.n_sel + j++] = pad[r][i];
        }
    }
    return hs;
}

// Valid ordinals of a set, ascending and unique.
static std::vector<int32_t> vp_clip(const std::vector<int32_t> & ordinals, size_t n_vis) {
    std::vector<int32_t> res;
    for (int32_t o : ordinals) {
        if (o >= 0 && o < (int32_t) n_vis) res.push_back(o);
    }
    std::sort(res.begin(), res.end());
    res.erase(std::unique(res.begin(), res.end()), res.end());
    return res;
}

//
// the plan
//

// A decode step: at most one token per sequence (prefill stays dense).
static bool vp_is_decode_step(const llama_ubatch & ub) {
    std::vector<char> seen(LLAMA_MAX_SEQ, 0);
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        const llama_seq_id s = ub.seq_id[i][0];
        if (ub.n_seq_id[i] != 1 || seen[s]) {
            return false;
        }
        seen[s] = 1;
    }
    return true;
}

// The sliding-window cache's cells that hold a visual position, mapped to their base cells.
static void vp_plan_swa(vp_step_plan & plan, const llama_kv_cache & kv, const llama_kv_cache_context & swa) {
    plan.n_kv_swa              = swa.get_n_kv();
    const llama_kv_cache * kvs = swa.get_kv();
    for (auto & rw : plan.rows) {
        std::unordered_map<llama_pos, int32_t> base_of;
        const auto &                           cb = kv.get_cells(rw.seq);
        for (int32_t c : rw.vis) {
            base_of[cb.pos_get(c)] = c;
        }
        const auto & cs = kvs->get_cells(rw.seq);
        for (uint32_t j = 0; j < std::min<uint32_t>((uint32_t) plan.n_kv_swa, cs.size()); ++j) {
            if (cs.is_empty(j) || !cs.seq_has(j, rw.seq)) continue;
            auto it = base_of.find(cs.pos_get(j));
            if (it != base_of.end()) {
                rw.vis_swa.push_back((int32_t) j);
                rw.swa_to_base.push_back(it->second);
            }
        }
    }
}

// The one place where FORCED (and STATIC's remembered ranking) is special: its set is known
// here, on the host; every later stage treats it as any other selection.
static void vp_plan_known(vp_step_plan & plan, const llama_vp_context & vp) {
    if (plan.mode == LLAMA_VP_MODE_STATIC) {
        // ranked once, at the first step after a reset (the caller makes that the last prompt
        // token), then that set is kept for good
        bool all_ranked = true;
        for (const auto & rw : plan.rows) {
            auto it = vp.seqs.find(rw.seq);
            all_ranked &= it != vp.seqs.end() && it->second.has_forced;
        }
        plan.rank_only = !all_ranked;
        plan.mode      = all_ranked ? LLAMA_VP_MODE_FORCED : LLAMA_VP_MODE_FIXED;
    }
    if (plan.mode != LLAMA_VP_MODE_FORCED) {
        return;
    }
    std::vector<std::vector<int32_t>> kept;
    for (const auto & rw : plan.rows) {
        auto it = vp.seqs.find(rw.seq); // a sequence without a set keeps nothing
        kept.push_back(it != vp.seqs.end() ? vp_clip(it->second.forced, rw.vis.size()) : std::vector<int32_t>());
    }
    plan.known  = true;
    plan.forced = vp_host_set_of(plan, std::move(kept));
}

// Lagged: every row needs a previous step over the same visual cells. FORCED lags too (its
// previous set), so that a replay of a lagged run forces both of a step's sets.
static void vp_plan_lagged(vp_step_plan & plan, const llama_vp_context & vp) {
    if (!vp.params.lagged || vp.params.mode == LLAMA_VP_MODE_DENSE || vp.params.mode == LLAMA_VP_MODE_STATIC) {
        return;
    }
    std::vector<std::vector<int32_t>> kept;
    for (const auto & rw : plan.rows) {
        auto it = vp.seqs.find(rw.seq);
        if (it == vp.seqs.end() || !it->second.has_stats || it->second.stats.n_visual != (int32_t) rw.vis.size()) {
            return;
        }
        kept.push_back(vp_clip(it->second.kept, rw.vis.size()));
    }
    plan.lag    = true;
    plan.lagged = vp_host_set_of(plan, std::move(kept));
}

std::unique_ptr<llm_graph_input_vp> vp_plan_step(const llama_cparams & cparams, const llama_ubatch & ub, int64_t n_head,
                                                 const llama_kv_cache_context * base,
                                                 const llama_kv_cache_context * swa) {
    llama_vp_context * vp = cparams.vp;
    if (!vp || !vp->enabled) {
        return nullptr;
    }
    // Every graph built while VisionPulse is on carries this input, an inactive one when the
    // ubatch selects nothing: so a graph of one phase (a one-token prompt tail) is never reused
    // for a step of another (the first generated token), with no version bump between them.
    auto inp         = std::make_unique<llm_graph_input_vp>();
    inp->vp          = vp;
    inp->plan.n_head = n_head;
    if (base && vp->params.quest != LLAMA_VP_QUEST_OFF) {
        vp_quest_written(*vp, ub, *base->get_kv()); // every ubatch, prompt ones included
    }
    if (!ub.token || ub.n_tokens == 0 || !cparams.causal_attn || !base || !vp_is_decode_step(ub)) {
        return inp;
    }
    const llama_kv_cache * kv   = base->get_kv();
    vp_step_plan &         plan = inp->plan;
    plan.mode                   = vp->params.mode;
    plan.n_kv                   = base->get_n_kv();
    plan.n_stream               = cparams.kv_unified ? 1 : ub.n_seqs_unq;
    plan.n_rows                 = ub.n_tokens / plan.n_stream;
    plan.rows.resize(ub.n_tokens);
    int64_t nv_max = 0;
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        auto & rw = plan.rows[i];
        rw.seq    = ub.seq_id[i][0];
        auto st   = vp->seqs.find(rw.seq);
        rw.step   = st == vp->seqs.end() || !st->second.prompt;
        if (rw.step) { // a prompt-processing row has nothing to select from
            rw.vis = llama_vp_visual_cells(*vp, kv->get_cells(rw.seq), (uint32_t) plan.n_kv, rw.seq);
        }
        nv_max = std::max<int64_t>(nv_max, (int64_t) rw.vis.size());
    }
    if (nv_max == 0) {
        return inp; // inactive: nothing to select from
    }
    if (vp->skip) {
        plan.skipped = true; // inactive, and the stats say why
        return inp;
    }
    plan.active = true;
    vp_plan_known(plan, *vp);
    float frac = 1.0f; // the budget's upper bound, for the argsort's static size
    if (plan.mode == LLAMA_VP_MODE_DYNAMIC || plan.mode == LLAMA_VP_MODE_RANDOM) {
        frac = vp->params.budget_max;
    } else if (plan.mode == LLAMA_VP_MODE_FIXED) {
        frac = vp->params.ratio;
    }
    plan.k_max = std::clamp<int64_t>((int64_t) std::ceil(frac * (double) nv_max), 1, nv_max);
    if (plan.mode == LLAMA_VP_MODE_DYNAMIC || plan.mode == LLAMA_VP_MODE_FIXED || plan.mode == LLAMA_VP_MODE_RANDOM) {
        int64_t k_given = 0;
        plan.k_given    = true;
        for (const auto & rw : plan.rows) {
            auto it = vp->seqs.find(rw.seq);
            plan.k_given &= it != vp->seqs.end() && it->second.k_given > 0;
            if (plan.k_given) k_given = std::max<int64_t>(k_given, it->second.k_given);
        }
        if (plan.k_given) {
            plan.k_max = std::clamp<int64_t>(k_given, 1, nv_max);
        }
    }
    if (swa && vp->params.prune_swa) { // the window's cells map to base cells only when it is pruned
        vp_plan_swa(plan, *kv, *swa);
    }
    if (plan.known) {
        plan.n_sel = plan.forced.n_sel;
    } else {
        int64_t n_nonvis_max = 0;
        for (const auto & rw : plan.rows) {
            n_nonvis_max = std::max<int64_t>(n_nonvis_max, plan.n_kv - (int64_t) rw.vis.size());
        }
        plan.n_sel = std::min<int64_t>(plan.n_kv, n_nonvis_max + plan.k_max);
    }
    vp_plan_lagged(plan, *vp);
    vp_quest_plan(plan, *vp, *kv);
    return inp;
}

bool vp_step_plan::same_shape(const vp_step_plan & o) const {
    return mode == o.mode && rank_only == o.rank_only && n_kv == o.n_kv && n_kv_swa == o.n_kv_swa &&
           n_rows == o.n_rows && n_stream == o.n_stream && k_max == o.k_max && n_sel == o.n_sel && known == o.known &&
           lag == o.lag && lagged.n_sel == o.lagged.n_sel && k_given == o.k_given && quest.on == o.quest.on &&
           quest.cand.size() == o.quest.cand.size() && quest.refresh.size() == o.quest.refresh.size() &&
           quest.k == o.quest.k && quest.known == o.quest.known;
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
// data (visual cells, known selections) is taken from the new plan.
bool llm_graph_input_vp::can_reuse(const llm_graph_params & params) {
    const llama_kv_cache_context *base, *swa;
    vp_caches(params.mctx, base, swa);
    auto nw = vp_plan_step(params.cparams, params.ubatch, plan.n_head, base, swa);
    if (!nw || nw->plan.active != plan.active || (plan.active && !nw->plan.same_shape(plan))) {
        return false;
    }
    vp   = nw->vp;
    plan = std::move(nw->plan);
    return true;
}

//
// inputs
//

// inputs that no op of this graph ended up using have no buffer
static void vp_set(ggml_tensor * t, const void * data) {
    if (t && t->buffer) {
        ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
    }
}

// n uniform draws in [0, 1) from the context's generator (the random controls' rankings)
static std::vector<float> vp_draw(llama_vp_context & vp, int64_t n) {
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::vector<float>                    out(n);
    for (auto & x : out) {
        x = u(vp.rng);
    }
    return out;
}

void llm_graph_input_vp::set_input(const llama_ubatch * ubatch) {
    GGML_UNUSED(ubatch);
    if (!plan.active) {
        return; // a graph that selects nothing has no inputs of ours
    }
    const vp_step_plan & p = plan;
    const int64_t        R = p.n_rows * p.n_stream, n_kv = p.n_kv;
    std::vector<float>   vis(n_kv * R, 0.0f), vis_neg(n_kv * R, -INFINITY), nv(R, 0.0f), kk(R, 1.0f);
    for (int64_t r = 0; r < R; ++r) {
        const auto & v = p.rows[r].vis;
        for (int32_t c : v) {
            vis[r * n_kv + c]     = 1.0f;
            vis_neg[r * n_kv + c] = 0.0f;
        }
        nv[r] = (float) v.size();
        kk[r] = std::max(1.0f, std::floor(vp->params.ratio * (float) v.size()));
        if (p.k_given) {
            kk[r] = (float) std::min<int64_t>(vp->seqs.at(p.rows[r].seq).k_given, (int64_t) v.size());
        }
    }
    vp_set(in.vis, vis.data());
    vp_set(in.vis_neg, vis_neg.data());
    vp_set(in.nv, nv.data());
    vp_set(in.k, kk.data());
    if (in.rank) {
        std::vector<float> rk(p.k_max);
        for (int64_t i = 0; i < p.k_max; ++i) {
            rk[i] = (float) i;
        }
        vp_set(in.rank, rk.data());
    }
    if (in.rand) {
        vp_set(in.rand, vp_draw(*vp, n_kv * R).data());
    }
    if (in.negcell) {
        std::vector<float> nc(n_kv);
        for (int64_t i = 0; i < n_kv; ++i) {
            nc[i] = -(float) i;
        }
        vp_set(in.negcell, nc.data());
    }
    vp_set(in.forced_keep, p.forced.keep_full.data());
    vp_set(in.forced_idx, p.forced.idx.data());
    vp_set(in.lagged_keep, p.lagged.keep_full.data());
    vp_set(in.lagged_idx, p.lagged.idx.data());
    for (auto & [n, t] : in.iota) {
        std::vector<int32_t> io(n * p.n_stream);
        for (int64_t i = 0; i < (int64_t) io.size(); ++i) {
            io[i] = (int32_t) (i % n);
        }
        vp_set(t, io.data());
    }
    vp_set(in.quest_cand, p.quest.cand.data());
    vp_set(in.quest_refresh, p.quest.refresh.data());
    if (in.quest_forced) {
        std::vector<char> kept(p.quest.cand.size(), 0);
        for (int32_t x : p.quest.forced)
            kept[x] = 1;
        std::vector<int32_t> cells(p.quest.n_sel);
        vp_quest_cells(p.quest, kept, cells.data());
        vp_set(in.quest_forced, cells.data());
    }
    for (auto & [il, t] : in.quest_rand) {
        vp_set(t, vp_draw(*vp, ggml_nelements(t)).data());
    }
    if (in.swa_map) {
        std::vector<int32_t> map(p.n_kv_swa * R, (int32_t) n_kv);
        std::vector<float>   vs(p.n_kv_swa * R, 0.0f);
        for (int64_t r = 0; r < R; ++r) {
            const auto & rw = p.rows[r];
            for (size_t j = 0; j < rw.vis_swa.size(); ++j) {
                map[r * p.n_kv_swa + rw.vis_swa[j]] = rw.swa_to_base[j];
                vs[r * p.n_kv_swa + rw.vis_swa[j]]  = 1.0f;
            }
        }
        vp_set(in.swa_map, map.data());
        vp_set(in.vis_swa, vs.data());
    }
}
