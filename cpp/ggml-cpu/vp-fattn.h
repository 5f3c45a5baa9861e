// vp-gguf: a GQA-aware flash-attention decode kernel for ggml's CPU backend.
//
// Upstream's CPU kernel computes one query head at a time, so a decode step reads
// every K/V row once per query head of its group (8 times for 16 query over 2 KV
// heads). This one takes the query heads of a group together: each K row and each
// V row is read once per group, and runs of fully masked cells (VisionPulse's
// holes, the causal tail) are skipped without touching K or V.
//
// Called first by ggml_compute_forward_flash_attn_ext (patch 0005); returns false
// for the shapes it does not handle, which then take upstream's path unchanged.
#pragma once

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;
struct ggml_tensor;

// true when dst (a GGML_OP_FLASH_ATTN_EXT node) was computed here; every thread of the
// op calls it and gets the same answer
bool vp_fattn_decode(const struct ggml_compute_params * params, struct ggml_tensor * dst);

// on by default; off sends every node to upstream's kernel (the speed benchmark's
// "upstream" rows, and the equivalence test's second opinion)
void vp_fattn_set_enabled(bool enabled);

// bytes of work buffer the kernel needs for this node with n_tasks threads (0 if it
// would not take the node)
size_t vp_fattn_work_size(const struct ggml_tensor * node, int n_tasks);

#ifdef __cplusplus
}
#endif
