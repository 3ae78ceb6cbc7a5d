"""Serve a sealed sentence-embedding model: BYTES text in, FP32 embeddings out, tokenized
inside the TEE with the sealed tokenizer.

:func:`sentence_embedding` is a *directory factory*: the loading core
(:mod:`sealtorch.runtime.loading`) calls it with the sealed directory and the key cache client
only after the signed policy's ``factories`` allow-list names it. Every text is tokenized on
its own and padded to :data:`MAX_TOKENS`, so a row's embedding never depends on the other
texts of its batch (the batcher's fixed-shape rule, extended to the sequence length).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

from sealtorch.errors import InferenceInputError
from sealtorch.format.keys import KeyProvider

#: every text is padded to this many tokens; longer texts are refused, never truncated
MAX_TOKENS = 128
#: a text longer than this (in UTF-8 bytes) is refused before it is tokenized
MAX_TEXT_BYTES = 4096


class SentenceEmbedder(torch.nn.Module):
    """A transformers encoder with its tokenizer: ``forward(texts)`` takes a ``[batch, 1]``
    array of UTF-8 ``bytes`` and returns mean-pooled, L2-normalized embeddings
    ``[batch, hidden]`` (as sentence-transformers computes them)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *,
                 max_tokens: int = MAX_TOKENS) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
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

    def check_inputs(self, texts: np.ndarray) -> None:
        """Refuse a request before it is batched: a text that is not UTF-8, or longer than
        :data:`MAX_TEXT_BYTES` bytes or :attr:`max_tokens` tokens."""
        items = self._texts(texts)
        with self._tokenizing:
            ids_list = self.tokenizer(items)["input_ids"]
        for i, ids in enumerate(ids_list):
            if len(ids) > self.max_tokens:
                raise InferenceInputError(f"text {i} is {len(ids)} tokens long; this model "
                                          f"takes at most {self.max_tokens}: split it")

    def encode(self, texts: np.ndarray) -> Any:
        """Token ids and attention mask ``[batch, max_tokens]``: each text tokenized alone
        and padded to ``max_tokens``."""
        items = self._texts(texts)
        with self._tokenizing:
            batch = self.tokenizer(items, padding="max_length", max_length=self.max_tokens,
                                   truncation=False, return_tensors="pt")
        if batch["input_ids"].shape[1] != self.max_tokens:
            raise InferenceInputError(f"a text is longer than {self.max_tokens} tokens")
        return batch

    def forward(self, texts: np.ndarray) -> torch.Tensor:
        """Embed each text (:meth:`encode`): mean pooling over its tokens, L2 normalization."""
        batch = self.encode(texts)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


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
