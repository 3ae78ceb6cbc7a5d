"""A runtime process for end-to-end tests: loads a sealed file through dkeycache on command.

Usage: runtime_proc.py SOCKET SERVER_PUB_B64 SEALED_FILE MEASURE_CONFIG. Reads one command per
line from stdin (``load``/``quit``) and answers one JSON line per command on stdout, so a test
can keep one runtime (and its cache session) alive across server outages and cache restarts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings


def main() -> None:
    sock, pub, path, cfg = sys.argv[1:5]
    warnings.simplefilter("ignore", RuntimeWarning)
    import sealtorch
    from sealtorch.attestation import sim
    from sealtorch.attestation.attesters.sim import SimAttester
    from sealtorch.errors import SealtorchError

    att = SimAttester(sim.default_dir() / sim.KEY_FILE, sim.measure("runtime", cfg.encode()),
                      role="runtime")
    kc = sealtorch.KeyCacheClient(sock, server_public_key=pub, attester=att)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        try:
            sd = sealtorch.load(path, key_provider=kc)
            h = hashlib.sha256()
            for k in sorted(sd):
                h.update(k.encode() + sd[k].numpy().tobytes())
            out = {"ok": True, "digest": h.hexdigest()}
        except SealtorchError as e:
            out = {"ok": False, "code": getattr(e, "denial", None) or e.code}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
