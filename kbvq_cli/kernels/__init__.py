"""Compute kernels for packed VQ models: the matmul with `dequant(indices, codebook)` and the projection
around it, on a backend chosen by `KBVQ_KERNELS` (reference | torch | cpu | triton | auto). A library
package: it imports nothing from `stages/`. See docs/kernels.md.

    vq_matmul(x [T, ic], indices [oc, ic/d], codebook [K, d]) -> [T, oc]
    vq_experts_forward(x [N, ic], offsets [n+1], indices [n, oc, ic/d], codebook [n, K, d]) -> [N, oc] float32
    projection_forward(x [N, ic], parts: VqParts, offsets [n+1] | None) -> [N, oc]
    moe_experts_forward(hidden, top_k_index, top_k_weights, gate, up, down, act_fn) -> [T, H]
    group_by_expert(top_k_index [T, k], num_experts) -> (token [N], slot [N], offsets [n+1])
"""

from kbvq_cli.kernels.api import BACKENDS, resolve_backend, vq_experts_forward, vq_matmul
from kbvq_cli.kernels.projection import VqParts, group_by_expert, moe_experts_forward, projection_forward

__all__ = ["BACKENDS", "VqParts", "group_by_expert", "moe_experts_forward", "projection_forward",
           "resolve_backend", "vq_experts_forward", "vq_matmul"]
