"""The configuration of one editing run: objective, parameterization and their hyperparameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from icelora.architecture import MODULE_ROLES
from icelora.errors import InvalidConfigError

OBJECTIVES = ("ft", "ft-last", "ice", "ice-reference")
PARAMETERIZATIONS = ("lora", "full")
LOCALITY_ANCHOR_KINDS = ("general", "subject", "relation")
LORA_PROJECTION_SCOPES = ("adapter", "edit")
LORA_INITS = ("random", "edit_inputs")
#: float16 is left out: its gradients need loss scaling, which the editing loop does not do.
AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16}


@dataclass
class EditConfig:
    """Every knob of the editing loop. Methods (``icelora.methods``) are named presets of it.

    objective: ``ft`` (cross-entropy on the target tokens), ``ft-last`` (the target tokens scored at
        the last prompt position, EasyEdit's FT-L), ``ice`` (``L_FT + lambda_ice * L_ICE``) or
        ``ice-reference`` (the ICE reference implementation's loss terms).
    parameterization: ``lora`` (PEFT adapters) or ``full`` (the selected weight matrices themselves).
    layers: decoder layers to edit; ``None`` picks 5 consecutive layers at ~15% depth.
    target_modules: roles to edit in those layers: ``attn_qv``, ``mlp_in``, ``mlp_out``.
    clamp: for ``full``, keep every trained element within ``theta0 +- clamp`` (``None``: no clamp).
    num_contexts / samples_per_context / completion_length / temperature: the ICE sampling of
        self-induced completions ``x_c`` from the context-conditioned model (the samples after one
        context share its prefill).
    contexts_per_step: ``ice`` only: each step samples after this many of a request's contexts, a
        window that moves on by as many every step, so all of them take turns equally often (step
        ``s`` uses contexts ``s*k .. s*k+k-1`` modulo their number); ``None``: all of them every
        step. Fewer contexts per step make each step cheaper and the ICE term noisier.
    sample_every: ``ice`` only: draw fresh completions ``x_c`` (and their teacher distributions,
        from the context-conditioned pass) at the first step and every this many steps after; the
        steps between train on the same draw and skip the sampling passes. 1: every step (ICE as
        published). A larger value makes the steps between cheaper and the teacher up to that many
        steps old.
    lambda_locality / locality_anchors: weight of ``KL(p_before || p_edited)`` on that many anchor
        texts per step (:mod:`icelora.anchors`); 0 turns it off.
    locality_anchor_kind: ``general`` (fixed unrelated texts), ``subject`` (prompts about each
        request's subject, continued by the unedited model's greedy tokens) or ``relation`` (the
        subject's other relations, asked for common Wikidata properties, continued likewise).
    lora_projection_energy: LoRA only: keep each adapter's input projection ``A`` orthogonal to
        the leading directions of the inputs its module receives on the edit's locality anchors
        before the edit (those holding this share of their energy), so the update cannot act on
        them (:mod:`icelora.input_projection`); ``None``: off. Each edit call protects its own
        anchors; with ``lambda_locality`` 0 the anchors are made for the projection alone and no
        KL term is trained on them.
    lora_projection_scope: what that projection applies to: ``adapter``, the whole of ``A`` (in
        sequential editing, the part earlier edits put there included), or ``edit``, only what
        the current edit call adds to it (earlier edits' part is kept; an adapter that has
        learned nothing yet, ``B = 0``, is projected whole, so a first edit is the same under both);
        ``edit`` needs ``lora_projection_energy``.
    lora_projection_gradients: with ``lora_projection_energy``, also project each step's gradient
        of ``A`` off the protected directions before the optimizer step, so Adam's moments hold
        only what the adapter may learn (the update is still projected after the step: Adam's
        per-element scaling can turn a projected gradient back into the protected directions).
    loraplus_lr_ratio: LoRA only: the learning rate of the adapters' output projections ``B``
        over ``learning_rate``, which ``A`` keeps (LoRA+, Hayou et al., arXiv 2402.12354); 1: one
        learning rate for both.
    lora_init: how an adapter's input projection ``A`` starts: ``random`` (PEFT's initialisation) or
        ``edit_inputs``: at the start of an edit call, in every adapted module whose ``B`` is still
        zero (an adapter that has learned nothing there), the leading rows of ``A`` are set to the
        leading directions of the inputs the module receives on the requests' prompt and target
        (off the protected directions under ``lora_projection_energy``), each at the norm of the
        row it replaces (:mod:`icelora.input_alignment`).
    autocast_dtype: run each step's passes (and the anchors' pre-edit distributions) under
        ``torch.autocast`` in ``bfloat16``, the trained tensors staying in their own dtype;
        ``None``: no autocast.
    frozen_dtype: LoRA only: while an edit call runs, the model's frozen weights are read from a
        copy in this dtype (``bfloat16``: made once and kept), the adapters staying in float32;
        outside edit calls the model has its own weights (:mod:`icelora.frozen_weights`). On a CPU
        with bfloat16 matrix units the step's products run several times faster; the edited model
        is still used and evaluated in its own dtype. ``None``: the model's own weights throughout.
    replay_edits / lambda_replay: sequential editing: each step of a new edit also minimises, with
        weight ``lambda_replay``, the target cross-entropy of ``replay_edits`` earlier edits of the
        editor's ledger, drawn afresh every step (:mod:`icelora.replay`); 0 turns it off.
    replay_anchors: with replay and ``lambda_locality > 0``: that many of each replayed edit's
        anchors (its relation anchors under ``locality_anchor_kind`` relation, its subject anchors
        otherwise) join the step's locality term (KL to the unedited model, weight
        ``lambda_locality``), so earlier subjects keep what the model said about them; 0: none.
    early_stopping: stop once the target is predicted (greedy, teacher-forced, no context) and its
        cross-entropy moved by at most ``early_stop_tolerance`` nats per step, for
        ``early_stop_patience`` consecutive steps (0: stop at the first step it is learned), its
        cross-entropy also at most ``early_stop_target_loss`` nats per token in those steps where
        that is set (``None``: no bound).
    """

    objective: str = "ice"
    parameterization: str = "lora"
    learning_rate: float = 1e-3
    max_steps: int = 25
    lambda_ice: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    layers: list[int] | None = None
    target_modules: list[str] = field(default_factory=lambda: ["attn_qv", "mlp_in", "mlp_out"])
    clamp: float | None = None
    weight_decay: float = 0.0
    num_contexts: int = 5
    contexts_per_step: int | None = None
    sample_every: int = 1
    samples_per_context: int = 1
    completion_length: int = 3
    temperature: float = 1.0
    context_template: str = "{context} {prompt}"
    lambda_locality: float = 0.0
    locality_anchors: int = 4
    locality_anchor_kind: str = "general"
    lora_projection_energy: float | None = None
    lora_projection_scope: str = "adapter"
    lora_projection_gradients: bool = False
    loraplus_lr_ratio: float = 1.0
    lora_init: str = "random"
    autocast_dtype: str | None = None
    frozen_dtype: str | None = None
    replay_edits: int = 0
    lambda_replay: float = 1.0
    replay_anchors: int = 0
    early_stopping: bool = False
    early_stop_patience: int = 2
    early_stop_tolerance: float = 0.05
    early_stop_target_loss: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidConfigError` naming the first bad field."""
        if self.objective not in OBJECTIVES:
            raise InvalidConfigError(f"objective {self.objective!r} is unknown; choose from {list(OBJECTIVES)}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise InvalidConfigError(
                f"parameterization {self.parameterization!r} is unknown; choose from {list(PARAMETERIZATIONS)}"
            )
        positive_ints = ("max_steps", "lora_rank", "num_contexts", "samples_per_context",
                         "completion_length", "locality_anchors", "sample_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}")
        positive_floats = ("learning_rate", "lora_alpha", "temperature", "loraplus_lr_ratio")
        for name in positive_floats:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InvalidConfigError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.early_stop_patience, int) or isinstance(self.early_stop_patience, bool) \
                or self.early_stop_patience < 0:
            raise InvalidConfigError(f"early_stop_patience must be an integer >= 0, got {self.early_stop_patience!r}")
        for name in ("replay_edits", "replay_anchors"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidConfigError(f"{name} must be an integer >= 0, got {value!r}")
        non_negative = ("lambda_ice", "weight_decay", "early_stop_tolerance", "lambda_locality", "lambda_replay")
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise InvalidConfigError(f"{name} must be a number >= 0, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise InvalidConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.clamp is not None and not self.clamp > 0:
            raise InvalidConfigError(f"clamp must be a positive number or null, got {self.clamp!r}")
        if self.layers is not None and (
            not self.layers or not all(isinstance(x, int) and x >= 0 for x in self.layers)
        ):
            raise InvalidConfigError(f"layers must be a non-empty list of layer indices, got {self.layers!r}")
        bad_roles = [r for r in self.target_modules if r not in MODULE_ROLES]
        if not self.target_modules or bad_roles:
            raise InvalidConfigError(
                f"target_modules {self.target_modules!r} must be a non-empty subset of {list(MODULE_ROLES)}"
            )
        if self.locality_anchor_kind not in LOCALITY_ANCHOR_KINDS:
            raise InvalidConfigError(f"locality_anchor_kind must be one of {list(LOCALITY_ANCHOR_KINDS)}, "
                                     f"got {self.locality_anchor_kind!r}")
        energy = self.lora_projection_energy
        if energy is not None:
            if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy < 1:
                raise InvalidConfigError(f"lora_projection_energy must be a number in (0, 1) or null, got {energy!r}")
            if self.parameterization != "lora":
                raise InvalidConfigError("lora_projection_energy needs parameterization lora (it keeps LoRA's "
                                         "input projection off the locality anchors' inputs)")
        if self.lora_projection_scope not in LORA_PROJECTION_SCOPES:
            raise InvalidConfigError(f"lora_projection_scope must be one of {list(LORA_PROJECTION_SCOPES)}, "
                                     f"got {self.lora_projection_scope!r}")
        if self.lora_projection_scope != "adapter" and energy is None:
            raise InvalidConfigError(f"lora_projection_scope {self.lora_projection_scope!r} needs "
                                     "lora_projection_energy (there is no projection to scope without it)")
        bound = self.early_stop_target_loss
        if bound is not None and (not isinstance(bound, (int, float)) or isinstance(bound, bool) or not bound > 0):
            raise InvalidConfigError(f"early_stop_target_loss must be a positive number or null, got {bound!r}")
        if not isinstance(self.lora_projection_gradients, bool):
            raise InvalidConfigError(f"lora_projection_gradients must be true or false, "
                                     f"got {self.lora_projection_gradients!r}")
        if self.lora_projection_gradients and energy is None:
            raise InvalidConfigError("lora_projection_gradients needs lora_projection_energy (there are no "
                                     "protected directions to project the gradients off without it)")
        if self.loraplus_lr_ratio != 1 and self.parameterization != "lora":
            raise InvalidConfigError(f"loraplus_lr_ratio needs parameterization lora (it sets the learning rate "
                                     f"of LoRA's B matrices), got {self.loraplus_lr_ratio!r} with "
                                     f"{self.parameterization!r}")
        if self.lora_init not in LORA_INITS:
            raise InvalidConfigError(f"lora_init must be one of {list(LORA_INITS)}, got {self.lora_init!r}")
        if self.lora_init != "random" and self.parameterization != "lora":
            raise InvalidConfigError(f"lora_init {self.lora_init!r} needs parameterization lora")
        per_step = self.contexts_per_step
        if per_step is not None:
            if not isinstance(per_step, int) or isinstance(per_step, bool) or per_step < 1:
                raise InvalidConfigError(f"contexts_per_step must be a positive integer or null, got {per_step!r}")
            if self.objective != "ice":
                raise InvalidConfigError(f"contexts_per_step applies to objective ice only, not {self.objective!r}")
        if self.sample_every > 1 and self.objective != "ice":
            raise InvalidConfigError(f"sample_every applies to objective ice only, not {self.objective!r}")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise InvalidConfigError(
                f"autocast_dtype must be one of {list(AUTOCAST_DTYPES)} or null, got {self.autocast_dtype!r}")
        if self.frozen_dtype not in AUTOCAST_DTYPES:
            raise InvalidConfigError(
                f"frozen_dtype must be one of {list(AUTOCAST_DTYPES)} or null, got {self.frozen_dtype!r}")
        if self.frozen_dtype is not None and self.parameterization != "lora":
            raise InvalidConfigError(f"frozen_dtype needs parameterization lora (full matrices train the weights "
                                     f"themselves), got {self.parameterization!r}")
        if "{context}" not in self.context_template or "{prompt}" not in self.context_template:
            raise InvalidConfigError("context_template must contain {context} and {prompt}")

    def replace(self, **changes: Any) -> EditConfig:
        """A validated copy with some fields changed; unknown field names are an error."""
        check_keys(changes, source="overrides")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the configuration."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> EditConfig:
        """Build from a mapping, rejecting unknown keys with the key named."""
        check_keys(data, source=source)
        return cls(**data)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise InvalidConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{path}: must be a mapping of configuration keys")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML file of ``EditConfig`` keys (plus an optional ``method``), checking every key."""
    data = read_yaml_mapping(path)
    check_keys({k: v for k, v in data.items() if k != "method"}, source=str(path))
    return data


def check_keys(data: dict[str, Any], source: str) -> None:
    """Raise if ``data`` holds a key that is not an :class:`EditConfig` field."""
    known = {f.name for f in dataclasses.fields(EditConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
