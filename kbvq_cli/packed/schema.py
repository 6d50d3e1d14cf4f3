"""The metadata of one packed unit, defined once: written by `kbvq pack`, read by the loader, the dense
export and `kbvq report`. The tensor names of a unit are in `kbvq_cli.packed.layout`.

A unit is a decoder layer (`layer_NNN`) or `model_rest`. A quantized MoE layer is in one of two formats:
- `vq`: KBVQ or plain VQ codes (`bits`, `dim`), the decomposed parts' side and rank, whether the shared
  expert's gate/up were stacked with the routed experts (`shared_stacked`), whether BCOS corrects it;
  `code_sizes` (projection -> [bits, dim]) where a bit budget gave the projections other code sizes
  than `bits`, `dim` (absent otherwise, and in packs made before it existed: every projection at those);
- `scalar`: RTN/GPTQ integer codes (`bits`, `group_size`).
`nonexpert` lists the layer's non-expert linears quantized by `kbvq nonexpert`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VQ, SCALAR = "vq", "scalar"


@dataclass(frozen=True)
class PackedPart:
    side: str  # "input" or "output": which side of the matrices the basis is shared on
    rank: int


@dataclass(frozen=True)
class PackedLinear:
    """A non-expert linear quantized by RTN/GPTQ."""

    shape: tuple[int, int]
    bits: int
    group_size: int


@dataclass(frozen=True)
class PackedUnitMeta:
    layer: int | None = None  # None for model_rest
    moe: bool = False  # a quantized MoE layer
    format: str = VQ
    bits: int = 0
    dim: int = 0  # vq
    group_size: int = 0  # scalar
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # "gate" / "shared.gate" -> (oc, ic)
    parts: dict[str, PackedPart] = field(default_factory=dict)  # vq: klt-svd's decomposed parts
    shared_path: str | None = None  # the shared expert's module path in the layer, if it has one
    shared_stacked: dict[str, bool] = field(default_factory=dict)  # vq
    corrected: bool = False  # vq: BCOS scale and shift present
    nonexpert: dict[str, PackedLinear] = field(default_factory=dict)
    storage: dict = field(default_factory=dict)  # kbvq_cli.packed.storage.unit_storage
    code_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # vq: projection -> (bits, dim)

    @property
    def index_width(self) -> int:
        """Bits per stored code: `b d` for VQ indices, `b` for RTN/GPTQ codes (the layer's own, see
        `projection_width` for a projection's)."""
        return self.bits * self.dim if self.format == VQ else self.bits

    def code_size(self, projection: str) -> tuple[int, int]:
        """(bits, dim) of a VQ projection (`gate`, `up`, `down`; a shared expert's take the same)."""
        return self.code_sizes.get(projection, (self.bits, self.dim))

    def projection_width(self, projection: str) -> int:
        """Bits per stored code of one projection's matrices."""
        if self.format != VQ:
            return self.bits
        bits, dim = self.code_size(projection)
        return bits * dim

    def to_json(self) -> dict:
        data: dict = {"storage": self.storage}
        if self.layer is not None:
            data["layer"] = self.layer
            data["moe"] = self.moe
        if self.moe:
            data.update(format=self.format, bits=self.bits, shapes={k: list(v) for k, v in self.shapes.items()},
                        shared_path=self.shared_path)
            if self.format == VQ:
                data.update(dim=self.dim, corrected=self.corrected, shared_stacked=self.shared_stacked,
                            parts={k: {"side": p.side, "rank": p.rank} for k, p in self.parts.items()})
                if self.code_sizes:
                    data["code_sizes"] = {k: list(v) for k, v in self.code_sizes.items()}
            else:
                data["group_size"] = self.group_size
        if self.nonexpert:
            data["nonexpert"] = {path: {"shape": list(m.shape), "bits": m.bits, "group_size": m.group_size}
                                 for path, m in self.nonexpert.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "PackedUnitMeta":
        return cls(layer=data.get("layer"), moe=bool(data.get("moe")), format=data.get("format", VQ),
                   bits=int(data.get("bits", 0)), dim=int(data.get("dim", 0)),
                   group_size=int(data.get("group_size", 0)),
                   shapes={k: tuple(v) for k, v in data.get("shapes", {}).items()},
                   parts={k: PackedPart(p["side"], int(p["rank"])) for k, p in data.get("parts", {}).items()},
                   shared_path=data.get("shared_path"), shared_stacked=dict(data.get("shared_stacked", {})),
                   corrected=bool(data.get("corrected")),
                   nonexpert={path: PackedLinear(tuple(m["shape"]), int(m["bits"]), int(m["group_size"]))
                              for path, m in data.get("nonexpert", {}).items()},
                   storage=dict(data.get("storage", {})),
                   code_sizes={k: (int(v[0]), int(v[1])) for k, v in data.get("code_sizes", {}).items()})
