"""Attestation: evidence, claims, report-data binding, verifiers, attesters and policy.

See ``docs/attestation.md`` and ``docs/policy.md``. Submodules are imported explicitly
(``from sealtorch.attestation.verifiers import VerifierSet``) so that importing this package
stays cheap.
"""
