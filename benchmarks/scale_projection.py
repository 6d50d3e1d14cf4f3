"""A projection of a whole paper-settings kbvq run (256 x 4096 tokens, 2 bits, d = 4, 100 Lloyd iterations,
default rank) of each paper model on one A6000, from operation counts. Not a measurement: every
assumption is in ASSUMPTIONS and printed with the table.

Per stage and MoE layer, each term is (operations or bytes) / (rate x efficiency) on the device the
stage uses there: calibrate's forward in bf16 and its statistics in float32 (TF32 off) on the GPU;
klt-svd's Gram matrices in float32 (upper block triangle) and its Cholesky factors, eigendecompositions
(block Krylov for the leading eigenpairs of inputs wider than 8192) and KLT products in float64 on the GPU;
vq's k-means on the GPU (torch backend, `backend: auto` on CUDA), where each Lloyd step's score block
is memory-bound; bcos's closed form on the GPU (float32 products, float64 sums); every stage reads the model's weights from
disk once, and pack writes its output. Dense layers (DeepSeek-V2-Lite's first) count only in calibrate.
"""

from __future__ import annotations

from dataclasses import dataclass

from paper_models import PAPER_MODELS, paper_config

LEADING_ONLY_ABOVE = 8192  # stages/klt_svd/core.py: wider inputs get only their leading eigenpairs
# block Krylov steps and width: an allowance (a flat 2048-wide spectrum took 29 steps of 32 to the 1e-8 residual)
KRYLOV_BLOCKS, KRYLOV_BLOCK = 40, 32

ASSUMPTIONS = {
    "fp32 (non-tensor) TFLOP/s": 38.7, "bf16 tensor TFLOP/s": 154.8, "fp64 TFLOP/s": 38.7 / 64,
    "memory GB/s": 768.0, "PCIe GB/s": 25.0, "disk GB/s": 2.0, "compute efficiency": 0.5,
    "bandwidth efficiency": 0.7, "eigh flops": "9 n^3", "cholesky flops": "n^3 / 3", "tokens": 256 * 4096, "Lloyd iterations": 100,
    "codewords": 256, "vector length": 4,
}


@dataclass(frozen=True)
class Shapes:
    layers: int
    moe_layers: int
    experts: int
    top_k: int
    hidden: int
    inter: int
    shared: int  # shared-expert intermediate (0: none)
    attention_params: int  # per layer
    attention_spaces: tuple[int, ...]  # widths of the attention's recorded inputs
    params: int

    @classmethod
    def of(cls, name: str) -> "Shapes":
        c = paper_config(name)
        experts = next(getattr(c, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
                       if getattr(c, n, None))
        inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
        shared = getattr(c, "shared_expert_intermediate_size", 0) or (
            (getattr(c, "n_shared_experts", 0) or 0) * inter)
        dense = getattr(c, "first_k_dense_replace", 0) or 0
        if name == "deepseek-v2-lite":
            heads, h = c.num_attention_heads, c.hidden_size
            qk = c.qk_nope_head_dim + c.qk_rope_head_dim
            attention = h * heads * qk + h * (c.kv_lora_rank + c.qk_rope_head_dim) + \
                c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * h
            spaces = (h, c.kv_lora_rank, heads * c.v_head_dim)
        else:
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
            attention = c.hidden_size * (2 * q + 2 * kv)
            spaces = (c.hidden_size, q)
        from paper_models import parameter_count

        return cls(c.num_hidden_layers, c.num_hidden_layers - dense, experts, c.num_experts_per_tok,
                   c.hidden_size, inter, shared, attention, spaces, parameter_count(c))


def _rate(key: str) -> float:
    return ASSUMPTIONS[key] * 1e12 * ASSUMPTIONS["compute efficiency"]


def _bandwidth(key: str) -> float:
    return ASSUMPTIONS[key] * 1e9 * ASSUMPTIONS["bandwidth efficiency"]


def calibrate_seconds(s: Shapes) -> float:
    n, h, i = ASSUMPTIONS["tokens"], s.hidden, s.inter
    forward = 2 * n * (s.attention_params + s.top_k * 3 * h * i + 3 * h * s.shared)
    moments = 2 * n * (s.top_k * (h * h + i * i) + sum(d * d for d in s.attention_spaces) + h * h + s.shared ** 2)
    recompute = 2 * n * s.top_k * h * 2 * i  # the collector's own act(gate) * up per routed expert
    transfer = 2 * n * h * 4  # the layer's input to the GPU and its output back, float32
    return forward / _rate("bf16 tensor TFLOP/s") + (moments + recompute) / _rate("fp32 (non-tensor) TFLOP/s") + \
        transfer / _bandwidth("PCIe GB/s")


def klt_svd_seconds(s: Shapes) -> float:
    h, i, e = s.hidden, s.inter, s.experts
    grams = 0.6 * (2 * (2 * (e * i + s.shared) * h * h) + 2 * e * h * i * i)  # upper block triangle only
    cholesky = (h ** 3 + i ** 3) / 3  # the KLTs' T = chol(C): block input and pooled down input
    spectra, mapped = 0.0, 0.0
    for dim, count in ((h, 2), (i, 1)):  # gate and up share the block KLT; the pooled down its own
        if dim > LEADING_ONLY_ABOVE:  # the leading eigenpairs by block Krylov: T^T (G (T X)) per block
            spectra += count * KRYLOV_BLOCKS * 3 * 2 * dim * dim * KRYLOV_BLOCK
        else:
            spectra += count * 9 * dim ** 3
            mapped += count * 2 * 2 * dim ** 3  # T^T G T
    if s.shared:
        rows = min(h, s.shared)  # a shared down is decomposed from its row side (the smaller)
        spectra += 9 * rows ** 3
        mapped += 2 * h * s.shared * s.shared + 2 * h * h * s.shared
    return grams / _rate("fp32 (non-tensor) TFLOP/s") + (cholesky + spectra + mapped) / _rate("fp64 TFLOP/s")


def _matrices(s: Shapes) -> list[tuple[int, int]]:
    routed = [(s.inter, s.hidden)] * 2 + [(s.hidden, s.inter)]
    shared = [(s.shared, s.hidden)] * 2 + [(s.hidden, s.shared)] if s.shared else []
    return routed * s.experts + shared


def vq_seconds(s: Shapes) -> float:
    k, d, iters = ASSUMPTIONS["codewords"], ASSUMPTIONS["vector length"], ASSUMPTIONS["Lloyd iterations"]
    total = 0.0
    for oc, ic in _matrices(s):
        points = oc * ic // d
        scores = 2 * points * k * 4  # the [points, K] float32 score block, written and read once per step
        update = points * (4 * d + 8) * 4  # sort by cluster, cumulative sums, gathers
        per_step = max(2 * points * k * d / _rate("fp32 (non-tensor) TFLOP/s"), (scores + update) / _bandwidth("memory GB/s"))
        metrics = 3 * 2 * oc * ic * ic / _rate("fp32 (non-tensor) TFLOP/s")  # Tr(E C E^T) x 3, float32 products
        total += (iters + 1) * per_step + metrics
    return total


def bcos_seconds(s: Shapes) -> float:
    flops = sum(2 * 2 * oc * ic * ic for oc, ic in _matrices(s))  # [W; What] S_x, float32 products
    return flops / _rate("fp32 (non-tensor) TFLOP/s")


def io_seconds(s: Shapes) -> float:
    return 5 * 2 * s.params / _bandwidth("disk GB/s") / max(s.moe_layers, 1)  # five stages read the model


def projection(name: str) -> dict[str, float]:
    """Projected hours of each stage for the whole model, and their total."""
    s = Shapes.of(name)
    per_layer = {"calibrate": calibrate_seconds(s), "klt-svd": klt_svd_seconds(s), "vq": vq_seconds(s),
                 "bcos": bcos_seconds(s), "model reads": io_seconds(s)}
    hours = {stage: seconds * (s.layers if stage == "calibrate" else s.moe_layers) / 3600
             for stage, seconds in per_layer.items()}
    hours["total"] = sum(hours.values())
    return hours


def print_projection(names: list[str]) -> None:
    print("\nprojected hours of a whole paper-settings run on one A6000 (from operation counts, not measured):")
    print("assumptions: " + "; ".join(f"{key} {value}" for key, value in ASSUMPTIONS.items()))
    stages = ("calibrate", "klt-svd", "vq", "bcos", "model reads", "total")
    print(f"{'model':<18}" + "".join(f"{stage:>12}" for stage in stages))
    for name in names:
        hours = projection(name)
        print(f"{name:<18}" + "".join(f"{hours[stage]:>12.3f}" for stage in stages))


if __name__ == "__main__":
    import sys

    print_projection(sys.argv[1:] or list(PAPER_MODELS))
