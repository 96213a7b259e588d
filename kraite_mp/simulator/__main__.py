"""``python -m kraite_mp.simulator``: same as ``kraite-mp simulate``."""

from __future__ import annotations

from kraite_mp.simulator.cli import main

if __name__ == "__main__":
    main()
