"""The real ClientApp in this process, for client tests: its context, and a query that starts it."""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from fedbilevel import protocol
from fedbilevel.client.app import make_client_app


def client_context(
    config: dict[str, Any],
    *,
    partition_id: int = 0,
    num_partitions: int = 2,
    node_id: int = 5,
    state: RecordDict | None = None,
) -> Context:
    """A ClientApp's context on one node, as a SuperNode gives it.

    Parameters
    ----------
    config : dict
        The whole run config (e.g. ``load_app_config()`` with overrides).
    partition_id : int (default: 0)
        The node's partition.
    num_partitions : int (default: 2)
        The partitions in all.
    node_id : int (default: 5)
        The node's id.
    state : RecordDict, optional
        The node's state (default: a new, empty one).

    Returns
    -------
    Context
        Run id 1.
    """
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=state if state is not None else RecordDict(),
        run_config=config,
    )


def query_info(app: ClientApp, context: Context) -> ConfigRecord:
    """The info of the app's reply to the server's start-up query (``protocol.QUERY_PARTITION``).

    Parameters
    ----------
    app : ClientApp
        The app, from ``make_client_app()``.
    context : Context
        Its context.

    Returns
    -------
    ConfigRecord
        The client's partition, task and data, or its ``protocol.START_ERROR``.
    """
    query = Message(
        RecordDict({protocol.CONFIG: ConfigRecord({protocol.QUERY: protocol.QUERY_PARTITION})}),
        context.node_id,
        MessageType.QUERY,
    )
    return app(query, context).content.config_records[protocol.INFO]


def started_client(
    config: dict[str, Any], *, partition_id: int = 0, num_partitions: int = 2, node_id: int = 5
) -> tuple[ClientApp, Context]:
    """A ClientApp and its context after the start-up query, which must have started the client.

    Parameters
    ----------
    config : dict
        The whole run config (e.g. ``load_app_config()`` with overrides).
    partition_id : int (default: 0)
        The node's partition.
    num_partitions : int (default: 2)
        The partitions in all.
    node_id : int (default: 5)
        The node's id; messages to the app name it.

    Returns
    -------
    tuple[ClientApp, Context]
        The app, and its context (its state holds θ⁰, derived at start).
    """
    context = client_context(config, partition_id=partition_id, num_partitions=num_partitions, node_id=node_id)
    app = make_client_app()
    assert protocol.START_ERROR not in query_info(app, context)
    return app, context
