"""``ICELoRAEditor``: edit a model, query it, undo the edit, and save or export it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from icelora import __version__
from icelora.anchors import AnchorTeacher, anchor_teachers, request_anchors_each, teacher_from_rows
from icelora.architecture import (
    ArchitectureMap,
    count_parameters,
    default_edit_layers,
    first_layers_only,
    inspect_architecture,
    model_device,
)
from icelora.attention_precision import float32_training_attention
from icelora.config import AUTOCAST_DTYPES, EditConfig
from icelora.editing_loop import StepRecord, autocast, run_edit_loop, run_independent_edit_loop
from icelora.errors import AdapterFolderError, InvalidConfigError, InvalidRequestError
from icelora.frozen_weights import FrozenWeights
from icelora.input_projection import leading_directions_each, module_inputs, per_distinct_input
from icelora.lora_utils import ADAPTER_NAME, BASE_ROWS
from icelora.losses import EditPlan, LossParts, Objective, build_plan
from icelora.methods import method_config
from icelora.models import EMBEDDED_MODEL, LoadedModel, load_model
from icelora.parameterization import LoraParameterization, make_parameterization
from icelora.replay import AnchorRows, ReplayAnchors, ReplayObjective, replayed_requests
from icelora.request import EditRequest
from icelora.tokenization import check_encodable, pad_rows

log = logging.getLogger(__name__)

LEDGER_FILE = "icelora_ledger.json"
LEDGER_FORMAT = 1

RequestLike = EditRequest | dict[str, Any]


@dataclass
class EditResult:
    """What one :meth:`ICELoRAEditor.edit` call did."""

    requests: list[EditRequest]
    method: str
    steps: int
    seconds: float
    trainable_params: int
    total_params: int
    stopped_early: bool
    history: list[StepRecord] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """Total loss of every step."""
        return [r.loss for r in self.history]

    def to_dict(self) -> dict[str, Any]:
        return {"requests": [r.to_dict() for r in self.requests], "method": self.method, "steps": self.steps,
                "seconds": self.seconds, "trainable_params": self.trainable_params,
                "total_params": self.total_params, "stopped_early": self.stopped_early,
                "history": [r.to_dict() for r in self.history]}


@dataclass
class SeparateEdits:
    """Edits made by :meth:`ICELoRAEditor.edit_each`, each in its own adapter.

    ``adapters[k]`` names edit k's adapter: route rows to it with ``adapters=`` in the query methods.
    ``seconds``: training time of all of them; each result's ``seconds`` is its own time (trained
    one by one) or an equal share of the joint time (trained together).
    """

    results: list[EditResult]
    adapters: list[str]
    seconds: float


def _seconds_per_edit(seconds: float | list[float], count: int) -> list[float]:
    """Each edit's own time, or (trained together) an equal share of the joint time."""
    return list(seconds) if isinstance(seconds, list) else [seconds / count] * count


def _as_requests(requests: RequestLike | Iterable[RequestLike]) -> list[EditRequest]:
    items = [requests] if isinstance(requests, (EditRequest, dict)) else list(requests)
    if not items:
        raise InvalidRequestError("no edit request given")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(item if isinstance(item, EditRequest) else EditRequest.from_dict(item))
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"request {i}: {exc}") from None
    return out


def model_fingerprint(model: torch.nn.Module, arch: ArchitectureMap) -> dict[str, Any]:
    """Shape facts that must match between a saved edit and the model it is loaded into."""
    config = model.config
    return {"model_type": getattr(config, "model_type", None), "vocab_size": getattr(config, "vocab_size", None),
            "num_layers": arch.num_layers, "hidden_size": arch.hidden_size}


class ICELoRAEditor:
    """Knowledge editor for a causal LM; ``method`` picks objective and parameterization.

    >>> editor = ICELoRAEditor()                       # embedded SmolLM2-135M, ICE-LoRA
    >>> editor.edit({"prompt": "The Eiffel Tower is located in the city of", "target": "Rome"})
    >>> editor.generate("The Eiffel Tower is located in the city of")
    """

    def __init__(
        self,
        model: str | LoadedModel = EMBEDDED_MODEL,
        method: str = "ice-lora",
        config: EditConfig | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        **overrides: Any,
    ) -> None:
        self.method = method
        self.config = config.replace(**overrides) if config is not None else method_config(method, **overrides)
        self.loaded = load_model(model, device=device, dtype=dtype) if isinstance(model, str) else model
        self.tokenizer = self.loaded.tokenizer
        base = self.loaded.model
        if any(isinstance(m, LoraLayer) for m in base.modules()):
            raise InvalidConfigError("this model already carries adapters (is another editor holding it?); "
                                     "load a fresh copy for each editor")
        base.eval()
        base.requires_grad_(False)
        self.architecture = inspect_architecture(base)
        self.layers = list(self.config.layers or default_edit_layers(self.architecture.num_layers))
        #: the base model's weights in ``frozen_dtype`` while an edit call runs (LoRA: they never train)
        self.frozen_weights = FrozenWeights(base, AUTOCAST_DTYPES[self.config.frozen_dtype])
        self.params = make_parameterization(base, self.architecture, self.config, self.layers)
        self.model = self.params.model
        self.ledger: list[EditRequest] = []
        self._anchor_rows: dict[tuple[str, str | None], AnchorRows] = {}  # kept per subject (or request) for replay
        #: replay ICE's sampling and training passes from CUDA graphs (``None``: wherever the model
        #: is on CUDA; ``"sampling"``: the sampling passes only; ``False``: neither)
        self.cuda_graphs: bool | str | None = None

    # -- editing -----------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.loaded.name

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the edited model."""
        return count_parameters(self.model)

    def check_request(self, request: EditRequest) -> None:
        """Raise :class:`InvalidRequestError` if the tokenizer cannot encode the request's target.

        A prompt with characters the tokenizer does not know is still read (as unknown tokens); a
        target like that could not be taught, so it is refused.
        """
        check_encodable(self.tokenizer, request.target, "target")

    def edit(self, requests: RequestLike | Iterable[RequestLike], progress: bool = True,
             on_step: Callable[[StepRecord], None] | None = None) -> EditResult:
        """Write one request, or a list of them into one update, into the model.

        ``on_step`` is called after every step with its :class:`StepRecord`, the step's update
        already in the model (to log or probe the edit as it goes; under ``lora_projection_energy``
        the adapters are projected already). Whatever it does must leave the trainable tensors
        as they are."""
        batch = _as_requests(requests)
        for request in batch:
            self.check_request(request)
        history, seconds = self._train(batch, progress, on_step=on_step)
        self.ledger.extend(batch)
        trainable, total = self.parameter_counts()
        log.info("edited %d request(s) with %s in %d steps, %.2f s", len(batch), self.method, len(history), seconds)
        return EditResult(requests=batch, method=self.method, steps=len(history), seconds=seconds,
                          trainable_params=trainable, total_params=total,
                          stopped_early=len(history) < self.config.max_steps, history=history)

    def _train(self, batch: list[EditRequest], progress: bool, replay: bool = True,
               on_step: Callable[[StepRecord], None] | None = None) -> tuple[list[StepRecord], float]:
        """Run the editing loop on the live parameters; (step history, seconds). ``replay``: rehearse
        the ledger's earlier edits (when ``replay_edits > 0``). The time counts everything the edit
        does, its anchors included."""
        start = time.perf_counter()
        with self.training_precision():
            history = self._train_swapped(batch, progress, replay, on_step)
        if model_device(self.model).type == "cuda":
            torch.cuda.synchronize()
        return history, time.perf_counter() - start

    def _train_swapped(self, batch: list[EditRequest], progress: bool, replay: bool,
                       on_step: Callable[[StepRecord], None] | None) -> list[StepRecord]:
        plan = build_plan(self.tokenizer, batch, self.config)
        teachers = self.anchor_teachers(plan)
        main = Objective(plan, self.config, model_device(self.model), teachers)
        main.cuda_graphs = self.cuda_graphs
        objective: Callable[[torch.nn.Module, int], LossParts] = main
        earlier = replayed_requests(self.ledger, batch) if replay and self.config.replay_edits else []
        if earlier:
            replayed = build_plan(self.tokenizer, earlier, self.config)
            objective = ReplayObjective(objective, replayed, self.config, self.replay_anchors(replayed))
        torch.manual_seed(self.config.seed)
        with self.anchors_protected(teachers, [ADAPTER_NAME]):
            self.align_inputs([[pt.ids for pt in plan.encoded]], [ADAPTER_NAME])
            return run_edit_loop(self.model, self.params, objective, self.config, progress=progress,
                                 on_step=on_step)

    @contextmanager
    def training_precision(self) -> Iterator[None]:
        """Within the block the model trains as edit calls train it: on the bfloat16 copies of its
        frozen weights under ``frozen_dtype`` (:class:`FrozenWeights`), and with attention in
        float32 in the passes that train on a CPU with narrow activations
        (:func:`float32_training_attention`)."""
        with self.frozen_weights.swapped(), float32_training_attention():
            yield

    @contextmanager
    def edit_each(self, requests: Iterable[RequestLike], progress: bool = True,
                  together: bool = True) -> Iterator[SeparateEdits]:
        """Make every request its own edit, as if each were edited alone from the unedited model,
        each kept in its own LoRA adapter.

        ``together``: train them at once, one batched forward/backward per step (pays where the
        hardware has room, e.g. a GPU); otherwise one after another, each then copied into its
        adapter (on a few CPU cores, where a step is already compute-bound). Inside the block,
        query edit k by routing rows to ``edits.adapters[k]`` (``adapters=`` of
        :meth:`generate_many`, or ``adapter_names=`` of a forward pass); unrouted calls see the
        model as it was. The adapters are removed when the block ends.
        """
        batch = _as_requests(requests)
        if not isinstance(self.params, LoraParameterization):
            raise InvalidConfigError(f"method {self.method!r} trains full matrices; editing requests each in "
                                     "its own adapter needs a LoRA parameterization")
        if together and self.config.lora_dropout:
            raise InvalidConfigError("separate edits trained together need lora_dropout 0 (dropout draws would "
                                     "depend on the batch)")
        for request in batch:
            self.check_request(request)
        names = self.params.add_separate_adapters(len(batch))
        try:
            tensors = [self.params.separate_tensors([name]) for name in names]
            if together:
                histories, seconds = self._train_together(batch, names, tensors, progress)
            else:
                histories, seconds = self._train_one_by_one(batch, names, tensors, progress)
            for group in tensors:
                for param in group.values():
                    param.requires_grad_(False)
            trainable = sum(p.numel() for p in tensors[0].values())
            _, total = self.parameter_counts()
            total -= trainable * len(batch)
            results = [EditResult(requests=[r], method=self.method, steps=len(h), seconds=s,
                                  trainable_params=trainable, total_params=total,
                                  stopped_early=len(h) < self.config.max_steps, history=h)
                       for r, h, s in zip(batch, histories, _seconds_per_edit(seconds, len(batch)))]
            joint = sum(r.seconds for r in results)
            log.info("edited %d request(s) separately with %s in %d steps at most, %.2f s", len(batch),
                     self.method, max(len(h) for h in histories), joint)
            yield SeparateEdits(results=results, adapters=names, seconds=joint)
        finally:
            self.params.remove_separate_adapters(names)

    def _train_together(self, batch: list[EditRequest], names: list[str], tensors: list[dict[str, Any]],
                        progress: bool) -> tuple[list[list[StepRecord]], float]:
        start = time.perf_counter()
        with self.training_precision():
            histories = self._train_together_swapped(batch, names, tensors, progress)
        if model_device(self.model).type == "cuda":
            torch.cuda.synchronize()
        return histories, time.perf_counter() - start

    def _train_together_swapped(self, batch: list[EditRequest], names: list[str], tensors: list[dict[str, Any]],
                                progress: bool) -> list[list[StepRecord]]:
        plan = build_plan(self.tokenizer, batch, self.config, independent=True, adapter_names=names)
        teachers = self.anchor_teachers(plan)
        objective = Objective(plan, self.config, model_device(self.model), teachers)
        objective.cuda_graphs = self.cuda_graphs
        with self.anchors_protected(teachers, names):
            self.align_inputs([[pt.ids] for pt in plan.encoded], names)
            named = {n: p for group in tensors for n, p in group.items()}
            return run_independent_edit_loop(self.model, self.params, named, objective, len(batch), self.config,
                                             progress=progress)

    def _train_one_by_one(self, batch: list[EditRequest], names: list[str], tensors: list[dict[str, Any]],
                          progress: bool) -> tuple[list[list[StepRecord]], list[float]]:
        histories, seconds = [], []
        with self.unedited():
            for request, name, group in zip(batch, names, tensors):
                history, took = self._train([request], progress, replay=False)  # each from the unedited model
                live = self.params.named_trainable()
                with torch.no_grad():
                    for key, param in group.items():
                        param.copy_(live[key.replace(f".{name}.", f".{ADAPTER_NAME}.")])
                self.params.revert()
                histories.append(history)
                seconds.append(took)
        return histories, seconds

    @contextmanager
    def anchors_protected(self, teachers: list[AnchorTeacher] | None, adapters: list[str],
                          on_unedited: bool = False, resumed: bool = False) -> Iterator[None]:
        """Within the block, under ``lora_projection_energy``: adapter ``adapters[k]`` is kept blind
        to the leading directions of its modules' inputs on ``teachers[k]``'s anchors (one set for
        all adapters when there is one), measured on the model as that adapter sees it (the main
        adapter: the model as it is; a separate one: routed to it, before its training, the
        unedited model). Under ``lora_projection_scope`` ``edit`` what an adapter has learned
        before is kept and only the change made within the block is projected off. Nothing
        happens without the setting (or without anchors). ``on_unedited``: measure the inputs on
        the unedited model whatever the adapters hold (a training run resumed from a checkpoint
        then protects the directions its first part protected); ``resumed``: the adapters come
        from a checkpoint of a training that began within this same block from fresh adapters,
        so they are projected already and hold nothing learned before it."""
        energy = self.config.lora_projection_energy
        if energy is None or not teachers or not isinstance(self.params, LoraParameterization):
            yield
            return
        own = [teachers[k] if len(teachers) > 1 else teachers[0] for k in range(len(adapters))]
        inputs = self._anchor_inputs(own, adapters, on_unedited)  # module -> each adapter's inputs
        # modules handed the same input share its directions
        directions = per_distinct_input(inputs, lambda each: leading_directions_each(each, energy))
        del inputs  # not held while the edits train
        for k, adapter in enumerate(adapters):
            self.params.protect({name: each[k] for name, each in directions.items()}, adapter,
                                keep_learned=self.config.lora_projection_scope == "edit" and not resumed,
                                at_once=not resumed)
        try:
            yield
        finally:
            for adapter in adapters:
                self.params.protect(None, adapter)

    def align_inputs(self, rows: list[list[Sequence[int]]], adapters: list[str]) -> None:
        """Under ``lora_init`` ``edit_inputs``: start each adapter's ``A`` on the inputs its modules
        receive on ``rows[k]`` (token rows: the prompt and target of adapter ``k``'s requests),
        measured in one forward pass on the model as each adapter sees it; modules whose ``B`` has
        learned something are left as they are. Call within :meth:`anchors_protected`, so that the
        aligned rows are blind to the protected directions. Nothing happens under ``random``."""
        if self.config.lora_init != "edit_inputs" or not isinstance(self.params, LoraParameterization):
            return
        aligned = self.params.align_inputs(self._inputs_each(rows, adapters), adapters)
        log.debug("aligned the input projections of %d adapted module(s) with the edit's inputs", aligned)

    def _anchor_inputs(self, teachers: list[AnchorTeacher], adapters: list[str],
                       on_unedited: bool) -> dict[str, list[torch.Tensor]]:
        """Module -> what it receives at the real positions of each adapter's teacher's anchors
        (:meth:`_inputs_each`)."""
        return self._inputs_each([teacher.rows for teacher in teachers], adapters, on_unedited)

    def _inputs_each(self, rows: list[Sequence[Sequence[int]]], adapters: list[str],
                     on_unedited: bool = False) -> dict[str, list[torch.Tensor]]:
        """Module -> what it receives at the real positions of each adapter's token ``rows``, on the
        model as that adapter sees it (the main adapter: the model as it is; a separate one: its
        rows routed to it; ``on_unedited``: the unedited model), in the order of ``adapters``, all
        from one forward pass through the layers up to the last adapted one. Adapters that change
        nothing yet (fresh ones) are not run: their rows see the base model, as they would."""
        flat = [row for each in rows for row in each]
        with (self.unedited() if on_unedited else contextlib.nullcontext(),
              first_layers_only(self.model, self.architecture, max(self.layers) + 1)):
            if self.params.unchanged(adapters):  # the base model, without the adapters' zero products
                route = {"adapter_names": [BASE_ROWS] * len(flat)}
            elif adapters == [ADAPTER_NAME]:
                route = {}
            else:
                route = {"adapter_names": [adapter for adapter, each in zip(adapters, rows) for _ in each]}
            inputs = module_inputs(self.model, self.params.base_modules(), flat, self.tokenizer.pad_token_id,
                                   **route)
        positions = [sum(len(row) for row in each) for each in rows]
        return per_distinct_input(inputs, lambda x: list(x.split(positions)))  # shared input, shared list

    def anchor_teachers(self, plan: EditPlan) -> list[AnchorTeacher] | None:
        """The unedited model's distributions on the locality anchors of ``plan``'s requests, for
        the locality term and the null-space constraint (``None`` when neither is on)."""
        if not (self.config.lambda_locality or self.config.lora_projection_energy is not None):
            return None
        with self.unedited(), autocast(self.model, self.config):  # as the student will see them
            return anchor_teachers(self.model, self.tokenizer, plan.pad_id, self.config.locality_anchor_kind,
                                   plan.requests, plan.independent, lambda rs: self._unedited_anchors(rs, plan))

    def _anchor_key(self, request: EditRequest) -> tuple[str, str | None]:
        """What a request's anchor rows depend on: its subject, and under relation anchors its
        prompt too (the relations it names are left out)."""
        return request.subject, request.prompt if self.config.locality_anchor_kind == "relation" else None

    def _unedited_anchors(self, requests: Sequence[EditRequest], plan: EditPlan) -> list[AnchorTeacher]:
        """Each of ``requests``' anchors (all with a subject; relation anchors under
        ``locality_anchor_kind`` relation, subject anchors otherwise) with the unedited model's
        distributions on them (call under :meth:`unedited`). Made afresh for every edit, so that
        they do not depend on what was edited before. For an independent plan (edits each in its
        own adapter, which no ledger keeps) all in one batched decode. Otherwise one decode per
        request, and the rows are kept for when the edit is replayed: they then do not depend on
        which other requests shared the call, and a run resumed from its ledger
        (:meth:`replay_anchors`) makes the same rows again."""
        kind = "relation" if self.config.locality_anchor_kind == "relation" else "subject"
        if plan.independent:
            return request_anchors_each(self.model, self.tokenizer, plan.pad_id, kind, requests)
        made = [request_anchors_each(self.model, self.tokenizer, plan.pad_id, kind, [r])[0] for r in requests]
        for request, teacher in zip(requests, made):
            self._anchor_rows[self._anchor_key(request)] = teacher.rows
        return made

    def replay_anchors(self, plan: EditPlan) -> ReplayAnchors | None:
        """The anchors of the earlier edits in ``plan`` (relation anchors under
        ``locality_anchor_kind`` relation, subject anchors otherwise) and their pre-edit
        distributions (``None`` unless ``replay_anchors`` and ``lambda_locality`` are on). Each
        edit's anchor rows are made once, by the unedited model, and kept; the distributions are
        computed on the rows each step draws."""
        if not (self.config.replay_anchors and self.config.lambda_locality):
            return None
        missing = [r for r in plan.requests if r.subject and self._anchor_key(r) not in self._anchor_rows]
        if missing:
            with self.unedited(), autocast(self.model, self.config):
                self._unedited_anchors(missing, plan)

        def teacher(rows: AnchorRows) -> AnchorTeacher:
            with self.unedited(), autocast(self.model, self.config):  # as the student will see them
                return teacher_from_rows(self.model, rows, plan.pad_id)

        return ReplayAnchors(rows=[self._anchor_rows[self._anchor_key(r)] if r.subject else [] for r in plan.requests],
                             teacher=teacher)

    def revert(self) -> None:
        """Undo every edit: the model is exactly the unedited one again."""
        self.params.revert()
        self.ledger.clear()

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """Within the block the model is exactly the unedited one; the edits come back after it."""
        edited = {name: p.detach().clone() for name, p in self.params.named_trainable().items()}
        self.params.revert()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.named_trainable().items():
                    param.copy_(edited[name])

    # -- querying ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_many(self, prompts: list[str], max_new_tokens: int | list[int] = 16,
                      adapters: list[str] | None = None) -> list[str]:
        """Greedy continuations of ``prompts`` (without the prompt, special tokens dropped).

        ``max_new_tokens`` may differ per prompt. ``adapters`` (one name per prompt) routes each
        prompt to one of the adapters of :meth:`edit_each`.
        """
        for i, prompt in enumerate(prompts):
            if not prompt or not prompt.strip():
                raise InvalidRequestError(f"prompt {i} is empty")
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        rows = [self.tokenizer(p.strip())["input_ids"] for p in prompts]
        batch = pad_rows(rows, self.tokenizer.pad_token_id, side="left", device=model_device(self.model))
        eos = self.tokenizer.eos_token_id
        routing = {} if adapters is None else {"adapter_names": list(adapters)}
        out = self.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
            max_new_tokens=max(limits), pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
            temperature=None, top_p=None, top_k=None, **routing,
        )
        width = batch.input_ids.shape[1]
        return [self.tokenizer.decode(seq[width: width + limit], skip_special_tokens=True).strip()
                for seq, limit in zip(out, limits)]

    def generate(self, prompt: str, max_new_tokens: int = 16) -> str:
        """Greedy continuation of ``prompt``."""
        return self.generate_many([prompt], max_new_tokens)[0]

    @torch.no_grad()
    def logits(self, text: str) -> torch.Tensor:
        """Next-token logits at every position of ``text`` ([tokens, vocab])."""
        ids = torch.tensor([self.tokenizer(text)["input_ids"]], device=model_device(self.model))
        return self.model(input_ids=ids).logits[0]

    # -- persistence -------------------------------------------------------------------------
    def ledger_dict(self) -> dict[str, Any]:
        """The JSON ledger saved beside the weights: model, method, configuration and edits."""
        trainable, total = self.parameter_counts()
        return {"format": "icelora-edit", "format_version": LEDGER_FORMAT, "icelora_version": __version__,
                "model": self.model_name, "model_fingerprint": model_fingerprint(self.loaded.model, self.architecture),
                "method": self.method, "config": self.config.to_dict(), "layers": self.layers,
                "modules": self.params.module_names, "trainable_params": trainable, "total_params": total,
                "requests": [r.to_dict() for r in self.ledger]}

    def save(self, folder: str | Path, into_existing: bool = False) -> Path:
        """Save the edit: adapter (or edited matrices) in safetensors plus the ledger.

        An existing folder is written into only if it is an icelora edit folder (or
        ``into_existing``, for a training run's own output folder). Files are written beside it
        first and then moved in, so a failure leaves no file half-written.
        """
        target = Path(folder)
        if not into_existing:
            check_save_target(target)
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            self.params.save(staging)
            (staging / LEDGER_FILE).write_text(json.dumps(self.ledger_dict(), indent=2) + "\n")
            for item in staging.iterdir():
                os.replace(item, target / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    @classmethod
    def load(cls, folder: str | Path, model: str | LoadedModel | None = None, device: str | None = None,
             dtype: str | torch.dtype | None = None) -> ICELoRAEditor:
        """An editor holding the edit saved in ``folder`` (on ``model``, else the ledger's model)."""
        path = Path(folder)
        ledger = read_ledger(path)
        source = model if model is not None else ledger["model"]
        loaded = load_model(source, device=device, dtype=dtype) if isinstance(source, str) else source
        expected = ledger.get("model_fingerprint")
        actual = model_fingerprint(loaded.model, inspect_architecture(loaded.model))
        if expected and expected != actual:
            raise AdapterFolderError(f"{path} holds an edit of another model ({ledger['model']}: {expected}), "
                                     f"not of {loaded.name} ({actual})")
        editor = cls(loaded, method=ledger["method"],
                     config=EditConfig.from_dict(ledger["config"], source=str(path / LEDGER_FILE)))
        editor.params.load(path)
        editor.ledger = [EditRequest.from_dict(r) for r in ledger.get("requests", [])]
        return editor

    def export_merged(self, folder: str | Path) -> Path:
        """Write the edited model as a plain Hugging Face model folder (adapters merged)."""
        target = Path(folder)
        if target.exists() and any(target.iterdir()):
            raise AdapterFolderError(f"{target} exists and is not empty")
        target.mkdir(parents=True, exist_ok=True)
        base = self.loaded.model
        state = {k: v.detach().contiguous() for k, v in self.params.merged_state_dict().items()}
        base.save_pretrained(str(target), state_dict=state)
        self.tokenizer.save_pretrained(str(target))
        (target / LEDGER_FILE).write_text(json.dumps(self.ledger_dict(), indent=2) + "\n")
        return target


def read_ledger(folder: Path) -> dict[str, Any]:
    """The ledger of an icelora edit folder, or an error saying why ``folder`` is not one."""
    path = folder / LEDGER_FILE
    if not path.is_file():
        raise AdapterFolderError(f"{folder} is not an icelora edit folder (no {LEDGER_FILE})")
    try:
        ledger = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFolderError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(ledger, dict) or ledger.get("format") != "icelora-edit":
        raise AdapterFolderError(f"{path}: not an icelora ledger")
    for key in ("model", "method", "config"):
        if key not in ledger:
            raise AdapterFolderError(f"{path}: field {key!r} is missing")
    return ledger


def check_save_target(folder: Path) -> None:
    """Raise unless ``folder`` is absent, empty, or an icelora edit folder (safe to replace)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise AdapterFolderError(f"--save target {folder} exists and is not a folder")
    if any(folder.iterdir()):
        read_ledger(folder)
