// Quest pages below the anchor (beyond the paper, opt-in: llama_vp_params.quest).
//
// The layers up to the anchor are where a VisionPulse step spends its time at long visual contexts,
// and the anchor's selection cannot reach them. Quest (Tang et al., 2024) makes them sparse at a
// cost of a fraction of their reads: the cells are cut into pages of P; for each page and KV head
// the element-wise min m and max M of its keys bound any query's score on the page,
//   q.k <= sum_i max(q_i m_i, q_i M_i),
// so a step reads the summaries (2 rows per page instead of P), keeps the pages with the highest
// bound, and attends to those and to every cell that is not in a wholly visual page.
//
// A step's flow in a Quest layer, all CPU ops over host memory:
//   summaries  (only for pages the plan found new or rewritten) made in place in the store
//   bounds     per candidate page and query head                       [pages, H]
//   selection  per KV head: pages ranked by max over its query heads of the bound relative to that
//              head's best page; the top k kept; the cells to attend, ascending   [n_sel, H_kv]
//   attention  on the step's path (enum llama_vp_attn): MASK (CPU flash attention) gives each query
//              head a mask row over every cell, -inf outside its KV head's cells, and our kernel
//              skips a KV head's masked cells; GATHER copies those cells' K and V rows per KV head
//              in the cache's own type and layout, with their mask entries per query head
// Either way a step that keeps every page equals the dense layer bit for bit: the kernel takes the
// same cells in the same blocks, and the gathers keep cell order and copy (never convert) rows.

#include "llama-vp-step.h"

#include "llama-kv-cache.h"
#include "llama-kv-cells.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <unordered_map>
#include <unordered_set>

//
// the store
//

llama_vp_quest_store::~llama_vp_quest_store() {
    clear();
}

void llama_vp_quest_store::clear() {
    for (auto * b : bufs)
        ggml_backend_buffer_free(b);
    for (auto * c : ctxs)
        ggml_free(c);
    bufs.clear();
    ctxs.clear();
    summ.clear();
    pages.clear();
    page   = 0;
    broken = false;
}

// Layer il's summaries [2 d, H_kv, pages], made on first use in the cache's (host) buffer type;
// null if that memory cannot be had (Quest is then off for the context: its pages would lie).
static ggml_tensor * vp_quest_store_of(llama_vp_context & vp, const ggml_tensor * k, int il) {
    auto &         st = vp.quest;
    ggml_tensor *& s  = st.summ[il];
    if (s || st.broken) {
        return s;
    }
    ggml_init_params ip = { ggml_tensor_overhead(), nullptr, true };
    ggml_context *   c  = ggml_init(ip);
    s                   = ggml_new_tensor_3d(c, GGML_TYPE_F16, 2 * k->ne[0], k->ne[1], (int64_t) st.pages.size());
    const ggml_backend_buffer_t kb = (k->view_src ? k->view_src : k)->buffer;
    ggml_backend_buffer_t       buf =
        kb ? ggml_backend_alloc_ctx_tensors_from_buft(c, ggml_backend_buffer_get_type(kb)) : nullptr;
    if (!buf) {
        ggml_free(c);
        s         = nullptr;
        st.broken = true;
        return nullptr;
    }
    st.ctxs.push_back(c);
    st.bufs.push_back(buf);
    return s;
}

//
// host side
//

void vp_quest_written(llama_vp_context & vp, const llama_ubatch & ub, const llama_kv_cache & kv) {
    auto & st = vp.quest;
    if (st.pages.empty() || ub.n_tokens == 0 || kv.get_n_stream() != 1 || !ub.pos) {
        return;
    }
    std::unordered_map<llama_seq_id, std::unordered_set<llama_pos>> written;
    llama_pos                                                       lo = ub.pos[0], hi = ub.pos[0];
    for (uint32_t i = 0; i < ub.n_tokens; ++i) {
        for (int32_t s = 0; s < ub.n_seq_id[i]; ++s) {
            written[ub.seq_id[i][s]].insert(ub.pos[i]);
        }
        lo = std::min(lo, ub.pos[i]);
        hi = std::max(hi, ub.pos[i]);
    }
    for (const auto & [seq, pos] : written) {
        const auto &   cells = kv.get_cells(seq);
        const uint32_t n     = std::min<uint32_t>(cells.size(), (uint32_t) (st.pages.size() * st.page));
        for (uint32_t c = 0; c < n; ++c) {
            if (cells.is_empty(c) || !cells.seq_has(c, seq)) continue;
            const llama_pos p = cells.pos_get(c);
            if (p >= lo && p <= hi && pos.count(p)) {
                st.pages[c / st.page].valid = false;
            }
        }
    }
}

void vp_quest_plan(vp_step_plan & plan, llama_vp_context & vp, const llama_kv_cache & kv) {
    const auto &  p  = vp.params;
    auto &        qp = plan.quest;
    auto &        st = vp.quest;
    const int64_t P  = p.quest_page;
    // one query row in one stream: the summaries and the gathers are per cache cell of that stream
    if (p.quest == LLAMA_VP_QUEST_OFF || !plan.active || plan.rows.size() != 1 || kv.get_n_stream() != 1 || st.broken ||
        plan.n_kv % P != 0 || !plan.rows[0].step) {
        return;
    }
    if (st.pages.empty()) {
        st.page = (int32_t) P;
        st.pages.resize(kv.get_size() / P);
    }
    const auto &      rw    = plan.rows[0];
    const auto &      cells = kv.get_cells(rw.seq);
    std::vector<char> vis(plan.n_kv, 0);
    for (int32_t c : rw.vis)
        vis[c] = 1;
    for (int64_t j = 0; j < plan.n_kv / P && j < (int64_t) st.pages.size(); ++j) {
        if (!std::all_of(vis.begin() + j * P, vis.begin() + (j + 1) * P, [](char x) { return x != 0; })) continue;
        qp.cand.push_back((int32_t) j);
        const auto &    pg = st.pages[j];
        const llama_pos p0 = cells.pos_get((uint32_t) (j * P)), p1 = cells.pos_get((uint32_t) (j * P + P - 1));
        if (!pg.valid || pg.seq != rw.seq || pg.p0 != p0 || pg.p1 != p1) {
            qp.refresh.push_back((int32_t) j);
            qp.refresh_pos.emplace_back(p0, p1);
        }
    }
    const int64_t n = (int64_t) qp.cand.size();
    if (n == 0) {
        return;
    }
    // the budget follows the previous step's visual mass; rounded up to 1/64 of the pages so that
    // steps whose mass moves a little keep one graph
    const auto it   = vp.seqs.find(rw.seq);
    float      frac = p.quest_budget_max;
    if (it != vp.seqs.end() && it->second.has_stats && !it->second.stats.skipped &&
        it->second.stats.n_visual == (int32_t) rw.vis.size()) {
        frac = std::clamp(it->second.stats.mass, p.quest_budget_min, p.quest_budget_max);
    }
    const int64_t unit = (n + 63) / 64;
    int64_t       k    = (int64_t) std::ceil((double) frac * (double) n);
    k                  = std::clamp<int64_t>((k + unit - 1) / unit * unit, 1, n);
    if (it != vp.seqs.end() && !it->second.quest_pages.empty()) {
        for (int32_t x : it->second.quest_pages) {
            if (x < n) qp.forced.push_back(x);
        }
        std::sort(qp.forced.begin(), qp.forced.end());
        qp.forced.erase(std::unique(qp.forced.begin(), qp.forced.end()), qp.forced.end());
        qp.known = true;
        k        = (int64_t) qp.forced.size();
    }
    qp.on     = true;
    qp.page   = P;
    qp.n_kv   = plan.n_kv;
    qp.k      = k;
    qp.n_sel  = plan.n_kv - (n - k) * P;
    qp.random = p.quest == LLAMA_VP_QUEST_RANDOM;
}

bool vp_quest_layer(const llm_graph_input_vp & inp, int il, bool is_swa) {
    const llama_vp_context & vp = *inp.vp;
    return inp.plan.quest.on && !is_swa && il >= vp.params.quest_first_layer && il < vp.anchor && il < vp.first_pruned;
}

void vp_quest_cells(const vp_step_plan::quest_plan & qp, const std::vector<char> & kept, int32_t * out) {
    int64_t n = 0, ci = 0;
    for (int64_t j = 0; j < qp.n_kv / qp.page; ++j) {
        const bool cand = ci < (int64_t) qp.cand.size() && qp.cand[ci] == j;
        if (!cand || kept[ci]) {
            for (int64_t c = j * qp.page; c < (j + 1) * qp.page; ++c)
                out[n++] = (int32_t) c;
        }
        ci += cand ? 1 : 0;
    }
    GGML_ASSERT(n == qp.n_sel);
}

void vp_quest_after_compute(llama_vp_context & vp, const vp_step_plan & plan, const llm_graph_input_vp & inp) {
    const auto & qp  = plan.quest;
    auto &       seq = vp.seqs[plan.rows[0].seq];
    seq.quest        = { (int32_t) inp.quest.n_layers, (int32_t) qp.cand.size(), (int32_t) qp.k,
                         inp.quest.n_layers > 0 ? (int32_t) qp.refresh.size() : 0, (int32_t) qp.page };
    seq.has_quest    = true;
    if (inp.quest.n_layers == 0 || !inp.in.quest_refresh) {
        return; // nothing was summarized
    }
    const auto & rw = plan.rows[0];
    auto &       st = vp.quest;
    for (size_t i = 0; i < qp.refresh.size(); ++i) {
        st.pages[qp.refresh[i]] = { true, rw.seq, qp.refresh_pos[i].first, qp.refresh_pos[i].second };
    }
}

//
// the ops (CPU, on host memory; each splits its rows over the threads)
//

// in place on the store: the refreshed pages' min and max keys per KV head.
// src[0] the store [2 d, H_kv, pages], src[1] the layer's K view [d, H_kv, n_kv], src[2] the pages (I32).
static void vp_quest_summarize_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    const auto *             a    = (const vp_quest_args *) ud;
    const ggml_tensor *      k    = dst->src[1];
    const ggml_tensor *      list = dst->src[2];
    const int64_t            d = k->ne[0], H_kv = k->ne[1], n = list->ne[0];
    const ggml_to_float_t    to_float = ggml_get_type_traits(k->type)->to_float;
    std::vector<float>       row(d), mn(d), mx(d);
    std::vector<ggml_fp16_t> out(2 * d);
    for (int64_t r = ith; r < n * H_kv; r += nth) {
        const int64_t j = ((const int32_t *) list->data)[r / H_kv], h = r % H_kv;
        std::fill(mn.begin(), mn.end(), INFINITY);
        std::fill(mx.begin(), mx.end(), -INFINITY);
        for (int64_t c = j * a->page; c < (j + 1) * a->page; ++c) {
            const char * src = (const char *) k->data + h * k->nb[1] + c * k->nb[2];
            if (k->type == GGML_TYPE_F32) {
                memcpy(row.data(), src, d * sizeof(float));
            } else {
                to_float(src, row.data(), d);
            }
            for (int64_t i = 0; i < d; ++i) {
                mn[i] = std::min(mn[i], row[i]);
                mx[i] = std::max(mx[i], row[i]);
            }
        }
        ggml_fp32_to_fp16_row(mn.data(), out.data(), d);
        ggml_fp32_to_fp16_row(mx.data(), out.data() + d, d);
        memcpy((char *) dst->data + h * dst->nb[1] + j * dst->nb[2], out.data(), out.size() * sizeof(ggml_fp16_t));
    }
}

// dst I32 [n_sel, H_kv]: per KV head, the cells it attends to (ascending).
// src[0] the scores: bounds [n_kv / page, H] of every page (ranked per KV head by the best of its query
// heads relative to that head's best candidate) or a draw [candidates, H_kv] (the random control).
static void vp_quest_select_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    const auto *         inp = (const llm_graph_input_vp *) ud;
    const auto &         qp  = inp->plan.quest;
    const ggml_tensor *  sc  = dst->src[0];
    const int64_t        n = (int64_t) qp.cand.size(), H_kv = dst->ne[1], G = sc->ne[1] / H_kv, n_sc = sc->ne[0];
    const int32_t *      at = qp.random ? nullptr : qp.cand.data(); // a candidate's bound is its page's
    std::vector<float>   agg(n);
    std::vector<int32_t> order(n);
    std::vector<char>    kept(n);
    for (int64_t h = ith; h < H_kv; h += nth) {
        std::fill(agg.begin(), agg.end(), -INFINITY);
        for (int64_t g = 0; g < G; ++g) {
            const float * s    = (const float *) sc->data + (h * G + g) * n_sc;
            float         best = -INFINITY;
            for (int64_t c = 0; c < n; ++c) {
                const float x = s[at ? at[c] : c];
                best          = std::isnan(x) ? best : std::max(best, x);
            }
            for (int64_t c = 0; c < n; ++c) {
                const float x = s[at ? at[c] : c];
                if (!std::isnan(x)) agg[c] = std::max(agg[c], x - best);
            }
        }
        std::iota(order.begin(), order.end(), 0);
        const auto higher = [&](int32_t x, int32_t y) { return agg[x] > agg[y] || (agg[x] == agg[y] && x < y); };
        if (qp.k > 0) std::nth_element(order.begin(), order.begin() + (qp.k - 1), order.end(), higher);
        std::fill(kept.begin(), kept.end(), 0);
        for (int64_t i = 0; i < qp.k; ++i) {
            kept[order[i]] = 1;
        }
        vp_quest_cells(qp, kept, (int32_t *) ((char *) dst->data + h * dst->nb[1]));
    }
}

// dst per query head, in the mask's type: the layer's mask entries of its KV head's cells, either
//   compact  [n_sel, 1, H]: entry j is cell idx[j]'s (the gather path, beside the gathered rows), or
//   in place [n_kv, 1, H]:  at their cells, -inf (F16) everywhere else (the mask path: CPU flash
//                           attention skips a KV head's masked cells, so nothing is copied).
// The shape tells which: n_sel == n_kv only where every page is kept, and then both are the same.
// src[0] the cells [n_sel, 1 or H_kv], src[1] the layer's mask (its first row).
static void vp_quest_mask_op(ggml_tensor * dst, int ith, int nth, void * ud) {
    const auto *        a        = (const vp_quest_args *) ud;
    const ggml_tensor * idx      = dst->src[0];
    const ggml_tensor * mask     = dst->src[1];
    const size_t        es       = ggml_element_size(mask);
    const int64_t       G        = a->n_head / a->n_head_kv;
    const bool          in_place = dst->ne[0] != idx->ne[0];
    const ggml_fp16_t   ninf     = ggml_fp32_to_fp16(-INFINITY);
    GGML_ASSERT(!in_place || mask->type == GGML_TYPE_F16);
    for (int64_t iq = ith; iq < dst->ne[2]; iq += nth) {
        const int32_t * cell = (const int32_t *) ((const char *) idx->data + ((iq / G) % idx->ne[1]) * idx->nb[1]);
        char *          out  = (char *) dst->data + iq * dst->nb[2];
        if (in_place) {
            std::fill((ggml_fp16_t *) out, (ggml_fp16_t *) out + dst->ne[0], ninf);
        }
        for (int64_t j = 0; j < idx->ne[0]; ++j) {
            memcpy(out + (in_place ? cell[j] : j) * es, (const char *) mask->data + (size_t) cell[j] * es, es);
        }
    }
}

// dst [d, H_kv, n_sel] in the cache's type and layout: head h of row j is head h of cell idx[j, h].
// Rows are copied, never converted. src[0] a cache view [d, H_kv, n_kv], src[1] the cells [n_sel, 1 or H_kv].
static void vp_gather_heads_op(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * t     = dst->src[0];
    const ggml_tensor * idx   = dst->src[1];
    const size_t        bytes = ggml_row_size(t->type, t->ne[0]);
    for (int64_t j = ith; j < dst->ne[2]; j += nth) {
        for (int64_t h = 0; h < dst->ne[1]; ++h) {
            const int32_t c =
                *(const int32_t *) ((const char *) idx->data + j * idx->nb[0] + (h % idx->ne[1]) * idx->nb[1]);
            memcpy((char *) dst->data + h * dst->nb[1] + j * dst->nb[2],
                   (const char *) t->data + h * t->nb[1] + (int64_t) c * t->nb[2], bytes);
        }
    }
}

ggml_tensor * vp_gather_heads(ggml_context * ctx, ggml_tensor * t, ggml_tensor * idx) {
    ggml_tensor * args[2] = { t, idx };
    ggml_tensor * out     = ggml_custom_4d(ctx, t->type, t->ne[0], t->ne[1], idx->ne[0], 1, args, 2, vp_gather_heads_op,
                                           GGML_N_TASKS_MAX, nullptr);
    return out;
}

//
// the graph of a Quest layer
//

// Every page's bound for every query head, [pages, H]: sum_i max(q_i m_i, q_i M_i) is
// [min(q, 0) | max(q, 0)] . [m | M], one matrix product per KV head over its group's queries.
static ggml_tensor * vp_quest_bounds(ggml_context * ctx, ggml_tensor * q, ggml_tensor * summ, int64_t n_pages) {
    const int64_t H = q->ne[1], H_kv = summ->ne[1], G = H / H_kv;
    ggml_tensor * q2  = ggml_reshape_2d(ctx, ggml_cont(ctx, q), q->ne[0], H);
    ggml_tensor * pos = ggml_relu(ctx, q2);
    ggml_tensor * neg = ggml_sub(ctx, q2, pos);
    ggml_tensor * qq  = ggml_concat(ctx, neg, pos, 0); // [2 d, H]
    for (ggml_tensor * t : { q2->view_src ? q2->view_src : q2, pos, neg, qq }) {
        ggml_set_name(t, "vp_quest_q");
    }
    qq              = ggml_reshape_3d(ctx, qq, qq->ne[0], G, H_kv); // [2 d, G, H_kv]
    ggml_tensor * s = ggml_view_3d(ctx, summ, summ->ne[0], n_pages, H_kv, summ->nb[2], summ->nb[1], 0);
    ggml_tensor * b = ggml_mul_mat(ctx, s, qq); // [pages, G, H_kv]
    ggml_prec_set_acc(b, GGML_PREC_F32);
    ggml_set_name(b, "vp_quest_bounds");
    return ggml_reshape_2d(ctx, b, n_pages, H);
}

// I32 input of a host list, made once per graph
static ggml_tensor * vp_list_input(ggml_context * ctx, ggml_tensor *& t, size_t n, const char * name) {
    if (!t) t = vp_input(ctx, GGML_TYPE_I32, (int64_t) std::max<size_t>(n, 1), 1, 1, 1, name);
    return t;
}

ggml_tensor * vp_quest_attn(const llm_graph_context & g, llm_graph_input_vp & inp, ggml_tensor * q, ggml_tensor ** k,
                            ggml_tensor ** v, ggml_tensor * kq_mask, int il) {
    ggml_context * ctx = g.ctx0;
    const auto &   qp  = inp.plan.quest;
    ggml_tensor *  K   = *k;
    if (!vp_on_host(K) || !vp_on_host(*v) || K->ne[3] != 1 || q->ne[2] != 1) {
        return kq_mask; // these ops read host memory; elsewhere the layer stays dense
    }
    const int64_t H_kv = K->ne[1];
    auto &        a    = inp.quest;
    a                  = { qp.page, q->ne[1], H_kv, a.n_layers };
    ggml_tensor * idx;
    if (qp.known) {
        if (!inp.in.quest_forced)
            inp.in.quest_forced = vp_input(ctx, GGML_TYPE_I32, qp.n_sel, 1, 1, 1, "vp_quest_forced");
        idx = inp.in.quest_forced;
    } else {
        ggml_tensor * summ = vp_quest_store_of(*inp.vp, K, il);
        if (!summ) {
            return kq_mask;
        }
        if (!qp.refresh.empty()) {
            ggml_tensor * args[2] = { K,
                                      vp_list_input(ctx, inp.in.quest_refresh, qp.refresh.size(), "vp_quest_refresh") };
            summ = ggml_custom_inplace(ctx, summ, args, 2, vp_quest_summarize_op, GGML_N_TASKS_MAX, &inp.quest);
            ggml_set_name(summ, "vp_quest_summaries");
        }
        ggml_tensor * cand = vp_list_input(ctx, inp.in.quest_cand, qp.cand.size(), "vp_quest_cand");
        ggml_tensor * scores;
        if (qp.random) {
            scores = inp.in.quest_rand[il] =
                vp_input(ctx, GGML_TYPE_F32, (int64_t) qp.cand.size(), H_kv, 1, 1, "vp_quest_rand");
        } else {
            scores = vp_quest_bounds(ctx, q, summ, qp.n_kv / qp.page);
        }
        ggml_tensor * args[2] = { scores, cand };
        idx = ggml_custom_4d(ctx, GGML_TYPE_I32, qp.n_sel, H_kv, 1, 1, args, 2, vp_quest_select_op, GGML_N_TASKS_MAX,
                             &inp);
        ggml_set_name(idx, "vp_quest_select");
    }
    a.n_layers += 1;
    ggml_tensor * margs[2] = { idx, kq_mask };
    // flash attention on the CPU: a mask row per query head over every cell, and no copies
    const bool    in_place = inp.path == LLAMA_VP_ATTN_MASK && kq_mask->type == GGML_TYPE_F16;
    ggml_tensor * mask = ggml_custom_4d(ctx, kq_mask->type, in_place ? K->ne[2] : qp.n_sel, 1, q->ne[1], 1, margs, 2,
                                        vp_quest_mask_op, GGML_N_TASKS_MAX, &inp.quest);
    ggml_set_name(mask, "vp_quest_mask");
    if (in_place) {
        return mask;
    }
    *k = vp_gather_heads(ctx, K, idx);
    ggml_set_name(*k, "vp_quest_k");
    const bool v_trans = (*v)->nb[1] > (*v)->nb[2];
    *v                 = v_trans ? vp_gather_v_trans(ctx, *v, idx) : vp_gather_heads(ctx, *v, idx);
    ggml_set_name((*v)->view_src ? (*v)->view_src : *v, "vp_quest_v"); // the transposed gather's op, not its view
    return mask;
}
