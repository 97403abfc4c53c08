"""What a SuperNode's --node-config decides for its client: its partition, its device, its data."""

import pytest
from flwr.app import Context, RecordDict

from fedbilevel.client.app import ClientSession, partition_of
from fedbilevel.config import ConfigError, load_app_config


def context(node_config, **run_config):
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={**load_app_config(), **run_config}
    )


def test_partition_comes_from_node_config_and_is_checked():
    assert partition_of(context({"partition-id": "3", "num-partitions": 8})) == (3, 8)
    with pytest.raises(
        ValueError,
        match=r"node-config key 'partition-id': value 8 is not allowed; "
        r"expected 0 ≤ partition-id < num-partitions \(8\)",
    ):
        partition_of(context({"partition-id": 8, "num-partitions": 8}))
    with pytest.raises(ValueError, match="node-config key 'num-partitions': value None is not allowed"):
        partition_of(context({"partition-id": 0}))


def test_node_config_overrides_device_and_data_path_for_that_node_only(tmp_path):
    node = {"partition-id": 1, "num-partitions": 2, "device": "cpu"}
    session = ClientSession(context(node, **{"synthetic-tasks": "reverse,count"}), overrides=None)
    assert session.config.model.device == "cpu" and session.partition_id == 1 and session.data.task == "count"
    missing = tmp_path / "nowhere"
    node = {"partition-id": 0, "num-partitions": 2, "data-path": str(missing)}
    with pytest.raises(ValueError, match=f"data folder {missing}: not found"):
        ClientSession(context(node, data="flan-json", **{"data-path": "../elsewhere"}), overrides=None)
    with pytest.raises(ConfigError, match="run-config key 'device': value 'tpu' is not allowed"):
        ClientSession(context({"partition-id": 0, "num-partitions": 2, "device": "tpu"}), overrides=None)
