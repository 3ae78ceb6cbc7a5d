"""The release logic of dkeyserver: challenge, release and status, independent of HTTP.

Order of a release (DESIGN.md "Binding and key delivery"): check the nonce's MAC and expiry,
burn it in the database (committed), verify the evidence, check the binding, enrol the cache,
evaluate each model's policy, then commit the audit entries and only then answer. Public denial
codes are short; reasons go only to the audit log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealtorch._secret import Secret
from sealtorch.errors import SealtorchError, StoreError, TamperError
from sealtorch.keyserver import attest
from sealtorch.keyserver.config import ServerConfig
from sealtorch.keyserver.store import DatabaseUnavailableError, Store
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64e
from sealtorch.protocol.grant import (
    AuditHead,
    Grant,
    ModelStatus,
    Status,
    sign_audit_head,
    sign_grant_digest,
    sign_status,
)
from sealtorch.protocol.messages import ReleaseRequest, StatusRequest
from sealtorch.protocol.signing import key_id

log = logging.getLogger("sealtorch.keyserver")

# public denial codes
DENIED = "denied"
NONCE_INVALID = "nonce_invalid"
EVIDENCE_INVALID = "evidence_invalid"
NOT_APPROVED = "not_approved"
REVOKED = "revoked"
UNKNOWN_MODEL = "unknown_model"

_NONCE_TAG = b"sealtorch-nonce/v1\x00"
T = TypeVar("T")


@dataclass
class Outcome:
    """An HTTP-agnostic answer: status code and JSON body; ``decisions`` feed the metrics."""

    status: int
    body: dict[str, Any]
    decisions: list[str]


class KeyServer:
    """One key server process's release logic (stateless across replicas except the DB)."""

    def __init__(self, config: ServerConfig, store: Store, signing_key: Ed25519PrivateKey
                 ) -> None:
        self.config = config
        self.store = store
        self.signing_key = signing_key
        self.server_key_id = key_id(signing_key)
        self.audience = bytes.fromhex(self.server_key_id)
        self._nonce_key = store.nonce_key()
        self._verifier_lock = threading.Lock()
        self._verifier: Any = None
        self._verifier_sims: tuple[str, ...] | None = None
        self._sims_checked = 0.0
        self._last_purge = time.monotonic()

    # --- nonces ---------------------------------------------------------------------------
    def new_nonce(self) -> bytes:
        """32 bytes: expiry (8, big-endian) | random (8) | HMAC-SHA256 tag (16)."""
        head = struct.pack(">Q", int(time.time()) + self.config.nonce_ttl) + os.urandom(8)
        return head + self._nonce_tag(head)

    def _nonce_tag(self, head: bytes) -> bytes:
        return hmac.new(bytes(self._nonce_key), _NONCE_TAG + head, hashlib.sha256).digest()[:16]

    def check_nonce(self, nonce: bytes) -> tuple[bool, str, int]:
        """(valid, reason, expiry) from the nonce's own MAC and expiry (no database)."""
        head, tag = nonce[:16], nonce[16:]
        if not hmac.compare_digest(self._nonce_tag(head), tag):
            return False, "nonce was not issued by this server", 0
        expires = struct.unpack(">Q", head[:8])[0]
        if expires < time.time():
            return False, "nonce expired", expires
        return True, "", expires

    def challenge(self) -> Outcome:
        return Outcome(200, {"nonce": b64e(self.new_nonce()),
                             "expires_in": self.config.nonce_ttl}, [])

    # --- attestation ----------------------------------------------------------------------
    def invalidate_verifier(self) -> None:
        """Re-read registered sim platforms on the next release (after a registration)."""
        self._sims_checked = 0.0

    def verifier(self) -> Any:
        """The VerifierSet, rebuilt when the registered sim platforms change (checked at most
        once a second, and at once after a registration through this process)."""
        now = time.monotonic()
        if self._verifier is not None and now - self._sims_checked < 1.0:
            return self._verifier
        sims = tuple(sorted(self.store.sim_platforms())) if self.config.sim else ()
        self._sims_checked = now
        with self._verifier_lock:
            if self._verifier is None or sims != self._verifier_sims:
                self._verifier = attest.build_verifier(self.config, list(sims))
                self._verifier_sims = sims
            return self._verifier

    def _signed_head(self, seq: int, head: str) -> dict[str, Any]:
        return sign_audit_head(self.signing_key,
                               AuditHead(seq, head, int(time.time()), self.server_key_id))

    async def _write(self, op: Callable[[Any], T]) -> T:
        """Run ``op`` in the next group-commit batch; returns once that batch has committed."""
        return await self.store.committer().run_async(op)

    def _audit_deny_op(self, code: str, reason: str, client: str, evidence_digest: str,
                       cache_id: str | None) -> Callable[[Any], tuple[int, str]]:
        def op(conn: Any) -> tuple[int, str]:
            return self.store.append_audit(
                conn, actor=f"client:{client}", action="release", decision="deny", code=code,
                cache_id=cache_id, details={"reason": reason, "evidence": evidence_digest})
        return op

    async def _deny_all(self, code: str, reason: str, client: str, *, evidence_digest: str = "",
                        cache_id: str | None = None) -> Outcome:
        log.info("release denied", extra={"fields": {"code": code, "client": client}})
        seq, head = await self._write(
            self._audit_deny_op(code, reason, client, evidence_digest, cache_id))
        return Outcome(403, {"error": {"code": code, "message": code},
                             "audit_head": self._signed_head(seq, head)}, [code])

    # --- release --------------------------------------------------------------------------
    async def release(self, req: ReleaseRequest, client: str) -> Outcome:
        """One release, run on the event loop; its two durable writes (the nonce burn, then
        the decision with its audit entries) go through the group-commit writer, and the
        answer is built only after each has committed."""
        ok, reason, expires = self.check_nonce(req.nonce)
        if not ok:
            return await self._deny_all(NONCE_INVALID, reason, client)
        nonce = req.nonce
        fresh = await self._write(lambda conn: self.store.burn_nonce_in(conn, nonce, expires))
        if not fresh:  # committed before verification: a reused nonce never gets further
            return await self._deny_all(NONCE_INVALID, "nonce already used", client)
        if time.monotonic() - self._last_purge > 60:
            self._last_purge = time.monotonic()
            await asyncio.to_thread(self.store.purge_nonces)  # expired ones fail the MAC anyway
        ev_digest = ""
        try:
            evidence = attest.parse_evidence(req.evidence)
            ev_digest = evidence.digest().hex()
            if evidence.tee == "sim":  # ~0.1 ms: cheaper inline than a thread hop
                claims = self.verifier().verify(evidence)
            else:  # DCAP/SNP verification takes milliseconds: keep the event loop free
                claims = await asyncio.to_thread(self.verifier().verify, evidence)
            attest.check_binding(claims, nonce=req.nonce, public_key=req.public_key,
                                 audience=self.audience)
        except DatabaseUnavailableError:
            raise  # the verifier's platform list could not be read: not the evidence's fault
        except SealtorchError as e:
            return await self._deny_all(EVIDENCE_INVALID, f"{e.code}: {e}", client,
                                        evidence_digest=ev_digest)
        ident = attest.identity(claims)
        cache_id = hashlib.sha256(
            b"sealtorch-cache/v1\x00" + ident.tee.encode() + b"\x00" + ident.platform_id.encode()
        ).hexdigest()[:32]
        now = int(time.time())
        pending, denials, decisions, seq, head, state = await self._write(
            lambda conn: self._decide(conn, req, claims, ident, cache_id, ev_digest, now))
        # the decision is committed; signing and sealing happen outside the write transaction
        grants = []
        for g, key in pending:
            doc, digest = sign_grant_digest(self.signing_key, g)
            grants.append({"grant": doc,
                           "sealed_key": b64e(hpke.seal(key, req.recipient(), digest))})
        log.info("release decision", extra={"fields": {
            "cache_id": cache_id, "tee": ident.tee, "grants": len(grants),
            "denials": sorted({d["code"] for d in denials}), "audit_seq": seq}})
        return Outcome(200, {"grants": grants, "denials": denials,
                             "audit_head": self._signed_head(seq, head),
                             "cache_id": cache_id, "cache_state": state}, decisions)

    def _decide(self, conn: Any, req: ReleaseRequest, claims: Any, ident: attest.Identity,
                cache_id: str, ev_digest: str, now: int) -> tuple[
                    list[tuple[Grant, Secret]], list[dict[str, str]], list[str], int, str, str]:
        """The decision transaction (a group-commit operation): enrol the cache, decide each
        model and append the audit entries; returns what the answer needs. No side effects
        outside the database, so the writer may re-run it alone."""
        pending: list[tuple[Grant, Secret]] = []
        denials: list[dict[str, str]] = []
        decisions: list[str] = []
        self.store.enrol_cache_raw(conn, cache_id, ident.tee, ident.platform_id,
                                   b64e(req.public_key), ident.measurement)
        epoch = self.store.epoch_locked(conn)
        explicit = req.models is not None
        model_ids = req.models if req.models is not None else self.store.all_model_ids(conn)
        audit_rows: list[dict[str, Any]] = []
        for mid in model_ids:
            code, reason, tenant, made = self._release_one(
                conn, mid, claims, cache_id, req, ev_digest, epoch, now)
            if code is None:
                pending.extend(made)
                decisions.append("release")
                details: dict[str, Any] = {"key_versions": [g.key_version for g, _ in made],
                                           "evidence": ev_digest}
                if reason:
                    details["admitted_by"] = reason
                audit_rows.append({"tenant": tenant, "model_id": mid, "decision": "release",
                                   "code": "granted", "details": details})
            elif explicit:  # never list (or audit per model) models the caller did not name
                denials.append({"model_id": mid, "code": code})
                decisions.append(code)
                audit_rows.append({"tenant": tenant, "model_id": mid, "decision": "deny",
                                   "code": code, "details": {"reason": reason,
                                                             "evidence": ev_digest}})
        if not audit_rows:
            audit_rows.append({"tenant": None, "model_id": None, "decision": "deny",
                               "code": DENIED, "details": {"reason": "no models granted",
                                                           "evidence": ev_digest}})
        seq, head = 0, ""
        for row in audit_rows:
            seq, head = self.store.append_audit(
                conn, actor=f"cache:{cache_id}", action="release", cache_id=cache_id, **row)
        state = self._state_from(self.store.cache_states(conn, cache_id))
        return pending, denials, decisions, seq, head, state

    def _release_one(self, conn: Any, mid: str, claims: Any, cache_id: str,
                     req: ReleaseRequest, ev_digest: str, epoch: int, now: int
                     ) -> tuple[str | None, str, str | None, list[tuple[Grant, Secret]]]:
        row = self.store.release_row(conn, mid, cache_id)
        if row is None:
            return UNKNOWN_MODEL, "no such model", None, []
        tenant, model_state, approval, policy_version, policy_text, policy_mac = row
        if approval == "revoked":
            return REVOKED, "cache revoked by tenant", tenant, []
        admitted = approval == "approved" or self.config.auto_approve
        by_policy = not admitted
        policy_doc: dict[str, Any] | None = None
        if not admitted:  # a policy may admit caches that match it (admit_caches = true)
            try:
                if policy_text is not None:
                    policy_doc = self.store.checked_policy(tenant, mid, policy_version,
                                                           policy_text, policy_mac)
                    admitted = attest.admits_caches(policy_doc, text=policy_text)
            except (TamperError, SealtorchError):
                admitted = False  # an unreadable policy admits nobody (denied below if used)
            if not admitted:
                return NOT_APPROVED, "cache not approved by this model's tenant", tenant, []
        if model_state != "active":
            return REVOKED, "model revoked", tenant, []
        if policy_text is None:
            return DENIED, "model has no policy", tenant, []
        if policy_doc is None:
            try:
                policy_doc = self.store.checked_policy(tenant, mid, policy_version, policy_text,
                                                       policy_mac)
            except TamperError as e:
                log.error("tamper detected: %s", e)
                return DENIED, f"tampered: {e}", tenant, []
        try:
            allowed, reasons, lease = attest.evaluate(policy_doc, claims, self.config,
                                                      text=policy_text)
        except SealtorchError as e:
            return DENIED, f"policy error {e.code}: {e}", tenant, []
        if not allowed:
            return DENIED, "; ".join(reasons)[:2000] or "policy denied", tenant, []
        try:
            keys = self.store.active_keys_raw(conn, tenant, mid)
        except TamperError as e:
            log.error("tamper detected: %s", e)
            return DENIED, f"tampered: {e}", tenant, []
        if not keys:
            return REVOKED, "no active key version", tenant, []
        made = [(Grant(tenant=tenant, model_id=mid, key_version=kv, nonce=req.nonce,
                       requester_key=req.public_key, kem_id=hpke.KEM_ID,
                       evidence_digest=ev_digest, cache_id=cache_id, policy=policy_doc,
                       policy_version=int(policy_version), lease_seconds=lease,
                       revocation_epoch=epoch, issued_at=now, server_key_id=self.server_key_id),
                 key) for kv, key in keys]
        # on a grant, the "reason" names how the cache was admitted when not by approval
        return None, "policy" if by_policy else "", tenant, made

    def _state_from(self, states: set[str]) -> str:
        """The cache's summary state from every tenant's approval of it."""
        if "approved" in states:
            return "approved"
        if states == {"revoked"}:
            return "revoked"
        return "approved" if self.config.auto_approve else "pending"

    def _cache_state_summary(self, cache_id: str, conn: Any = None) -> str:
        from sqlalchemy import select

        from sealtorch.keyserver.store import cache_approvals

        q = select(cache_approvals.c.state).where(cache_approvals.c.cache_id == cache_id)
        if conn is None:
            with self.store.read() as c:
                states = {r[0] for r in c.execute(q)}
        else:
            states = {r[0] for r in conn.execute(q)}
        return self._state_from(states)

    # --- status ---------------------------------------------------------------------------
    def status(self, req: StatusRequest) -> Outcome:
        """Revocation poll: per model active/revoked, active versions, policy version; unknown
        models look revoked (so existence is not revealed)."""
        with self.store.read() as conn:
            epoch = self.store.epoch(conn)
            mids = req.models or []
            out: dict[str, ModelStatus] = {}
            tenants: set[str] = set()
            for mid in mids:
                info = self.store.model_info(conn, mid)
                if info is None:
                    out[mid] = ModelStatus("revoked", (), 0)
                    continue
                tenants.add(info.tenant)
                appr = self.store.approval(conn, info.tenant, req.cache_id)
                rows = [kv for kv, st in self._versions(conn, mid) if st == "active"]
                pv = 0
                try:
                    got = self.store.get_policy(conn, info.tenant, mid)
                    pv = got[1] if got else 0
                except StoreError:
                    rows = []
                active = info.state == "active" and rows and appr != "revoked" and (
                    appr == "approved" or self.config.auto_approve)
                # nothing about a model is revealed unless it is active for this cache
                out[mid] = (ModelStatus("active", tuple(rows), pv) if active
                            else ModelStatus("revoked", (), 0))
        cache_state = self._cache_state_summary(req.cache_id)
        st = Status(nonce=req.nonce, cache_id=req.cache_id, revocation_epoch=epoch,
                    cache_state=cache_state, models=out, issued_at=int(time.time()),
                    server_key_id=self.server_key_id)
        return Outcome(200, {"status": sign_status(self.signing_key, st)}, [])

    def _versions(self, conn: Any, mid: str) -> list[tuple[int, str]]:
        from sqlalchemy import select

        from sealtorch.keyserver.store import key_versions

        return [(r[0], r[1]) for r in conn.execute(
            select(key_versions.c.key_version, key_versions.c.state).where(
                key_versions.c.model_id == mid))]

    # --- admin helpers ----------------------------------------------------------------------
    def policy_test(self, tenant: str, model_id: str, evidence_json: dict[str, Any]
                    ) -> dict[str, Any]:
        """Explain, claim by claim, whether evidence would get this model's key (no nonce)."""
        with self.store.read() as conn:
            info = self.store.model_info(conn, model_id)
            if info is None or info.tenant != tenant:
                raise StoreError("model not found for this tenant")
            got = self.store.get_policy(conn, tenant, model_id)
        if got is None:
            return {"allowed": False, "reasons": ["model has no policy"]}
        try:
            evidence = attest.parse_evidence(evidence_json)
            claims = self.verifier().verify(evidence)
        except DatabaseUnavailableError:
            raise
        except SealtorchError as e:
            return {"allowed": False, "reasons": [f"evidence rejected ({e.code}): {e}"]}
        allowed, reasons, lease = attest.evaluate(got[0], claims, self.config)
        return {"allowed": allowed, "reasons": reasons, "lease_seconds": lease,
                "policy_version": got[1], "claims": attest.claims_dict(claims)}


def wipe_all(secrets: list[Secret]) -> None:
    for s in secrets:
        s.wipe()
