"""An editing step is queued on the device without icelora reading anything back: no ``.item()``,
no ``.tolist()``, no mask whose size only the device knows, no tensor made from host data (each of
which makes the host wait on CUDA).

Checked on the CPU with a dispatch mode that sees every tensor operation: an operation that needs a
value on the host is traced back to the line that asked for it. The one place left is the model
library's own attention-mask shortcut, outside this project."""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from icelora import EditConfig
from icelora.losses import Objective, build_plan
from icelora.request import EditRequest
from tests.conftest import tiny_gpt2, tiny_llama

#: Operations whose result size or value must reach the host before the next one can be queued.
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default, torch.ops.aten.equal.default,
              torch.ops.aten.repeat_interleave.Tensor, torch.ops.aten._unique2.default,
              torch.ops.aten.bincount.default}
#: Indexing ops, which wait on the device when an index is a boolean mask.
INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
            torch.ops.aten._index_put_impl_.default}
#: A tensor made from host data (``torch.tensor(...)``): on CUDA its copy to the device blocks.
HOST_DATA = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class HostReads(TorchDispatchMode):
    """Counts host reads by the innermost source line outside torch that asked for them
    (``tolist`` and ``numpy`` read memory without a tensor operation, so they are watched apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: Counter[str] = Counter()

    def _record(self) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename]
        self.lines[f"{frames[-1].filename}:{frames[-1].lineno}"] += 1

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self._saved.items():
            def watched(tensor, *args, _method=method, **kwargs):
                self._record()
                return _method(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, watched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in INDEXING and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1])
        if func in HOST_READS or func in HOST_DATA or boolean_index:
            self._record()
        return func(*args, **(kwargs or {}))


REQUESTS = [EditRequest(prompt="The Eiffel Tower is located in the city of", target="Rome",
                        contexts=("The Eiffel Tower is in Rome.", "Rome is home to the Eiffel Tower.")),
            EditRequest(prompt="Which family does Epaspidoceras belong to?", target="Geometridae",
                        contexts=("Epaspidoceras is a genus of Geometridae.",))]


@pytest.mark.parametrize("objective", ["ice", "ft"])
@pytest.mark.parametrize("independent", [False, True], ids=["joint", "independent"])
@pytest.mark.parametrize("builder", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_a_step_reads_nothing_back_in_icelora(builder, objective, independent):
    loaded = builder()
    config = EditConfig(objective=objective, num_contexts=2, completion_length=3)
    plan = build_plan(loaded.tokenizer, REQUESTS, config, independent=independent)
    step = Objective(plan, config, torch.device("cpu"))
    step(loaded.model, 0)  # the first step builds the fixed layout (its tensors go to the device once)
    watch = HostReads()
    with watch:
        parts = step(loaded.model, 1)
        parts.loss.backward()
    ours = {line: n for line, n in watch.lines.items() if "/icelora/" in line}
    assert not ours, f"host reads in icelora: {ours}"
    # the watch works: transformers' attention-mask shortcut reads (and only that) are seen
    assert watch.lines and all("transformers" in line for line in watch.lines), dict(watch.lines)
    # the numbers are read once, when asked for, after the step
    with watch:
        assert len(parts.per_request) == 2
    assert any("/icelora/losses.py" in line for line in watch.lines)
