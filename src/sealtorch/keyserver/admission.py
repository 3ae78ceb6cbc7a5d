"""Whether a key cache may hold a model's key: one pure function, :func:`admit`, over typed
inputs, used by release (with the cache's verified claims), by status polls (without: the
lease was granted on claims; a policy change makes the cache attest again) and by
``policy test``.

Public codes do not tell an unknown model from one the cache is not admitted for (both
``not_approved``); ``revoked`` and ``denied`` are only told to caches that are admitted. The
``reason`` is for the audit log and for admins, never for the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from sealtorch.attestation.claims import Claims
from sealtorch.keyserver.state import AuthState, Model, StoredPolicy

GRANTED = "granted"
NOT_APPROVED = "not_approved"
REVOKED = "revoked"
DENIED = "denied"


@dataclass(frozen=True)
class AdmissionInput:
    """Everything :func:`admit` reads about one (cache, model) pair."""

    model: Model | None
    policy: StoredPolicy | None
    active_versions: tuple[int, ...]
    approval: str | None  # the model's tenant's approval of this cache: approved | revoked
    auto_approve: bool  # server setting (demo/tests)
    claims: Claims | None  # None: a status poll
    tenant_sim_platforms: frozenset[str]  # fingerprints of the tenant's sim platforms
    default_lease: int


@dataclass(frozen=True)
class Admission:
    """The decision: a public ``code``, the audited ``reason``, and for a grant, how the cache
    was admitted, which key versions and for how long."""

    code: str
    reason: str
    admitted_by: str | None = None  # approval | auto_approve | policy
    key_versions: tuple[int, ...] = ()
    lease_seconds: int = 0

    @property
    def granted(self) -> bool:
        return self.code == GRANTED


def admit(inp: AdmissionInput) -> Admission:
    """Decide one (cache, model) pair; see the module docstring."""
    if inp.model is None:
        return Admission(NOT_APPROVED, "no such model")
    tenant = inp.model.tenant
    if inp.approval == "revoked":
        return Admission(NOT_APPROVED, f"cache revoked by tenant {tenant}")
    claims = inp.claims
    if claims is not None and claims.tee == "sim" \
            and claims.platform_key not in inp.tenant_sim_platforms:
        return Admission(NOT_APPROVED,
                         f"sim platform {claims.platform_key} is not registered by tenant {tenant}")
    pol = inp.policy.parsed if inp.policy is not None else None
    if inp.approval == "approved":
        by = "approval"
    elif inp.auto_approve:
        by = "auto_approve"
    elif pol is not None and pol.admit_caches and (
            claims is None or pol.evaluate_cache(claims).allowed):
        by = "policy"
    else:
        return Admission(NOT_APPROVED, f"cache not approved by tenant {tenant}")
    if inp.model.state != "active":
        return Admission(REVOKED, "model revoked")
    if inp.policy is None:
        return Admission(DENIED, "model has no policy")
    if pol is None:
        return Admission(DENIED, inp.policy.error or "stored policy does not parse")
    if claims is not None:
        decision = pol.evaluate_cache(claims)
        if not decision.allowed:
            return Admission(DENIED, "; ".join(decision.reasons)[:2000] or "policy denied")
    if not inp.active_versions:
        return Admission(REVOKED, "no active key version")
    return Admission(GRANTED, "", by, inp.active_versions,
                     int(pol.lease_seconds or inp.default_lease))


def admission_input(state: AuthState, model_id: str, cache_id: str, claims: Claims | None, *,
                    auto_approve: bool, default_lease: int) -> AdmissionInput:
    """The inputs of :func:`admit` for one pair, read from a verified snapshot."""
    model = state.models.get(model_id)
    tenant = model.tenant if model is not None else ""
    sims = (state.sim_platforms_of(tenant)
            if model is not None and claims is not None and claims.tee == "sim" else frozenset())
    return AdmissionInput(
        model=model,
        policy=state.policies.get(model_id),
        active_versions=tuple(v.key_version for v in state.active_versions(model_id)),
        approval=state.approvals.get((tenant, cache_id)) if model is not None else None,
        auto_approve=auto_approve,
        claims=claims,
        tenant_sim_platforms=sims,
        default_lease=default_lease,
    )
