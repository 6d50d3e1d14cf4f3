"""The upcycled test-bed: a dense model trained first, its MLP copied into every expert, then trained as an MoE.

Made the way Qwen1.5-MoE and Mixtral were made (from a dense model), so its experts start identical and
stay correlated: the test-bed on which IDRE's shared basis (docs/method.md §2) has something to find.

1. Dense phase: the same `Qwen2MoeForCausalLM` with one routed expert used by every token (its
   softmax weight is exactly 1: a dense MLP beside the shared expert), `dense_steps` steps.
2. Upcycling: every weight copied into the MoE model of the base variant's architecture, the one expert
   into all E; the router keeps its seeded random initialisation. With `norm_topk_prob=False` the routed
   output is `sum_{top-k} p_e f(x)`, and a near-uniform router gives `p_e ~ 1/E`, so each copy's
   `down_proj` is scaled by `E / k`: the upcycled model then computes about what the dense one did.
   No perturbation is added: the random router already sends different tokens to different experts
   from the first step, so their gradients differ and the copies drift apart, deterministically.
3. MoE phase: `moe_steps` steps with the per-layer balance loss (`train.py`), a fresh warm-up and cosine.

The same training split, tokenizer and evaluation as the from-scratch variants (`build.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from kbvq_cli.testbed.model import VARIANTS, Variant

CODE_MODULES = ("upcycle.py",)  # hashed into the build key of these variants only


@dataclass(frozen=True)
class UpcycledVariant:
    """An upcycled test-bed: `base` gives the architecture, corpus and evaluation; the rest the schedule."""

    name: str
    base: Variant
    dense_steps: int
    moe_steps: int
    moe_peak_lr: float
    moe_warmup_steps: int
    code_modules: tuple[str, ...] = CODE_MODULES

    def __getattr__(self, name: str) -> Any:  # architecture, corpus and evaluation fields: the base's
        if name == "base":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def steps(self) -> int:
        return self.dense_steps + self.moe_steps

    def dense_variant(self) -> Variant:
        return replace(self.base, num_experts=1, experts_per_token=1, steps=self.dense_steps)

    def moe_variant(self) -> Variant:
        # Another seed: the router's initialisation and the MoE phase's batch order differ from the dense phase's.
        return replace(self.base, steps=self.moe_steps, peak_lr=self.moe_peak_lr,
                       warmup_steps=self.moe_warmup_steps, seed=self.base.seed + 2)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base.to_json(), "dense_steps": self.dense_steps,
                "moe_steps": self.moe_steps, "moe_peak_lr": self.moe_peak_lr,
                "moe_warmup_steps": self.moe_warmup_steps}


UPCYCLED: dict[str, UpcycledVariant] = {
    # The full test-bed's architecture and token budget (1000 steps of 16 x 256), split half dense, half MoE.
    "upcycled": UpcycledVariant("upcycled", replace(VARIANTS["full"], name="upcycled"), dense_steps=500,
                                moe_steps=500, moe_peak_lr=1e-3, moe_warmup_steps=20),
    # The mini test-bed's, for tests: 120 + 120 steps.
    "upcycled-mini": UpcycledVariant("upcycled-mini", replace(VARIANTS["mini"], name="upcycled-mini"),
                                     dense_steps=120, moe_steps=120, moe_peak_lr=1.5e-3, moe_warmup_steps=10),
}


def upcycle(dense, moe, experts_per_token: int) -> None:
    """Copy the one-expert `dense` model into `moe` in place: every parameter but the routers
    (`mlp.gate.weight`, kept as initialised), the expert into all E with `down_proj` scaled by E / k."""
    import torch

    source = dict(dense.named_parameters())
    with torch.no_grad():
        for name, parameter in moe.named_parameters():
            if name.endswith(".mlp.gate.weight"):
                continue
            value = source[name]
            if ".mlp.experts." in name:
                count = parameter.shape[0]
                value = value.expand_as(parameter) * (count / experts_per_token if name.endswith("down_proj") else 1)
            parameter.copy_(value)


def train_upcycled(variant: UpcycledVariant, sequences, eos_token_id: int,
                   progress: Callable) -> tuple[Any, dict[str, Any]]:
    """Both phases on `sequences` (int64 [n, seq_len]): (the trained MoE model, {phase: training record}).
    `progress(steps)` is a context manager yielding train_model's `on_step` (build.training_progress)."""
    from kbvq_cli.testbed.model import new_model
    from kbvq_cli.testbed.train import train_model

    records = {}
    dense = new_model(variant.dense_variant(), eos_token_id)
    with progress(variant.dense_steps) as on_step:
        records["dense"] = train_model(dense, sequences, variant.dense_variant(), on_step)
    moe = new_model(variant.moe_variant(), eos_token_id)
    upcycle(dense, moe, variant.experts_per_token)
    del dense
    with progress(variant.moe_steps) as on_step:
        records["moe"] = train_model(moe, sequences, variant.moe_variant(), on_step)
    return moe, {phase: asdict(summary) for phase, summary in records.items()}
