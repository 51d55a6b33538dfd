"""KnowEdit-compatible metrics (see METRICS in the README): batched, teacher-forced token accuracy,
locality as argmax agreement with the unedited model, n-gram-entropy fluency, PPL_r and
generation exact match.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from icelora.output_layer import OutputLayerNotCalledError, output_layer_reads
from icelora.tokenization import PaddedBatch, encode_prompt_target, pad_rows, span_index

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class AnswerPrediction:
    """The answer's token ids and the model's greedy prediction at each of those positions."""

    answer_ids: tuple[int, ...]
    predicted_ids: tuple[int, ...]

    @property
    def accuracy(self) -> float:
        """Teacher-forced token accuracy: share of answer tokens the argmax gets right."""
        hits = sum(a == p for a, p in zip(self.answer_ids, self.predicted_ids))
        return hits / len(self.answer_ids)


def routing(adapters: list[str] | None, rows: Sequence[int] | None = None) -> dict[str, list[str]]:
    """Forward keyword arguments routing the batch of ``rows`` (all when ``None``) to their adapters
    (no ``adapters``: no routing)."""
    if adapters is None:
        return {}
    return {"adapter_names": list(adapters) if rows is None else [adapters[i] for i in rows]}


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices ``0..len(lengths)-1`` in batches of ``batch_size``, shortest rows first, so that
    rows of similar length are padded together. (Splitting a batch further, so that short rows are
    never padded to a long one's width, would change the perplexities' rounding: reports/speed.md.)"""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start: start + batch_size] for start in range(0, len(order), batch_size)]


def scored_logits(model: nn.Module, batch: PaddedBatch, spans: list[tuple[int, int]], **forward_kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [N, V], labels [N], row index [N]) of the tokens ``spans[i] = (start, end)`` of each
    row i (unpadded positions; a row's first token has no position before it and is not scored),
    in :func:`~icelora.tokenization.next_token_view`'s order, from one forward pass over ``batch``
    whose output layer runs only at the N positions that predict them
    (:func:`~icelora.tokenization.span_index`): no logits are made at a prompt's, a padding's or
    the last position. A model whose forward pass does not call the layer
    :func:`~icelora.output_layer.output_layer` names makes all its logits, and those are read."""
    index = span_index(batch, [(max(start, 1), max(end, 1)) for start, end in spans], batch.input_ids.device)
    try:
        with output_layer_reads(model, lambda hidden: hidden[index.rows, index.positions - 1][None]):
            out = model(**batch.forward_kwargs(), **forward_kwargs)
    except OutputLayerNotCalledError:
        return index.logits(out.logits), index.labels(batch.input_ids), index.rows
    return out.logits[0], index.labels(batch.input_ids), index.rows


@torch.no_grad()
def predict_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]],
                    batch_size: int = 32, adapters: list[str] | None = None) -> list[AnswerPrediction]:
    """Greedy predictions at the answer positions of ``prompt + " " + answer``, in batches.

    The input is the prompt and answer read together; the prediction for answer token j is the
    argmax of the logits at the position before it (KnowEdit's rewrite/portability accuracy).
    BOS and padding are never counted as answer tokens. ``adapters``: one adapter name per pair.
    """
    device = next(model.parameters()).device
    encoded = [encode_prompt_target(tokenizer, prompt, answer, strict=False) for prompt, answer in pairs]
    out: dict[int, AnswerPrediction] = {}
    for chunk in batches_by_length([len(e.ids) for e in encoded], batch_size):
        mine = [encoded[i] for i in chunk]
        batch = pad_rows([e.ids for e in mine], tokenizer.pad_token_id, side="right", device=device)
        logits, _, rows = scored_logits(model, batch, [(e.target_start, len(e.ids)) for e in mine],
                                        **routing(adapters, chunk))
        predicted = logits.argmax(-1).tolist()
        row_ids = rows.tolist()
        for k, (i, enc) in enumerate(zip(chunk, mine)):
            out[i] = AnswerPrediction(answer_ids=enc.target_ids,
                                      predicted_ids=tuple(p for p, r in zip(predicted, row_ids) if r == k))
    return [out[i] for i in range(len(encoded))]


def agreement(edited: AnswerPrediction, unedited: AnswerPrediction) -> float:
    """Locality of one item: share of answer positions where both models predict the same token."""
    same = sum(a == b for a, b in zip(edited.predicted_ids, unedited.predicted_ids))
    return same / len(edited.predicted_ids)


def word_tokenize(text: str) -> list[str]:
    """Words as NLTK's ``word_tokenize`` gives them, without its punkt data: sentences split on
    end punctuation followed by white space, then NLTK's Treebank word tokenizer per sentence."""
    from nltk.tokenize import TreebankWordTokenizer

    tokenizer = TreebankWordTokenizer()
    return [w for sentence in SENTENCE_END.split(text) if sentence for w in tokenizer.tokenize(sentence)]


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """KnowEdit fluency: ``mean_n(w_n * H_n)``, ``H_n = -sum f log2 f`` over n-gram frequencies.

    With the defaults this is ``(2/3 H2 + 4/3 H3) / 2`` in bits; published tables multiply by 100.
    """
    words = word_tokenize(text)
    weighted = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


@torch.no_grad()
def sample_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], seeds: list[int],
                 max_length: int = 100, top_k: int = 5, adapters: list[str] | None = None
                 ) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Top-k sampling from each prompt to ``max_length`` tokens including the prompt, not stopping
    at EOS (as KnowEdit's fluency generation). All prompts decode together (left-padded, KV cache);
    row i draws from its own generator seeded with ``seeds[i]``, so its sample does not depend on
    the other rows. ``adapters``: one adapter name per prompt. Returns (full text, prompt ids,
    generated ids) per prompt.
    """
    device = next(model.parameters()).device
    prompt_ids = [tuple(tokenizer(p)["input_ids"]) for p in prompts]
    budgets = [max(0, max_length - len(ids)) for ids in prompt_ids]
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    batch = pad_rows(prompt_ids, tokenizer.pad_token_id, side="left", device=device)
    route = routing(adapters)
    out = model(**batch.forward_kwargs(), **route, use_cache=True, logits_to_keep=1)
    attention_mask, positions = batch.attention_mask, batch.position_ids[:, -1:]
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max(budgets, default=0)):
        top = torch.topk(out.logits[:, -1].float(), top_k)
        probs = torch.softmax(top.values, -1)
        tokens = torch.stack([top.indices[i, torch.multinomial(probs[i], 1, generator=generators[i])]
                              for i in range(len(prompts))])
        for i, token in enumerate(tokens.tolist()):
            if step < budgets[i]:
                generated[i].append(token[0])
        if step + 1 == max(budgets):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
        positions = positions + 1
        out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, cache=out.cache,
                    use_cache=True, logits_to_keep=1, **route)
    return [(tokenizer.decode(list(ids) + gen, skip_special_tokens=True), ids, tuple(gen))
            for ids, gen in zip(prompt_ids, generated)]


def sample_text(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int = 100,
                top_k: int = 5, seed: int = 0) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """:func:`sample_texts` for one prompt."""
    return sample_texts(model, tokenizer, [prompt], [seed], max_length, top_k)[0]


@torch.no_grad()
def continuation_nll(model: nn.Module, prompt_ids: tuple[int, ...], continuation: tuple[int, ...]) -> float:
    """Mean negative log-likelihood (nats per token) of ``continuation`` after ``prompt_ids``."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(continuation)], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].float()
    return F.cross_entropy(logits, ids[0, len(prompt_ids):]).item()


@torch.no_grad()
def continuation_nlls(model: nn.Module, pad_id: int, items: list[tuple[tuple[int, ...], tuple[int, ...]]],
                      batch_size: int = 32) -> list[float]:
    """:func:`continuation_nll` of many (prompt ids, continuation) pairs, in right-padded batches
    (shortest first), with logits made at the continuations' positions only.

    An empty continuation gives NaN.
    """
    device = next(model.parameters()).device
    out = [float("nan")] * len(items)
    for chunk in batches_by_length([len(p) + len(c) for p, c in items], batch_size):
        mine = [items[i] for i in chunk]
        batch = pad_rows([tuple(p) + tuple(c) for p, c in mine], pad_id, side="right", device=device)
        pred, labels, rows = scored_logits(model, batch, [(len(p), len(p) + len(c)) for p, c in mine])
        nll = F.cross_entropy(pred.float(), labels, reduction="none")
        sums = torch.zeros(len(mine), device=device).index_add(0, rows, nll).tolist()
        for i, total, (_, c) in zip(chunk, sums, mine):
            if c:
                out[i] = total / len(c)
    return out


def perplexity_ratio(gen_nll: float, target_nll: float) -> float | None:
    """PPL_r: perplexity of the edited model's generation over that of the target, both scored by
    the unedited model given the prompt (the ICE paper's metric, with logits shifted against labels
    and the whole prompt used). None where either has no token to score (a NaN mean)."""
    if math.isnan(gen_nll) or math.isnan(target_nll):
        return None
    return math.exp(gen_nll - target_nll)
