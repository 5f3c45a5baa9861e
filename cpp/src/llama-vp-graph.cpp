// Graph helpers shared by the anchor and the pruned layers: inputs, the visual flags, masks, and
// a selection known on the host turned into graph inputs.

#include "llama-vp-step.h"

#include "ggml.h"

ggml_tensor * vp_input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                       const char * name) {
    ggml_tensor * t = ggml_new_tensor_4d(ctx, type, ne0, ne1, ne2, ne3);
    ggml_set_input(t);
    ggml_set_name(t, name);
    return t;
}

ggml_tensor * vp_vis(ggml_context * ctx, llm_graph_input_vp & inp) {
    if (!inp.in.vis) {
        inp.in.vis = vp_input(ctx, GGML_TYPE_F32, inp.plan.n_kv, inp.plan.n_rows, 1, inp.plan.n_stream, "vp_vis");
    }
    return inp.in.vis;
}

ggml_tensor * vp_mask_f32(ggml_context * ctx, llm_graph_input_vp & inp, ggml_tensor * kq_mask) {
    if (!inp.kq_mask_f32) {
        inp.kq_mask_f32 = kq_mask->type == GGML_TYPE_F32 ? kq_mask : ggml_cast(ctx, kq_mask, GGML_TYPE_F32);
    }
    return inp.kq_mask_f32;
}

ggml_tensor * vp_as_mask_type(ggml_context * ctx, ggml_tensor * m, const ggml_tensor * like) {
    return like->type == GGML_TYPE_F32 ? m : ggml_cast(ctx, m, like->type);
}

ggml_tensor * vp_keep_cells(ggml_context * ctx, const vp_step_plan & plan, ggml_tensor * full) {
    const int64_t n_kv = plan.n_kv, R = plan.n_rows, S = plan.n_stream;
    ggml_tensor * keep = ggml_view_4d(ctx, full, 1, n_kv, R, S, full->nb[1], full->nb[2], full->nb[3], 0);
    return ggml_reshape_4d(ctx, ggml_cont(ctx, keep), n_kv, R, 1, S);
}

ggml_tensor * vp_set_mask(ggml_context * ctx, llm_graph_input_vp & inp, vp_layer_set & set, ggml_tensor * kq_mask) {
    if (!set.mask) {
        // drop = visual and not kept
        ggml_tensor * drop = ggml_scale(ctx, ggml_sub(ctx, vp_vis(ctx, inp), set.keep), -VP_BIG);
        set.mask_f32       = ggml_add(ctx, vp_mask_f32(ctx, inp, kq_mask), drop);
        set.mask           = vp_as_mask_type(ctx, set.mask_f32, kq_mask);
    }
    return set.mask;
}

vp_layer_set & vp_host_layer_set(ggml_context * ctx, llm_graph_input_vp & inp, bool lagged) {
    vp_layer_set & set = lagged ? inp.lag : inp.sel;
    if (set.ready()) {
        return set;
    }
    const vp_step_plan & p      = inp.plan;
    const vp_host_set &  hs     = lagged ? p.lagged : p.forced;
    ggml_tensor *&       t_keep = lagged ? inp.in.lagged_keep : inp.in.forced_keep;
    ggml_tensor *&       t_idx  = lagged ? inp.in.lagged_idx : inp.in.forced_idx;
    t_keep                      = vp_input(ctx, GGML_TYPE_F32, 1, p.n_kv + 1, p.n_rows, p.n_stream, "vp_host_keep");
    t_idx                       = vp_input(ctx, GGML_TYPE_I32, hs.n_sel, p.n_stream, 1, 1, "vp_host_idx");
    set.keep_full               = t_keep;
    set.keep                    = vp_keep_cells(ctx, p, t_keep);
    set.idx                     = t_idx;
    set.n_sel                   = hs.n_sel;
    return set;
}
