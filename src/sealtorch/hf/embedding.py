"""Serve a sealed sentence-embedding model: BYTES text in, FP32 embeddings out, tokenized
inside the TEE with the sealed tokenizer.

:func:`sentence_embedding` is a *directory factory*: the loading core
(:mod:`sealtorch.runtime.loading`) calls it with the sealed directory and the key cache client
only after the signed policy's ``factories`` allow-list names it. Every text is tokenized on
its own and padded to the smallest of :data:`TOKEN_BUCKETS` that holds it; the texts of each
bucket run as one forward pass of the batcher's full row count, so a row's embedding depends on
its own text only, never on the texts it was batched with (the batcher's fixed-shape rule,
extended to the sequence length), while short texts do not pay for a 128-token pass.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any, cast

import numpy as np
import torch

from sealtorch.errors import InferenceInputError
from sealtorch.format.keys import KeyProvider

#: a text is padded to the smallest of these lengths (in tokens) that holds it; the last is the
#: longest text taken: longer texts are refused, never truncated
TOKEN_BUCKETS = (16, 32, 64, 128)
MAX_TOKENS = TOKEN_BUCKETS[-1]
#: a text longer than this (in UTF-8 bytes) is refused before it is tokenized
MAX_TEXT_BYTES = 4096


class SentenceEmbedder(torch.nn.Module):
    """A transformers encoder with its tokenizer: ``forward(texts)`` takes a ``[batch, 1]``
    array of UTF-8 ``bytes`` and returns mean-pooled, L2-normalized embeddings
    ``[batch, hidden]`` (as sentence-transformers computes them)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *,
                 buckets: tuple[int, ...] = TOKEN_BUCKETS) -> None:
        super().__init__()
        if not buckets or any(b < 2 for b in buckets) \
                or any(a >= b for a, b in itertools.pairwise(buckets)):
            raise ValueError(f"token buckets must be increasing lengths of at least 2 tokens "
                             f"(room for the special tokens), not {buckets!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.buckets = tuple(buckets)
        self.max_tokens = self.buckets[-1]
        # a fast tokenizer keeps its padding/truncation settings in shared state: requests are
        # checked on the server's threads while the batcher's thread embeds, so one at a time
        self._tokenizing = threading.Lock()

    def _texts(self, texts: np.ndarray) -> list[str]:
        """The texts of a ``[batch, 1]`` BYTES array, checked (UTF-8, length)."""
        if not isinstance(texts, np.ndarray) or texts.dtype != object or texts.ndim != 2 \
                or texts.shape[1] != 1:
            raise InferenceInputError("this model takes one BYTES input of shape [batch, 1] "
                                      "(one text per row)")
        out = []
        for i, raw in enumerate(texts.reshape(-1)):
            if len(raw) > MAX_TEXT_BYTES:
                raise InferenceInputError(f"text {i} is longer than {MAX_TEXT_BYTES} bytes; "
                                          "split it")
            try:
                out.append(bytes(raw).decode("utf-8"))
            except UnicodeDecodeError:
                raise InferenceInputError(f"text {i} is not valid UTF-8; send text encoded "
                                          "as UTF-8") from None
        return out

    def _lengths(self, items: list[str]) -> list[int]:
        """Each text's padded length: the smallest bucket that holds its tokens."""
        with self._tokenizing:
            ids_list = self.tokenizer(items)["input_ids"]
        lengths = []
        for i, ids in enumerate(ids_list):
            fits = [b for b in self.buckets if b >= len(ids)]
            if not fits:
                raise InferenceInputError(f"text {i} is {len(ids)} tokens long; this model "
                                          f"takes at most {self.max_tokens}: split it")
            lengths.append(fits[0])
        return lengths

    def check_inputs(self, texts: np.ndarray) -> None:
        """Refuse a request before it is batched: a text that is not UTF-8, or longer than
        :data:`MAX_TEXT_BYTES` bytes or :attr:`max_tokens` tokens."""
        self._lengths(self._texts(texts))

    def _encode(self, items: list[str], length: int) -> Any:
        with self._tokenizing:
            batch = self.tokenizer(items, padding="max_length", max_length=length,
                                   truncation=False, return_tensors="pt")
        if batch["input_ids"].shape[1] != length:
            raise InferenceInputError(f"a text is longer than {length} tokens")
        return batch

    def encode(self, texts: np.ndarray, length: int | None = None) -> Any:
        """Token ids and attention mask ``[batch, length]`` (default :attr:`max_tokens`): each
        text tokenized alone and padded to ``length``."""
        return self._encode(self._texts(texts), length or self.max_tokens)

    def _embed(self, batch: Any) -> torch.Tensor:
        """Mean pooling over each row's tokens, then L2 normalization."""
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def forward(self, texts: np.ndarray) -> torch.Tensor:
        """Embed each text: one pass per bucket in use, each over all rows (the texts of
        other buckets replaced by the empty text), so a row sees the same shape and the same
        own tokens whatever it is batched with."""
        items = self._texts(texts)
        if not items:
            raise InferenceInputError("the request holds no text; send at least one row")
        lengths = self._lengths(items)
        out: torch.Tensor | None = None
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            group = [t if n == length else "" for t, n in zip(items, lengths, strict=True)]
            emb = self._embed(self._encode(group, length))
            if out is None:
                out = torch.empty_like(emb)
            out[rows] = emb[rows]
        return cast(torch.Tensor, out)


def sentence_embedding(sealed_dir: str | os.PathLike[str], *, key_provider: KeyProvider,
                       threads: int | None = None) -> SentenceEmbedder:
    """Directory factory: the sealed encoder (``AutoModel``) and its sealed tokenizer, both
    decrypted in memory with keys from ``key_provider``, as a :class:`SentenceEmbedder`."""
    from transformers import AutoModel

    from sealtorch.hf.pretrained import from_pretrained, tokenizer_from_pretrained

    model = from_pretrained(sealed_dir, key_provider=key_provider, model_class=AutoModel,
                            threads=threads)
    tokenizer = tokenizer_from_pretrained(sealed_dir, key_provider=key_provider)
    return SentenceEmbedder(model, tokenizer).eval()
