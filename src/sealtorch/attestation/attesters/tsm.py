"""TDX and SNP attester through Linux configfs-tsm (``/sys/kernel/config/tsm/report``).

One report entry per request: mkdir, read ``generation``, write 64 bytes to ``inblob``, read
``outblob``/``provider``/``auxblob``, re-read ``generation`` and accept only if it advanced by
exactly one (our write), then rmdir. A different generation means someone else wrote to the
entry in between, and the result is rejected.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from pathlib import Path

from sealtorch.attestation.attesters.base import check_report_data
from sealtorch.attestation.evidence import MAX_CERTS, MAX_QUOTE, Evidence
from sealtorch.errors import AttestationError, AttesterUnavailableError

DEFAULT_DIR = Path("/sys/kernel/config/tsm/report")
PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "snp"}
TDX_REPORT_DATA = slice(568, 632)  # quote header 48 + TD report body offset 520
SNP_REPORT_DATA = slice(0x50, 0x90)


class TsmAttester:
    """configfs-tsm attester; ``tee`` comes from the kernel's ``provider`` (or is given)."""

    def __init__(self, root: Path | str = DEFAULT_DIR, *, tee: str | None = None) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        if not self.root.is_dir():
            raise AttesterUnavailableError(
                f"configfs-tsm not available at {self.root} (needs Linux 6.7+ in a TDX/SNP guest)"
            )
        if tee is not None and tee not in PROVIDERS.values():
            raise AttesterUnavailableError("configfs-tsm supports tee tdx or snp")
        self.tee = tee if tee is not None else self._probe()

    # --- filesystem steps (overridable so tests can play the kernel on a temp tree) ---
    def _create(self, entry: Path) -> None:
        entry.mkdir(mode=0o700)

    def _write_inblob(self, entry: Path, data: bytes) -> None:
        with open(entry / "inblob", "wb", buffering=0) as f:
            if f.write(data) != len(data):
                raise AttestationError("short write to configfs-tsm inblob")

    def _remove(self, entry: Path) -> None:
        os.rmdir(entry)

    def _read(self, entry: Path, name: str, limit: int) -> bytes:
        with open(entry / name, "rb", buffering=0) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise AttestationError(f"configfs-tsm {name} is larger than {limit} bytes")
        return data

    def _generation(self, entry: Path) -> int:
        raw = self._read(entry, "generation", 32)
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise AttestationError("configfs-tsm generation is not an integer") from None

    def _provider(self, entry: Path) -> str:
        raw = self._read(entry, "provider", 64).decode("ascii", "replace").strip()
        if raw not in PROVIDERS:
            raise AttesterUnavailableError(
                "configfs-tsm provider is not tdx_guest or sev_guest; unsupported TEE"
            )
        return PROVIDERS[raw]

    def _probe(self) -> str:
        entry = self.root / f"sealtorch-probe-{secrets.token_hex(8)}"
        try:
            self._create(entry)
            try:
                return self._provider(entry)
            finally:
                self._remove(entry)
        except OSError as e:
            raise AttesterUnavailableError(
                f"cannot use configfs-tsm at {self.root}: {e.strerror}"
            ) from None

    def attest(self, report_data: bytes) -> Evidence:
        """Produce a TDX quote or SNP report over ``report_data`` (plus SNP certificates)."""
        rd = check_report_data(report_data)
        entry = self.root / f"sealtorch-{os.getpid()}-{secrets.token_hex(8)}"
        with self._lock:
            try:
                self._create(entry)
                try:
                    before = self._generation(entry)
                    self._write_inblob(entry, rd)
                    out = self._read(entry, "outblob", MAX_QUOTE)
                    provider = self._provider(entry)
                    certs: bytes | None = None
                    if provider == "snp" and (entry / "auxblob").exists():
                        certs = self._read(entry, "auxblob", MAX_CERTS) or None
                    after = self._generation(entry)
                finally:
                    self._remove(entry)
            except OSError as e:
                raise AttestationError(f"configfs-tsm I/O failed: {e.strerror}") from None
        if after != before + 1:
            raise AttestationError(
                "configfs-tsm generation changed by someone else during the request; "
                "the report may not be ours, retry"
            )
        if provider != self.tee:
            raise AttestationError(f"configfs-tsm provider changed from {self.tee}")
        where = TDX_REPORT_DATA if provider == "tdx" else SNP_REPORT_DATA
        if len(out) < where.stop or not hmac.compare_digest(out[where], rd):
            raise AttestationError("configfs-tsm outblob does not carry our report data; retry")
        return Evidence(tee=provider, quote=out, certs=certs)
