// The C API of cpp/include/llama-visionpulse.h: presets, settings validated once, marks, sets and stats.

#include "llama-vp.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

static thread_local std::string g_vp_error;

static int32_t vp_fail(int32_t code, const std::string & msg) {
    g_vp_error = msg;
    return code;
}

void llama_vp_free(llama_vp_context * vp) {
    delete vp;
}

static llama_vp_context * vp_of(const llama_context * ctx) {
    return ctx ? ctx->get_cparams().vp : nullptr;
}

// A sequence of this context: [0, n_seq_max), the context's own limit. LLAMA_MAX_SEQ is only
// the library's: the KV cache has one stream per context sequence and asserts on any other.
static bool vp_seq_ok(const llama_context * ctx, llama_seq_id seq) {
    return ctx && seq >= 0 && (uint32_t) seq < ctx->n_seq_max();
}

// 0, or -1 with the reason in llama_vp_last_error(): a null context or seq not one of its sequences
static int32_t vp_check_seq(const llama_context * ctx, llama_seq_id seq) {
    if (!ctx) return vp_fail(-1, "null context");
    if (vp_seq_ok(ctx, seq)) return 0;
    return vp_fail(-1, "sequence id " + std::to_string(seq) + " out of range [0, " + std::to_string(ctx->n_seq_max()) +
                           ") (the context's n_seq_max)");
}

// The documented "seq < 0: all" functions: any negative seq, or one of the context's sequences.
static int32_t vp_check_seq_or_all(const llama_context * ctx, llama_seq_id seq) {
    return seq < 0 && ctx ? 0 : vp_check_seq(ctx, seq);
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
    p.prune_anchor       = false;
    p.auto_mark          = true;
    p.first_pruned_layer = -1;
    p.attn               = LLAMA_VP_ATTN_AUTO;
    p.lagged             = false;
    p.prune_swa          = false;
    p.min_pruned_layers  = 2;
    p.quest              = LLAMA_VP_QUEST_OFF;
    p.quest_page         = 16;
    p.quest_first_layer  = 2;
    p.quest_budget_min   = 0.25f;
    p.quest_budget_max   = 0.75f; // a cap of 50% lost 2 of 6 video answers, 75% none (docs/quest/video-curve)
    if (preset == 10) {
        p.tau        = 0.4f;
        p.budget_min = 0.05f;
        p.budget_max = 0.10f;
        p.ratio      = 0.10f;
    } else if (preset != 5) {
        p.mode = LLAMA_VP_MODE_NONE;
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

// Whether the selection can pay on this model: the full-attention layers it prunes must be at
// least min_pruned_layers (sliding-window layers stay dense unless prune_swa, and cost what
// their window holds either way).
static void vp_decide_skip(llama_vp_context & vp, const llama_hparams & hp, int32_t n_layer) {
    const llama_vp_mode m       = vp.params.mode;
    const bool          selects = m == LLAMA_VP_MODE_DYNAMIC || m == LLAMA_VP_MODE_FIXED || m == LLAMA_VP_MODE_RANDOM ||
                                  m == LLAMA_VP_MODE_STATIC;
    int32_t             n_full  = 0;
    for (int32_t il = std::max(vp.first_pruned, 0); il < n_layer; ++il) {
        n_full += hp.is_swa(il) ? 0 : 1;
    }
    vp.skip = selects && n_full < vp.params.min_pruned_layers;
    vp.skip_reason.clear();
    if (vp.skip) {
        vp.skip_reason = "the selection is skipped: it would prune " + std::to_string(n_full) +
                         " full-attention layer(s) after the anchor (layer " + std::to_string(vp.anchor) +
                         "), fewer than min_pruned_layers = " + std::to_string(vp.params.min_pruned_layers) +
                         ", so it cannot pay for its probe; steps run dense";
    }
}

const char * llama_vp_skip_reason(const struct llama_context * ctx) {
    const llama_vp_context * vp = vp_of(ctx);
    return vp && vp->enabled && vp->skip ? vp->skip_reason.c_str() : nullptr;
}

// An enum field as the int a C caller stored: reading a value outside the enumerators through the
// enum type is undefined behaviour in C++ (UBSan reports mode = 99 from ctypes), so check the bytes.
template <typename E> static int32_t vp_raw_enum(const E & e) {
    static_assert(sizeof(E) == sizeof(int32_t), "C enums are int-sized");
    int32_t v;
    std::memcpy(&v, &e, sizeof v);
    return v;
}

int32_t llama_vp_check_params(const struct llama_vp_params * params) {
    if (!params) return vp_fail(-1, "null parameters");
    const llama_vp_params & p    = *params;
    const int32_t           mode = vp_raw_enum(p.mode);
    const int32_t           attn = vp_raw_enum(p.attn);
    if (mode < LLAMA_VP_MODE_DENSE || mode > LLAMA_VP_MODE_FORCED) {
        return vp_fail(-1, "unknown mode " + std::to_string(mode));
    }
    if (!std::isfinite(p.tau) || p.tau <= 0.0f) return vp_fail(-1, "tau must be a finite number > 0");
    if (!vp_frac_ok(p.budget_min) || !vp_frac_ok(p.budget_max))
        return vp_fail(-1, "budget_min and budget_max must be finite and in (0, 1]");
    if (p.budget_min > p.budget_max) return vp_fail(-1, "budget_min exceeds budget_max");
    if (!vp_frac_ok(p.ratio)) return vp_fail(-1, "ratio must be finite and in (0, 1]");
    if (p.min_pruned_layers < 0) return vp_fail(-1, "min_pruned_layers must be >= 0");
    if (attn < LLAMA_VP_ATTN_AUTO || attn > LLAMA_VP_ATTN_GATHER) {
        return vp_fail(-1, "unknown attention path " + std::to_string(attn) + " (0 auto, 1 mask, 2 gather)");
    }
    const int32_t quest = vp_raw_enum(p.quest);
    if (quest < LLAMA_VP_QUEST_OFF || quest > LLAMA_VP_QUEST_RANDOM) {
        return vp_fail(-1, "unknown quest " + std::to_string(quest) + " (0 off, 1 bound, 2 random)");
    }
    if (quest != LLAMA_VP_QUEST_OFF) {
        if (p.lagged) return vp_fail(-1, "quest and lagged both choose the layers below the anchor: pick one");
        if (p.quest_page < 1 || p.quest_page > 256 || (p.quest_page & (p.quest_page - 1)) != 0) {
            return vp_fail(-1, "quest_page must be a power of two in [1, 256] (the cache pads its cells to 256)");
        }
        if (p.quest_first_layer < 0) return vp_fail(-1, "quest_first_layer must be >= 0");
        if (!vp_frac_ok(p.quest_budget_min) || !vp_frac_ok(p.quest_budget_max)) {
            return vp_fail(-1, "quest_budget_min and quest_budget_max must be finite and in (0, 1]");
        }
        if (p.quest_budget_min > p.quest_budget_max) return vp_fail(-1, "quest_budget_min exceeds quest_budget_max");
    }
    return 0;
}

int32_t llama_vp_enable(struct llama_context * ctx, const struct llama_vp_params * params) {
    if (!ctx) return vp_fail(-1, "null context");
    if (llama_vp_check_params(params) != 0) return -1;
    const llama_vp_params & p = *params;

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
    const int32_t first = p.first_pruned_layer >= 0 ? p.first_pruned_layer : p.prune_anchor ? anchor : anchor + 1;
    if (first > n_layer) {
        return vp_fail(-1, "first_pruned_layer out of range");
    }
    if (first < anchor && p.mode != LLAMA_VP_MODE_FORCED) {
        return vp_fail(-1, "only FORCED mode can prune below the anchor layer (the selection is made there)");
    }
    llama_vp_context * vp = vp_of(ctx);
    if (!vp) vp = new llama_vp_context();
    vp->quest.clear(); // the cells were not watched while it was off, and the page size may change
    vp->params       = p;
    vp->anchor       = anchor;
    vp->first_pruned = first;
    vp->enabled      = true;
    vp_decide_skip(*vp, hp, n_layer);
    vp->rng.seed(p.seed);
    ctx->set_vp(vp);
    return 0;
}

void llama_vp_disable(struct llama_context * ctx) {
    llama_vp_context * vp = vp_of(ctx);
    if (vp && vp->enabled) {
        vp->enabled = false;
        vp->quest.clear();
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

// Quest's page summaries no longer hold (the cells may hold other keys than when they were made).
static void vp_quest_forget(llama_vp_context & vp) {
    for (auto & pg : vp.quest.pages) {
        pg.valid = false;
    }
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

void llama_vp_trace_backends(struct llama_context * ctx, bool on) {
    if (!ctx) return;
    llama_vp_context * vp = vp_state(ctx);
    vp->trace_backends    = on;
    if (!on) vp->op_backends.clear();
}

int32_t llama_vp_op_backends(const struct llama_context * ctx, char * buf, int32_t cap) {
    if (!ctx || cap < 0 || (!buf && cap > 0)) return -1;
    const llama_vp_context * vp = vp_of(ctx);
    std::string              text;
    if (!vp) {
        if (cap > 0) buf[0] = '\0';
        return 0;
    }
    for (const auto & [key, n] : vp->op_backends) {
        text += key.first + " " + std::to_string(n) + " " + key.second + "\n";
    }
    if (cap > 0) snprintf(buf, (size_t) cap, "%s", text.c_str());
    return (int32_t) text.size();
}

int32_t llama_vp_mark_visual(struct llama_context * ctx, llama_seq_id seq, llama_pos p0, llama_pos p1) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    if (p1 <= p0 || p0 < 0) return vp_fail(-1, "empty or negative position range");
    llama_vp_context * vp = vp_state(ctx);
    vp->seqs[seq].marks.emplace_back(p0, p1);
    vp_quest_forget(*vp); // marks come after a state load, which writes cells without a decode: summarize again
    return 0;
}

int32_t llama_vp_clear_marks(struct llama_context * ctx, llama_seq_id seq) {
    if (vp_check_seq_or_all(ctx, seq) != 0) return -1;
    llama_vp_context * vp = vp_of(ctx);
    if (!vp) return 0;
    for (auto & [s, st] : vp->seqs) {
        if (seq < 0 || s == seq) st.marks.clear();
    }
    vp_quest_forget(*vp);
    return 0;
}

int32_t llama_vp_n_visual(struct llama_context * ctx, llama_seq_id seq) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    llama_vp_context *     vp  = vp_state(ctx);
    auto *                 mem = ctx->get_memory();
    const llama_kv_cache * kv  = dynamic_cast<const llama_kv_cache *>(mem);
    if (!kv) {
        if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem)) kv = iswa->get_base();
    }
    if (!kv) return vp_fail(-2, "the context's memory is not a KV cache");
    const auto & cells = kv->get_cells(seq);
    return (int32_t) llama_vp_visual_cells(*vp, cells, cells.size(), seq).size();
}

int32_t llama_vp_set_forced(struct llama_context * ctx, llama_seq_id seq, const int32_t * ordinals, int32_t n) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    if (n < 0 || (n > 0 && !ordinals)) return vp_fail(-1, "invalid ordinals: n < 0, or a null array with n > 0");
    if (std::any_of(ordinals, ordinals + n, [](int32_t o) { return o < 0; })) {
        return vp_fail(-1, "invalid ordinals: negative ordinal");
    }
    auto & st = vp_state(ctx)->seqs[seq];
    st.forced.assign(ordinals, ordinals + n);
    std::sort(st.forced.begin(), st.forced.end());
    st.forced.erase(std::unique(st.forced.begin(), st.forced.end()), st.forced.end());
    st.has_forced = true;
    return 0;
}

int32_t llama_vp_get_stats(const struct llama_context * ctx, llama_seq_id seq, struct llama_vp_stats * out) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    if (!out) return vp_fail(-1, "null stats pointer");
    const llama_vp_context * vp = vp_of(ctx);
    if (!vp) return -1;
    auto it = vp->seqs.find(seq);
    if (it == vp->seqs.end() || !it->second.has_stats) return -1;
    *out = it->second.stats;
    return 0;
}

int32_t llama_vp_get_quest_stats(const struct llama_context * ctx, llama_seq_id seq,
                                 struct llama_vp_quest_stats * out) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    if (!out) return vp_fail(-1, "null stats pointer");
    const llama_vp_context * vp = vp_of(ctx);
    if (!vp) return -1;
    auto it = vp->seqs.find(seq);
    if (it == vp->seqs.end() || !it->second.has_quest) return -1;
    *out = it->second.quest;
    return 0;
}

int32_t llama_vp_set_quest_pages(struct llama_context * ctx, llama_seq_id seq, const int32_t * pages, int32_t n) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    if (n < 0 || (n > 0 && !pages)) return vp_fail(-1, "invalid pages: n < 0, or a null array with n > 0");
    if (std::any_of(pages, pages + n, [](int32_t x) { return x < 0; })) {
        return vp_fail(-1, "invalid pages: negative page");
    }
    vp_state(ctx)->seqs[seq].quest_pages.assign(pages, pages + n);
    return 0;
}

int32_t llama_vp_get_kept(const struct llama_context * ctx, llama_seq_id seq, int32_t * ordinals, int32_t cap) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    if (cap < 0 || (cap > 0 && !ordinals)) return vp_fail(-1, "invalid buffer: cap < 0, or a null array with cap > 0");
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
    if (vp_check_seq_or_all(ctx, seq) != 0) return;
    llama_vp_context * vp = seq >= 0 ? vp_state(ctx) : vp_of(ctx);
    if (!vp) return;
    if (seq >= 0) vp->seqs[seq]; // a seq reset before its first decode starts in the prompt phase too
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
        st.prompt     = true;
        st.k_given    = 0;
        st.quest_pages.clear();
        st.quest     = {};
        st.has_quest = false;
    }
}

void llama_vp_begin_generation(struct llama_context * ctx, llama_seq_id seq) {
    if (vp_check_seq_or_all(ctx, seq) != 0) return;
    llama_vp_context * vp = vp_of(ctx);
    if (!vp) return;
    for (auto & [s, st] : vp->seqs) {
        if (seq < 0 || s == seq) st.prompt = false;
    }
}

int32_t llama_vp_set_k(struct llama_context * ctx, llama_seq_id seq, int32_t k) {
    if (vp_check_seq(ctx, seq) != 0) return -1;
    if (k < 0) return vp_fail(-1, "k must be >= 0 (0: the budget rule's K)");
    vp_state(ctx)->seqs[seq].k_given = k;
    return 0;
}
