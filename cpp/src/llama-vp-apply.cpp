// The hooks in build_attn: each layer of a decode step asks which cells it attends to.
//
// Layers >= first_pruned use the step's selection, full-attention layers below the anchor the
// previous step's in lagged mode; sliding-window layers only with prune_swa. Two ways to skip
// the dropped cells (enum llama_vp_attn): MASK adds -inf to them (CPU flash attention skips such
// cells; Metal gets the n_kv_max hint); GATHER copies the selected K/V rows (text cells and kept
// visual cells, in ascending cell order, so flash attention sees them in the same order as MASK)
// and attends to the copy. Without flash attention V is stored transposed (a cell's values one
// per row); on a host buffer its kept columns are copied by vp_gather_v_trans, elsewhere V stays
// whole and the gathered rows' scores go back to their cells.

#include "llama-vp-step.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstring>

// the buffer a cache view lives in (null before allocation)
static ggml_backend_buffer_t vp_buffer_of(const ggml_tensor * t) {
    return (t->view_src ? t->view_src : t)->buffer;
}

bool vp_on_host(const ggml_tensor * t) {
    const ggml_backend_buffer_t buf = vp_buffer_of(t);
    return !buf || ggml_backend_buffer_is_host(buf);
}

// MASK or GATHER for this step (AUTO: MASK where masked cells cost nothing, GATHER elsewhere).
static int32_t vp_resolve_path(const llm_graph_context & g, const llm_graph_input_vp & inp, const ggml_tensor * k) {
    if (inp.plan.n_rows != 1) {
        return LLAMA_VP_ATTN_MASK; // queries of several sequences share the stream's cells
    }
    if (inp.vp->params.attn != LLAMA_VP_ATTN_AUTO) {
        return inp.vp->params.attn;
    }
    if (vp_on_host(k)) {
        // CPU flash attention skips -inf cells; the non-FA CPU path reads every cell
        return g.cparams.flash_attn ? LLAMA_VP_ATTN_MASK : LLAMA_VP_ATTN_GATHER;
    }
    const char * name = ggml_backend_buft_name(ggml_backend_buffer_get_type(vp_buffer_of(k)));
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

// out[j] = row[cell[j]] for elements of ES bytes (a constant size: the copy compiles to one move)
template <size_t ES> static void vp_copy_cells(char * out, const char * row, const int32_t * cell, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        memcpy(out + ES * j, row + ES * (size_t) cell[j], ES);
    }
}

// dst[j] = row[idx[j]] along every row of a transposed V: src[0] the cache's view [n_kv, H_kv, d, S]
// (a row per head and dimension, cells along it), src[1] the cells [n_sel, 1 or H_kv, S] (one list for
// every head, or one per head); dst [n_sel, d, H_kv, S].
// Elements are copied, not converted, so the weighted sum sees the cache's own values.
static void vp_gather_v_trans_op(ggml_tensor * dst, int ith, int nth, void * /*userdata*/) {
    const ggml_tensor * v   = dst->src[0];
    const ggml_tensor * idx = dst->src[1];
    const size_t        es  = ggml_element_size(v); // F16/BF16 or F32: a transposed V is never quantized
    GGML_ASSERT(es == 2 || es == 4);
    const int64_t n_sel = dst->ne[0], D = dst->ne[1], H = dst->ne[2], S = dst->ne[3], rows = D * H * S;
    for (int64_t r = ith; r < rows; r += nth) {
        const int64_t   d = r % D, h = (r / D) % H, s = r / (D * H);
        const char *    src = (const char *) v->data + h * v->nb[1] + d * v->nb[2] + s * v->nb[3];
        const int32_t * cell =
            (const int32_t *) ((const char *) idx->data + (h % idx->ne[1]) * idx->nb[1] + s * idx->nb[2]);
        char * out = (char *) dst->data + d * dst->nb[1] + h * dst->nb[2] + s * dst->nb[3];
        (es == 2 ? vp_copy_cells<2> : vp_copy_cells<4>) (out, src, cell, n_sel);
    }
}

// The kept columns of a transposed V, returned in the cache's transposed layout [n_sel, H_kv, d, S]
// (nb[1] > nb[2]) so that the attention reads it as it reads the cache. A CPU op: used only where
// the cache is in host memory; it touches only the cache lines that hold kept cells.
ggml_tensor * vp_gather_v_trans(ggml_context * ctx, ggml_tensor * v, ggml_tensor * idx) {
    ggml_tensor * args[2] = { v, idx };
    ggml_tensor * out     = ggml_custom_4d(ctx, v->type, idx->ne[0], v->ne[2], v->ne[1], v->ne[3], args, 2,
                                           vp_gather_v_trans_op, GGML_N_TASKS_MAX, nullptr);
    ggml_set_name(out, "vp_v_gath");
    return ggml_permute(ctx, out, 0, 2, 1, 3);
}

// Swap k/v for the set's rows and return the matching mask.
// A transposed V (the cache's layout without flash attention) in host memory is gathered by
// vp_gather_v_trans; on another backend it stays whole, only K is gathered, and
// llama_vp_attn_scores puts the scores of the gathered rows back at their cells (0 elsewhere,
// where the full mask is -inf).
static ggml_tensor * vp_gather(llm_graph_input_vp & inp, ggml_context * ctx, vp_layer_set & set, ggml_tensor ** k,
                               ggml_tensor ** v, int il) {
    ggml_tensor * idx     = set.idx;
    ggml_tensor * iota    = nullptr; // row numbers 0..n_sel-1 for re-quantizing (host input, shared)
    const bool    v_trans = (*v)->nb[1] > (*v)->nb[2];
    if (ggml_is_quantized((*k)->type) || (!v_trans && ggml_is_quantized((*v)->type))) {
        auto & t = inp.in.iota[idx->ne[0]];
        if (!t) t = vp_input(ctx, GGML_TYPE_I32, idx->ne[0], idx->ne[1], 1, 1, "vp_iota");
        iota = t;
    }
    *k = vp_gather_rows(ctx, *k, idx, iota);
    if (v_trans && !vp_on_host(*v)) {
        inp.scores.scatter_il  = il;
        inp.scores.scatter_idx = idx;
        return set.mask;
    }
    *v = v_trans ? vp_gather_v_trans(ctx, *v, ggml_reshape_3d(ctx, idx, idx->ne[0], 1, idx->ne[1]))
                 : vp_gather_rows(ctx, *v, idx, iota);
    if (!set.mask_gath) {
        set.mask_gath = vp_gather_mask(ctx, set.mask_f32, idx, set.mask);
    }
    return set.mask_gath;
}

// A full-attention layer's use of a set: its mask, gathered rows, or the mask with flash attention's hint.
static ggml_tensor * vp_use_set(llm_graph_input_vp & inp, ggml_context * ctx, vp_layer_set & set, ggml_tensor * kq_mask,
                                ggml_tensor ** k, ggml_tensor ** v, int il, int64_t * n_kv_max) {
    ggml_tensor * mask = vp_set_mask(ctx, inp, set, kq_mask);
    if (inp.path == LLAMA_VP_ATTN_GATHER && set.idx) {
        return vp_gather(inp, ctx, set, k, v, il);
    }
    if (kq_mask->type == GGML_TYPE_F16) { // flash attention
        *n_kv_max = set.n_sel;
    }
    return mask;
}

// The sliding-window layers' view of the step's selection (their cells are indexed differently).
static ggml_tensor * vp_swa_mask(ggml_context * ctx, llm_graph_input_vp & inp, vp_layer_set & set,
                                 ggml_tensor * kq_mask_swa) {
    if (set.mask_swa) {
        return set.mask_swa;
    }
    const int64_t R = inp.plan.n_rows, S = inp.plan.n_stream, NS = inp.plan.n_kv_swa;
    inp.in.swa_map     = vp_input(ctx, GGML_TYPE_I32, NS, R, S, 1, "vp_swa_map");
    inp.in.vis_swa     = vp_input(ctx, GGML_TYPE_F32, NS, R, 1, S, "vp_vis_swa");
    ggml_tensor * keep = ggml_get_rows(ctx, set.keep_full, inp.in.swa_map); // [1, NS, R, S]
    keep               = ggml_mul(ctx, ggml_reshape_4d(ctx, keep, NS, R, 1, S), inp.in.vis_swa);
    ggml_tensor * drop = ggml_scale(ctx, ggml_sub(ctx, inp.in.vis_swa, keep), -VP_BIG);
    ggml_tensor * mask = kq_mask_swa->type == GGML_TYPE_F32 ? kq_mask_swa : ggml_cast(ctx, kq_mask_swa, GGML_TYPE_F32);
    set.mask_swa       = vp_as_mask_type(ctx, ggml_add(ctx, mask, drop), kq_mask_swa);
    return set.mask_swa;
}

// The set layer il uses, if any: the step's from first_pruned on (FORCED's may start below the
// anchor; a computed one exists once the anchor is built), the previous step's below the anchor.
static vp_layer_set * vp_set_of_layer(ggml_context * ctx, llm_graph_input_vp & inp, int il, bool is_swa) {
    const llama_vp_context & vp = *inp.vp;
    if (il >= vp.first_pruned) {
        if (inp.plan.known) {
            return &vp_host_layer_set(ctx, inp, false);
        }
        return inp.sel.ready() ? &inp.sel : nullptr;
    }
    if (inp.plan.lag && !is_swa && il < vp.anchor) {
        return &vp_host_layer_set(ctx, inp, true);
    }
    return nullptr;
}

// Records where a hook's tensors lie in the graph context's memory, which holds tensors in the order
// they are made: the nodes inside the span are the ops VisionPulse built (llama_vp_trace_backends).
struct vp_op_span {
    llm_graph_input_vp & inp;
    ggml_context *       ctx;
    size_t               begin;

    vp_op_span(llm_graph_input_vp & inp, ggml_context * ctx) : inp(inp), ctx(ctx), begin(ggml_used_mem(ctx)) {}

    ~vp_op_span() {
        const size_t end = ggml_used_mem(ctx);
        if (end > begin) inp.op_spans.emplace_back(begin, end);
    }
};

ggml_tensor * llama_vp_build_attn(const llm_graph_context & g, const llama_kv_cache_context * base,
                                  const llama_kv_cache_context * swa, bool is_swa, ggml_tensor * q, ggml_tensor ** k,
                                  ggml_tensor ** v, ggml_tensor * kq_mask, float kq_scale, int il, int64_t * n_kv_max) {
    llama_vp_context * vp = g.cparams.vp;
    if (!vp || !vp->enabled) {
        return kq_mask;
    }
    if (!g.vp_graph_checked) {
        g.vp_graph_checked = true;
        auto inp           = vp_plan_step(g.cparams, g.ubatch, g.n_head, base, swa);
        g.vp_graph         = inp.get();
        if (inp) g.res->add_input(std::move(inp));
    }
    llm_graph_input_vp * inp = g.vp_graph;
    if (!inp || !inp->plan.active) {
        return kq_mask;
    }
    ggml_context * ctx = g.ctx0;
    vp_op_span     span(*inp, ctx);
    if (inp->path < 0) {
        inp->path     = vp_resolve_path(g, *inp, *k);
        vp->last_attn = inp->path;
    }
    if (is_swa) {
        vp_layer_set * set = vp->params.prune_swa ? vp_set_of_layer(ctx, *inp, il, true) : nullptr;
        return set ? vp_swa_mask(ctx, *inp, *set, kq_mask) : kq_mask;
    }
    if (vp_quest_layer(*inp, il, false)) {
        return vp_quest_attn(g, *inp, q, k, v, kq_mask, il);
    }
    ggml_tensor * k_full = *k; // the anchor probes every cell
    const bool    anchor = il == vp->anchor;
    if (anchor && il >= vp->first_pruned && !inp->plan.known) {
        // the anchor attends to its own selection (eager reference): select before its attention
        vp_build_anchor(g, *inp, q, k_full, kq_mask, kq_scale, nullptr);
    }
    vp_layer_set * set = vp_set_of_layer(ctx, *inp, il, false);
    ggml_tensor *  res = set ? vp_use_set(*inp, ctx, *set, kq_mask, k, v, il, n_kv_max) : kq_mask;
    if (anchor && !inp->selected) {
        GGML_ASSERT(!is_swa && "the VisionPulse anchor must be a full-attention layer");
        if (!g.cparams.flash_attn && *k == k_full) {
            // the layer's own kq will exist: llama_vp_attn_scores builds the selection from it
            inp->scores.q     = q;
            inp->scores.k     = k_full;
            inp->scores.mask  = kq_mask;
            inp->scores.scale = kq_scale;
        } else {
            vp_build_anchor(g, *inp, q, k_full, kq_mask, kq_scale, nullptr); // probes the dense attention
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
    vp_op_span     span(*inp, ctx);
    auto &         sc = inp->scores;
    if (sc.scatter_idx && sc.scatter_il == il) {
        // [n_sel, 1, H, S] -> [n_kv, 1, H, S]: one-value rows, the stream's index list for every head.
        // The layers share one zeroed buffer: they all write the same cells (the step's selection),
        // and each layer's write depends on the previous layer's output, so on its softmax too.
        ggml_tensor *  idx = sc.scatter_idx;
        const int64_t  H = kq->ne[2], S = kq->ne[3];
        ggml_tensor *& buf = sc.scatter_buf[idx];
        if (!buf) {
            buf = ggml_fill(ctx, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, inp->plan.n_kv, H, S), 0.0f);
        }
        buf            = ggml_set_rows(ctx, buf, ggml_reshape_4d(ctx, ggml_cont(ctx, kq), 1, kq->ne[0], H, S),
                                       ggml_reshape_3d(ctx, idx, idx->ne[0], 1, idx->ne[1]));
        kq             = ggml_reshape_4d(ctx, buf, inp->plan.n_kv, 1, H, S);
        sc.scatter_idx = nullptr;
    }
    if (sc.q && il == inp->vp->anchor) {
        const auto & p = inp->plan;
        const bool   same =
            kq->ne[0] == p.n_kv && kq->ne[1] == p.n_rows && kq->ne[2] == g.n_head && kq->ne[3] == p.n_stream;
        vp_build_anchor(g, *inp, sc.q, sc.k, sc.mask, sc.scale, same ? kq : nullptr);
        sc.q = nullptr;
    }
    return kq;
}
