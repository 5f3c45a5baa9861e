// The anchor layer of a decode step (one query token per sequence), built into the step's graph:
//   scores  = q.k * kq_scale                                   [n_kv, rows, n_head, streams]
//   mass_h  = sum over visual keys of softmax(scores/tau + mask) (all visible keys)
//   mass    = max_h mass_h;  K = max(1, floor(clamp(mass, b_min, b_max) * N_v))
//   rank    = argsort(mean_h scores + (visual ? 0 : -inf)), descending; the first K are kept
//   mask'   = mask + (visual and not kept ? -BIG : 0)          used by the pruned layers
// All with standard ggml ops, so it runs wherever the graph runs (CPU, CUDA, Metal).
// K is data dependent, so the ranking keeps a static k_max = max over rows of the budget's
// upper bound, and ranks >= K are switched off with step(K - rank).

#include "llama-vp-step.h"

#include "llama-hparams.h"

#include "ggml.h"

static ggml_tensor * vp_output(ggml_cgraph * gf, ggml_tensor * t, const char * name) {
    ggml_set_name(t, name);
    ggml_set_output(t);
    ggml_build_forward_expand(gf, t);
    return t;
}

// The first k entries of argsort(a, descending) along rows ([k, ne1, ne2, ne3] I32), without sorting
// every cell: top_k picks the k largest in no order (a partial sort), then only those k are sorted.
// At 32K cells and k = 5% this is a tenth of the full argsort's time. Equal values may come out in
// another order than the full sort's (neither promises one).
static ggml_tensor * vp_top_k_sorted(ggml_context * ctx, ggml_tensor * a, int64_t k) {
    const int64_t n = a->ne[0], B1 = a->ne[1], B2 = a->ne[2] * a->ne[3];
    if (k >= n) {
        return ggml_argsort(ctx, a, GGML_SORT_ORDER_DESC);
    }
    ggml_tensor * top = ggml_top_k(ctx, a, (int) k); // [k, B1, ..]
    GGML_ASSERT(ggml_is_contiguous(a));
    ggml_tensor * rows = ggml_reshape_4d(ctx, a, 1, n, B1, B2);                          // a value per row
    ggml_tensor * vals = ggml_get_rows(ctx, rows, ggml_reshape_3d(ctx, top, k, B1, B2)); // [1, k, B1, B2]
    ggml_tensor * ord  = ggml_argsort(ctx, ggml_reshape_3d(ctx, vals, k, B1, B2), GGML_SORT_ORDER_DESC);
    ggml_tensor * idx  = ggml_get_rows(ctx, ggml_reshape_4d(ctx, top, 1, k, B1, B2), ord); // [1, k, B1, B2]
    return ggml_reshape_4d(ctx, idx, k, a->ne[1], a->ne[2], a->ne[3]);
}

// The current queries' scores against every cell, per head: [n_kv, R, H, S] (soft-capped).
static ggml_tensor * vp_probe(const llm_graph_context & g, const vp_step_plan & p, ggml_tensor * q, ggml_tensor * k) {
    ggml_context * ctx  = g.ctx0;
    const int64_t  n_kv = p.n_kv, R = p.n_rows, S = p.n_stream, H = g.n_head;
    ggml_tensor *  kp   = ggml_permute(ctx, k, 0, 2, 1, 3); // [d, n_kv, H_kv, S]
    const int64_t  H_kv = k->ne[1], G = H / H_kv;
    ggml_tensor *  kq;
    if (R == 1) {
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
    if (g.hparams.attn_soft_cap) {
        kq = ggml_scale(ctx, kq, 1.0f / g.hparams.f_attn_logit_softcapping);
        kq = ggml_tanh(ctx, kq);
        kq = ggml_scale(ctx, kq, g.hparams.f_attn_logit_softcapping);
    }
    return kq;
}

// K per row: FIXED's (or llama_vp_set_k's) from its input, else the clamped visual mass times N_v.
static ggml_tensor * vp_budget(ggml_context * ctx, llm_graph_input_vp & inp, ggml_tensor * mass) {
    const auto &  p = inp.vp->params;
    const int64_t R = inp.plan.n_rows, S = inp.plan.n_stream;
    ggml_tensor * K;
    if (inp.plan.mode == LLAMA_VP_MODE_FIXED || inp.plan.k_given) {
        inp.in.k = vp_input(ctx, GGML_TYPE_F32, 1, R, 1, S, "vp_k");
        K        = inp.in.k;
    } else {
        K = ggml_clamp(ctx, mass, p.budget_min, p.budget_max);
        K = ggml_floor(ctx, ggml_mul(ctx, K, inp.in.nv));
        K = ggml_clamp(ctx, K, 1.0f, 1e9f);
    }
    ggml_set_name(K, "vp_k");
    return K;
}

// The top K visual cells by score (or at random): their keep flags, per cell [n_kv, R, 1, S] in
// set.keep and in set.keep_full's layout [1, n_kv + 1, R, S].
static void vp_select(const llm_graph_context & g, llm_graph_input_vp & inp, vp_layer_set & set, ggml_tensor * kq,
                      ggml_tensor * mass, float kq_scale) {
    ggml_context * ctx  = g.ctx0;
    const int64_t  n_kv = inp.plan.n_kv, R = inp.plan.n_rows, S = inp.plan.n_stream, KM = inp.plan.k_max;
    ggml_tensor *  K = vp_budget(ctx, inp, mass);

    // ranking: head-mean pre-softmax score (or random), visual cells only
    ggml_tensor * score;
    if (inp.plan.mode == LLAMA_VP_MODE_RANDOM) {
        inp.in.rand = vp_input(ctx, GGML_TYPE_F32, n_kv, R, 1, S, "vp_rand");
        score       = inp.in.rand;
    } else {
        score = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, kq, 1, 2, 0, 3))); // [1, n_kv, R, S]
        score = ggml_reshape_4d(ctx, score, n_kv, R, 1, S);
        score = ggml_scale(ctx, score, kq_scale / (float) g.n_head);
    }
    inp.in.vis_neg    = vp_input(ctx, GGML_TYPE_F32, n_kv, R, 1, S, "vp_vis_neg");
    ggml_tensor * idx = vp_top_k_sorted(ctx, ggml_add(ctx, score, inp.in.vis_neg), KM); // [KM, R, 1, S]
    inp.out.idx       = vp_output(g.gf, idx, "vp_idx");

    // keep rank r iff r < K
    inp.in.rank          = vp_input(ctx, GGML_TYPE_F32, KM, 1, 1, 1, "vp_rank");
    ggml_tensor * keep_r = ggml_sub(ctx, ggml_repeat_4d(ctx, K, KM, R, 1, S), inp.in.rank);
    keep_r               = ggml_step(ctx, keep_r); // [KM, R, 1, S]
    inp.out.keep         = vp_output(g.gf, keep_r, "vp_keep");

    // scatter the per-rank flags to cells; slot n_kv collects nothing (the SWA map's "none")
    ggml_tensor * full = ggml_fill(ctx, ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, n_kv + 1, R, S), 0.0f);
    full = ggml_set_rows(ctx, full, ggml_reshape_4d(ctx, keep_r, 1, KM, R, S), ggml_reshape_4d(ctx, idx, KM, R, S, 1));
    set.keep_full = full;
    set.keep      = ggml_mul(ctx, vp_keep_cells(ctx, inp.plan, full), vp_vis(ctx, inp));
}

// The gather list of a computed selection: text and kept visual cells first, in ascending cell
// order (key = attended * 2 n_kv - cell), then dropped visual cells as padding.
static ggml_tensor * vp_gather_list(ggml_context * ctx, llm_graph_input_vp & inp, ggml_tensor * keep) {
    const int64_t n_kv = inp.plan.n_kv, S = inp.plan.n_stream;
    inp.in.negcell    = vp_input(ctx, GGML_TYPE_F32, n_kv, 1, 1, 1, "vp_negcell");
    ggml_tensor * att = ggml_add(ctx, ggml_scale_bias(ctx, vp_vis(ctx, inp), -1.0f, 1.0f), keep);
    ggml_tensor * key = ggml_add(ctx, ggml_scale(ctx, att, 2.0f * (float) n_kv), inp.in.negcell);
    ggml_tensor * ord = vp_top_k_sorted(ctx, key, inp.plan.n_sel); // [n_sel, 1, 1, S] (keys are distinct)
    return ggml_reshape_2d(ctx, ord, inp.plan.n_sel, S);
}

void vp_build_anchor(const llm_graph_context & g, llm_graph_input_vp & inp, ggml_tensor * q, ggml_tensor * k,
                     ggml_tensor * kq_mask, float kq_scale, ggml_tensor * kq_own) {
    ggml_context * ctx  = g.ctx0;
    const auto &   p    = inp.vp->params;
    const int64_t  n_kv = inp.plan.n_kv, R = inp.plan.n_rows, S = inp.plan.n_stream, H = g.n_head;
    ggml_tensor *  vis = vp_vis(ctx, inp);
    inp.in.nv          = vp_input(ctx, GGML_TYPE_F32, 1, R, 1, S, "vp_nv");
    inp.vp->last_probe = kq_own ? 1 : 0;
    ggml_tensor * kq   = kq_own ? kq_own : vp_probe(g, inp.plan, q, k);
    ggml_tensor * mask = vp_mask_f32(ctx, inp, kq_mask);

    // visual mass: max over heads of the tau-softmax share on visual cells
    ggml_tensor * pr     = ggml_soft_max_ext(ctx, kq, mask, kq_scale / p.tau, 0.0f); // [n_kv, R, H, S]
    ggml_tensor * mass_h = ggml_sum_rows(ctx, ggml_mul(ctx, pr, vis));               // [1, R, H, S]
    ggml_tensor * mh     = ggml_cont(ctx, ggml_permute(ctx, mass_h, 2, 1, 0, 3));    // [H, R, 1, S]
    mh                   = ggml_reshape_2d(ctx, mh, H, R * S);
    ggml_tensor * mass   = ggml_pool_2d(ctx, mh, GGML_OP_POOL_MAX, (int) H, 1, (int) H, 1, 0, 0); // [1, R*S]
    mass                 = ggml_reshape_4d(ctx, mass, 1, R, 1, S);
    inp.out.mass         = vp_output(g.gf, mass, "vp_mass");

    // head-mean of the tau-softmax, for the share of mass the kept cells cover
    ggml_tensor * pmean = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, pr, 1, 2, 0, 3))); // [1, n_kv, R, S]
    pmean               = ggml_reshape_4d(ctx, pmean, n_kv, R, 1, S);
    inp.out.cov_den     = vp_output(g.gf, ggml_sum_rows(ctx, ggml_mul(ctx, pmean, vis)), "vp_cov_den");

    vp_layer_set   ranked; // STATIC's ranking step: remembered, not applied
    vp_layer_set * set = nullptr;
    if (inp.plan.known) {
        set = &vp_host_layer_set(ctx, inp, false);
    } else if (inp.plan.mode != LLAMA_VP_MODE_DENSE) {
        set = inp.plan.rank_only ? &ranked : &inp.sel;
        vp_select(g, inp, *set, kq, mass, kq_scale);
        set->n_sel = inp.plan.n_sel;
        if (!inp.plan.rank_only) {
            vp_set_mask(ctx, inp, *set, kq_mask);
            if (R == 1 && inp.path == LLAMA_VP_ATTN_GATHER) { // the mask path never reads it: no second sort
                set->idx = vp_gather_list(ctx, inp, set->keep);
            }
        }
    }
    if (set) {
        inp.out.cov_num = vp_output(g.gf, ggml_sum_rows(ctx, ggml_mul(ctx, pmean, set->keep)), "vp_cov_num");
    }
    inp.selected = true;
}
