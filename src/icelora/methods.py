"""Named editing methods: each one is an objective combined with a parameterization.

FT-L, FT-M, LoRA, ICE and ICE-LoRA are presets of :class:`EditConfig`, run by the one editing loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icelora.config import EditConfig, read_config_file
from icelora.errors import InvalidConfigError

METHOD_PRESETS: dict[str, dict[str, Any]] = {
    # EasyEdit's FT-L: target tokens scored at the last prompt position, MLP output matrices,
    # elementwise clamp around the original weights.
    "ft-l": dict(objective="ft-last", parameterization="full", target_modules=["mlp_out"],
                 learning_rate=5e-4, max_steps=25, clamp=5e-4),
    # KnowEdit's FT-M: cross-entropy on the target tokens, MLP output matrices.
    "ft-m": dict(objective="ft", parameterization="full", target_modules=["mlp_out"],
                 learning_rate=5e-4, max_steps=25),
    # Cross-entropy on the target, trained into LoRA adapters.
    "lora": dict(objective="ft", parameterization="lora", learning_rate=2e-3, max_steps=25),
    # ICE as published: the reference objective on full MLP output matrices with the clamp.
    "ice": dict(objective="ice-reference", parameterization="full", target_modules=["mlp_out"],
                learning_rate=7e-4, max_steps=25, clamp=5e-4, temperature=100.0, completion_length=3),
    # ICE-LoRA: the clean ICE objective trained into LoRA adapters on the MLP projections, with early
    # stopping after 4 flat steps, a locality term on anchors asking the edited subject's other
    # relations, adapters kept blind to the leading input directions of those anchors (98% of their
    # energy) and, when edits accumulate, replay of 4 earlier edits per step, each with one of its
    # own anchors (chosen on validation records: reports/tuning.md).
    "ice-lora": dict(objective="ice", parameterization="lora", learning_rate=2e-3, max_steps=25,
                     lambda_ice=1.0, target_modules=["mlp_in", "mlp_out"], early_stopping=True,
                     early_stop_patience=4, lambda_locality=4.0, locality_anchor_kind="relation",
                     lora_projection_energy=0.98, replay_edits=4, replay_anchors=1),
}

METHODS = tuple(METHOD_PRESETS)


def method_config(method: str, **overrides: Any) -> EditConfig:
    """The preset of ``method`` with ``overrides`` applied as given, ``None`` included
    (``lora_projection_energy=None``, or ``null`` in a configuration file, turns the preset's off)."""
    if method not in METHOD_PRESETS:
        raise InvalidConfigError(f"unknown method {method!r}; choose from {list(METHODS)}")
    return EditConfig.from_dict({**METHOD_PRESETS[method], **overrides}, source=f"method {method!r}")


def config_from_file(path: str | Path | None, method: str | None = None,
                     **overrides: Any) -> tuple[str, EditConfig]:
    """The method and configuration a YAML file of keys makes: ``method`` (else the file's
    ``method``, else ``ice-lora``), its preset, then the file's keys, then ``overrides``.
    ``path=None``: the preset alone."""
    settings = read_config_file(path) if path else {}
    file_method = settings.pop("method", None)
    method = method or file_method or "ice-lora"
    return method, method_config(method, **{**settings, **overrides})
