"""The daemon's HTTP side, on aiohttp in the daemon's own event loop: the probes and
metrics (probes.py) always, served by one server (server.py)."""
