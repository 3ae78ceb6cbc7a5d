"""SGX and TDX quote verification with Intel DCAP, through the pinned ``dcap-qvl`` package.

dcap-qvl checks the PCK chain up to Intel's SGX root CA (built in), the CRLs, the TCB info and
QE identity signatures and validity at ``now``, the QE report and the quote signature, and
yields the TCB status and advisories. Collateral comes from a JSON file, from a directory keyed
by FMSPC and PCK CA (``<FMSPC>-<ca>.json``, e.g. ``00A067110000-processor.json``), or from a
PCCS. The claims are taken from the verified report that dcap-qvl returns.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.x509.oid import NameOID

from sealtorch.attestation.claims import Claims
from sealtorch.attestation.evidence import Evidence
from sealtorch.errors import CollateralError, EvidenceFormatError, VerificationError

MAX_COLLATERAL = 256 * 1024
MAX_DIR_FILES = 256
SGX_DEBUG_BIT = 0x02  # ATTRIBUTES.DEBUG: bit 1 of byte 0
TDX_DEBUG_BIT = 0x01  # TD_ATTRIBUTES.DEBUG: bit 0 of byte 0
_COLLATERAL_ERRORS = ("expired", "future", "crl", "collateral", "issuer chain", "tcbinfo",
                      "qeidentity", "fmspc")


def load_collateral(path: Path | str) -> dcap_qvl.QuoteCollateralV3:
    """Read one collateral JSON file (dcap-qvl's QuoteCollateralV3 JSON form)."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_COLLATERAL:
            raise CollateralError(f"collateral file {p} is larger than {MAX_COLLATERAL} bytes")
        text = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CollateralError(f"cannot read collateral file {p}: {e}") from None
    try:
        json.loads(text)
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError, RecursionError):
        raise CollateralError(
            f"collateral file {p} is not DCAP QuoteCollateralV3 JSON (see docs/attestation.md)"
        ) from None


def _run(coro: Any) -> Any:
    """Run a coroutine to completion even when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller thread
            box["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


class CollateralSource:
    """Where DCAP collateral comes from: a file, a directory, documents already in memory (a
    key cache's, signed by its key server), and/or a PCCS URL (fallback)."""

    def __init__(self, path: Path | str | None = None, *, pccs_url: str | None = None,
                 documents: Iterable[str] = ()) -> None:
        self.path = Path(path) if path is not None else None
        if pccs_url is not None and not re.match(r"^https://", pccs_url):
            raise CollateralError("the PCCS URL must be https://")
        self.pccs_url = pccs_url
        self._documents = {collateral_key_of(text): text for text in documents}
        if self.path is None and pccs_url is None and not self._documents:
            raise CollateralError(
                "DCAP verification needs collateral: give a collateral file or directory "
                "(--collateral) or a PCCS URL"
            )
        if self.path is not None and not self.path.exists():
            raise CollateralError(f"collateral path {self.path} does not exist")
        self._index: dict[tuple[str, int, int], tuple[str, str]] = {}

    def get(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        """Collateral for this quote (by FMSPC and PCK CA when a directory is used)."""
        if self._documents:
            fmspc, ca = quote_fmspc_ca(quote)
            text = self._documents.get((fmspc, ca))
            if text is not None:
                return dcap_qvl.QuoteCollateralV3.from_json(text)
            if self.path is None and self.pccs_url is None:
                raise CollateralError(
                    f"no collateral for FMSPC {fmspc} (CA {ca}) among the documents given; "
                    "import it on the key server ('dkeyserver collateral import')")
        if self.path is not None and self.path.is_file():
            return load_collateral(self.path)
        if self.path is not None:
            fmspc, ca = quote_fmspc_ca(quote)
            p = self.path / f"{fmspc}-{ca}.json"
            if p.is_file():
                return load_collateral(p)
            found = self._scan(fmspc, ca)
            if found is not None:
                return load_collateral(found)
            if self.pccs_url is None:
                raise CollateralError(
                    f"no collateral for FMSPC {fmspc} (CA {ca}) in {self.path}; refresh the "
                    "collateral directory"
                )
        try:
            return _run(dcap_qvl.get_collateral(self.pccs_url, quote))
        except (ValueError, RuntimeError, OSError) as e:
            raise CollateralError(f"fetching collateral from the PCCS failed: {e}") from None


    def _scan(self, fmspc: str, ca: str) -> Path | None:
        """A collateral file of the directory for (FMSPC, CA), whatever its name."""
        assert self.path is not None
        files = sorted(self.path.glob("*.json"))[:MAX_DIR_FILES]
        for f in files:
            try:
                st = f.stat()
            except OSError:
                continue
            ck = (str(f), st.st_mtime_ns, st.st_size)
            key = self._index.get(ck)
            if key is None:
                try:
                    key = collateral_key(f)
                except CollateralError:
                    continue
                self._index[ck] = key
            if key == (fmspc, ca):
                return f
        return None


def collateral_key(path: Path) -> tuple[str, str]:
    """(FMSPC, PCK CA) that a collateral file is for, read from its TCB info and PCK CRL."""
    try:
        if path.stat().st_size > MAX_COLLATERAL:
            raise CollateralError(f"collateral file {path} is too large")
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        raise CollateralError(f"{path} is not DCAP collateral JSON") from None
    try:
        return collateral_key_of(text)
    except CollateralError:
        raise CollateralError(f"{path} is not DCAP collateral JSON") from None


def collateral_key_of(text: str) -> tuple[str, str]:
    """(FMSPC, PCK CA) of one collateral JSON document."""
    if len(text) > MAX_COLLATERAL:
        raise CollateralError("a collateral document is too large")
    try:
        obj = json.loads(text)
        fmspc = str(json.loads(obj["tcb_info"])["fmspc"]).upper()
        crl = x509.load_der_x509_crl(bytes.fromhex(obj["pck_crl"]))
        cn = crl.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        raise CollateralError("a document is not DCAP collateral JSON") from None
    ca = "processor" if "Processor" in str(cn) else "platform" if "Platform" in str(cn) else "?"
    return fmspc, ca


def as_source(
    collateral: Path | str | CollateralSource | None, *, pccs_url: str | None = None
) -> CollateralSource:
    """Normalize the ``collateral`` argument of :class:`VerifierSet`."""
    if isinstance(collateral, CollateralSource):
        return collateral
    return CollateralSource(collateral, pccs_url=pccs_url)


def quote_fmspc_ca(quote: bytes) -> tuple[str, str]:
    """FMSPC (upper-case hex) and PCK CA name (``processor``/``platform``) of a quote."""
    try:
        q = dcap_qvl.parse_quote(quote)
        return str(q.fmspc()).upper(), str(q.ca()).lower()
    except (ValueError, TypeError):
        raise EvidenceFormatError("the quote cannot be parsed as an SGX/TDX DCAP quote") from None


def _h(report: dict[str, Any], key: str) -> bytes:
    v = report.get(key)
    if not isinstance(v, str):
        raise VerificationError(f"verified report lacks {key}")
    return bytes.fromhex(v)


def verify(evidence: Evidence, source: CollateralSource, *, now: int) -> Claims:
    """Verify an SGX or TDX quote at ``now`` and return its claims."""
    quote = evidence.quote
    try:
        parsed = dcap_qvl.parse_quote(quote)
        is_tdx = bool(parsed.is_tdx())
    except (ValueError, TypeError):
        raise EvidenceFormatError("the quote cannot be parsed as an SGX/TDX DCAP quote") from None
    if is_tdx != (evidence.tee == "tdx"):
        raise EvidenceFormatError(f"evidence says tee {evidence.tee} but the quote is not that")
    collateral = source.get(quote)
    try:
        verified = dcap_qvl.verify(quote, collateral, int(now))
    except (ValueError, RuntimeError) as e:
        msg = str(e)
        if any(w in msg.lower() for w in _COLLATERAL_ERRORS) and "tcb level" not in msg.lower():
            raise CollateralError(f"DCAP collateral not acceptable at {now}: {msg}") from None
        raise VerificationError(f"DCAP quote verification failed: {msg}") from None
    try:
        out = json.loads(verified.to_json())
    except ValueError:  # pragma: no cover - library contract
        raise VerificationError("dcap-qvl returned an unreadable report") from None
    status = str(out.get("status"))
    advisories = tuple(sorted(str(a) for a in out.get("advisory_ids", [])))
    rep = out.get("report", {})
    common: dict[str, Any] = {"verified_at": int(now), "tcb_status": status,
                              "advisory_ids": advisories}
    if isinstance(out.get("ppid"), str) and out["ppid"]:
        common["ppid"] = bytes.fromhex(out["ppid"])
    if "SgxEnclave" in rep:
        if evidence.tee != "sgx":
            raise VerificationError("quote body type does not match the evidence tee")
        r = rep["SgxEnclave"]
        attributes = _h(r, "attributes")
        # dcap-qvl names the KSS fields by the reserved runs that hold them: ISVEXTPRODID is
        # bytes 12..28 of reserved1 (report offset 32), CONFIGID bytes 32..96 of reserved3
        # (offset 192), CONFIGSVN bytes 0..2 and ISVFAMILYID bytes 44..60 of reserved4
        reserved1 = _h(r, "reserved1")
        reserved3, reserved4 = _h(r, "reserved3"), _h(r, "reserved4")
        return Claims(
            tee="sgx",
            report_data=_h(r, "report_data"),
            debug=bool(attributes[0] & SGX_DEBUG_BIT),
            mrenclave=_h(r, "mr_enclave"),
            mrsigner=_h(r, "mr_signer"),
            isv_prod_id=int(r["isv_prod_id"]),
            isv_svn=int(r["isv_svn"]),
            attributes=attributes,
            config_id=reserved3[32:96],
            config_svn=int.from_bytes(reserved4[0:2], "little"),
            isv_ext_prod_id=reserved1[12:28],
            isv_family_id=reserved4[44:60],
            **common,
        )
    td = rep.get("TD10") or rep.get("TD15")
    if td is None or evidence.tee != "tdx":
        raise VerificationError("quote body type does not match the evidence tee")
    if "TD15" in rep and "base" in td:  # TD 1.5 reports nest the 1.0 body
        td = {**td["base"], **{k: v for k, v in td.items() if k != "base"}}
    td_attributes = _h(td, "td_attributes")
    return Claims(
        tee="tdx",
        report_data=_h(td, "report_data"),
        debug=bool(td_attributes[0] & TDX_DEBUG_BIT),
        mrtd=_h(td, "mr_td"),
        rtmr0=_h(td, "rt_mr0"),
        rtmr1=_h(td, "rt_mr1"),
        rtmr2=_h(td, "rt_mr2"),
        rtmr3=_h(td, "rt_mr3"),
        mrconfigid=_h(td, "mr_config_id"),
        mrowner=_h(td, "mr_owner"),
        mrownerconfig=_h(td, "mr_owner_config"),
        td_attributes=td_attributes,
        tee_tcb_svn=_h(td, "tee_tcb_svn"),
        xfam=_h(td, "xfam"),
        **common,
    )
