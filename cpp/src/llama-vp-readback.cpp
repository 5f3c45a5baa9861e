// After a decode step's graph was computed: its stats and kept sets, read back per sequence.

#include "llama-vp-step.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <unordered_map>

template <typename T> static std::vector<T> vp_get(ggml_tensor * t) {
    std::vector<T> v(t ? ggml_nelements(t) : 0);
    if (t) ggml_backend_tensor_get(t, v.data(), 0, ggml_nbytes(t));
    return v;
}

// The kept ordinals of row r of a selection computed at the anchor (its top k_max cells and their flags).
static std::vector<int32_t> vp_kept_computed(const vp_step_plan & plan, int64_t r, const std::vector<int32_t> & idx,
                                             const std::vector<float> & keep) {
    const auto &                         vis = plan.rows[r].vis;
    std::unordered_map<int32_t, int32_t> ord;
    for (int32_t o = 0; o < (int32_t) vis.size(); ++o) {
        ord[vis[o]] = o;
    }
    std::vector<int32_t> kept;
    for (int64_t j = 0; j < plan.k_max; ++j) {
        if (keep[r * plan.k_max + j] > 0.5f) {
            auto it = ord.find(idx[r * plan.k_max + j]);
            if (it != ord.end()) kept.push_back(it->second);
        }
    }
    std::sort(kept.begin(), kept.end());
    kept.erase(std::unique(kept.begin(), kept.end()), kept.end());
    return kept;
}

// every visual ordinal of a row: what a step that drops nothing keeps
static std::vector<int32_t> vp_all_kept(int32_t nv) {
    std::vector<int32_t> kept(nv);
    std::iota(kept.begin(), kept.end(), 0);
    return kept;
}

// A step that skipped the selection attended to every visual cell: all kept, no scores.
static void vp_record_skipped(llama_vp_context * vp, const vp_step_plan & plan) {
    for (const auto & rw : plan.rows) {
        if (!rw.step) {
            continue;
        }
        auto &        st = vp->seqs[rw.seq];
        const int32_t nv = (int32_t) rw.vis.size();
        st.stats         = { st.stats.step + 1, (int32_t) plan.n_kv, nv, nv, 0.0f, 1.0f, 1 };
        st.kept          = vp_all_kept(nv);
        st.has_stats     = true;
    }
}

// ops that compute; views and reshapes only name memory (the scheduler places them all the same)
static bool vp_computes(const ggml_tensor * t) {
    switch (t->op) {
    case GGML_OP_NONE:
    case GGML_OP_VIEW:
    case GGML_OP_RESHAPE:
    case GGML_OP_PERMUTE:
    case GGML_OP_TRANSPOSE:
        return false;
    default:
        return true;
    }
}

// Which backend the scheduler gave each op the hooks built (their tensors lie in inp.op_spans).
static void vp_record_backends(llama_vp_context * vp, const llm_graph_result * res, const llm_graph_input_vp & inp,
                               ggml_backend_sched * sched) {
    vp->op_backends.clear();
    const auto &  spans = inp.op_spans; // ascending: the hooks run in graph-building order
    const char *  base  = (const char *) ggml_get_mem_buffer(res->get_ctx());
    ggml_cgraph * gf    = res->get_gf();
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * t = ggml_graph_node(gf, i);
        if (!vp_computes(t)) continue;
        const size_t off = (size_t) ((const char *) t - base);
        auto         it  = std::upper_bound(spans.begin(), spans.end(), std::make_pair(off, SIZE_MAX));
        if (it == spans.begin() || off >= std::prev(it)->second) continue;
        ggml_backend_t be = ggml_backend_sched_get_tensor_backend(sched, t);
        vp->op_backends[{ ggml_op_desc(t), be ? ggml_backend_name(be) : "none" }] += 1;
    }
}

void llama_vp_after_compute(llama_vp_context * vp, const llm_graph_result * res, ggml_backend_sched * sched) {
    if (!vp || !res) return;
    llm_graph_input_vp * inp = nullptr;
    for (auto & in : res->inputs) {
        if ((inp = dynamic_cast<llm_graph_input_vp *>(in.get()))) break;
    }
    if (!inp) return;
    if (inp->plan.skipped) {
        vp_record_skipped(vp, inp->plan);
        return;
    }
    if (inp->plan.quest.on) vp_quest_after_compute(*vp, inp->plan, *inp);
    if (!inp->selected) return;
    if (vp->trace_backends && sched) vp_record_backends(vp, res, *inp, sched);
    const vp_step_plan & plan = inp->plan;
    const auto           mass = vp_get<float>(inp->out.mass);
    const auto           keep = vp_get<float>(inp->out.keep);
    const auto           num  = vp_get<float>(inp->out.cov_num);
    const auto           den  = vp_get<float>(inp->out.cov_den);
    const auto           idx  = vp_get<int32_t>(inp->out.idx);

    for (int64_t r = 0; r < (int64_t) plan.rows.size(); ++r) {
        const auto & rw = plan.rows[r];
        if (!rw.step) {
            continue;
        }
        auto &               st = vp->seqs[rw.seq];
        const int32_t        nv = (int32_t) rw.vis.size();
        std::vector<int32_t> kept;
        if (plan.known) {
            kept = plan.forced.kept[r];
        } else if (plan.mode == LLAMA_VP_MODE_DENSE || nv == 0) {
            kept = vp_all_kept(nv);
        } else {
            kept = vp_kept_computed(plan, r, idx, keep);
        }
        st.stats.step += 1;
        st.stats.n_kv      = (int32_t) plan.n_kv;
        st.stats.n_visual  = nv;
        st.stats.n_kept    = (int32_t) kept.size();
        st.stats.mass      = mass.empty() ? 0.0f : mass[r];
        st.stats.mass_kept = (num.empty() || den.empty() || den[r] <= 0.0f) ? 1.0f : num[r] / den[r];
        st.stats.skipped   = 0;
        if (plan.rank_only) {
            st.forced     = kept;
            st.has_forced = true;
        }
        st.kept      = std::move(kept);
        st.has_stats = true;
    }
}
