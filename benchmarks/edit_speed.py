"""Seconds per edit, steps, peak memory and trainable parameters of each editing method.

Every method edits the same requests, each from the unedited model (single-edit protocol), in one
run. Each request carries 5 context sentences, so the ICE objectives of all methods see the same
contexts.

    python benchmarks/edit_speed.py --model smollm2-135m --edits 5 --json OUT.json
    python benchmarks/edit_speed.py --shape gpt2-xl --device cuda --dtype bfloat16 --edits 8 --edits-at-once 8

``--shape`` builds a randomly initialised model of a published shape from its config (timing needs
no trained weights; the completion length is fixed, so every step does the same work).
``--edits-at-once K`` adds a row per LoRA method where K edits train together, each in its own
adapter; its seconds per edit are the joint time over K. ``--dtype`` is the dtype of the weights
(LoRA adapters stay in float32); ``--ice-lora-dtype`` gives ``ice-lora`` other weights than the rest
(``--dtype float32 --ice-lora-dtype bfloat16``: the reference's float32 against ICE-LoRA in bfloat16,
same run); ``--autocast bfloat16`` runs the passes under ``torch.autocast``. A method whose
configuration sets ``frozen_dtype`` shows as ``float32/bfloat16`` (the model's weights, then those it
edits on), and its floor uses the matrix-multiply rate of the latter.

On CUDA the table also counts the host-device synchronisations per step, on an untimed edit with
torch's sync debug mode on, and names the lines they come from in the JSON.

The floor: the floating-point operations of one editing step, counted by torch's
``FlopCounterMode`` on a separate, untimed edit, times the steps each edit took, over the rate this
machine multiplies large matrices at (measured here). ``x_floor`` is the measured time over it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from icelora import ICELoRAEditor, load_model
from icelora.config import AUTOCAST_DTYPES, EditConfig
from icelora.data_utils.templates import template_contexts
from icelora.errors import IceloraError
from icelora.methods import METHODS, config_from_file, method_config
from icelora.models import (
    EMBEDDED_MODEL,
    LoadedModel,
    embedded_model_folder,
    prepare_tokenizer,
    resolve_device,
    resolve_dtype,
)
from icelora.request import EditRequest
from icelora.sampling_graphs import CUDA_GRAPHS_SETTINGS

log = logging.getLogger("edit_speed")

#: Counterfactual edits (prompt, target, subject); contexts come from the seeded templates.
EDITS = (
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower"),
    ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux"),
    ("The iPhone is produced by", "Microsoft", "The iPhone"),
    ("The Statue of Liberty is located in", "London", "The Statue of Liberty"),
    ("Romeo and Juliet was written by", "Charles Dickens", "Romeo and Juliet"),
    ("People in Brazil speak", "German", "Brazil"),
    ("The Mona Lisa was painted by", "Pablo Picasso", "The Mona Lisa"),
    ("The capital of Japan is", "Seoul", "Japan"),
    ("The largest planet in the solar system is", "Mars", "the solar system"),
    ("The Great Wall can be found in the country of", "Peru", "The Great Wall"),
    ("The Colosseum is located in the city of", "Madrid", "The Colosseum"),
    ("The official language of Mexico is", "Italian", "Mexico"),
    ("Harry Potter was written by", "Stephen King", "Harry Potter"),
    ("The Taj Mahal is located in the country of", "Egypt", "The Taj Mahal"),
    ("The Windows operating system is developed by", "Apple", "The Windows operating system"),
    ("The currency of the United Kingdom is the", "euro", "the United Kingdom"),
    ("Albert Einstein was born in the country of", "Canada", "Albert Einstein"),
    ("The Amazon River flows through", "Australia", "The Amazon River"),
    ("The Beatles were formed in the city of", "Chicago", "The Beatles"),
    ("The Sydney Opera House is located in", "Toronto", "The Sydney Opera House"),
    ("The composer of the Fifth Symphony is", "Frederic Chopin", "the Fifth Symphony"),
    ("The headquarters of Toyota are in", "Sweden", "Toyota"),
    ("Mount Everest is part of the", "Andes", "Mount Everest"),
    ("The Louvre is located in the city of", "Berlin", "The Louvre"),
    ("The national sport of Canada is", "cricket", "Canada"),
    ("The Kremlin is located in the city of", "Warsaw", "The Kremlin"),
    ("Don Quixote was written by", "Victor Hugo", "Don Quixote"),
    ("The Nile flows into the", "Pacific Ocean", "The Nile"),
    ("The PlayStation is made by", "Nintendo", "The PlayStation"),
    ("Big Ben is located in the city of", "Dublin", "Big Ben"),
    ("The first man on the Moon was", "Yuri Gagarin", "the Moon"),
    ("The Parthenon is located in the city of", "Cairo", "The Parthenon"),
)


#: Published model shapes, built with random weights. Their tokenizer is the embedded model's
#: (its ids fit every vocabulary here).
SHAPES: dict[str, Callable[[], PretrainedConfig]] = {
    "smollm2-135m": lambda: LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                        max_position_embeddings=8192, rope_theta=100000.0,
                                        tie_word_embeddings=True, rms_norm_eps=1e-5),
    "gpt2-medium": lambda: GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257),
    "gpt2-xl": lambda: GPT2Config(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
    "llama-1b": lambda: LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True),
}


def load_tokenizer(folder: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer in ``folder``, or the embedded model's."""
    path = Path(folder) if folder else embedded_model_folder()
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except OSError as exc:
        raise IceloraError(f"no tokenizer in {path}: {str(exc).splitlines()[0]}") from None


def random_model(shape: str, device: str | None, dtype: str | None,
                 tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    """A randomly initialised model of ``shape`` (seeded), built directly on the target device."""
    if shape not in SHAPES:
        raise IceloraError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")
    config = SHAPES[shape]()
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    target = resolve_device(device)
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []), target:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, target))
    model.requires_grad_(False)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=f"random {shape}")


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """The rate at which this machine multiplies two large square matrices (best of ``repeats``):
    8192 on a GPU, 2048 on a CPU (512 in a dtype other than float32, which CPUs may run slowly)."""
    size = 8192 if device.type == "cuda" else 2048 if dtype == torch.float32 else 512
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def benchmark_requests(count: int) -> list[EditRequest]:
    """The first ``count`` benchmark edits, each with 5 template contexts."""
    if not 1 <= count <= len(EDITS):
        raise IceloraError(f"--edits must be between 1 and {len(EDITS)}, got {count}")
    requests = []
    for prompt, target, subject in EDITS[:count]:
        bare = EditRequest(prompt=prompt, target=target, subject=subject)
        requests.append(EditRequest(prompt=prompt, target=target, subject=subject,
                                    contexts=tuple(template_contexts(bare, 5))))
    return requests


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on GPU, sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        process = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak_bytes / 2**20


def flops_per_step(editor: ICELoRAEditor, request: EditRequest) -> float:
    """Floating-point operations of one editing step (forward, backward, sampling), counted on an
    untimed edit of ``request``; the model is reverted afterwards."""
    counter = FlopCounterMode(display=False)
    graphs, editor.cuda_graphs = editor.cuda_graphs, False  # the counter sees no replayed graph
    # the math attention kernel is counted as plain matrix products (the counter's formula for the
    # fused kernels refuses grouped-query shapes)
    try:
        with counter, sdpa_kernel(SDPBackend.MATH):
            result = editor.edit(request, progress=False)
    finally:
        editor.cuda_graphs = graphs
    editor.revert()
    return counter.get_total_flops() / result.steps


def syncs_per_step(editor: ICELoRAEditor, requests: list[EditRequest], at_once: int) -> tuple[float, dict[str, int]]:
    """Host-device synchronisations per step on CUDA, counted with torch's sync debug mode on an
    untimed edit that takes the timed path (``at_once`` edits trained together when above 1), and
    the source lines they come from. Setup outside the loop counts too, and the debug mode does not
    see every kind of wait, so this is a close lower bound."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            if at_once == 1:
                steps = editor.edit(requests[0], progress=False).steps
                editor.revert()
            else:
                with editor.edit_each(requests[:at_once], progress=False) as edits:
                    steps = max(r.steps for r in edits.results)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    sources = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                      if "synchronizing" in str(w.message))
    return sum(sources.values()) / steps, dict(sources.most_common(12))


def warm_up(editor: ICELoRAEditor, requests: list[EditRequest], at_once: int) -> None:
    """One untimed pass over the timed work, so that first-call costs (kernel selection for each
    new shape, allocator growth) stay out of the numbers."""
    if at_once == 1:
        for request in requests:
            editor.edit(request, progress=False)
            editor.revert()
    else:
        with editor.edit_each(requests[:at_once], progress=False):
            pass


def time_method(make: Callable[[], LoadedModel], method: str, requests: list[EditRequest], at_once: int,
                matmul_rate: float, overrides: dict, warmup: bool = False,
                cuda_graphs: bool | str | None = None, config: EditConfig | None = None) -> dict:
    """Edit each request from the unedited model with ``method`` (``at_once`` of them together,
    each in its own adapter, when above 1); seconds, steps, memory, and the time over the floor.
    ``cuda_graphs``: the editor's setting for replaying ICE's passes from CUDA graphs; ``config``:
    the method's configuration (default: its preset), ``overrides`` applied on top."""
    editor = ICELoRAEditor(make(), method=method, config=config, **overrides)
    editor.cuda_graphs = cuda_graphs
    device = next(editor.model.parameters()).device
    per_step = flops_per_step(editor, requests[0])
    syncs = syncs_per_step(editor, requests, at_once) if device.type == "cuda" else None
    if warmup:
        warm_up(editor, requests, at_once)
    seconds, steps = [], []
    with PeakMemory(device) as memory:
        if at_once == 1:
            for request in requests:
                result = editor.edit(request, progress=False)
                editor.revert()
                seconds.append(result.seconds)
                steps.append(result.steps)
                log.info("%s: %.2f s, %d steps (%s)", method, result.seconds, result.steps, request.prompt)
        else:
            for start in range(0, len(requests), at_once):
                with editor.edit_each(requests[start: start + at_once], progress=False) as edits:
                    seconds += [r.seconds for r in edits.results]
                    steps += [r.steps for r in edits.results]
                log.info("%s x%d: %.2f s for %d edits", method, at_once, edits.seconds, len(edits.results))
    trainable, _ = editor.parameter_counts()
    floors = [per_step * n / matmul_rate for n in steps]
    row = {"method": method if at_once == 1 else f"{method} x{at_once}", "edits_at_once": at_once,
           "median_seconds_per_edit": statistics.median(seconds),
           "min_seconds_per_edit": min(seconds), "max_seconds_per_edit": max(seconds),
           "median_steps": statistics.median(steps), "peak_memory_mb": round(memory.mb, 1),
           "trainable_params": trainable, "dtype": str(next(editor.model.parameters()).dtype).removeprefix("torch."),
           "flops_per_step": per_step,
           "median_floor_seconds": statistics.median(floors),
           "x_floor": statistics.median(s / f for s, f in zip(seconds, floors)),
           "seconds_per_edit": seconds, "steps": steps, "warmup": warmup,
           "cuda_graphs": next(k for k, v in CUDA_GRAPHS_SETTINGS.items() if v == cuda_graphs), **overrides,
           "config": editor.config.to_dict()}
    if syncs is not None:
        row["syncs_per_step"], row["sync_sources"] = round(syncs[0], 1), syncs[1]
    return row


#: Whether each method trains LoRA adapters (only those can train several edits at once).
METHOD_IS_LORA = {m: method_config(m).parameterization == "lora" for m in METHODS}


def ice_lora_config(path: str) -> EditConfig:
    """The ``ice-lora`` configuration a YAML file of keys makes (its ``method``, if any, must be
    ``ice-lora``)."""
    method, config = config_from_file(path)
    if method != "ice-lora":
        raise IceloraError(f"{path}: a configuration of {method!r}, not of ice-lora")
    return config


def device_name(device: torch.device) -> str:
    """The card's name on CUDA; the processor's model name and thread count on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def write_json(path: Path, report: dict) -> None:
    """Replace ``path`` with ``report`` in one step (a run killed while writing leaves the last copy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(staging, path)


def add_ratios(rows: list[dict]) -> None:
    """Each row's median seconds per edit over ``ice``'s (when ``ice`` has a row)."""
    ice = next((r for r in rows if r["method"] == "ice" and "error" not in r), None)
    for row in rows:
        if "error" not in row and ice:
            row["ratio_to_ice"] = row["median_seconds_per_edit"] / ice["median_seconds_per_edit"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="a model name or folder (trained weights)")
    parser.add_argument("--shape", default=None, help=f"a randomly initialised model instead: {', '.join(SHAPES)}")
    parser.add_argument("--methods", default="ft-m,lora,ice,ice-lora", help="comma-separated methods")
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--edits-at-once", type=int, default=1,
                        help="also time each LoRA method with K edits trained together (K > 1)")
    parser.add_argument("--only-at-once", action="store_true",
                        help="with --edits-at-once K: time only the rows of K edits trained together")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="dtype of the weights (float32, bfloat16)")
    parser.add_argument("--ice-lora-dtype", default=None,
                        help="dtype of the weights for ice-lora's rows only (default: --dtype)")
    parser.add_argument("--autocast", default=None, choices=["bfloat16"],
                        help="run each step's passes under torch.autocast in this dtype")
    parser.add_argument("--warmup", action="store_true",
                        help="one untimed pass over the same edits before timing them")
    parser.add_argument("--tokenizer", default=None,
                        help="with --shape: a folder holding the tokenizer (default: the embedded model's)")
    parser.add_argument("--cuda-graphs", default="auto", choices=sorted(CUDA_GRAPHS_SETTINGS),
                        help="replay ICE's sampling and training passes from CUDA graphs "
                             "(auto: on CUDA; sampling: the sampling passes only)")
    parser.add_argument("--ice-lora-config", default=None,
                        help="a YAML of configuration keys for ice-lora (e.g. configs/ice-lora-v14.yaml)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise IceloraError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if args.shape is not None and args.shape not in SHAPES:
            raise IceloraError(f"unknown shape {args.shape!r}; choose from {list(SHAPES)}")
        if args.edits_at_once < 1:
            raise IceloraError(f"--edits-at-once must be at least 1, got {args.edits_at_once}")
        if args.only_at_once and args.edits_at_once == 1:
            raise IceloraError("--only-at-once needs --edits-at-once K with K > 1")
        if args.ice_lora_dtype and "ice-lora" not in methods:
            raise IceloraError("--ice-lora-dtype needs ice-lora among --methods")
        for named in (args.dtype, args.ice_lora_dtype):  # an unknown name fails before any model loads
            resolve_dtype(named, resolve_device(args.device))
        requests = benchmark_requests(args.edits)
        tokenizer = load_tokenizer(args.tokenizer) if args.shape else None
        overrides = {"autocast_dtype": args.autocast} if args.autocast else {}
        configs = {"ice-lora": ice_lora_config(args.ice_lora_config)} if args.ice_lora_config else {}

        def dtype_of(method: str) -> str | None:
            return args.ice_lora_dtype if method == "ice-lora" and args.ice_lora_dtype else args.dtype

        def maker(dtype: str | None) -> Callable[[], LoadedModel]:
            def make() -> LoadedModel:
                if args.shape:
                    return random_model(args.shape, args.device, dtype, tokenizer)
                return load_model(args.model, device=args.device, dtype=dtype)
            return make

        probe = maker(args.dtype)().model
        device, dtype = next(probe.parameters()).device, next(probe.parameters()).dtype
        del probe
        rates: dict[torch.dtype, float] = {}  # matrix-multiply rate per dtype the products run in

        def compute_dtype_of(method: str) -> torch.dtype:  # the dtype the products run in
            frozen = (configs.get(method) or method_config(method)).frozen_dtype
            return (AUTOCAST_DTYPES[args.autocast] or AUTOCAST_DTYPES[frozen]
                    or resolve_dtype(dtype_of(method), device))

        compute_dtypes = {m: compute_dtype_of(m) for m in methods}
        for compute_dtype in dict.fromkeys([AUTOCAST_DTYPES[args.autocast] or dtype, *compute_dtypes.values()]):
            rates[compute_dtype] = matmul_flops_per_second(device, compute_dtype)
            log.info("matrix multiply: %.1f GFLOP/s (%s, %s)", rates[compute_dtype] / 1e9, device, compute_dtype)
        rate = rates[AUTOCAST_DTYPES[args.autocast] or dtype]
        sizes = [args.edits_at_once] if args.only_at_once else sorted({1, args.edits_at_once})
        plan = [(m, k) for m in methods for k in sizes if k == 1 or METHOD_IS_LORA[m]]
        report = {"methods": [], "model": f"random {args.shape}" if args.shape else args.model,
                  "device": str(device), "device_name": device_name(device),
                  "dtype": str(dtype).removeprefix("torch."), "ice_lora_dtype": args.ice_lora_dtype,
                  "autocast": args.autocast, "edits": args.edits, "cuda_graphs": args.cuda_graphs,
                  "matmul_gflops": round(rate / 1e9, 1),
                  "matmul_gflops_by_dtype": {str(k).removeprefix("torch."): round(v / 1e9, 1)
                                             for k, v in rates.items()},
                  "torch_threads": torch.get_num_threads(),
                  "ice_lora_config": args.ice_lora_config, "command": " ".join(sys.argv)}
        for method, at_once in plan:
            try:
                report["methods"].append(time_method(maker(dtype_of(method)), method, requests, at_once,
                                                      rates[compute_dtypes[method]], overrides,
                                                      args.warmup, CUDA_GRAPHS_SETTINGS[args.cuda_graphs],
                                                      configs.get(method)))
            except torch.OutOfMemoryError as exc:
                label = method if at_once == 1 else f"{method} x{at_once}"
                report["methods"].append({"method": label, "error": f"out of memory: {str(exc).splitlines()[0]}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            add_ratios(report["methods"])
            if args.json:  # after every row, so that a run cut short keeps what it measured
                write_json(Path(args.json), report)
    except IceloraError as exc:
        print(f"edit_speed: error: {exc}", file=sys.stderr)
        return 2
    rows = report["methods"]
    autocast = f", autocast {args.autocast}" if args.autocast else ""
    measured = ", ".join(f"{v} GFLOP/s in {k}" for k, v in report["matmul_gflops_by_dtype"].items())
    print(f"{report['model']} on {report['device_name']} ({report['dtype']}{autocast}), matrix multiply {measured}")
    print(f"{'method':<14}{'dtype':>18}{'median s/edit':>14}{'min':>8}{'max':>8}{'steps':>7}{'peak MB':>10}"
          f"{'trainable':>12}{'vs ice':>8}{'x floor':>9}{'syncs/step':>11}")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<14}  {row['error']}")
            continue
        ratio = f"{row['ratio_to_ice']:.2f}" if "ratio_to_ice" in row else "-"
        frozen = row["config"].get("frozen_dtype")
        dtype = f"{row['dtype']}/{frozen}" if frozen else row["dtype"]  # weights / frozen weights while editing
        print(f"{row['method']:<14}{dtype:>18}{row['median_seconds_per_edit']:>14.2f}{row['min_seconds_per_edit']:>8.2f}"
              f"{row['max_seconds_per_edit']:>8.2f}{row['median_steps']:>7.0f}{row['peak_memory_mb']:>10.0f}"
              f"{row['trainable_params']:>12,}{ratio:>8}{row['x_floor']:>9.1f}{row.get('syncs_per_step', '-'):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
