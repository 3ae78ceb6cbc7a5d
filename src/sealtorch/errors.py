"""Every exception sealtorch raises on purpose.

Messages say what failed, where, and what to do; they never contain key material or echo
rejected input verbatim. Each subsystem has its own family under :class:`SealtorchError`, so a
caller can catch one family (``except sealtorch.errors.FormatError``) or everything.
"""

from __future__ import annotations


class SealtorchError(Exception):
    """Base class of every error sealtorch raises deliberately."""

    #: short machine-readable code, used in CLI output, HTTP error bodies and metrics
    code: str = "error"


# --- sealed format -------------------------------------------------------------------------
class FormatError(SealtorchError):
    """A sealed file could not be read or authenticated."""

    code = "format_error"


class NotASealedFileError(FormatError):
    """The file does not start with the sealtorch magic."""

    code = "not_sealed"


class UnsupportedVersionError(FormatError):
    """The file's format version (or cipher) is not one this release reads."""

    code = "unsupported_version"


class HeaderError(FormatError):
    """The public header is malformed or its MAC does not verify."""

    code = "header_invalid"


class WrongKeyError(FormatError):
    """The key does not match the file (key commitment mismatch): not tampering, a wrong key."""

    code = "wrong_key"


class KeyMismatchError(FormatError):
    """The key file names another model id or key version than the sealed file."""

    code = "key_mismatch"


class IntegrityError(FormatError):
    """Ciphertext failed authentication: tampered, truncated, reordered or spliced."""

    code = "integrity"


class TruncatedError(IntegrityError):
    """The file is shorter than its header says."""

    code = "truncated"


class TrailingDataError(IntegrityError):
    """The file has bytes after its last chunk."""

    code = "trailing_data"


class IndexError_(FormatError):
    """The tensor index is malformed or does not match the module being loaded into."""

    code = "index_invalid"


class SignatureError(FormatError):
    """The owner signature is missing, malformed or does not verify."""

    code = "signature_invalid"


class KeyFileError(SealtorchError):
    """A key file is malformed, unreadable, or has unsafe permissions."""

    code = "key_file"


class InputError(SealtorchError):
    """An input model/state_dict cannot be sealed (unsupported type, unsafe pickle, ...)."""

    code = "input_invalid"


class StreamError(FormatError):
    """Authenticated tensor bytes break a format rule (nonzero padding, a BOOL byte not 0/1).

    Not tampering (every tag verified): the file was written wrong by someone with the key.
    """

    code = "stream_invalid"


class SealedDirError(FormatError):
    """A sealed model directory does not match its manifest: a file missing, extra, swapped,
    from another sealing, or the manifest itself from another sealing."""

    code = "sealed_dir_invalid"


class OutputError(SealtorchError):
    """An output cannot be written: its directory is missing or is a file, or the output exists
    and overwriting was not asked for."""

    code = "output_invalid"


# --- attestation -----------------------------------------------------------------------------
class AttestationError(SealtorchError):
    """Evidence could not be produced or verified."""

    code = "attestation_failed"


class EvidenceFormatError(AttestationError):
    """Evidence bytes are malformed (wrong length, bad encoding, unknown version)."""

    code = "evidence_malformed"


class VerificationError(AttestationError):
    """Evidence is well-formed but its signatures, chain, collateral or TCB do not verify."""

    code = "evidence_invalid"


class CollateralError(AttestationError):
    """DCAP collateral is missing, malformed or outside its validity window."""

    code = "collateral"


class BindingError(AttestationError):
    """The evidence's report data does not bind the expected nonce, key and audience."""

    code = "binding_mismatch"


class AttesterUnavailableError(AttestationError):
    """No TEE interface is available (or the chosen one is not present/usable)."""

    code = "attester_unavailable"


class PolicyError(SealtorchError):
    """A policy file is malformed or inconsistent."""

    code = "policy_invalid"


class PolicyDenied(SealtorchError):
    """Verified evidence is not allowed by the policy; ``reasons`` explain each failed check."""

    code = "policy_denied"

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = list(reasons or [])


# --- key delivery ------------------------------------------------------------------------------
class ProtocolError(SealtorchError):
    """A protocol message (grant, release response, local session message) is invalid."""

    code = "protocol_error"


class GrantError(ProtocolError):
    """A grant's signature, binding, policy version or lease is not acceptable."""

    code = "grant_invalid"


class ReleaseDenied(SealtorchError):
    """The key server or key cache refused to release a key; ``denial`` is the public code."""

    code = "denied"

    def __init__(self, message: str, denial: str = "denied") -> None:
        super().__init__(message)
        self.denial = denial


class RevokedError(ReleaseDenied):
    """The model, key version or cache was revoked."""

    code = "revoked"

    def __init__(self, message: str) -> None:
        super().__init__(message, "revoked")


class LeaseExpiredError(ReleaseDenied):
    """The lease under which a key was held has expired and could not be renewed."""

    code = "lease_expired"

    def __init__(self, message: str) -> None:
        super().__init__(message, "lease_expired")


class ServiceUnavailableError(SealtorchError):
    """A key server or key cache could not be reached or answered with a server error."""

    code = "unavailable"


class ConfigError(SealtorchError):
    """A service configuration is invalid or unsafe (e.g. sim on a non-loopback listener)."""

    code = "config_invalid"


class StoreError(SealtorchError):
    """The key server's database or KEK provider failed or detected tampering."""

    code = "store_error"


class NotFoundError(StoreError):
    """The named model, key version, policy, token or cache does not exist for this tenant."""

    code = "not_found"


class TamperError(StoreError):
    """Data at rest failed its integrity check (swapped wrapped key, edited policy, audit chain)."""

    code = "tampered"


class StateRollbackError(StoreError):
    """The key server's database holds older state than this server has already seen (a
    restored backup or a rolled-back row): releases and admin writes stop until an operator
    runs ``dkeyserver recover``."""

    code = "state_rollback"


class StateTamperedError(TamperError):
    """The key server's authoritative rows do not add up to the digest its last admin change
    signed (a row was rolled back, deleted or re-inserted by someone without the KEK)."""

    code = "state_tampered"


class AuthError(SealtorchError):
    """An admin token is missing, unknown, expired, revoked or out of scope."""

    code = "unauthorized"


# --- inference runtime -------------------------------------------------------------------------
class ServeError(SealtorchError):
    """The inference server cannot start or serve a model."""

    code = "serve_error"


class FactoryError(ServeError):
    """A model factory is not on the policy's allow-list, malformed, or did not build a module."""

    code = "factory_refused"


class InferenceInputError(ServeError):
    """An inference request is malformed (bad JSON, wrong name, shape or datatype)."""

    code = "bad_request"


class OverloadedError(ServeError):
    """Too many inference requests are waiting; the client should retry later."""

    code = "overloaded"


# --- end to end: clients verify the inference server -------------------------------------------
class E2EError(SealtorchError):
    """An end-to-end encrypted inference exchange failed (on the client or the server side)."""

    code = "e2e_error"


class EncapsulationError(E2EError):
    """An encapsulated request or response is malformed, for another key, or does not open."""

    code = "bad_encapsulation"


class ReplayError(E2EError):
    """A request was seen before, or its time is outside what the server still remembers."""

    code = "replay"


class ReceiptError(E2EError):
    """A receipt is malformed, not signed by the attested receipt key, or names something else
    than the request, response or model it came with."""

    code = "receipt_invalid"


class ServerRefusedError(E2EError):
    """The inference server refused an end-to-end request; ``refusal`` is its short code."""

    code = "server_refused"

    def __init__(self, message: str, refusal: str = "server_refused") -> None:
        super().__init__(message)
        self.refusal = refusal
