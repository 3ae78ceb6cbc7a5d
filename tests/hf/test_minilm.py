"""all-MiniLM-L6-v2, sealed as a Hugging Face directory and loaded through transformers:
sentence embeddings equal the plaintext model's bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sealtorch.hf import from_pretrained, seal_pretrained, tokenizer_from_pretrained

SENTENCES = ["Sealed weights stay encrypted outside the enclave.",
             "The quick brown fox jumps over the lazy dog!", "Ünïcödé, façade, naïve café"]


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean pooling, L2 normalized."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@pytest.fixture(scope="module")
def sealed_minilm(tmp_path_factory, minilm_dir, hf_key) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "sealed"
    seal_pretrained(minilm_dir, out, hf_key)
    return out


def test_embeddings_bit_identical(sealed_minilm, minilm_dir, hf_key):
    from transformers import AutoModel, AutoTokenizer

    model = from_pretrained(sealed_minilm, key=hf_key)
    tokenizer = tokenizer_from_pretrained(sealed_minilm, key=hf_key)
    ref_model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    assert type(model) is type(ref_model) and not model.training
    for s in SENTENCES:
        assert tokenizer(s)["input_ids"] == ref_tok(s)["input_ids"]
    got, want = embed(model, tokenizer, SENTENCES), embed(ref_model, ref_tok, SENTENCES)
    assert got.shape == (3, 384)
    assert torch.equal(got, want)
    ref_state = ref_model.state_dict()
    assert all(torch.equal(t, ref_state[n]) for n, t in model.state_dict().items())


def test_nothing_readable_without_the_key(sealed_minilm, minilm_dir):
    """Every file is sealed by default: config, tokenizer, vocabulary, the README."""
    stored = sorted(p.relative_to(sealed_minilm).as_posix() for p in sealed_minilm.rglob("*")
                    if p.is_file())
    assert stored and all(n.endswith(".sealed") for n in stored)
    vocab = (minilm_dir / "vocab.txt").read_bytes()[:2000]
    for p in sealed_minilm.rglob("*.sealed"):
        data = p.read_bytes()
        assert data.startswith(b"SEALTRCH")
        assert b"BertModel" not in data and b"hidden_size" not in data
        assert vocab[:200] not in data


def test_public_config_and_tokenizer(tmp_path, minilm_dir, hf_key):
    out = tmp_path / "sealed"
    seal_pretrained(minilm_dir, out, hf_key, public_config=True,
                    public=["tokenizer.json", "tokenizer_config.json"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert (out / "tokenizer.json").read_bytes() == (minilm_dir / "tokenizer.json").read_bytes()
    assert (out / "model.safetensors.sealed").is_file() and (out / "vocab.txt.sealed").is_file()
    model = from_pretrained(out, key=hf_key)
    tok = tokenizer_from_pretrained(out, key=hf_key)
    assert embed(model, tok, SENTENCES[:1]).shape == (1, 384)


def test_cast_to_another_dtype(sealed_minilm, minilm_dir, hf_key):
    from transformers import AutoModel

    model = from_pretrained(sealed_minilm, key=hf_key, torch_dtype=torch.bfloat16)
    ref = AutoModel.from_pretrained(str(minilm_dir), dtype=torch.bfloat16)
    assert model.embeddings.word_embeddings.weight.dtype is torch.bfloat16
    ref_state = ref.state_dict()
    assert all(torch.equal(t, ref_state[n]) for n, t in model.state_dict().items())


def test_wrong_inputs(tmp_path, sealed_minilm, minilm_dir, hf_key):
    from sealtorch.errors import InputError, OutputError, SealedDirError, WrongKeyError
    from sealtorch.format import keyfile

    other = tmp_path / "other.key"
    keyfile.write_key_file(other, keyfile.generate_model_key("acme/hf-model", 1))
    with pytest.raises(WrongKeyError):
        from_pretrained(sealed_minilm, key=other)
    with pytest.raises(SealedDirError, match="not a sealed model directory"):
        from_pretrained(minilm_dir, key=hf_key)
    with pytest.raises(InputError, match="exactly one of"):
        from_pretrained(sealed_minilm)
    with pytest.raises(InputError, match="device_map"):
        from_pretrained(sealed_minilm, key=hf_key, device_map="cuda:0")
    with pytest.raises(OutputError, match="already exists"):
        seal_pretrained(minilm_dir, sealed_minilm, hf_key)
    with pytest.raises(InputError, match="no such file"):
        seal_pretrained(minilm_dir, tmp_path / "x", hf_key, public=["nope.json"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match=r"no config\.json"):
        seal_pretrained(tmp_path, tmp_path / "y", hf_key)
