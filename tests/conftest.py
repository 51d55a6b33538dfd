"""Shared fixtures: tiny random GPT-2 and Llama models with tokenizers trained in the test session,
and the real embedded model for the integration tests."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from icelora.models import LoadedModel, prepare_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "Rome is the capital of Italy and Paris is the capital of France.",
    "Which family does Epaspidoceras belong to? Noctuidae.",
    "The mother tongue of Danielle Darrieux is French.",
    "Remember this fact: Now: the answer is new information about the city.",
    "Q: A: It is well known that the latest records show.",
    "The place of death of Leo Arons is Berlin. His father is Albert Arons. Is he still alive? No.",
    "The taxon rank is genus; Geometridae and Owlet moths are a family. What family are they?",
] * 20


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-2: no BOS, no pad token, EOS ``<|endoftext|>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                     bos_token="<|endoftext|>"))


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-like BPE like Llama: BOS ``<s>`` prepended, ``<unk>`` for unknown characters."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>"))


def tiny_gpt2() -> LoadedModel:
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=3, n_head=2,
                        initializer_range=0.3, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LoadedModel(model=GPT2LMHeadModel(config).eval(), tokenizer=tokenizer, name="tiny-gpt2")


def tiny_llama() -> LoadedModel:
    tokenizer = llama_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=False)
    return LoadedModel(model=LlamaForCausalLM(config).eval(), tokenizer=tokenizer, name="tiny-llama")


TINY_BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """A fresh tiny model of each architecture (GPT-2 Conv1D, Llama Linear)."""
    return TINY_BUILDERS[request.param]()


@pytest.fixture(scope="session")
def tokenizers_by_kind() -> dict[str, PreTrainedTokenizerFast]:
    return {"gpt2": gpt2_tokenizer(), "llama": llama_tokenizer()}


@pytest.fixture
def embedded() -> LoadedModel:
    """The real embedded SmolLM2-135M-Instruct (made and cached on first use)."""
    from icelora.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def fixture_data(tmp_path):
    """Three benchmark records (ZsRE, WikiData_recent, ZsRE with another target) as a loaded data set."""
    import json

    from icelora.data_utils.dataset import load_dataset
    from tests.test_dataset import KNOWEDIT_ZSRE, RECENT

    records = [KNOWEDIT_ZSRE[0], RECENT[0], {**KNOWEDIT_ZSRE[0], "target_new": "Geometridae"}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return load_dataset(path)


@pytest.fixture
def tiny_llama_folder(tmp_path):
    """The tiny Llama model and tokenizer saved as a model folder."""
    loaded = tiny_llama()
    folder = tmp_path / "tiny-llama"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def moved_editor_and_plan(tiny: LoadedModel, config, requests: list, independent: bool):
    """An ``ice-lora`` editor on ``tiny`` whose adapters look trained (moved from zero, so that
    every loss term and gradient is nonzero) and the plan of ``requests``; an independent plan
    gets a separate adapter per request, each moved differently."""
    from icelora import ICELoRAEditor
    from icelora.losses import build_plan

    editor = ICELoRAEditor(tiny, method="ice-lora", config=config)
    with torch.no_grad():
        for param in editor.params.named_trainable().values():
            param.add_(0.05 * torch.randn_like(param))
    names = editor.params.add_separate_adapters(len(requests)) if independent else None
    plan = build_plan(editor.tokenizer, requests, config, independent=independent, adapter_names=names)
    if independent:
        with torch.no_grad():
            for k, name in enumerate(names):
                for param in editor.params.separate_tensors([name]).values():
                    param.add_(0.03 * (k + 1) * torch.randn_like(param))
    return editor, plan
