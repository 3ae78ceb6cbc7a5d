"""``sealtorch demo``: the whole flow on one machine, with real processes and the sim TEE.

Owner side: init a key server, create a model key, seal a ResNet-50, upload the key and a policy
computed from the expected (sim) measurements. Inference host: start dkeycache (it attests to
dkeyserver and receives a signed grant), attest this runtime to the cache, receive the file key,
decrypt the weights straight into the module, serve it over KServe v2 and compare a sample batch
bit for bit with the plaintext model. Then two denials, each with its reason: a key cache whose
measurement the policy does not allow asks dkeyserver (reason from the audit log), and a runtime
whose measurement it does not allow asks dkeycache (reason from the cache's decision log, the
JSON lines it writes to its log).
Everything is stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealtorch._outputs import output_dir
from sealtorch._secret import Secret
from sealtorch.errors import ReleaseDenied, ServeError
from sealtorch.runtime.world import LocalDeployment

MODEL_ID = "resnet50-demo"
FACTORY = "sealtorch.models.resnet:resnet50"
SEED = 0
INPUT_SEED = 1234


@dataclass
class Step:
    """One timed step of the demo."""

    name: str
    seconds: float
    detail: str = ""


@dataclass(frozen=True)
class Denial:
    """One refusal the demo provoked: who refused, the public code, and the reason."""

    by: str
    code: str
    reason: str


@dataclass
class DemoResult:
    """What the demo showed (for tests and ``--json``)."""

    steps: list[Step] = field(default_factory=list)
    bit_identical: bool = False
    max_abs_diff: float = 0.0
    #: a key cache whose measurement is not allowed, denied by dkeyserver
    cache_denial: Denial | None = None
    #: an inference runtime whose measurement is not allowed, denied by dkeycache
    runtime_denial: Denial | None = None
    workdir: str = ""
    leftover_pids: list[int] = field(default_factory=list)
    #: what the demo did, as the commands a user would type (``--keep`` prints them)
    commands: list[str] = field(default_factory=list)


class _FileKeyOnce:
    """A KeyProvider handing out a copy of one already-fetched file key (the loader wipes it)."""

    def __init__(self, key: Secret) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "_FileKeyOnce(<redacted>)"

    def file_key(self, header: Any) -> Secret:
        return Secret(self._key.view())


def _plain_model(weights: Path | None) -> Any:
    """The plaintext reference: fixed-seed ResNet-50, or ``weights`` loaded into ResNet-50."""
    import torch

    from sealtorch.models.resnet import make_resnet50, resnet50

    if weights is None:
        return make_resnet50(seed=SEED)
    sd: Any
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(weights))
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle raise many types for a bad file
        raise ServeError(f"cannot read --weights ({type(e).__name__}); give a ResNet-50 "
                         "state_dict as .safetensors or .pt") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    model = resnet50()
    try:
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError) as e:
        raise ServeError("--weights must be a ResNet-50 state_dict (torchvision names) in "
                         ".safetensors or .pt format") from e
    return model.eval()


def _policy(cache_meas: bytes, runtime_meas: bytes, platform: str) -> dict[str, Any]:
    def ident(name: str, meas: bytes) -> dict[str, Any]:
        return {"tee": "sim", "name": name, "measurement": meas.hex(), "platform_key": platform}

    return {"format": "sealtorch-policy/v1", "version": 1, "lease_seconds": 300,
            "caches": [ident("demo-dkeycache", cache_meas)],
            "runtimes": [ident("demo-serve", runtime_meas)],
            "factories": [FACTORY]}


def _audit_denial(dep: LocalDeployment, after: int, model_id: str) -> tuple[int, str, str]:
    """The key server's newest denial of ``model_id`` after ``after``: (seq, code, reason)."""
    import json

    rows = dep.admin("GET", f"/v1/admin/audit?after={after}&limit=1000")["entries"]
    for row in reversed(rows):
        if row.get("decision") == "deny" and row.get("model_id") == model_id:
            try:
                details = json.loads(row.get("details") or "{}")
            except ValueError:
                details = {}
            reason = details.get("reason", "") if isinstance(details, dict) else ""
            return int(row["seq"]), str(row.get("code", "")), str(reason)
    raise ServeError("the key server's audit log has no entry for the denied request")


def _cache_denial_reason(log: Path, model_id: str) -> str:
    """The reasons of the key cache's newest local denial of ``model_id``, from its decision
    log (one JSON object per line on its stderr)."""
    import json

    deadline = time.monotonic() + 5  # the cache writes the line right after it answers
    while True:
        for line in reversed(log.read_text(errors="replace").splitlines()):
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if (isinstance(d, dict) and d.get("event") == "local_decision"
                    and d.get("decision") == "deny" and d.get("model_id") == model_id):
                return "; ".join(str(r) for r in d.get("reasons") or []) or str(d.get("code"))
        if time.monotonic() > deadline:
            raise ServeError("the key cache's decision log has no entry for the denied request")
        time.sleep(0.05)


def equivalent_commands(dep: LocalDeployment, factory: str, cache_meas: bytes,
                        runtime_meas: bytes) -> list[str]:
    """What the demo did, as the commands a user types (docs/tutorial-sim.md explains each);
    paths, URLs and measurements are this run's."""
    wd, ks = dep.workdir, dep.ks_dir
    key = wd / "owner" / f"{MODEL_ID}.key"
    admin = f"--admin-url {dep.admin_url}"
    return [
        f"export SEALTORCH_SIM_DIR={dep.sim_dir} SEALTORCH_CA_CERT={dep.ca_cert} "
        f"SEALTORCH_ADMIN_TOKEN_FILE={ks / 'admin.token'}",
        f"dkeyserver init --data-dir {ks} --release-port 0 --admin-port 0 --sim --auto-approve",
        f"dkeyserver serve --data-dir {ks} > {dep.logs / 'dkeyserver.log'} 2>&1 &",
        "sealtorch sim init",
        f"dkeyserver sim register {dep.sim_dir / 'platform_key.pub'} {admin}",
        f"sealtorch keygen --model-id {MODEL_ID} -o {key}",
        f"sealtorch seal resnet50.pt -o {wd / 'resnet50.sealed'} --key-file {key}",
        f"dkeyserver model add --model-id {MODEL_ID} --key-file {key} {admin}",
        f"sealtorch attest measure --role dkeycache --config {wd / 'dkeycache.toml'}"
        f"    # {cache_meas.hex()}",
        f"sealtorch attest measure --role serve --config {wd / 'runtime.toml'}"
        f"    # {runtime_meas.hex()}",
        f"sealtorch policy init --tee sim --platform-key {dep.sim_dir / 'platform_key.pub'} "
        f"--cache measurement={cache_meas.hex()} --runtime measurement={runtime_meas.hex()} "
        f"--factory {factory} -o {wd / 'policy.toml'}",
        f"dkeyserver policy set {MODEL_ID} {wd / 'policy.toml'} {admin}",
        f"dkeycache serve --config {wd / 'dkeycache.toml'} --attester sim "
        f"> {dep.logs / 'dkeycache.log'} 2>&1 &",
        f"sealtorch serve {wd / 'resnet50.sealed'} --factory {factory} --keycache {dep.socket} "
        f"--config {wd / 'runtime.toml'} --attester sim --name resnet50 --port 8080 &",
        "sealtorch client infer http://127.0.0.1:8080 --policy client-policy.toml --input "
        "request.json --unsafe-sim    # a client policy as in docs/tutorial-sim.md step 9",
    ]


def _audit_seq(dep: LocalDeployment) -> int:
    rows = dep.admin("GET", "/v1/admin/audit?after=0&limit=1000")["entries"]
    return max((int(r.get("seq", 0)) for r in rows), default=0)


def run_demo(
    *,
    workdir: Path | None = None,
    keep: bool = False,
    weights: Path | None = None,
    batch: int = 2,
    say: Any = print,
) -> DemoResult:
    """Run the demo; ``say(text)`` reports progress. Leaves no process running."""
    import torch

    from sealtorch.attestation import binding, sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.attestation.binding import ServedIdentity
    from sealtorch.client import AttestedClient, ClientPolicy
    from sealtorch.format.header import read_header
    from sealtorch.format.keyfile import generate_model_key, write_key_file
    from sealtorch.format.writer import seal
    from sealtorch.keycache.client import KeyCacheClient
    from sealtorch.keycache.localauth import policy_from_grant
    from sealtorch.protocol import hpke
    from sealtorch.protocol.release_client import KeyServerClient
    from sealtorch.runtime.app import ServeOptions, build_app
    from sealtorch.runtime.attested import E2EMiddleware, Gateway
    from sealtorch.runtime.batcher import reference_forward
    from sealtorch.runtime.config import render_runtime_config
    from sealtorch.runtime.localserver import LocalServer
    from sealtorch.runtime.model import ServedModel, build_sealed

    result = DemoResult()
    created = workdir is None or not workdir.exists()
    wd = Path(tempfile.mkdtemp(prefix="sealtorch-demo-")) if workdir is None else workdir
    output_dir(wd)
    result.workdir = str(wd)

    @contextlib.contextmanager
    def step(name: str) -> Iterator[list[str]]:
        detail: list[str] = []
        t0 = time.perf_counter()
        yield detail
        s = Step(name, time.perf_counter() - t0, "; ".join(detail))
        result.steps.append(s)
        say(f"  {name}: {s.seconds * 1000:.0f} ms" + (f"  ({s.detail})" if s.detail else ""))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    dep = LocalDeployment(wd)
    old_term = signal.signal(signal.SIGTERM, on_term)
    client: KeyCacheClient | None = None
    file_key: Secret | None = None
    server: LocalServer | None = None
    user: AttestedClient | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the sim warning is logged once
            say("owner machine")
            with step("key server: init + start (SQLite, file KEK, sim on loopback)") as d:
                dep.init_keyserver()
                dep.start_keyserver()
                platform = dep.init_sim_platform()
                d.append(dep.url)
            sealed = wd / "resnet50.sealed"
            with step("seal ResNet-50 (AES-256-GCM STREAM)") as d:
                key = generate_model_key(MODEL_ID)
                (wd / "owner").mkdir(mode=0o700, exist_ok=True)
                write_key_file(wd / "owner" / f"{MODEL_ID}.key", key, overwrite=True)
                plain = _plain_model(weights)
                header = seal(weights if weights is not None else plain, sealed, key,
                              overwrite=True)
                d.append(f"{sealed.stat().st_size / 1e6:.1f} MB, {header.chunk_count} chunks")
            with step("upload key + policy from expected sim measurements") as d:
                dep.admin("POST", "/v1/admin/models", {
                    "model_id": MODEL_ID, "key_version": 1,
                    "key": base64.b64encode(bytes(key.key)).decode()})
                key.wipe()
                cache_meas = sim.measure("dkeycache", dep.write_cache_config())
                runtime_cfg = render_runtime_config(dep.server_public_key_b64)
                (wd / "runtime.toml").write_bytes(runtime_cfg)
                runtime_meas = sim.measure("serve", runtime_cfg)
                dep.admin("PUT", f"/v1/admin/policy/{MODEL_ID}",
                          {"policy": _policy(cache_meas, runtime_meas, platform)})
                d.append(f"cache {cache_meas.hex()[:12]}…, runtime {runtime_meas.hex()[:12]}…")

            say("inference host")
            with step("attestation: dkeycache -> dkeyserver (remote, grant)") as d:
                ready = dep.start_cache()
                d.append(f"cache state {ready.get('state')}")
            attester = SimAttester(dep.sim_dir / sim.KEY_FILE,
                                   runtime_meas, role="serve")
            client = KeyCacheClient(dep.socket, server_public_key=dep.server_public_key_b64,
                                    attester=attester)
            with step("attestation: runtime -> dkeycache (local session)") as d:
                client.connect()
                d.append(f"auth {client.auth_mode}")
            with step("release: signed policy + file key from the cache") as d:
                grant = client.grant(MODEL_ID)
                policy = policy_from_grant(grant)
                header = read_header(sealed)
                file_key = client.file_key(header)
                d.append(f"factories {list(policy.factories)}")
            with step("load: allow-listed factory, decrypt into tensors") as d:
                module = build_sealed(sealed, FACTORY, key_provider=_FileKeyOnce(file_key),
                                      allowed_factories=policy.factories)
                file_key.wipe()
                d.append(f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M parameters")
            x = torch.randn((batch, 3, 224, 224),
                            generator=torch.Generator().manual_seed(INPUT_SEED))
            app = build_app(ServedModel("resnet50", module, input_shape=(3, 224, 224)),
                            ServeOptions(max_batch=batch))
            gateway = Gateway(attester, [ServedIdentity(
                name="resnet50", model_id=MODEL_ID, key_version=header.key_version,
                header_digest=header.digest(), policy_version=grant.policy_version,
                factory=FACTORY, tenant=grant.tenant,
                server_key_id=bytes.fromhex(grant.server_key_id))])
            server = LocalServer(E2EMiddleware(app, gateway,
                                               max_request_bytes=app.state.max_body + 4096))
            server.start()

            say("an inference client")
            with step("attestation: client -> inference server (the client's policy)") as d:
                user = AttestedClient(server.url, ClientPolicy.from_dict({
                    "format": "sealtorch-client-policy/v1",
                    "runtimes": [{"tee": "sim", "measurement": runtime_meas.hex(),
                                  "platform_key": platform}],
                    "models": [{"model_id": MODEL_ID, "key_versions": [1],
                                "factories": [FACTORY]}],
                    "owners": [{"server_key": dep.server_public_key_b64}],
                    "verifier": {"sim_platform_keys": [str(dep.sim_dir / sim.PUBLIC_FILE)]}}),
                    unsafe_sim=True)
                verified = user.attest()
                d.append(f"{verified.claims.tee}, {verified.identity.model_id} key version "
                         f"{verified.identity.key_version}, policy "
                         f"{verified.identity.policy_version}")
            with step(f"inference: KServe v2 HTTP end to end (HPKE + receipt), batch of "
                      f"{batch}") as d:
                answer = user.infer({"inputs": [{
                    "name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "data": x.reshape(-1).tolist()}]})
                out = answer.json()["outputs"][0]
                got = torch.tensor(out["data"], dtype=torch.float32).reshape(out["shape"])
                d.append(f"output {list(got.shape)}, receipt {len(answer.receipt)} bytes")
            expected = reference_forward(plain, x, batch)
            result.bit_identical = bool(torch.equal(got, expected))
            result.max_abs_diff = float((got - expected).abs().max())
            say(f"  outputs vs plaintext model: "
                f"{'bit-identical' if result.bit_identical else 'DIFFERENT'} "
                f"(max |diff| = {result.max_abs_diff})")

            say("a key cache whose measurement is not allowed (another build or config)")
            with step("denied: key cache -> dkeyserver (audited)") as d:
                rogue_cache = SimAttester(
                    dep.sim_dir / sim.KEY_FILE,
                    sim.measure("dkeycache", dep.cache_config + b"# another build\n"),
                    role="dkeycache")
                before = _audit_seq(dep)
                with KeyServerClient(dep.url, dep.ca_cert, dep.server_public_key) as ks:
                    nonce = ks.challenge()
                    _sk, pk = hpke.generate_keypair()
                    ev = rogue_cache.attest(binding.report_data("remote", nonce, hpke.KEM_ID, pk,
                                                                ks.audience))
                    res = ks.release(ev, pk, nonce, [MODEL_ID])
                    if res.grants or MODEL_ID not in res.denials:
                        raise ServeError("the rogue key cache was NOT denied by the key server")
                seq, code, reason = _audit_denial(dep, before, MODEL_ID)
                result.cache_denial = Denial("dkeyserver", code, reason)
                d.append(f"dkeyserver: {code} (audit #{seq})")
            say(f"  reason (key server audit log): {reason}")

            say("an inference runtime whose measurement is not allowed")
            with step("denied: runtime -> dkeycache") as d:
                rogue_rt = SimAttester(dep.sim_dir / sim.KEY_FILE,
                                       sim.measure("serve", runtime_cfg + b"# another build\n"),
                                       role="serve")
                with KeyCacheClient(dep.socket, server_public_key=dep.server_public_key_b64,
                                    attester=rogue_rt) as rogue:
                    try:
                        rogue.file_key(read_header(sealed)).wipe()
                        raise ServeError("the rogue runtime was NOT denied by the key cache")
                    except ReleaseDenied as e:
                        code = e.denial
                reason = _cache_denial_reason(dep.logs / "dkeycache.log", MODEL_ID)
                result.runtime_denial = Denial("dkeycache", code, reason)
                d.append(f"dkeycache: {code}")
            say(f"  reason (key cache decision log): {reason}")
            result.commands = equivalent_commands(dep, FACTORY, cache_meas, runtime_meas)
    finally:
        # a second Ctrl-C/SIGTERM must not cut the teardown short: the children run in their own
        # sessions and would outlive this process (each stop is bounded: terminate, then kill)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        t0 = time.perf_counter()
        try:
            with contextlib.ExitStack() as teardown:  # newest first; each runs if one fails
                teardown.callback(dep.stop)
                if file_key is not None:
                    teardown.callback(file_key.wipe)
                if client is not None:
                    teardown.callback(client.close)
                if server is not None:
                    teardown.callback(server.stop)
                if user is not None:
                    teardown.callback(user.close)
        finally:
            signal.signal(signal.SIGTERM, old_term)
            signal.signal(signal.SIGINT, old_int)
        result.leftover_pids = dep.running
        result.steps.append(Step("stop everything", time.perf_counter() - t0))
        if not keep and created:
            shutil.rmtree(wd, ignore_errors=True)
    return result
