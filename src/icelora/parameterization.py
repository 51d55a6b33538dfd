"""What an edit trains: LoRA adapters, or selected full weight matrices.

Both keep a snapshot of their trainable tensors' starting values, so reverting an edit is a copy
back to that snapshot: exactly the unedited model (LoRA starts with ``B = 0``, a zero update).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from icelora.architecture import ArchitectureMap
from icelora.config import EditConfig
from icelora.errors import AdapterFolderError
from icelora.input_alignment import align_rows, leading_input_rows
from icelora.input_projection import project_off
from icelora.lora_utils import ADAPTER_NAME, attach_lora, build_lora_config, lora_layers, merged_state_dict
from icelora.row_routing import install_row_routing

FULL_WEIGHTS_FILE = "edited_weights.safetensors"
SEPARATE_PREFIX = "edit_"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


class Parameterization(ABC):
    """The trainable part of an edit. ``model`` is what the editor runs (wrapped for LoRA)."""

    model: nn.Module
    module_names: list[str]

    @abstractmethod
    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The tensors the optimizer updates, by name."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable().values())

    def _take_snapshot(self) -> None:
        self.snapshot = {n: p.detach().clone() for n, p in self.named_trainable().items()}

    def before_step(self) -> None:
        """Called after every backward pass, before the optimizer step (LoRA: gradient projection)."""

    def after_step(self) -> None:
        """Called after every optimizer step (the full-matrix clamp)."""

    @torch.no_grad()
    def revert(self) -> None:
        """Copy every trainable tensor back to its starting value."""
        for name, param in self.named_trainable().items():
            param.copy_(self.snapshot[name])

    def training(self, on: bool) -> None:
        """Switch the modules whose behaviour differs in training (adapter dropout) on or off."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write the trained tensors to ``folder`` in safetensors."""

    @abstractmethod
    def load(self, folder: Path) -> None:
        """Read tensors written by :meth:`save` into the model."""

    @abstractmethod
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain state dict of the edited model, loadable by ``from_pretrained``."""


class LoraParameterization(Parameterization):
    """PEFT LoRA adapters on the chosen roles and layers."""

    def __init__(self, model: nn.Module, arch: ArchitectureMap, config: EditConfig, layers: list[int]) -> None:
        self.lora_config = build_lora_config(arch, config, layers)
        self.module_names = list(self.lora_config.target_modules)
        self.model = attach_lora(model, self.lora_config, config.seed)
        self.model.eval()
        self._take_snapshot()
        #: adapter -> per module: its ``A`` weight, the orthonormal input directions ``U`` whose
        #: coefficients ``A U`` are held, and the values they are held at (``None``: zero)
        self.protected: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        #: also project the protected ``A``'s gradients before each optimizer step
        self.project_gradients = config.lora_projection_gradients

    def base_modules(self) -> dict[str, nn.Module]:
        """The adapted modules' original layers, by their name in the base model."""
        return {name: module.get_base_layer() for name, module in lora_layers(self.model).items()}

    def protect(self, directions: dict[str, torch.Tensor] | None, adapter: str = ADAPTER_NAME,
                keep_learned: bool = False, at_once: bool = True) -> None:
        """From now on (at once and after every step), keep what ``adapter``'s input projections
        ``A`` do on ``directions`` (module -> [in, k]) at zero, or, with ``keep_learned``, where it is
        now in every module whose ``B`` is not zero (what earlier training put there), so that only
        later changes are projected off. ``None`` lifts the constraint. ``at_once=False`` leaves the
        projection to the next step (for tensors restored from a checkpoint that was projected
        already: projecting again would move them by rounding)."""
        if directions is None:
            self.protected.pop(adapter, None)
            return
        modules = lora_layers(self.model)
        held = []
        for name, u in directions.items():
            weight = modules[name].lora_A[adapter].weight
            u = u.to(weight.device, weight.dtype)
            learned = keep_learned and bool(modules[name].lora_B[adapter].weight.any())
            held.append((weight, u, weight.detach() @ u if learned else None))
        self.protected[adapter] = held
        # this adapter only: projecting the others again would move their rounding
        for weight, u, values in held if at_once else ():
            project_off(weight, u, values)

    def align_inputs(self, inputs: dict[str, list[torch.Tensor]], adapters: list[str]) -> int:
        """Start the leading rows of ``A`` of each of ``adapters`` (in each module whose ``B`` is
        still zero) on the leading directions of that adapter's ``inputs`` (module -> one
        [positions, in] tensor per adapter), off its protected directions where it has some
        (:mod:`icelora.input_alignment`). Returns the number of modules aligned."""
        modules = lora_layers(self.model)
        aligned = 0
        for k, adapter in enumerate(adapters):
            held = {id(weight): u for weight, u, _ in self.protected.get(adapter, [])}
            for name, each in inputs.items():
                module = modules[name]
                if module.lora_B[adapter].weight.any():
                    continue
                weight = module.lora_A[adapter].weight
                align_rows(weight, leading_input_rows(each[k], weight.shape[0], held.get(id(weight))))
                aligned += 1
        return aligned

    def before_step(self) -> None:
        """Under ``lora_projection_gradients``: each protected ``A``'s gradient is projected off its
        directions, so the optimizer's moments (Adam's second moment above all, which scales every
        element's step) are made of what the adapter may learn, not of what the projection after
        the step takes away again."""
        if not self.project_gradients:
            return
        for held in self.protected.values():
            for weight, directions, _ in held:
                if weight.grad is not None:
                    project_off(weight.grad, directions)

    def after_step(self) -> None:
        for held in self.protected.values():
            for weight, directions, values in held:
                project_off(weight, directions, values)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The main adapter's tensors (not those of :meth:`add_separate_adapters`)."""
        main = f".{ADAPTER_NAME}."
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and main in n}

    def training(self, on: bool) -> None:
        for name, module in self.model.named_modules():
            if name.rpartition(".")[0].endswith(".lora_dropout"):
                module.train(on)

    # -- separate adapters for independent edits --------------------------------------------------
    def add_separate_adapters(self, count: int) -> list[str]:
        """Add ``count`` adapters beside the main one, each starting from the main adapter's initial
        values, with trainable tensors. Rows reach them through PEFT's ``adapter_names`` routing
        (computed by :mod:`icelora.row_routing`, which keeps it on the device); the main adapter
        stays the active one."""
        names = [f"{SEPARATE_PREFIX}{k}" for k in range(count)]
        with torch.random.fork_rng(devices=[]):  # their random init is overwritten; keep the global RNG as it was
            for name in names:
                self.model.add_adapter(name, copy.deepcopy(self.lora_config))
        install_row_routing(self.model)
        with torch.no_grad():
            for name in names:
                for key, param in self.separate_tensors([name]).items():
                    param.copy_(self.snapshot[key.replace(f".{name}.", f".{ADAPTER_NAME}.")])
                    param.requires_grad_(True)
        return names

    def unchanged(self, adapters: Sequence[str]) -> bool:
        """Whether each of ``adapters`` changes no module's output yet (its ``B`` is zero in every
        module), so that rows routed to it see the base model."""
        nonzero = [module.lora_B[adapter].weight.any() for module in lora_layers(self.model).values()
                   for adapter in adapters]
        return not nonzero or not bool(torch.stack(nonzero).any())  # one read of the device

    def separate_tensors(self, names: list[str]) -> dict[str, nn.Parameter]:
        """The LoRA tensors of the adapters ``names``, by parameter name."""
        wanted = tuple(f".{name}." for name in names)
        return {n: p for n, p in self.model.named_parameters() if ".lora_" in n and any(w in n for w in wanted)}

    def remove_separate_adapters(self, names: list[str]) -> None:
        """Delete adapters added by :meth:`add_separate_adapters`."""
        for name in names:
            self.protected.pop(name, None)
            self.model.delete_adapter(name)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder), safe_serialization=True, selected_adapters=[ADAPTER_NAME])

    def load(self, folder: Path) -> None:
        path = folder / ADAPTER_WEIGHTS_FILE
        if not path.exists():
            raise AdapterFolderError(f"{folder}: no {ADAPTER_WEIGHTS_FILE}")
        result = set_peft_model_state_dict(self.model, load_file(str(path)), adapter_name=ADAPTER_NAME)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise AdapterFolderError(f"{path}: tensors that fit no adapter of this model: {unexpected[:3]}")

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        return merged_state_dict(self.model)


class FullMatrixParameterization(Parameterization):
    """The selected weight matrices themselves, optionally clamped to ``theta0 +- clamp``."""

    def __init__(self, model: nn.Module, arch: ArchitectureMap, config: EditConfig, layers: list[int]) -> None:
        self.model = model
        self.clamp = config.clamp
        self.module_names = arch.module_names(layers, config.target_modules)
        self._params = {f"{name}.weight": model.get_submodule(name).weight for name in self.module_names}
        for param in self._params.values():
            param.requires_grad_(True)
        self._take_snapshot()

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return self._params

    @torch.no_grad()
    def after_step(self) -> None:
        if self.clamp is None:
            return
        for name, param in self._params.items():
            original = self.snapshot[name]
            param.copy_(torch.clamp(param, original - self.clamp, original + self.clamp))

    def save(self, folder: Path) -> None:
        tensors = {name: p.detach().contiguous().cpu() for name, p in self._params.items()}
        save_file(tensors, str(folder / FULL_WEIGHTS_FILE), metadata={"format": "pt"})

    @torch.no_grad()
    def load(self, folder: Path) -> None:
        path = folder / FULL_WEIGHTS_FILE
        if not path.exists():
            raise AdapterFolderError(f"{folder}: no {FULL_WEIGHTS_FILE}")
        tensors = load_file(str(path))
        if set(tensors) != set(self._params):
            raise AdapterFolderError(f"{path}: holds {sorted(tensors)[:3]}..., expected {sorted(self._params)[:3]}...")
        for name, param in self._params.items():
            if tensors[name].shape != param.shape:
                raise AdapterFolderError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                         f"the model's is {tuple(param.shape)}")
            param.copy_(tensors[name].to(param.device, param.dtype))

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())


def make_parameterization(model: nn.Module, arch: ArchitectureMap, config: EditConfig,
                          layers: list[int]) -> Parameterization:
    """The parameterization ``config.parameterization`` names."""
    if config.parameterization == "lora":
        return LoraParameterization(model, arch, config, layers)
    return FullMatrixParameterization(model, arch, config, layers)
