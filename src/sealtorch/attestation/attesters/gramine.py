"""SGX attester inside Gramine: ``/dev/attestation/user_report_data`` then ``quote`` (DCAP).

Gramine's pseudo-files are process-global state, so access is serialized with a lock, and the
quote's REPORTDATA is compared with what we wrote after reading (another thread or a confused
runtime must not hand us a quote over someone else's data).
"""

from __future__ import annotations

import hmac
import threading
from pathlib import Path

from sealtorch.attestation.attesters.base import check_report_data
from sealtorch.attestation.evidence import MAX_QUOTE, Evidence
from sealtorch.errors import AttestationError, AttesterUnavailableError

DEFAULT_DIR = Path("/dev/attestation")
QUOTE_REPORT_DATA = slice(368, 432)  # SGX quote v3: 48-byte header + report body offset 320
_LOCK = threading.Lock()


def attestation_type(root: Path = DEFAULT_DIR) -> str:
    """What Gramine says its remote attestation type is (``dcap``, ``none``, ...)."""
    try:
        return (root / "attestation_type").read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AttesterUnavailableError(
            f"no Gramine attestation interface at {root} (is this running inside gramine-sgx?)"
        ) from e


class GramineAttester:
    """Produces DCAP quotes through Gramine's ``/dev/attestation`` interface."""

    tee = "sgx"

    def __init__(self, root: Path | str = DEFAULT_DIR) -> None:
        self.root = Path(root)
        self._check_type()

    def _check_type(self) -> None:
        kind = attestation_type(self.root)
        if kind == "none":
            raise AttesterUnavailableError(
                "Gramine attestation_type is 'none': the enclave cannot attest; build the "
                'manifest with sgx.remote_attestation = "dcap"'
            )
        if kind != "dcap":
            raise AttesterUnavailableError(
                "Gramine attestation_type is not 'dcap'; only DCAP quotes are supported"
            )

    def attest(self, report_data: bytes) -> Evidence:
        """Write the report data, read the quote, and check the quote carries that data."""
        rd = check_report_data(report_data)
        with _LOCK:
            self._check_type()
            try:
                with open(self.root / "user_report_data", "wb", buffering=0) as f:
                    if f.write(rd) != len(rd):
                        raise AttestationError("short write to /dev/attestation/user_report_data")
                with open(self.root / "quote", "rb", buffering=0) as f:
                    quote = f.read(MAX_QUOTE + 1)
            except OSError as e:
                raise AttestationError(
                    f"Gramine attestation I/O failed under {self.root}: {e.strerror}"
                ) from None
        if len(quote) < QUOTE_REPORT_DATA.stop or len(quote) > MAX_QUOTE:
            raise AttestationError("Gramine returned a quote of an impossible length")
        if not hmac.compare_digest(quote[QUOTE_REPORT_DATA], rd):
            raise AttestationError(
                "the quote Gramine returned does not carry our report data "
                "(concurrent use of /dev/attestation?); retry"
            )
        return Evidence(tee="sgx", quote=quote)
