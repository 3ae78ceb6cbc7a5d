"""Admin operations of dkeyserver, independent of HTTP: tokens, models and keys, policies,
caches, the audit log and sim platforms, each scoped to the calling tenant.

Every write goes through :meth:`StateCache.change`: it checks the current state first (so an
admin write never launders a tampered or rolled-back database), writes MACed rows under the
next state sequence, appends its audit entry in the same transaction, re-seals the state
digest, and raises the high-water mark after the commit.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sealtorch._secret import Secret
from sealtorch.attestation.policy import ModelPolicy
from sealtorch.errors import AuthError, NotFoundError, PolicyError, ProtocolError, StoreError
from sealtorch.keyserver import queries, rows
from sealtorch.keyserver.audit import Head, verify_chain
from sealtorch.keyserver.keyring import KeyRef
from sealtorch.keyserver.service import KeyServer, cache_state_of
from sealtorch.keyserver.state import AuthState, Change, read_server_state
from sealtorch.keyserver.store import Store
from sealtorch.protocol import hpke
from sealtorch.protocol.b64 import b64e
from sealtorch.protocol.signing import KIND_KEY_EXPORT, body_digest, sign_document

TOKEN_PREFIX = "stk_"  # noqa: S105 - a public prefix, not a secret
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_TOKEN_TTL = 366 * 86400


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated admin: the tenant it acts for and the token it used."""

    tenant: str
    token_id: str


def authenticate(state: AuthState, token: str, now: int) -> Principal:
    """The principal of a valid token, else :class:`AuthError` (pure)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
        raise AuthError("admin token is malformed; read it from the token file")
    t = state.tokens.get(token_hash(token))
    if t is None or t.tenant not in state.tenants:
        raise AuthError("admin token is unknown")
    if t.revoked:
        raise AuthError("admin token was revoked; ask for a new one")
    if t.expires <= now:
        raise AuthError("admin token has expired; create a new one")
    return Principal(t.tenant, t.token_id)


# --- writes usable without a running server (init, tenant-add) -------------------------------
def add_tenant(ch: Change, tenant: str, token_ttl: int, *, actor: str) -> tuple[str, str]:
    """A new tenant and its first admin token; returns (token_id, token)."""
    if not TENANT_RE.fullmatch(tenant):
        raise ProtocolError("tenant names are [a-z0-9][a-z0-9_-]{0,63}")
    if tenant in ch.state.tenants:
        raise StoreError(f"tenant {tenant!r} already exists")
    ch.put(rows.TENANTS, {"name": tenant, "created": ch.now})
    ch.audit(actor=actor, action="tenant_add", decision="admin", code="ok", tenant=tenant)
    return _new_token(ch, tenant, token_ttl, actor=actor)


def create_token(ch: Change, tenant: str, ttl_seconds: int, *, actor: str) -> tuple[str, str]:
    """A new 256-bit token for ``tenant``; returns (token_id, token). Only its hash is kept."""
    if tenant not in ch.state.tenants:
        raise StoreError(f"tenant {tenant!r} does not exist")
    return _new_token(ch, tenant, ttl_seconds, actor=actor)


def _new_token(ch: Change, tenant: str, ttl_seconds: int, *, actor: str) -> tuple[str, str]:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    tid = secrets.token_hex(8)
    ch.put(rows.TOKENS, {"token_id": tid, "tenant": tenant, "token_hash": token_hash(token),
                         "expires": ch.now + ttl_seconds, "revoked": False, "created": ch.now})
    ch.audit(actor=actor, action="token_create", decision="admin", code="ok", tenant=tenant,
             details={"token_id": tid})
    return tid, token


class Admin:
    """The tenant-scoped admin API's operations."""

    def __init__(self, ks: KeyServer) -> None:
        self.ks = ks
        self.store: Store = ks.store

    def _change(self) -> Any:
        return self.store.states.change(self.ks.now())

    def authenticate(self, token: str) -> Principal:
        return authenticate(self.store.state(), token, self.ks.now())

    @staticmethod
    def _audit(ch: Change, p: Principal, action: str, model_id: str | None = None,
               details: Any = None, cache_id: str | None = None) -> None:
        ch.audit(actor=f"tenant:{p.tenant}", action=action, decision="admin", code="ok",
                 tenant=p.tenant, model_id=model_id, cache_id=cache_id, details=details or {})

    @staticmethod
    def _model(state: AuthState, p: Principal, model_id: str) -> None:
        m = state.models.get(model_id)
        if m is None or m.tenant != p.tenant:
            raise NotFoundError("model not found for this tenant")

    # --- tokens -------------------------------------------------------------------------
    def whoami(self, p: Principal) -> dict[str, Any]:
        return {"tenant": p.tenant, "token_id": p.token_id, "server_key_id": self.ks.server_key_id}

    def token_create(self, p: Principal, ttl: int) -> dict[str, Any]:
        if not 60 <= ttl <= MAX_TOKEN_TTL:
            raise ProtocolError(f"ttl_seconds must be an integer between 60 and {MAX_TOKEN_TTL}")
        with self._change() as ch:
            tid, token = create_token(ch, p.tenant, ttl, actor=f"tenant:{p.tenant}")
        return {"token_id": tid, "token": token, "expires_in": ttl}

    def token_revoke(self, p: Principal, token_id: str) -> dict[str, Any]:
        with self._change() as ch:
            t = next((t for t in ch.state.tokens.values()
                      if t.token_id == token_id and t.tenant == p.tenant), None)
            if t is None:
                raise NotFoundError("token not found for this tenant")
            ch.put(rows.TOKENS, {"token_id": t.token_id, "tenant": t.tenant,
                                 "token_hash": t.token_hash, "expires": t.expires,
                                 "revoked": True, "created": t.created})
            self._audit(ch, p, "token_revoke", details={"token_id": token_id})
        return {"revoked": True}

    # --- models and keys ----------------------------------------------------------------
    def models_list(self, p: Principal) -> dict[str, Any]:
        st = self.store.state()
        out = []
        for mid in sorted(m for m, x in st.models.items() if x.tenant == p.tenant):
            pol = st.policies.get(mid)
            out.append({"model_id": mid, "state": st.models[mid].state,
                        "key_versions": [{"key_version": v.key_version, "state": v.state,
                                          "exportable": (mid, v.key_version) in st.exports}
                                         for v in st.versions.get(mid, ())],
                        "policy_version": pol.version if pol else None})
        return {"models": out}

    def _add_key(self, ch: Change, p: Principal, model_id: str, key: Secret, kv: int, *,
                 generated: bool) -> None:
        if len(key) != 32:
            raise StoreError("model keys are 32 bytes")
        existing = ch.state.models.get(model_id)
        if existing is not None and existing.tenant != p.tenant:
            raise StoreError("this model id is taken by another tenant; choose another id")
        if any(v.key_version == kv for v in ch.state.versions.get(model_id, ())):
            raise StoreError("the model already has this key version; rotate instead")
        if existing is None:
            ch.put(rows.MODELS, {"model_id": model_id, "tenant": p.tenant, "state": "active",
                                 "created": ch.now})
        ref = KeyRef(p.tenant, model_id, kv)
        ch.put(rows.KEY_VERSIONS, {"model_id": model_id, "key_version": kv,
                                   "wrapped": self.store.keyring.wrap_model_key(key, ref),
                                   "state": "active", "created": ch.now})
        if generated:  # the one copy 'model export' may open, once
            ch.put(rows.EXPORTS, {"model_id": model_id, "key_version": kv, "created": ch.now,
                                  "wrapped": self.store.keyring.wrap_export_copy(key, ref)})

    def model_add(self, p: Principal, model_id: str, key: Secret | None, kv: int
                  ) -> dict[str, Any]:
        generated = key is None
        with key or Secret(os.urandom(32)) as k, self._change() as ch:
            self._add_key(ch, p, model_id, k, kv, generated=generated)
            self._audit(ch, p, "model_create" if generated else "model_add", model_id,
                        {"key_version": kv})
        return {"model_id": model_id, "key_version": kv, "generated": generated}

    def model_rotate(self, p: Principal, model_id: str, key: Secret | None) -> dict[str, Any]:
        generated = key is None
        with key or Secret(os.urandom(32)) as k, self._change() as ch:
            self._model(ch.state, p, model_id)
            kv = max((v.key_version for v in ch.state.versions.get(model_id, ())), default=0) + 1
            self._add_key(ch, p, model_id, k, kv, generated=generated)
            self._audit(ch, p, "model_rotate", model_id, {"key_version": kv})
        return {"model_id": model_id, "key_version": kv, "generated": generated}

    def model_export(self, p: Principal, model_id: str, kv: int, recipient: bytes
                     ) -> dict[str, Any]:
        """A server-generated key, once: its export copy is opened, sealed to ``recipient``
        and deleted in one transaction; re-arming it needs the KEK."""
        pk = hpke.load_public_key(recipient)
        body = {"format": "sealtorch-key-export/v1", "tenant": p.tenant, "model_id": model_id,
                "key_version": kv, "recipient": b64e(recipient),
                "server_key_id": self.ks.server_key_id, "issued_at": self.ks.now()}
        with self._change() as ch:
            self._model(ch.state, p, model_id)
            blob = ch.state.exports.get((model_id, kv))
            if blob is None:
                raise StoreError("this key version has no export copy: it was imported, not "
                                 "generated by the server, or was already exported once")
            with self.store.keyring.open_export_copy(blob, KeyRef(p.tenant, model_id, kv)) as key:
                sealed = hpke.seal(key, pk, body_digest(body))
            ch.remove(rows.EXPORTS, {"model_id": model_id, "key_version": kv})
            self._audit(ch, p, "model_export", model_id, {"key_version": kv})
        return {"export": sign_document(self.ks.signing_key, KIND_KEY_EXPORT, body),
                "sealed_key": b64e(sealed)}

    def version_retire(self, p: Principal, model_id: str, kv: int) -> dict[str, Any]:
        with self._change() as ch:
            self._model(ch.state, p, model_id)
            v = next((v for v in ch.state.versions.get(model_id, ()) if v.key_version == kv),
                     None)
            if v is None:
                raise NotFoundError("the model has no such key version")
            ch.put(rows.KEY_VERSIONS, {"model_id": model_id, "key_version": kv,
                                       "wrapped": v.wrapped, "state": "retired",
                                       "created": v.created})
            ch.bump_epoch()
            ch.evict(model_id, kv)
            self._audit(ch, p, "model_retire_version", model_id, {"key_version": kv})
        return {"model_id": model_id, "key_version": kv, "state": "retired"}

    def model_revoke(self, p: Principal, model_id: str) -> dict[str, Any]:
        with self._change() as ch:
            self._model(ch.state, p, model_id)
            ch.put(rows.MODELS, {"model_id": model_id, "tenant": p.tenant, "state": "revoked",
                                 "created": ch.state.models[model_id].created})
            ch.bump_epoch()
            ch.evict(model_id)
            self._audit(ch, p, "model_revoke", model_id)
        return {"model_id": model_id, "state": "revoked"}

    # --- policies -----------------------------------------------------------------------
    def policy_set(self, p: Principal, model_id: str, doc: dict[str, Any]) -> dict[str, Any]:
        try:
            pol = ModelPolicy.from_dict(doc)
        except PolicyError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise PolicyError("policy document is malformed") from e
        norm = pol.to_dict()  # store the normalised form: it is what grants carry
        from sealtorch.protocol.canonical import canonical_json

        text = canonical_json(norm).decode("ascii")
        with self._change() as ch:
            self._model(ch.state, p, model_id)
            cur = ch.state.policies.get(model_id)
            if cur is not None and pol.version <= cur.version:
                raise StoreError(
                    f"policy version must increase (current {cur.version}); bump 'version'")
            ch.put(rows.POLICIES, {"model_id": model_id, "version": pol.version, "policy": text,
                                   "updated": ch.now})
            self._audit(ch, p, "policy_set", model_id,
                        {"version": pol.version, "sha256": body_digest(norm).hex()})
        return {"model_id": model_id, "policy_version": pol.version}

    def policy_show(self, p: Principal, model_id: str) -> dict[str, Any]:
        st = self.store.state()
        self._model(st, p, model_id)
        pol = st.policies.get(model_id)
        if pol is None:
            raise NotFoundError("policy not found for this model")
        return {"model_id": model_id, "policy": pol.doc, "policy_version": pol.version}

    def policy_test(self, p: Principal, model_id: str, evidence: dict[str, Any]
                    ) -> dict[str, Any]:
        return self.ks.policy_test(self.store.state(), p.tenant, model_id, evidence)

    # --- caches -------------------------------------------------------------------------
    def caches_list(self, p: Principal) -> dict[str, Any]:
        """The caches this tenant has approved or revoked, or that asked for its models."""
        st = self.store.state()
        mine = {c for (t, c) in st.approvals if t == p.tenant}
        mine |= queries.caches_seen_by(self.store.db, p.tenant)
        out = []
        for c in queries.cache_rows(self.store.db, mine):
            state = st.approvals.get((p.tenant, c["cache_id"])) or (
                "approved" if self.ks.config.auto_approve else "pending")
            out.append({"cache_id": c["cache_id"], "tee": c["tee"],
                        "platform_id": c["platform_id"], "measurement": c["measurement"],
                        "first_seen": c["first_seen"], "last_seen": c["last_seen"],
                        "state": state})
        return {"caches": out}

    def cache_set(self, p: Principal, cache_id: str, state: str) -> dict[str, Any]:
        if not queries.cache_rows(self.store.db, {cache_id}):
            raise NotFoundError("cache not found: it has not enrolled yet (it must attest once)")
        with self._change() as ch:
            ch.put(rows.APPROVALS, {"tenant": p.tenant, "cache_id": cache_id, "state": state,
                                    "updated": ch.now})
            if state == "revoked":
                ch.bump_epoch()
            self._audit(ch, p, f"cache_{'approve' if state == 'approved' else 'revoke'}",
                        cache_id=cache_id)
        return {"cache_id": cache_id, "state": state,
                "summary": cache_state_of(self.store.state(), cache_id,
                                          self.ks.config.auto_approve)}

    # --- audit --------------------------------------------------------------------------
    def audit_show(self, p: Principal, after: int, limit: int, newest: bool) -> dict[str, Any]:
        return {"entries": queries.audit_rows(self.store.db, tenant=p.tenant, after=after,
                                              limit=limit, newest=newest)}

    def audit_head(self) -> dict[str, Any]:
        h = self.store.audit_head()
        return {"audit_head": self.ks.signed_head(h.seq, h.hash)}

    def audit_verify(self) -> dict[str, Any]:
        problems, h = verify_audit(self.store, None)
        return {"ok": not problems, "problems": problems,
                "audit_head": self.ks.signed_head(h.seq, h.hash)}

    # --- sim platforms ------------------------------------------------------------------
    def sim_register(self, p: Principal, key_text: str) -> dict[str, Any]:
        if not self.ks.config.sim:
            raise ProtocolError("sim attestation is disabled in this server's configuration")
        from sealtorch.attestation import sim

        pub = sim.platform_public_key_from_text(key_text)
        raw = sim.raw_public(pub).hex()
        with self._change() as ch:
            owner = ch.state.sim_keys.get(raw)
            if owner is not None and owner != p.tenant:
                raise StoreError("this sim platform key is registered by another tenant")
            if owner is None:
                ch.put(rows.SIM_PLATFORMS, {"key": raw, "tenant": p.tenant, "created": ch.now})
                self._audit(ch, p, "sim_register", details={"fingerprint": sim.fingerprint(pub)})
        self.ks.invalidate_verifier()
        return {"fingerprint": sim.fingerprint(pub)}


def verify_audit(store: Store, head: Head | None) -> tuple[list[str], Head]:
    """Verify the whole chain (and against a signed ``head`` held outside the database);
    returns the problems and the database's current head."""
    with store.db.read() as conn:
        row = read_server_state(store.db, conn)
    entries = queries.audit_rows(store.db)
    problems = verify_chain(entries, mac=store.keyring.audit, keyed_from=row.audit_keyed_from,
                            head=head)
    if entries and (int(entries[-1]["seq"]), str(entries[-1]["hash"])) != (row.audit_seq,
                                                                             row.audit_head):
        problems.append(f"the head pointer (seq {row.audit_seq}) is not the last entry "
                        f"(seq {entries[-1]['seq']})")
    mark = store.watermark.seen()
    if mark is not None and row.audit_seq < mark.audit_seq:
        problems.append(f"truncated: this server has seen audit seq {mark.audit_seq}, the log "
                        f"ends at {row.audit_seq}")
    return problems, row.audit
