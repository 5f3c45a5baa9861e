// VisionPulse internals: the context's state, and the hooks called from the patched tree.
//
// Our sources, by concern (each step's flow reads top to bottom in this order):
//   llama-vp-plan.cpp      which cells are visual; the host-side plan of a step and its inputs
//   llama-vp-graph.cpp     graph helpers: inputs, masks, host-known selections as inputs
//   llama-vp-anchor.cpp    the anchor layer's probe and selection, built into the step's graph
//   llama-vp-apply.cpp     the hooks in build_attn: the selection applied by the layers (mask, gather)
//   llama-vp-quest.cpp     beyond the paper: Quest pages in the layers below the anchor (summaries, bounds)
//   llama-vp-readback.cpp  after the step: stats and kept sets read back
//   llama-vp-api.cpp       the C API (cpp/include/llama-visionpulse.h): presets, validation, marks
#pragma once

#include "llama-visionpulse.h"

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

struct ggml_tensor;
struct ggml_context;
struct ggml_backend_buffer;
struct ggml_backend_sched;
struct llm_graph_context;
struct llm_graph_result;
class llama_kv_cache;
class llama_kv_cache_context;
class llama_kv_cells;
class llm_graph_input_vp;

struct llama_vp_seq {
    std::vector<std::pair<llama_pos, llama_pos>> marks;  // explicit visual ranges [p0, p1)
    std::vector<int32_t>                         forced; // FORCED (and STATIC once ranked): kept ordinals, sorted
    bool                                         has_forced = false;
    llama_vp_stats                               stats      = {};
    bool                                         has_stats  = false;
    std::vector<int32_t>                         kept;              // kept ordinals of the last step
    bool                                         prompt    = false; // from llama_vp_reset to llama_vp_begin_generation
    int32_t                                      k_given   = 0;  // llama_vp_set_k: K of the next steps (0: the rule's)
    llama_vp_quest_stats                         quest     = {}; // Quest pages of the last step
    bool                                         has_quest = false;
    std::vector<int32_t>                         quest_pages; // llama_vp_set_quest_pages (empty: the bounds choose)
};

// A page's summaries are current while its cells hold what they held when they were made.
struct llama_vp_quest_page {
    bool         valid = false;
    llama_seq_id seq   = -1;
    llama_pos    p0 = -1, p1 = -1; // positions of its first and last cell then (a shift moves them)
};

// Quest's page summaries beside the KV cache: per layer, F16 [2 * d, H_kv, pages] (each row the
// element-wise min, then max, of a page's keys for one KV head), in host memory.
struct llama_vp_quest_store {
    int32_t                            page = 0; // cells per page the summaries were made for
    std::map<int32_t, ggml_tensor *>   summ;     // by layer
    std::vector<ggml_context *>        ctxs;
    std::vector<ggml_backend_buffer *> bufs;
    std::vector<llama_vp_quest_page>   pages;          // by page of the cache (cell / page)
    bool                               broken = false; // memory for the summaries could not be had: off

    ~llama_vp_quest_store();
    void clear(); // frees the summaries: a new page size, VisionPulse off, the context freed
};

// Per llama_context state; owned by the context (cparams.vp), freed with it.
struct llama_vp_context {
    llama_vp_params                      params       = {};
    bool                                 enabled      = false;
    int32_t                              anchor       = -1;
    int32_t                              first_pruned = -1; // resolved: layers >= this one use the selection
    std::map<llama_seq_id, llama_vp_seq> seqs;
    std::mt19937                         rng;
    int32_t                              last_attn  = -1;    // path of the last step with a selection
    int32_t                              last_probe = -1;    // 1: its scores were the anchor layer's own, 0: probed
    bool                                 skip       = false; // the selection cannot pay on this model (llama_vp_enable)
    std::string                          skip_reason;
    bool                                 trace_backends = false;        // llama_vp_trace_backends
    std::map<std::pair<std::string, std::string>, int32_t> op_backends; // (op, backend) -> ops, last traced step
    llama_vp_quest_store                                   quest;       // page summaries (llama_vp_params.quest)
};

// The visual cells of seq among the first n_kv cells, in ordinal order (llama-vp-plan.cpp).
std::vector<int32_t> llama_vp_visual_cells(const llama_vp_context & vp, const llama_kv_cells & cells, uint32_t n_kv,
                                           llama_seq_id seq);

// Hooks called from the patched upstream files.

// In build_attn, before the attention itself: returns the mask this layer should use and
// may replace *k and *v by compact copies of the selected rows (GATHER path).
// `base`/`swa`: the cache contexts of the full-attention and sliding-window caches
// (`swa` is null for models with a single cache); `is_swa`: this layer's kind.
// *n_kv_max: set to a bound on the finite mask entries per row (flash attention's sparse hint), or 0.
ggml_tensor * llama_vp_build_attn(const llm_graph_context & g, const llama_kv_cache_context * base,
                                  const llama_kv_cache_context * swa, bool is_swa, ggml_tensor * q, ggml_tensor ** k,
                                  ggml_tensor ** v, ggml_tensor * kq_mask, float kq_scale, int il, int64_t * n_kv_max);

// In build_attn_mha without flash attention, on the layer's scores kq [n_kv, n_tokens, n_head, S]
// (soft-capped, before the softmax): the anchor takes them as its scores (no probe of its own),
// and a GATHER layer's scores of its gathered rows are returned at their cells.
ggml_tensor * llama_vp_attn_scores(const llm_graph_context & g, ggml_tensor * kq, int il);

// After a ubatch's graph was computed: read the step's selection and stats back (and, when traced,
// which of sched's backends ran the hooks' ops).
void llama_vp_after_compute(llama_vp_context * vp, const llm_graph_result * res, ggml_backend_sched * sched);

void llama_vp_free(llama_vp_context * vp);
