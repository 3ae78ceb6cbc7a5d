"""``python -I -m sealtorch.keycache``: the measured dkeycache command line (sim role args)."""

from sealtorch.keycache.cli import main

main()
