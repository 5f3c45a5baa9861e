// One decode step of VisionPulse: its host-side plan and the graph objects built from it.
//
// A step's selection reaches the layers in one of two ways, and everything after that is the same:
//   computed at the anchor (DYNAMIC, FIXED, RANDOM, STATIC's ranking step): built in the graph;
//   known on the host before the step (FORCED, STATIC once ranked): fed as inputs.
// Lagged mode adds a second known selection, the previous step's, for the full-attention layers
// below the anchor. A selection as the layers use it is a vp_layer_set.
#pragma once

#include "llama-vp.h"

#include "llama-graph.h"

#include <map>
#include <memory>
#include <vector>

struct ggml_context;

// Masked-out value: finite so that (1 - keep) * BIG stays a number; -1e30 is -inf in F16
// and exp(-1e30 - max) is exactly 0 in F32.
static constexpr float VP_BIG = 1e30f;

// A selection known on the host: per row, which visual ordinals are kept.
struct vp_host_set {
    std::vector<std::vector<int32_t>> kept;      // per row, kept ordinals (ascending)
    std::vector<float>                keep_full; // [1, n_kv + 1, n_rows, n_stream]: 1 = visual and kept
    std::vector<int32_t>              idx;       // [n_sel, n_stream]: the cells to gather (one row per stream)
    int64_t                           n_sel = 0;
};

// The host-side plan of a step: its shapes and data. Two plans with equal shapes share a graph.
struct vp_step_plan {
    struct row {
        llama_seq_id         seq  = -1;
        bool                 step = false; // a step of the seq's generation (else prompt processing, dense)
        std::vector<int32_t> vis;          // visual cells of the base cache, ordinal order
        std::vector<int32_t> vis_swa;      // visual cells of the SWA cache that map to base cells
        std::vector<int32_t> swa_to_base;
    };

    bool             active    = false;               // a decode step with visual cells: there is a selection to make
    bool             skipped   = false;               // one VisionPulse skips (llama_vp_context::skip): dense, inactive
    llama_vp_mode    mode      = LLAMA_VP_MODE_DENSE; // effective: STATIC becomes FIXED (ranking) or FORCED
    bool             rank_only = false;               // STATIC's ranking step: remember the set, mask nothing
    int64_t          n_kv = 0, n_kv_swa = 0, n_rows = 0, n_stream = 1, n_head = 0;
    int64_t          k_max   = 0;     // static bound of K (the argsort keeps this many)
    bool             k_given = false; // every row's K given by llama_vp_set_k (an input, as FIXED's)
    int64_t          n_sel   = 0;     // cells gathered per stream by the layers after the anchor
    std::vector<row> rows;
    bool             known = false; // the selection is known on the host (FORCED): `forced` holds it
    vp_host_set      forced;
    bool             lag = false; // lagged: the previous step's set, for the layers below the anchor
    vp_host_set      lagged;

    // Quest pages below the anchor (one row, one stream; llama-vp-quest.cpp)
    struct quest_plan {
        bool                 on   = false;
        int64_t              page = 0;
        int64_t              n_kv = 0; // cells: a whole number of pages
        std::vector<int32_t> cand;     // candidate pages (cell / page), ascending: wholly the row's visual cells
        std::vector<int32_t> refresh;  // pages whose summaries this step makes
        std::vector<std::pair<llama_pos, llama_pos>> refresh_pos; // their first and last cells' positions
        int64_t                                      k = 0;       // pages kept per KV head
        int64_t              n_sel                     = 0; // cells a KV head attends to: n_kv - (|cand| - k) * page
        std::vector<int32_t> forced; // llama_vp_set_quest_pages: the kept candidates (indices into cand)
        bool                 known  = false;
        bool                 random = false;
    } quest;

    bool same_shape(const vp_step_plan & o) const;
};

// A selection as the layers that use it see it; built once per graph, shared by those layers.
struct vp_layer_set {
    ggml_tensor * keep_full = nullptr; // F32 [1, n_kv + 1, R, S]: 1 = visual and kept (slot n_kv: none)
    ggml_tensor * keep      = nullptr; // F32 [n_kv, R, 1, S]: the same per cell
    ggml_tensor * idx       = nullptr; // I32 [n_sel, S]: cells to gather, or null (MASK only)
    int64_t       n_sel     = 0;       // a bound on the cells a row attends to
    ggml_tensor * mask_f32  = nullptr; // the full-attention layers' mask with the dropped cells at -BIG
    ggml_tensor * mask      = nullptr; // the same in the mask's type
    ggml_tensor * mask_gath = nullptr; // the gathered cells' mask
    ggml_tensor * mask_swa  = nullptr; // the sliding-window layers' mask
    bool          ready() const { return keep != nullptr; }
};

// Quest's constants for its ops, and the layers that kept pages.
struct vp_quest_args {
    int64_t page = 0, n_head = 0, n_head_kv = 0, n_layers = 0;
};

// The step's graph input: host data in `plan`, input tensors filled from it by set_input.
class llm_graph_input_vp : public llm_graph_input_i {
public:
    llama_vp_context * vp = nullptr;
    vp_step_plan       plan;
    int32_t            path = -1; // resolved llama_vp_attn of this step (MASK or GATHER)

    // inputs (null when no op of the graph uses them)
    struct {
        ggml_tensor *                    vis = nullptr, *vis_neg = nullptr; // F32 [n_kv, R, 1, S]: 1 / 0 visual
        ggml_tensor *                    nv = nullptr, *k = nullptr;        // F32 [1, R, 1, S]: N_v, FIXED's K
        ggml_tensor *                    rand        = nullptr;             // F32 [n_kv, R, 1, S]: RANDOM's ranking
        ggml_tensor *                    rank        = nullptr;             // F32 [k_max]: 0 .. k_max-1
        ggml_tensor *                    negcell     = nullptr;             // F32 [n_kv]: -cell
        ggml_tensor *                    swa_map     = nullptr; // I32 [n_kv_swa, R, S]: base cell, n_kv if none
        ggml_tensor *                    vis_swa     = nullptr; // F32 [n_kv_swa, R, 1, S]
        ggml_tensor *                    forced_keep = nullptr, *forced_idx = nullptr;
        ggml_tensor *                    lagged_keep = nullptr, *lagged_idx = nullptr;
        ggml_tensor *                    quest_cand = nullptr, *quest_refresh = nullptr; // I32 [|cand|], [|refresh|]
        ggml_tensor *                    quest_forced = nullptr;                         // I32 [n_sel]
        std::map<int, ggml_tensor *>     quest_rand;                                     // F32 [|cand|, H_kv], by layer
        std::map<int64_t, ggml_tensor *> iota;                                           // I32 [n, S]: 0..n-1, by n
    } in;

    // outputs read back after the step
    struct {
        ggml_tensor *mass = nullptr, *idx = nullptr, *keep = nullptr, *cov_num = nullptr, *cov_den = nullptr;
    } out;

    // where the hooks' tensors lie in the graph context's memory (offsets [begin, end)): a node
    // inside one is an op VisionPulse built (llama_vp_trace_backends)
    std::vector<std::pair<size_t, size_t>> op_spans;

    vp_quest_args quest; // Quest's per-op constants (the custom ops' userdata: this object outlives its graph)

    vp_layer_set  sel;                   // the step's selection (layers >= first_pruned)
    vp_layer_set  lag;                   // lagged: the previous step's (full-attention layers below the anchor)
    ggml_tensor * kq_mask_f32 = nullptr; // the layers' own mask in F32 (cast once)
    bool          selected    = false;   // the anchor's probe and selection are built

    // without flash attention (llama_vp_attn_scores sees the layer's kq):
    struct {
        // the anchor waits for its own layer's scores instead of probing,
        ggml_tensor *q = nullptr, *k = nullptr, *mask = nullptr;
        float        scale = 0.0f;
        // and a GATHER layer's scores of its gathered K rows go back to their cells
        int                                    scatter_il  = -1;
        ggml_tensor *                          scatter_idx = nullptr;
        std::map<ggml_tensor *, ggml_tensor *> scatter_buf; // by index list (lagged and step sets differ)
    } scores;

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;
};

// llama-vp-plan.cpp: the plan of a step (inactive when it has no selection to make); null when VisionPulse is off
std::unique_ptr<llm_graph_input_vp> vp_plan_step(const llama_cparams & cparams, const llama_ubatch & ub, int64_t n_head,
                                                 const llama_kv_cache_context * base,
                                                 const llama_kv_cache_context * swa);
// llama-vp-graph.cpp: graph helpers shared by the anchor and the pruned layers
ggml_tensor * vp_input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                       const char * name);
ggml_tensor * vp_vis(ggml_context * ctx, llm_graph_input_vp & inp); // the visual-cell flags, made once
ggml_tensor * vp_mask_f32(ggml_context * ctx, llm_graph_input_vp & inp, ggml_tensor * kq_mask);
ggml_tensor * vp_as_mask_type(ggml_context * ctx, ggml_tensor * m, const ggml_tensor * like);
// keep_full [1, n_kv + 1, R, S] -> the cells' flags [n_kv, R, 1, S]
ggml_tensor * vp_keep_cells(ggml_context * ctx, const vp_step_plan & plan, ggml_tensor * keep_full);
// the full-attention layers' mask of a selection (from its keep flags), built once
ggml_tensor * vp_set_mask(ggml_context * ctx, llm_graph_input_vp & inp, vp_layer_set & set, ggml_tensor * kq_mask);
// a selection known on the host (lagged: the previous step's, else FORCED's) as graph inputs, built once
vp_layer_set & vp_host_layer_set(ggml_context * ctx, llm_graph_input_vp & inp, bool lagged);

// llama-vp-quest.cpp: Quest pages below the anchor.
// Before any ubatch's plan: pages whose cells the ubatch wrote lose their summaries.
void vp_quest_written(llama_vp_context & vp, const llama_ubatch & ub, const llama_kv_cache & kv);
// The step's Quest plan (plan.quest.on stays false where it does not apply).
void vp_quest_plan(vp_step_plan & plan, llama_vp_context & vp, const llama_kv_cache & kv);
// Whether layer il keeps Quest pages at this step.
bool vp_quest_layer(const llm_graph_input_vp & inp, int il, bool is_swa);
// Layer il's Quest pages: swaps k/v for the kept cells per KV head and returns their mask.
ggml_tensor * vp_quest_attn(const llm_graph_context & g, llm_graph_input_vp & inp, ggml_tensor * q, ggml_tensor ** k,
                            ggml_tensor ** v, ggml_tensor * kq_mask, int il);
// The cells a KV head attends to, ascending: every cell outside the candidate pages, and the kept
// pages (kept: a flag per candidate).
void vp_quest_cells(const vp_step_plan::quest_plan & qp, const std::vector<char> & kept, int32_t * out);
// After the step: the refreshed pages' summaries are current; the stats.
void vp_quest_after_compute(llama_vp_context & vp, const vp_step_plan & plan, const llm_graph_input_vp & inp);
// Quest's per-KV-head gather of a cache view [d, H_kv, n_kv]: head h of cell idx[j, h % idx->ne[1]] -> [d, H_kv,
// n_sel].
ggml_tensor * vp_gather_heads(ggml_context * ctx, ggml_tensor * t, ggml_tensor * idx);

// llama-vp-apply.cpp: shared with Quest
bool vp_on_host(const ggml_tensor * t); // a cache view in host memory (or one not allocated yet)
// the columns idx ([n_sel, S], or per KV head [n_sel, H_kv, S]) of a transposed V in host memory
ggml_tensor * vp_gather_v_trans(ggml_context * ctx, ggml_tensor * v, ggml_tensor * idx);

// llama-vp-anchor.cpp: the probe and the selection at the anchor layer.
// kq_own: the anchor layer's own pre-softmax scores [n_kv, R, H, S] (soft-capped), or null to probe.
void vp_build_anchor(const llm_graph_context & g, llm_graph_input_vp & inp, ggml_tensor * q, ggml_tensor * k,
                     ggml_tensor * kq_mask, float kq_scale, ggml_tensor * kq_own);
