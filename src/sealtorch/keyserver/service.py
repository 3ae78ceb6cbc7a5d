"""The release logic of dkeyserver: challenge, release and status, independent of HTTP.

Order of a release (DESIGN.md "Binding and key delivery"): check the nonce's tag and expiry,
burn it in the database (committed), verify the evidence, check the binding, then in one
group-commit transaction read the verified state, decide each model (``admission.py``) and
append the audit entries; only after that commit are grants signed and keys sealed. Anonymous
failures (bad nonce, evidence that does not verify) are counted in aggregate, never audited one
row each; public denial codes are short and reasons go only to the audit log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.engine import Connection

from sealtorch._secret import Secret
from sealtorch.attestation.claims import Claims
from sealtorch.errors import NotFoundError, SealtorchError, StoreError, TamperError
from sealtorch.keyserver import attest, ops, queries
from sealtorch.keyserver.admission import DENIED, Admission, admission_input, admit
from sealtorch.keyserver.attest import CacheIdentity
from sealtorch.keyserver.config import ServerConfig
from sealtorch.keyserver.keyring import KeyRef
from sealtorch.keyserver.nonces import NonceBook
from sealtorch.keyserver.shared_read import SharedRead
from sealtorch.keyserver.state import AuthState
from sealtorch.keyserver.store import Store
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64e
from sealtorch.protocol.grant import (
    AuditHead,
    ClaimsDocument,
    Grant,
    ModelStatus,
    Status,
    sign_audit_head,
    sign_claims,
    sign_grant_digest,
    sign_status,
)
from sealtorch.protocol.messages import ReleaseRequest, StatusRequest, status_key_info
from sealtorch.protocol.signing import key_id

log = logging.getLogger("sealtorch.keyserver")

# public codes of whole-request denials
NONCE_INVALID = "nonce_invalid"
EVIDENCE_INVALID = "evidence_invalid"
UNAUTHORIZED = "unauthorized"
T = TypeVar("T")


@dataclass
class Outcome:
    """An HTTP-agnostic answer: status code and JSON body; ``decisions`` feed the metrics."""

    status: int
    body: dict[str, Any]
    decisions: list[str]


@dataclass
class _Decided:
    """What the decision transaction hands back to the answer."""

    grants: list[tuple[Grant, Secret]]
    denials: list[dict[str, str]]
    decisions: list[str]
    audit_seq: int
    audit_head: str
    cache_state: str
    state_seq: int


def cache_state_of(state: AuthState, cache_id: str, auto_approve: bool) -> str:
    """A cache's summary state across every tenant's approval of it."""
    states = {s for (_, c), s in state.approvals.items() if c == cache_id}
    if "approved" in states:
        return "approved"
    if states == {"revoked"}:
        return "revoked"
    return "approved" if auto_approve else "pending"


@dataclass
class _VerifierCache:
    """The VerifierSet for the currently registered sim platforms (refreshed at most once a
    second; the decision re-checks the tenant's platforms on the verified state anyway)."""

    verifier: Any = None
    sims: tuple[str, ...] | None = None
    checked: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class KeyServer:
    """One key server process's release logic (stateless across replicas but for the DB)."""

    def __init__(self, config: ServerConfig, store: Store, signing_key: Ed25519PrivateKey,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.signing_key = signing_key
        self.server_key_id = key_id(signing_key)
        self.audience = bytes.fromhex(self.server_key_id)
        self.clock = clock
        self.nonces = NonceBook(store.keyring.nonce_tag, config.nonce_ttl, clock=clock)
        self._verifiers = _VerifierCache()
        self._last_purge = time.monotonic()
        self._states = SharedRead(store.state, asyncio.to_thread)

    def now(self) -> int:
        return int(self.clock())

    def challenge(self) -> Outcome:
        return Outcome(200, {"nonce": b64e(self.nonces.issue()),
                             "expires_in": self.config.nonce_ttl}, [])

    # --- attestation ----------------------------------------------------------------------
    def invalidate_verifier(self) -> None:
        """Re-read registered sim platforms on the next release (after a registration)."""
        self._verifiers.checked = 0.0

    def verifier(self) -> Any:
        vc = self._verifiers
        now = time.monotonic()
        if vc.verifier is not None and now - vc.checked < 1.0:
            return vc.verifier
        sims = tuple(sorted(self.store.state().sim_keys)) if self.config.sim else ()
        with vc.lock:
            vc.checked = now
            if vc.verifier is None or sims != vc.sims:
                vc.verifier = attest.build_verifier(self.config, sims)
                vc.sims = sims
            return vc.verifier

    def signed_head(self, seq: int, head: str) -> dict[str, Any]:
        return ops.crypto("sign", sign_audit_head, self.signing_key,
                          AuditHead(seq, head, self.now(), self.server_key_id))

    async def _write(self, op: Callable[[Connection], T]) -> T:
        """Run ``op`` in the next group-commit batch; returns once that batch has committed."""
        return await self.store.committer().run_async(op)

    async def anonymous(self, code: str, reason: str, client: str, *, status: int = 403
                        ) -> Outcome:
        """Refuse a request that proved nothing about itself: counted, not audited."""
        log.info("request refused", extra={"fields": {"code": code, "client": client,
                                                      "reason": reason}})
        now = self.now()
        await self._write(lambda conn: queries.count_in(self.store.db, conn, code, now))
        return Outcome(status, {"error": {"code": code, "message": code}}, [code])

    # --- release --------------------------------------------------------------------------
    async def release(self, req: ReleaseRequest, client: str) -> Outcome:
        """One release, run on the event loop; its two durable writes (the nonce burn, then
        the decision with its audit entries) go through the group-commit writer, and the
        answer is built only after each has committed."""
        chk = self.nonces.check(req.nonce)
        if not chk.valid:
            return await self.anonymous(NONCE_INVALID, chk.reason, client)
        db, nonce = self.store.db, req.nonce
        if not await self._write(lambda conn: NonceBook.burn(db, conn, nonce, chk.expires)):
            return await self.anonymous(NONCE_INVALID, "nonce already used", client)
        if time.monotonic() - self._last_purge > 60:
            self._last_purge = time.monotonic()
            await asyncio.to_thread(self.nonces.purge, db)
        try:
            evidence = attest.parse_evidence(req.evidence)
            ev_digest = evidence.digest().hex()
            verifier = self.verifier()
            if evidence.tee == "sim":  # ~0.1 ms: cheaper inline than a thread hop
                claims = ops.crypto("verify_evidence", verifier.verify, evidence)
            else:  # DCAP/SNP verification takes milliseconds: keep the event loop free
                claims = await asyncio.to_thread(ops.crypto, "verify_evidence",
                                                 verifier.verify, evidence)
            attest.check_binding(claims, nonce=req.nonce, public_key=req.public_key,
                                 audience=self.audience)
        except StoreError:
            raise  # the verifier's platform list could not be read: not the evidence's fault
        except SealtorchError as e:
            return await self.anonymous(EVIDENCE_INVALID, f"{e.code}: {e}", client)
        ident = attest.cache_identity(claims, req.public_key)
        d = await self._write(lambda conn: self._decide(conn, req, claims, ident, ev_digest))
        # the decision is committed; signing and sealing happen outside the write transaction
        grants = []
        for g, key in d.grants:
            doc, digest = ops.crypto("sign", sign_grant_digest, self.signing_key, g)
            sealed = ops.crypto("hpke_seal", hpke.seal, key, req.recipient(), digest)
            grants.append({"grant": doc, "sealed_key": b64e(sealed)})
        with self.store.keyring.status_key(ident.cache_id) as sk:
            sealed_status_key = ops.crypto("hpke_seal", hpke.seal, sk, req.recipient(),
                                           status_key_info(ident.cache_id, req.nonce))
        own_claims = ops.crypto("sign", sign_claims, self.signing_key, ClaimsDocument(
            req.nonce, req.public_key, ident.cache_id, claims.to_dict(), self.now(),
            self.server_key_id))
        log.info("release decision", extra={"fields": {
            "cache_id": ident.cache_id, "tee": ident.tee, "grants": len(grants),
            "denials": sorted({x["code"] for x in d.denials}), "audit_seq": d.audit_seq}})
        return Outcome(200, {"grants": grants, "denials": d.denials,
                             "audit_head": self.signed_head(d.audit_seq, d.audit_head),
                             "cache_id": ident.cache_id, "cache_state": d.cache_state,
                             "state_seq": d.state_seq,
                             "status_key": b64e(sealed_status_key),
                             "claims": own_claims}, d.decisions)

    def _decide(self, conn: Connection, req: ReleaseRequest, claims: Claims,
                ident: CacheIdentity, ev_digest: str) -> _Decided:
        """The decision transaction (a group-commit operation): enrol the cache, decide each
        model and append the audit entries. No side effects outside the database, so the
        writer may re-run it alone."""
        store = self.store
        row, state = store.in_batch(conn)
        now = self.now()
        store.enrol_cache(conn, ident.cache_id, ident.tee, ident.platform_id,
                          b64e(req.public_key), ident.measurement, now)
        explicit = req.models is not None
        model_ids = req.models if req.models is not None else sorted(state.models)
        out = _Decided([], [], [], row.audit_seq, row.audit_head, "", state.seq)
        audit_rows: list[dict[str, Any]] = []
        tenants_seen: set[str] = set()
        for mid in model_ids:
            adm = admit(admission_input(state, mid, ident.cache_id, claims,
                                        auto_approve=self.config.auto_approve,
                                        default_lease=self.config.lease_seconds))
            model = state.models.get(mid)
            tenant = model.tenant if model is not None else None
            if adm.granted:
                assert tenant is not None
                made, adm = self._grants(state, tenant, mid, adm, req, ident.cache_id,
                                         ev_digest, now)
                out.grants += made
            if tenant is not None and (explicit or adm.granted):
                tenants_seen.add(tenant)
            if adm.granted:
                out.decisions.append("release")
                details: dict[str, Any] = {"key_versions": list(adm.key_versions),
                                           "evidence": ev_digest, "admitted_by": adm.admitted_by}
                audit_rows.append({"tenant": tenant, "model_id": mid, "decision": "release",
                                   "code": "granted", "details": details})
            elif explicit:  # never list (or audit per model) models the caller did not name
                out.denials.append({"model_id": mid, "code": adm.code})
                out.decisions.append(adm.code)
                audit_rows.append({"tenant": tenant, "model_id": mid, "decision": "deny",
                                   "code": adm.code, "details": {"reason": adm.reason,
                                                                 "evidence": ev_digest}})
        if not audit_rows:
            audit_rows.append({"tenant": None, "model_id": None, "decision": "deny",
                               "code": DENIED, "details": {"reason": "no models granted",
                                                           "evidence": ev_digest}})
        for tenant in sorted(tenants_seen):
            store.note_cache_seen(conn, tenant, ident.cache_id, now)
        for r in audit_rows:
            head = store.append_audit(conn, actor=f"cache:{ident.cache_id}", action="release",
                                      cache_id=ident.cache_id, **r)
            out.audit_seq, out.audit_head = head.seq, head.hash
        out.cache_state = cache_state_of(state, ident.cache_id, self.config.auto_approve)
        return out

    def _grants(self, state: AuthState, tenant: str, mid: str, adm: Admission,
                req: ReleaseRequest, cache_id: str, ev_digest: str, now: int
                ) -> tuple[list[tuple[Grant, Secret]], Admission]:
        """The grants of an admitted model, one per active key version (a key that does not
        open under its AAD turns the admission into a denial)."""
        pol = state.policies[mid]
        made: list[tuple[Grant, Secret]] = []
        for kv in state.active_versions(mid):
            try:
                key = self.store.keyring.model_key(kv.wrapped, KeyRef(tenant, mid, kv.key_version))
            except TamperError as e:
                log.error("tamper detected: %s", e)
                return [], Admission(DENIED, f"tampered: {e}")
            made.append((Grant(
                tenant=tenant, model_id=mid, key_version=kv.key_version, nonce=req.nonce,
                requester_key=req.public_key, kem_id=hpke.KEM_ID, evidence_digest=ev_digest,
                cache_id=cache_id, policy=pol.doc, policy_version=pol.version,
                lease_seconds=adm.lease_seconds, revocation_epoch=state.epoch, issued_at=now,
                server_key_id=self.server_key_id, state_seq=state.seq), key))
        return made, adm

    # --- collateral -----------------------------------------------------------------------
    def collateral(self) -> Outcome:
        """The DCAP collateral files of this server, signed (SGX caches verify their local
        runtimes with it, at the server's signed time)."""
        from sealtorch.attestation.verifiers.dcap import collateral_key
        from sealtorch.errors import CollateralError
        from sealtorch.protocol.collateral import MAX_FILES, CollateralBundle, sign_bundle

        d = self.config.path(self.config.collateral_dir)
        files: list[str] = []
        for f in sorted(d.glob("*.json"))[:MAX_FILES] if d.is_dir() else []:
            try:
                collateral_key(f)  # only what parses as collateral
                files.append(f.read_text("utf-8"))
            except (CollateralError, OSError, UnicodeDecodeError):
                log.warning("collateral file %s skipped: not DCAP collateral", f.name)
        doc = ops.crypto("sign", sign_bundle, self.signing_key,
                         CollateralBundle(tuple(files), self.now(), self.server_key_id))
        return Outcome(200, {"collateral": doc}, [])

    # --- status ---------------------------------------------------------------------------
    async def status(self, req: StatusRequest) -> Outcome | None:
        """Revocation poll of an enrolled cache (None: the request's MAC does not verify under
        the cache's status key). Per model: active with its versions and policy version, or
        revoked; an unknown model looks revoked, so existence is not revealed. The state is
        read after the poll arrived, in a read shared with the polls that arrived with it."""
        with self.store.keyring.status_key(req.cache_id) as sk:
            if not ops.crypto("hmac", req.check_mac, sk.view()):
                return None
        state = await self._states.get()
        models: dict[str, ModelStatus] = {}
        for mid in req.models or []:
            adm = admit(admission_input(state, mid, req.cache_id, None,
                                        auto_approve=self.config.auto_approve,
                                        default_lease=self.config.lease_seconds))
            pol = state.policies.get(mid)
            models[mid] = (ModelStatus("active", adm.key_versions, pol.version if pol else 0)
                           if adm.granted else ModelStatus("revoked", (), 0))
        st = Status(nonce=req.nonce, cache_id=req.cache_id, revocation_epoch=state.epoch,
                    cache_state=cache_state_of(state, req.cache_id, self.config.auto_approve),
                    models=models, issued_at=self.now(), server_key_id=self.server_key_id,
                    state_seq=state.seq)
        return Outcome(200, {"status": ops.crypto("sign", sign_status, self.signing_key, st)},
                       [])

    # --- admin: a dry run -----------------------------------------------------------------
    def policy_test(self, state: AuthState, tenant: str, model_id: str,
                    evidence_json: dict[str, Any]) -> dict[str, Any]:
        """Explain, claim by claim, whether evidence would get this model's key (no nonce)."""
        model = state.models.get(model_id)
        if model is None or model.tenant != tenant:
            raise NotFoundError("model not found for this tenant")
        pol = state.policies.get(model_id)
        if pol is None or pol.parsed is None:
            return {"allowed": False, "reasons": ["model has no (valid) policy"]}
        try:
            claims = self.verifier().verify(attest.parse_evidence(evidence_json))
        except StoreError:
            raise
        except SealtorchError as e:
            return {"allowed": False, "reasons": [f"evidence rejected ({e.code}): {e}"]}
        decision = pol.parsed.evaluate_cache(claims)
        # the cache's enrolled key is not known here: a cache named by its key shows "pending"
        ident = attest.cache_identity(claims, b"")
        adm = admit(admission_input(state, model_id, ident.cache_id, claims,
                                    auto_approve=self.config.auto_approve,
                                    default_lease=self.config.lease_seconds))
        return {"allowed": decision.allowed, "reasons": list(decision.reasons),
                "lease_seconds": pol.parsed.lease_seconds, "policy_version": pol.version,
                "admission": {"code": adm.code, "reason": adm.reason,
                              "admitted_by": adm.admitted_by},
                "cache_id": None if ident.by_key else ident.cache_id,
                "claims": claims.to_dict()}

