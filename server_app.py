"""Flower ServerApp entry point (see fedbilevel/server.py)."""

from fedbilevel.server import make_server_app

app = make_server_app()
