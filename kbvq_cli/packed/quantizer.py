"""kbvq as a transformers quantization method, so a pack loads with the standard call:

    import kbvq_cli  # registers "kbvq" (kbvq_cli.packed.registration), importing neither torch nor transformers
    model = AutoModelForCausalLM.from_pretrained("RUN/pack", dtype="auto", device_map="cuda")

transformers reads the pack's `config.json`, finds `quantization_config.quant_method == "kbvq"` and builds
`KbvqHfQuantizer`; `model.safetensors.index.json` gives it the shards. Before any tensor is read the
quantizer verifies the whole pack against its manifest (`kbvq_cli.packed.integrity`) and installs the
runtime modules on the meta skeleton from the shards' headers (`kbvq_cli.packed.install`); transformers
then fills every buffer by name, and afterwards the codes are put in their resident layout.
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from kbvq_cli.errors import KbvqError
from kbvq_cli.packed.layout import FORMAT, FORMAT_VERSION


class KbvqConfig(QuantizationConfigMixin):
    """A pack's `quantization_config` as `kbvq pack` wrote it (method, bits, vector length, ranks, modules):
    every key is kept, so the loaded model's config says how it was quantized."""

    def __init__(self, quant_method: str = FORMAT, format_version: int = FORMAT_VERSION, **settings):
        if format_version > FORMAT_VERSION:
            raise KbvqError(f"this pack has format version {format_version}; this kbvq reads up to "
                            f"{FORMAT_VERSION}: upgrade kbvq")
        self.quant_method = FORMAT
        self.format_version = format_version
        for key, value in settings.items():
            setattr(self, key, value)


class KbvqHfQuantizer(HfQuantizer):
    """Loads packs only (`requires_calibration`): quantizing happens in kbvq's own stages."""

    requires_calibration = True

    def validate_environment(self, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise KbvqError("kbvq packs cannot be offloaded to disk; pass device_map='cpu' or a GPU")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        from kbvq_cli.adapters import adapter_for
        from kbvq_cli.packed.install import install_pack_modules

        files = verified_shards(checkpoint_files)
        install_pack_modules(model, adapter_for(model.config.model_type), files, dtype or model.dtype)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from kbvq_cli.packed.install import finish_pack_modules

        finish_pack_modules(model)
        return model

    def is_serializable(self) -> bool:
        return False  # a pack is written by `kbvq pack`, from the run's stages

    @property
    def is_trainable(self) -> bool:
        return False


def verified_shards(checkpoint_files: list[str] | None) -> list[Path]:
    """The shards transformers is about to read, after checking every file of their pack (one-line
    KbvqError otherwise), and that they are the pack's own units."""
    from kbvq_cli.packed.integrity import pack_directory, repair_hint

    if not checkpoint_files:
        raise KbvqError("transformers found no shards for this kbvq pack; it needs its model.safetensors.index.json")
    files = [Path(name) for name in checkpoint_files]
    stage_dir = pack_directory(files[0].parent)
    units = {record["file"] for record in stage_dir.manifest["units"].values()}
    if {file.name for file in files} != units:
        raise KbvqError(f"the index in {stage_dir.path} names other shards than its manifest; "
                        f"{repair_hint(stage_dir.path, stage_dir.manifest)}")
    return files


def register() -> None:
    """Register the config and quantizer under "kbvq" (once per process)."""
    if FORMAT not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(FORMAT)(KbvqConfig)
        register_quantizer(FORMAT)(KbvqHfQuantizer)


# Importing this module registers kbvq, whichever of it and transformers' registry is imported first
# (kbvq_cli.packed.registration imports it right after the registry).
register()
