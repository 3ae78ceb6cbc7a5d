"""A small random Llama (bf16, tied embeddings, at least three shards) sealed and loaded:
generate() gives the plaintext model's tokens."""

from __future__ import annotations

import torch

from sealtorch.hf import SealedDir, from_pretrained


def test_generate_same_tokens(sealed_llama, llama_dir, hf_key):
    from transformers import AutoModelForCausalLM

    model = from_pretrained(sealed_llama, key=hf_key)
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as transformers does
    assert model.model.embed_tokens.weight.dtype is torch.bfloat16
    ref_state = ref.state_dict()
    assert all(torch.equal(t, ref_state[n]) for n, t in model.state_dict().items())
    prompt = torch.tensor([[1, 17, 42, 256, 7]])
    kw = {"max_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        got, want = model.generate(prompt, **kw), ref.generate(prompt, **kw)
    assert got.shape[1] > prompt.shape[1]
    assert torch.equal(got, want)


def test_shards_in_index_order(sealed_llama, llama_dir, hf_key):
    with SealedDir(sealed_llama, key=hf_key) as sd:
        names = [s.name for s in sd.manifest.shards]
        assert names == sorted(p.name for p in llama_dir.glob("model-*.safetensors"))
        assert len(names) >= 3
        assert sum(s.tensors or 0 for s in sd.manifest.shards) == sum(
            len(sf.index.order) for sf in sd.shards)


def test_key_provider_and_signer(tmp_path, llama_dir, hf_key):
    """Keys from a KeyProvider (as from the key cache: one file key per sealed file), and an
    owner signature required on every file."""
    import pytest
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealtorch.errors import SignatureError
    from sealtorch.format.keyfile import read_key_file
    from sealtorch.format.keys import KeyFileProvider
    from sealtorch.format.signing import raw_public
    from sealtorch.hf import seal_pretrained

    owner = Ed25519PrivateKey.generate()
    out = tmp_path / "signed"
    seal_pretrained(llama_dir, out, hf_key, sign_key=owner)
    asked: list[str] = []

    class Counting(KeyFileProvider):
        def file_key(self, header):
            asked.append(header.digest().hex())
            return super().file_key(header)

    model = from_pretrained(out, key_provider=Counting(read_key_file(hf_key)),
                            signer=raw_public(owner.public_key()))
    assert model.model.embed_tokens.weight.dtype is torch.bfloat16
    with SealedDir(out, key=hf_key) as sd:
        assert set(asked) >= {sf.header.digest().hex() for sf in sd.shards}
    other = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError):
        from_pretrained(out, key=hf_key, signer=raw_public(other.public_key()))
