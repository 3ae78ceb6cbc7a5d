"""Leases on model keys: remote attestation to dkeyserver, renewal, revocation polls, outages.

A lease is a relative duration measured on :func:`time.monotonic` from *before* the release
request was sent, so neither the host's wall clock nor network delay can stretch it; and it
never outlives the key server's own signed time: once a signed answer (status poll, release)
says the server's clock is past the grant's issue time plus its lease, the lease is gone, even
if the host froze or turned back this process's clock. The manager renews before expiry by
attesting again, polls a signed, nonce-bound status document on an interval, drops (wipes)
keys that are revoked, retired, denied or expired, and during an outage keeps serving
unexpired leases while retrying with exponential backoff and jitter. (A host that both freezes
the clock and blocks every poll can keep a lease alive: ``max_releases_per_lease`` still bounds
its use; docs/threat-model.md.)
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from sealtorch._secret import Secret
from sealtorch.errors import (
    GrantError,
    LeaseExpiredError,
    ProtocolError,
    ReleaseDenied,
    RevokedError,
    SealtorchError,
    ServiceUnavailableError,
)
from sealtorch.keycache.failover import backoff_delay
from sealtorch.keycache.lease import EvidenceFn, Lease, Upstream, parse_claims, parse_policy
from sealtorch.protocol import hpke
from sealtorch.protocol.grant import Grant
from sealtorch.protocol.local import CHALLENGE_LEN

log = logging.getLogger("sealtorch.keycache")
T = TypeVar("T")


class LeaseManager:
    """Holds the cache's leases and keeps them fresh; thread-safe."""

    def __init__(
        self,
        upstream: Upstream,
        make_evidence: EvidenceFn,
        *,
        models: list[str] | None = None,
        poll_interval: float = 30.0,
        renew_fraction: float = 0.5,
        retry_min: float = 0.5,
        retry_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._up = upstream
        self._make_evidence = make_evidence
        self._models = list(models) if models else None
        self.poll_interval = poll_interval
        self._renew_fraction = renew_fraction
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, int], Lease] = {}
        self._denied: dict[str, str] = {}  # model id -> public denial code (incl. "revoked")
        # One HPKE key pair per cache process: every grant names it, and runtimes check that
        # the grant relayed to them was issued to the cache they attested to (its audience).
        self._sk, self.public_key = hpke.generate_keypair()
        self.cache_id: str | None = None
        self.cache_state = "unknown"
        #: what the key server verified about this cache's own evidence at the last release
        self.own_claims: Any = None
        #: SGX: fetch the key server's signed DCAP collateral at every renewal
        self.fetch_collateral = False
        self.collateral: tuple[str, ...] = ()
        self._server_time: int | None = None  # newest signed key-server time seen
        self._server_seen = 0.0  # this process's clock when it was seen
        self._failures = 0
        self._poll_failures = 0
        self.last_error: str | None = None
        self.upstream_ok = False
        self.refreshes = 0
        self.polls = 0
        self.invalid_documents = 0
        #: renewals and polls that moved to another key server replica after one failed
        self.failovers = 0
        now = clock()
        self._next_refresh = now
        self._next_poll = now + poll_interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- time ----------------------------------------------------------------------------
    def _note_server_time(self, t: int) -> None:
        """Remember a signed key-server time (lock held); it never goes back."""
        if self._server_time is None or t > self._server_time:
            self._server_time = t
            self._server_seen = self._clock()

    def server_time(self) -> float | None:
        """The key server's time as this cache knows it: the newest signed time plus what this
        process's clock counted since (a host can only make it later). ``None`` before the
        first signed answer. Local evidence is verified at this time, not the host's clock."""
        with self._lock:
            if self._server_time is None:
                return None
            return self._server_time + max(0.0, self._clock() - self._server_seen)

    def _past_server_time(self, lease: Lease) -> bool:
        """The key server's signed time says this lease is over (lock held)."""
        return (self._server_time is not None
                and self._server_time >= lease.grant.issued_at + lease.grant.lease_seconds)

    # --- queries -------------------------------------------------------------------------
    def open_challenge(self, sealed: bytes, info: bytes) -> Secret:
        """Open a runtime's challenge sealed to this cache's HPKE key (proof of possession)."""
        try:
            secret = hpke.open(sealed, self._sk, info)
        except ProtocolError as e:
            raise ProtocolError(
                "the challenge does not open with this key cache's key for this file and "
                "session; the runtime attested to another cache or the request was altered"
            ) from e
        if len(secret) != CHALLENGE_LEN:
            secret.wipe()
            raise ProtocolError(
                f"the challenge must be a {CHALLENGE_LEN}-byte secret; update the runtime"
            )
        return secret

    def acquire(
        self,
        model_id: str,
        key_version: int,
        *,
        check: Callable[[Lease], None] | None = None,
        use: Callable[[Lease], T] | None = None,
    ) -> tuple[Lease, T | None]:
        """The live lease for a model key version, counting one release against its cap.

        ``check`` (e.g. the runtime allow-list) runs before the release is counted; ``use``
        (e.g. file-key derivation) runs under the lock too, so a renewal or revocation cannot
        wipe the model key while it is being used. Raises :class:`RevokedError`,
        :class:`LeaseExpiredError` or :class:`ReleaseDenied`.
        """
        with self._lock:
            now = self._clock()
            lease = self._leases.get((model_id, key_version))
            if lease is None:
                self._unavailable(model_id, key_version)
            if now >= lease.expires or self._past_server_time(lease):
                self._drop(lease, "lease_expired")
                raise LeaseExpiredError(
                    f"the lease on model {model_id!r} expired and could not be renewed"
                )
            if lease.max_releases is not None and lease.releases >= lease.max_releases:
                raise ReleaseDenied(
                    f"release cap of this lease on model {model_id!r} is reached; the cache "
                    "must renew its lease first", "release_cap",
                )
            if check is not None:
                check(lease)
            result = use(lease) if use is not None else None
            lease.releases += 1
            return lease, result

    def _unavailable(self, model_id: str, key_version: int | None) -> NoReturn:
        """Raise why no lease of ``model_id`` can be used (lock held)."""
        code = self._denied.get(model_id)
        if code == "revoked":
            raise RevokedError(f"model {model_id!r} was revoked by the key server")
        if code == "lease_expired":
            raise LeaseExpiredError(
                f"the lease on model {model_id!r} expired and could not be renewed "
                "(key server unreachable?)"
            )
        self._raise_if_pending(model_id, code)
        if code is not None:
            raise ReleaseDenied(f"the key server denied model {model_id!r}", code)
        version = f" key version {key_version}" if key_version is not None else ""
        raise ReleaseDenied(f"this cache holds no key for model {model_id!r}{version}; check "
                            "that the model is registered and its policy admits this cache "
                            "(dkeycache status shows what the key server answered)",
                            "not_available")

    def _raise_if_pending(self, model_id: str, code: str | None) -> None:
        """Say what to do when no key is held because the key server has not approved this
        cache yet (lock held): the owner's approve command, with this cache's id."""
        if self.cache_state != "pending" or code not in (None, "not_approved"):
            return
        raise ReleaseDenied(
            f"this key cache ({self.cache_id}) is waiting for approval, so it holds no key for "
            f"model {model_id!r}; the model owner approves it with `dkeyserver cache approve "
            f"{self.cache_id}`, after which the cache receives the key when it next attests",
            "cache_pending",
        )

    def newest(self, model_id: str, *, check: Callable[[Lease], None] | None = None) -> Lease:
        """The live lease of the newest key version of ``model_id`` (``check`` runs first, e.g.
        the runtime allow-list); raises like :meth:`acquire` when there is none."""
        with self._lock:
            now = self._clock()
            live = [ls for (m, _), ls in self._leases.items()
                    if m == model_id and now < ls.expires and not self._past_server_time(ls)]
            if not live:
                self._unavailable(model_id, None)
            lease = max(live, key=lambda ls: ls.key_version)
            if check is not None:
                check(lease)
            return lease

    def _state(self, leases: int) -> str:
        if not leases and not self.upstream_ok:
            return "down"
        return "ok" if self.upstream_ok else "degraded"

    def summary(self) -> dict[str, Any]:
        """State and counts only, plus this cache's own id and state (what an operator needs to
        approve it): what the health listener and the ``health`` op show."""
        with self._lock:
            now = self._clock()
            live = sum(1 for ls in self._leases.values() if now < ls.expires)
            return {"state": self._state(live),
                    "upstream": "ok" if self.upstream_ok else "unreachable",
                    "cache_id": self.cache_id, "cache_state": self.cache_state,
                    "leases": live, "models_denied": len(self._denied),
                    "refreshes": self.refreshes, "polls": self.polls,
                    "failovers": self.failovers,
                    "invalid_documents": self.invalid_documents}

    def policies(self) -> list[Any]:
        """The policies of the live leases (newest version of each model)."""
        with self._lock:
            return [ls.policy for ls in self._leases.values() if ls.policy is not None]

    def snapshot(self, models: set[str] | None = None) -> dict[str, Any]:
        """Detailed view (no key material): state, upstream status and each lease, of every
        model or only of ``models`` (a runtime's own)."""
        with self._lock:
            now = self._clock()
            leases = [
                {
                    "model_id": ls.model_id,
                    "key_version": ls.key_version,
                    "policy_version": ls.grant.policy_version,
                    "remaining_seconds": round(max(0.0, ls.expires - now), 3),
                    "releases": ls.releases,
                    "max_releases": ls.max_releases,
                    "state": "active" if now < ls.expires else "expired",
                }
                for ls in sorted(self._leases.values(), key=lambda x: (x.model_id, x.key_version))
                if models is None or ls.model_id in models
            ]
            denied = {m: c for m, c in sorted(self._denied.items())
                      if models is None or m in models}
            return {
                "state": self._state(len(leases)),
                "upstream": "ok" if self.upstream_ok else "unreachable",
                "cache_id": self.cache_id,
                "cache_state": self.cache_state,
                "leases": leases,
                "denied": denied,
                "last_error": self.last_error,
                "refreshes": self.refreshes,
                "polls": self.polls,
                "failovers": self.failovers,
                "invalid_documents": self.invalid_documents,
            }

    # --- state changes -------------------------------------------------------------------
    def _drop(self, lease: Lease, code: str) -> None:
        """Remove and wipe a lease (lock held)."""
        self._leases.pop((lease.model_id, lease.key_version), None)
        lease.key.wipe()
        self._denied[lease.model_id] = code
        log.warning("dropped key of model %s v%d (%s)", lease.model_id, lease.key_version, code)

    def drop_all(self, code: str = "revoked") -> None:
        """Wipe every key (cache revoked, or shutting down)."""
        with self._lock:
            for lease in list(self._leases.values()):
                self._drop(lease, code)

    def _failing_over(self, op: Callable[[], T]) -> T:
        """Run ``op``; when the replica it reached does not answer and another one is in the
        rotation (an upstream of several replicas), run it again there at once (the whole
        operation: a renewal takes a new nonce from the next replica)."""
        tries = max(1, int(getattr(self._up, "replicas", 1)))
        for attempt in range(tries):
            try:
                return op()
            except (ServiceUnavailableError, OSError):
                can = getattr(self._up, "can_fail_over", None)
                if attempt + 1 >= tries or can is None or not can():
                    raise
                self.failovers += 1
        raise AssertionError("unreachable")  # pragma: no cover

    def refresh(self) -> None:
        """Attest to dkeyserver and (re)acquire leases (moving to another replica when one
        does not answer); raises on failure, keeps old leases."""
        self._failing_over(self._refresh_once)

    def _refresh_once(self) -> None:
        t0 = self._clock()
        nonce = self._up.challenge()
        evidence = self._make_evidence(nonce, self.public_key, self._up.audience)
        result = self._up.release(
            evidence, self.public_key, nonce, self._models, private_key=self._sk
        )
        collateral = self._up.collateral() if self.fetch_collateral else None
        with self._lock:
            self._note_server_time(int(result.audit_head.issued_at))
            if collateral is not None:
                self.collateral = collateral
            self.cache_id = result.cache_id
            self.cache_state = result.cache_state
            if getattr(result, "claims", None) is not None:
                self.own_claims = parse_claims(result.claims)
            granted: set[tuple[str, int]] = set()
            parsed = [(rk, parse_policy(rk.grant.policy)) for rk in result.grants]
            for rk, pol in parsed:
                g: Grant = rk.grant
                if rk.key is None or len(rk.key) != 32:
                    raise GrantError("release response carried no usable key for a grant")
                lease_s = float(g.lease_seconds)
                new = Lease(
                    grant=g,
                    document=rk.document,
                    key=rk.key,
                    expires=t0 + lease_s,
                    renew_at=t0 + lease_s * self._renew_fraction,
                    max_releases=pol.max_releases_per_lease,
                    policy=pol,
                    grant_digest=g.digest(),
                )
                old = self._leases.get((g.model_id, g.key_version))
                if old is not None:
                    old.key.wipe()
                self._leases[(g.model_id, g.key_version)] = new
                self._denied.pop(g.model_id, None)
                granted.add((g.model_id, g.key_version))
            granted_models = {m for m, _ in granted}
            for (m, v), lease in list(self._leases.items()):
                if m in result.denials:
                    self._drop(lease, result.denials[m])
                elif m in granted_models and (m, v) not in granted:
                    self._drop(lease, "key_retired")
                elif m not in granted_models:  # no longer granted (policy or approval changed)
                    self._drop(lease, "denied")
            for m, code in result.denials.items():
                self._denied[m] = code
            if result.cache_state == "revoked":
                for lease in list(self._leases.values()):
                    self._drop(lease, "revoked")
            self.refreshes += 1
            self.upstream_ok = True
            self.last_error = None

    def poll(self) -> bool:
        """Fetch and apply the signed status; returns True if a renewal is needed now."""
        if self.cache_id is None:
            return True
        cache_id = self.cache_id
        with self._lock:
            models = sorted({m for m, _ in self._leases}) or None
        status = self._failing_over(lambda: self._up.status(cache_id, models))
        with self._lock:
            self._note_server_time(int(status.issued_at))
            self.polls += 1
            # a lease lost to an outage comes back by attesting again, not by polling
            renew = "lease_expired" in self._denied.values()
            if status.cache_state == "revoked":
                for lease in list(self._leases.values()):
                    self._drop(lease, "revoked")
                self._denied.update(
                    {m: "revoked" for m in list(self._denied) + list(status.models)}
                )
                self.cache_state = "revoked"
                return False
            if self.cache_state == "pending" and status.cache_state == "approved":
                renew = True  # approved since the last release: fetch the keys now
            for lease in list(self._leases.values()):
                if lease.grant.revocation_epoch < status.revocation_epoch:
                    renew = True
                ms = status.models.get(lease.model_id)
                if ms is None:
                    continue
                if ms.state == "revoked":
                    self._drop(lease, "revoked")
                elif lease.key_version not in ms.key_versions:
                    self._drop(lease, "key_retired")
                elif ms.policy_version != lease.grant.policy_version:
                    renew = True
        return renew

    # --- background loop -----------------------------------------------------------------
    def _backoff(self, failures: int) -> float:
        """Exponential backoff with jitter: half fixed, half random."""
        return backoff_delay(failures, self._retry_min, self._retry_max, self._rng())

    def _expire(self, now: float) -> None:
        with self._lock:
            for lease in list(self._leases.values()):
                if now >= lease.expires or self._past_server_time(lease):
                    self._drop(lease, "lease_expired")

    def _try_refresh(self) -> None:
        try:
            self.refresh()
        except (ServiceUnavailableError, ReleaseDenied, GrantError, ProtocolError,
                SealtorchError, OSError) as e:
            self._failures += 1
            self.upstream_ok = not isinstance(e, ServiceUnavailableError | OSError)
            if isinstance(e, GrantError | ProtocolError):
                self.invalid_documents += 1
                self.upstream_ok = False
            self.last_error = getattr(e, "code", type(e).__name__)
            delay = self._backoff(self._failures)
            log.warning("lease renewal failed (%s); retrying in %.2fs", self.last_error, delay)
            self._next_refresh = self._clock() + delay
            if isinstance(e, ReleaseDenied) and e.denial != "nonce_invalid":
                # the server refused this cache as a whole (evidence, approval, revocation)
                with self._lock:
                    for lease in list(self._leases.values()):
                        self._drop(lease, e.denial)
            return
        self._failures = 0
        self.upstream_ok = True
        self.last_error = None
        now = self._clock()
        with self._lock:
            renew_times = [ls.renew_at for ls in self._leases.values()]
        self._next_refresh = min(renew_times) if renew_times else now + self.poll_interval
        self._next_poll = now + self.poll_interval

    def _try_poll(self) -> None:
        try:
            renew = self.poll()
        except (ServiceUnavailableError, OSError) as e:
            self._poll_failures += 1
            self.upstream_ok = False
            self.last_error = getattr(e, "code", type(e).__name__)
            self._next_poll = self._clock() + min(self.poll_interval,
                                                  self._backoff(self._poll_failures))
            return
        except SealtorchError as e:  # forged/stale/rolled-back status: refuse, do not act
            self._poll_failures += 1
            self.invalid_documents += 1
            self.upstream_ok = False
            self.last_error = e.code
            log.warning("refused a status document (%s)", e.code)
            self._next_poll = self._clock() + min(self.poll_interval,
                                                  self._backoff(self._poll_failures))
            return
        self._poll_failures = 0
        self.upstream_ok = True
        self.last_error = None
        self._next_poll = self._clock() + self.poll_interval
        if renew:
            self._next_refresh = self._clock()

    def step(self) -> float:
        """Do whatever is due now; returns the monotonic time of the next due action."""
        now = self._clock()
        self._expire(now)
        if now >= self._next_refresh:
            self._try_refresh()
        elif now >= self._next_poll:
            self._try_poll()
        with self._lock:
            expiries = [ls.expires for ls in self._leases.values()]
        return min([self._next_refresh, self._next_poll, *expiries])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                due = self.step()
            except Exception:  # never let the loop die; log without details of key material
                log.exception("lease loop error")
                due = self._clock() + 1.0
            wait = max(0.005, due - self._clock())
            self._wake.wait(wait)
            self._wake.clear()

    def start(self) -> None:
        """Run renewals and polls in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="dkeycache-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wipe every key."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.drop_all("stopped")
