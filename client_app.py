"""Flower ClientApp entry point (see fedbilevel/client/app.py)."""

from fedbilevel.client.app import make_client_app

app = make_client_app()
