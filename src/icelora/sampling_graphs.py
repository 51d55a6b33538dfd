"""The sampling passes of an ICE step, replayed from CUDA graphs.

Every step of one edit samples after the same context rows: the prefill and the ``m - 1`` cached
decode passes have the same shapes at every step, and only the LoRA weights (updated in place by
the optimizer) and the drawn tokens change. On a GPU these passes are bound by the host launching
thousands of small kernels (``benchmarks/profile_edit.py``), so :class:`FixedShapeSampler` records
each pass once per edit as a CUDA graph and replays it at the later steps.

What a graph may not do is ask the host anything, so each pass gets everything the model would
otherwise work out from the data:

- the attention masks, made once per edit in the form the model's attention implementation uses
  (4-D masks are passed through by transformers unchanged, with no test of the padding);
- the position ids of every decode step;
- a KV cache whose layers are already initialised.

The draws between passes stay outside the graphs (same ``torch.multinomial`` calls and generators
as :func:`icelora.sampling.sample_from_batch`), so a step draws its completion with the same random
numbers either way (adapter dropout, off in every preset, draws inside the passes). Without CUDA
(or with ``graphs=False``) the same fixed-shape passes run eagerly; the tests check them against
:func:`~icelora.sampling.sample_from_batch` on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from icelora.sampling import Completions, sample_with
from icelora.tokenization import PaddedBatch

log = logging.getLogger(__name__)

#: Attention implementations whose prepared 4-D masks are plain tensors made here.
MASKED_ATTENTION = ("sdpa", "eager")

#: The ``--cuda-graphs`` choices of the command-line tools and the editor setting each gives: the
#: ICE step's sampling and training passes from CUDA graphs on CUDA (``auto``), always where they
#: apply (``yes``), never (``no``), or the sampling passes only (``sampling``).
CUDA_GRAPHS_SETTINGS: dict[str, bool | str | None] = {"auto": None, "yes": True, "no": False,
                                                     "sampling": "sampling"}

#: Models whose sampling passes failed to record: they are not tried again (the training pass has
#: its own set, :data:`icelora.training_graphs._UNRECORDABLE`: one may record where the other fails).
_UNRECORDABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation named in the model's config (``None`` when it names none)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def fixed_shape_supported(model: nn.Module) -> bool:
    """Whether the fixed-shape passes can drive ``model``: a decoder whose attention takes a
    prepared 4-D mask, whose rotary embedding (if any) does not rescale with the positions seen
    (that reads the largest position on the host), and whose KV cache is made of plain dynamic
    layers; and whose passes have not failed to record before."""
    if model in _UNRECORDABLE or attention_implementation(model) not in MASKED_ATTENTION:
        return False
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and ("dynamic" in str(rope.get("rope_type", "")) or rope.get("rope_type") == "longrope"):
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def prepared_mask(model: nn.Module, padding: torch.Tensor, q_length: int, dtype: torch.dtype) -> torch.Tensor:
    """The causal attention mask of ``q_length`` new tokens after ``padding.shape[1] - q_length``
    cached ones, in the form the model's attention implementation takes (``[B, 1, q, kv]``: boolean
    for ``sdpa``, additive for ``eager``). ``padding``: [B, kv], 1 on real tokens."""
    kv_length = padding.shape[1]
    make = ALL_MASK_ATTENTION_FUNCTIONS[attention_implementation(model)]
    return make(batch_size=padding.shape[0], q_length=q_length, kv_length=kv_length,
                q_offset=kv_length - q_length, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=padding.bool(), allow_is_causal_skip=False, dtype=dtype,
                config=model.config, use_vmap=False, device=padding.device)


def empty_cache(model: nn.Module, dtype: torch.dtype, device: torch.device) -> DynamicCache:
    """A KV cache for ``model`` with every layer initialised (empty), so a pass appends to it
    without making a tensor from host data."""
    cache = DynamicCache(config=model.config)
    nothing = torch.empty(0, dtype=dtype, device=device)
    for layer in cache.layers:
        layer.lazy_initialization(nothing, nothing)
    return cache


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (that of its input embeddings)."""
    return model.get_input_embeddings().weight.dtype


@functools.cache
def side_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """One stream per device and role (``warm-up``, ``capture``) for every edit: each new stream
    gets its own cuBLAS workspace, kept until the process ends, so a stream per edit would grow
    the memory held edit after edit."""
    return torch.cuda.Stream(device)


@contextlib.contextmanager
def capturing(device: torch.device) -> Iterator[Any]:
    """Work on the shared capture stream of ``device`` (after everything queued before is done),
    with a fresh memory pool for the recordings made inside; the current stream waits for it after."""
    torch.cuda.synchronize(device)
    stream = side_stream(device, "capture")
    with torch.cuda.stream(stream):
        yield torch.cuda.graph_pool_handle()
    torch.cuda.current_stream(device).wait_stream(stream)


def recorded(graph: torch.cuda.CUDAGraph, pool: Any, work: Callable[[], Any]) -> Any:
    """Record ``work()`` into ``graph`` (in ``pool``; call inside :func:`capturing`); its result."""
    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
    try:
        return work()
    finally:
        graph.capture_end()


class FixedShapeSampler:
    """:func:`icelora.sampling.sample_from_batch` for one fixed left-padded batch, every pass with
    inputs made once (masks, positions, token buffers), optionally replayed from CUDA graphs.

    Call it with the same arguments as ``sample_from_batch`` (the batch and length must be the
    ones it was made for). With ``graphs``, the first call runs the passes eagerly on a side stream
    (CUDA's warm-up before a capture) and then records them; later calls replay the recordings. A
    capture that fails is logged and the sampler keeps running the passes eagerly.
    """

    def __init__(self, model: nn.Module, batch: PaddedBatch, length: int, graphs: bool) -> None:
        self.batch = batch
        self.length = length
        self.graphs = graphs and batch.input_ids.device.type == "cuda"
        self.dtype = compute_dtype(model)
        device = batch.input_ids.device
        rows, width = batch.input_ids.shape
        padding = batch.attention_mask
        self.masks = [prepared_mask(model, padding, width, self.dtype)]
        self.positions: list[torch.Tensor] = []
        for step in range(1, length):
            padding = torch.cat([padding, torch.ones((rows, 1), dtype=padding.dtype, device=device)], dim=1)
            self.masks.append(prepared_mask(model, padding, 1, self.dtype))
            self.positions.append(batch.position_ids[:, -1:] + step)
        self.tokens = [torch.zeros((rows, 1), dtype=torch.long, device=device) for _ in range(length - 1)]
        self.recorded: list[torch.cuda.CUDAGraph] | None = None
        self.outputs: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []

    def _pass(self, model: nn.Module, index: int, cache: DynamicCache) -> torch.Tensor:
        """Pass ``index`` (0: the prefill; k: decode step k) appending to ``cache``; its last logits."""
        if index == 0:
            inputs = {"input_ids": self.batch.input_ids, "position_ids": self.batch.position_ids}
        else:
            inputs = {"input_ids": self.tokens[index - 1], "position_ids": self.positions[index - 1]}
        out = model(**inputs, attention_mask=self.masks[index], cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _sample(self, run_pass: Callable[[int], torch.Tensor], temperature: float,
                generators: Sequence[torch.Generator], eos_ids: set[int],
                groups: list[torch.Tensor] | None) -> Completions:
        """The sampling loop of ``sample_from_batch``, pass ``k`` from ``run_pass(k)`` after the
        token drawn before it is written into its input buffer."""
        def after(index: int, token: torch.Tensor | None) -> torch.Tensor:
            if token is not None:
                self.tokens[index - 1].copy_(token)
            return run_pass(index)

        return sample_with(after, self.length, temperature, generators, eos_ids, groups)

    def _eager(self, model: nn.Module, temperature: float, generators: Sequence[torch.Generator],
               eos_ids: set[int], groups: list[torch.Tensor] | None) -> Completions:
        """The passes run eagerly, on a fresh cache."""
        cache = empty_cache(model, self.dtype, self.batch.input_ids.device)
        return self._sample(lambda index: self._pass(model, index, cache), temperature, generators, eos_ids, groups)

    def _record(self, model: nn.Module) -> None:
        """Capture every pass as a CUDA graph sharing one memory pool; keep each pass's outputs and
        cache tensors alive, since the later passes (and the replays) read them where they are."""
        device = self.batch.input_ids.device
        graphs, outputs = [], []
        with capturing(device) as pool:
            cache = empty_cache(model, self.dtype, device)
            for index in range(self.length):
                graph = torch.cuda.CUDAGraph()
                outputs.append(recorded(graph, pool, lambda index=index: self._pass(model, index, cache)))
                graphs.append(graph)
                self.kept.extend(t for layer in cache.layers for t in (layer.keys, layer.values))
        self.recorded, self.outputs = graphs, outputs

    def _replay(self, index: int) -> torch.Tensor:
        """Pass ``index`` replayed; its output tensor (overwritten by the next replay)."""
        self.recorded[index].replay()
        return self.outputs[index]

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch: PaddedBatch, length: int, temperature: float,
                 generators: Sequence[torch.Generator], eos_ids: set[int],
                 groups: list[torch.Tensor] | None = None, forward_kwargs: dict[str, Any] | None = None
                 ) -> Completions:
        """Sampled completions, as :func:`icelora.sampling.sample_from_batch` gives them."""
        if batch is not self.batch or length != self.length or forward_kwargs:
            raise ValueError("a fixed-shape sampler runs only the batch and length it was made for, unrouted")
        if self.recorded:
            return self._sample(self._replay, temperature, generators, eos_ids, groups)
        if not self.graphs:
            return self._eager(model, temperature, generators, eos_ids, groups)
        device = batch.input_ids.device
        side = side_stream(device, "warm-up")
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            result = self._eager(model, temperature, generators, eos_ids, groups)
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        for tensor in (result.tokens, result.teacher_logits, result.alive):
            tensor.record_stream(current)  # made on the side stream, used (and freed) on this one
        try:
            self._record(model)
        except Exception as error:  # any failure to record leaves the eager passes
            log.warning("sampling passes not recorded as CUDA graphs (%s); running them eagerly from now on", error)
            _UNRECORDABLE.add(model)
            self.graphs, self.recorded, self.outputs, self.kept = False, None, [], []
        return result
