// VisionPulse: per-decode-step visual token selection for llama.cpp.
//
// At every decode step (one query token per sequence) the anchor layer scores the
// sequence's visual KV cells by the attention the step pays them, keeps the top K,
// and every later layer attends to all text cells plus those K visual cells. The
// KV cache itself is never modified: a cell dropped at one step can be kept at the next.
// Prefill (any ubatch with more than one token per sequence) is always dense.
//
// Visual cells are the cells written from embedding input (libmtmd image chunks),
// found automatically, or the position ranges given with llama_vp_mark_visual.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

enum llama_vp_mode {
    LLAMA_VP_MODE_NONE    = -1, // llama_vp_preset_params: no such preset
    LLAMA_VP_MODE_DENSE   = 0,  // nothing masked; the probe still runs and reports stats
    LLAMA_VP_MODE_DYNAMIC = 1,  // VisionPulse: K = floor(clamp(mass, budget_min, budget_max) * N_v)
    LLAMA_VP_MODE_FIXED   = 2,  // K = floor(ratio * N_v) at every step, top-K by score
    LLAMA_VP_MODE_RANDOM  = 3,  // K as DYNAMIC, but a uniformly random visual subset (control)
    LLAMA_VP_MODE_STATIC  = 4,  // FastV-style: ranked once at the last prompt token, top ratio kept for good
    LLAMA_VP_MODE_FORCED  = 5,  // the set given with llama_vp_set_forced (tests, tools)
};

// Beyond the paper (opt-in): sparsity below the anchor by query-aware KV pages (Quest). The visual
// cells are cut into pages of quest_page consecutive cells; per page and KV head the element-wise
// min and max of its keys bound any query's score there. Each full-attention layer in
// [quest_first_layer, anchor) keeps, per KV head, the pages with the highest bound for the step's
// query heads and attends to them and every other cell (text, pages that are not wholly visual).
enum llama_vp_quest {
    LLAMA_VP_QUEST_OFF    = 0,
    LLAMA_VP_QUEST_BOUND  = 1, // the pages with the highest score bound (Quest)
    LLAMA_VP_QUEST_RANDOM = 2, // as many pages, drawn at random per step, layer and KV head (control)
};

// How the layers after the anchor skip the dropped cells.
enum llama_vp_attn {
    LLAMA_VP_ATTN_AUTO   = 0, // per backend and step: MASK where the attention kernel skips masked cells
                              // (CPU flash attention; Metal, with the n_kv_max hint), GATHER elsewhere
    LLAMA_VP_ATTN_MASK   = 1, // attend to every cell, dropped visual cells masked out (-inf)
    LLAMA_VP_ATTN_GATHER = 2, // attend to a compact copy of the selected K/V rows (ascending cell order:
                              // equal to MASK bit for bit with flash attention, to rounding without it);
                              // needs one query row per KV stream, else MASK
};

struct llama_vp_params {
    enum llama_vp_mode mode;
    enum llama_vp_attn attn;
    int32_t            anchor_layer;       // < 0: the full-attention layer nearest 47% of depth
    int32_t            first_pruned_layer; // < 0: from prune_anchor. FORCED may prune from any layer (even 0);
                                           // the other modes select at the anchor, so only from it on
    float              tau;                // temperature of the mass softmax (> 0)
    float              budget_min;         // DYNAMIC/RANDOM: lower clamp of the kept fraction, in (0, 1]
    float              budget_max;         // DYNAMIC/RANDOM: upper clamp of the kept fraction, in (0, 1]
    float              ratio;              // FIXED/STATIC: kept fraction, in (0, 1]
    uint32_t           seed;               // RANDOM: seed of the per-step choice
    bool               prune_anchor;       // the anchor layer attends to its own selection (the reference's
                                           // eager path) instead of all cells (its Triton path)
    bool               auto_mark;          // treat cells written from embeddings as visual (default true)
    bool               lagged;             // beyond the paper (opt-in): full-attention layers before the anchor use
                                           // the previous step's kept set (DYNAMIC/FIXED/RANDOM/FORCED)
    bool               prune_swa;          // also prune sliding-window layers (default false: their cost is bounded by
                                           // the window, so there is nothing to save, and they carry the local context)
    int32_t            min_pruned_layers;  // DYNAMIC/FIXED/RANDOM/STATIC skip the selection (steps run dense, the stats
                                           // say so) when fewer full-attention layers than this would be pruned: the
                                           // probe costs about half a layer's attention, so one pruned layer cannot
                                           // pay (Gemma 3 270M: 1 of 3). Default 2; 0: never skip
    // Quest pages below the anchor (enum llama_vp_quest; not with lagged). The page summaries are made
    // once per page, when a step first needs them, kept beside the KV cache (host memory) and made
    // again when a decode rewrites a page's cells or a shift moves them (seq_rm, clear, seq_add); the
    // KV cache itself is never changed. A state load writes cells without a decode: the marks it needs
    // (llama_vp_mark_visual) drop the summaries too. Used where the step decodes one sequence, the
    // cache has one stream and is in host memory; elsewhere those layers run dense.
    enum llama_vp_quest quest;
    int32_t             quest_page;        // cells per page: a power of two in [1, 256] (default 16)
    int32_t             quest_first_layer; // layers below it stay dense (default 2, as Quest)
    float               quest_budget_min;  // kept share of the candidate pages per KV head = clamp(the previous
    float               quest_budget_max;  // step's visual mass, min, max); the first step takes max (0.25, 0.75)
};

// Preset "5": tau 0.1, budget [0.01, 0.05]. Preset "10": tau 0.4, budget [0.05, 0.10].
LLAMA_API struct llama_vp_params llama_vp_default_params(void);
LLAMA_API struct llama_vp_params llama_vp_preset_params(int32_t preset); // 5 or 10; else mode LLAMA_VP_MODE_NONE

// Returns 0, or a negative code with a message in llama_vp_last_error():
//  -1 invalid parameter, -2 unsupported model (no usable full-attention layer, ALiBi, ...)
// Every function checks its arguments and never aborts on them: a null ctx, a seq outside the
// context's own [0, llama_n_seq_max(ctx)) (not LLAMA_MAX_SEQ), a negative count or a null array
// with a non-zero count is -1 (void functions do nothing and set llama_vp_last_error()); where
// documented, seq < 0 means every sequence.
// llama_vp_check_params: what can be checked without a model (llama_vp_enable checks it too).
LLAMA_API int32_t      llama_vp_check_params(const struct llama_vp_params * params);
LLAMA_API int32_t      llama_vp_enable(struct llama_context * ctx, const struct llama_vp_params * params);
LLAMA_API void         llama_vp_disable(struct llama_context * ctx);
LLAMA_API bool         llama_vp_enabled(const struct llama_context * ctx);
LLAMA_API int32_t      llama_vp_anchor_layer(const struct llama_context * ctx); // resolved anchor, -1 if off
LLAMA_API const char * llama_vp_last_error(void);
// The attention path (enum llama_vp_attn, never AUTO) the last decode step with a selection used; -1 if none.
LLAMA_API int32_t llama_vp_last_attn(const struct llama_context * ctx);
// Where the last selection's scores came from: 1 the anchor layer's own attention scores
// (computed anyway without flash attention), 0 a probe of VisionPulse's own; -1 if none.
LLAMA_API int32_t llama_vp_last_probe(const struct llama_context * ctx);
// Why the enabled settings skip the selection on this model (min_pruned_layers), or NULL when they do not.
LLAMA_API const char * llama_vp_skip_reason(const struct llama_context * ctx);

// Explicit marks: the cells of seq with positions in [p0, p1) are visual (0 <= p0 < p1, else -1). Once a
// sequence has explicit marks, only those count for it (auto marks are ignored).
LLAMA_API int32_t llama_vp_mark_visual(struct llama_context * ctx, llama_seq_id seq, llama_pos p0, llama_pos p1);
LLAMA_API int32_t llama_vp_clear_marks(struct llama_context * ctx, llama_seq_id seq); // seq < 0: all
// Number of visual cells of seq now in the KV cache (either kind of mark); -1 bad seq, -2 no KV cache.
LLAMA_API int32_t llama_vp_n_visual(struct llama_context * ctx, llama_seq_id seq);

// FORCED mode: keep exactly these visual ordinals of seq (ordinals number the seq's
// visual cells in (pos, y, x) order, i.e. images in prompt order, row-major). A negative ordinal
// is -1; ordinals at or past the step's N_v (unknown before the images are in) are ignored.
LLAMA_API int32_t llama_vp_set_forced(struct llama_context * ctx, llama_seq_id seq, const int32_t * ordinals,
                                      int32_t n);

// DYNAMIC, FIXED, RANDOM: keep k visual cells of seq at its next steps instead of the budget
// rule's K (k = 0: the rule again, k < 0: -1; llama_vp_reset clears it; K is clamped to [1, N_v]). Applies to a ubatch
// only when every sequence in it has one. A random selection at another run's per-step K is a budget-matched control.
LLAMA_API int32_t llama_vp_set_k(struct llama_context * ctx, llama_seq_id seq, int32_t k);

struct llama_vp_stats {
    int64_t step;      // decode steps with a selection so far for this seq
    int32_t n_kv;      // cells attended by the step (visible to the query)
    int32_t n_visual;  // N_v
    int32_t n_kept;    // K (N_v when nothing was dropped)
    float   mass;      // max over heads of the tau-softmax mass on visual cells
    float   mass_kept; // share of the visual attention mass (head mean) on the kept cells
    int32_t skipped;   // 1: the selection was skipped (min_pruned_layers), the step ran dense; mass is 0
};

// Quest pages (llama_vp_params.quest) of the last decode step of seq.
struct llama_vp_quest_stats {
    int32_t n_layers;    // layers that kept pages (0: the step ran those layers dense)
    int32_t n_pages;     // candidate pages: wholly visual pages of seq
    int32_t n_kept;      // pages kept per KV head and layer
    int32_t n_refreshed; // pages whose summaries the step made (new or rewritten cells)
    int32_t page;        // cells per page
};
LLAMA_API int32_t llama_vp_get_quest_stats(const struct llama_context * ctx, llama_seq_id seq,
                                           struct llama_vp_quest_stats * out); // 0, or -1 (none, bad arguments)
// Keep exactly these candidate pages (numbered 0.. in cell order, as n_pages counts them) of seq in every
// Quest layer and KV head instead of the bounds' choice (tests, tools); n = 0 goes back to the bounds.
// Pages at or past the step's count are ignored. Returns 0, or -1 (a negative page, bad arguments).
LLAMA_API int32_t llama_vp_set_quest_pages(struct llama_context * ctx, llama_seq_id seq, const int32_t * pages,
                                           int32_t n);

// Stats of the last decode step that involved seq; returns 0, or -1 if there is none (or bad arguments).
LLAMA_API int32_t llama_vp_get_stats(const struct llama_context * ctx, llama_seq_id seq, struct llama_vp_stats * out);
// Visual ordinals kept at the last step (ascending); returns their count (may exceed cap; writes
// min(count, cap)). ordinals = NULL with cap = 0 asks for the count alone; NULL with cap > 0, cap < 0
// or a bad seq is -1.
LLAMA_API int32_t llama_vp_get_kept(const struct llama_context * ctx, llama_seq_id seq, int32_t * ordinals,
                                    int32_t cap);
// Before a new prompt: reset the per-seq step counters, stats, STATIC rankings and FORCED sets, and
// mark the seq's decodes as prompt processing (never pruned nor counted as steps, a one-token prompt
// tail included) until llama_vp_begin_generation. seq < 0: every seq seen so far.
LLAMA_API void llama_vp_reset(struct llama_context * ctx, llama_seq_id seq);
// The prompt is in: the seq's next decode steps select (for STATIC, call it before the last prompt
// token, whose query ranks the visual cells once). A seq never reset selects at every decode step.
LLAMA_API void llama_vp_begin_generation(struct llama_context * ctx, llama_seq_id seq); // seq < 0: all

// Which backend computed the selection's ops (split over RPC servers or GPUs): off by default; on,
// every step with a selection records, for each op the VisionPulse hooks built, the backend that ran it.
LLAMA_API void llama_vp_trace_backends(struct llama_context * ctx, bool on);
// The last traced step's record, a line per op and backend: "OP COUNT BACKEND\n" (OP as ggml_op_desc
// names it, BACKEND as ggml_backend_name, which may hold spaces). Returns the text's length as snprintf does (writes at
// most cap - 1 characters and a NUL; buf may be NULL with cap 0), 0 when nothing was traced, -1 on bad arguments.
LLAMA_API int32_t llama_vp_op_backends(const struct llama_context * ctx, char * buf, int32_t cap);

#ifdef __cplusplus
}
#endif
