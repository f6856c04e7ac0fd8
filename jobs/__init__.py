"""arq jobs: rollups, reports, retention and sweeps (see the arq issue)."""
