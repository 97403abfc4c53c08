"""Flower ClientApp entry point: light (Flower only); the stack loads on the first message, in this process
or in the SuperNode's persistent worker (node config ``node-worker=true``; fedbilevel/client/node_worker.py)."""

from fedbilevel.client.node_worker import make_entry_app

app = make_entry_app()
