"""The per-client store: one file per client and kind, only what changed written, copy on write."""

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel.checkpoint import STORE, ClientStore, load_checkpoint, save_checkpoint
from fedbilevel.strategies.fedamp import FedAmp
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.strategies.sampling import SamplingSettings
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid


def files(folder, kind):
    return sorted(path.name for path in (folder / STORE / kind).iterdir())


def test_a_table_keeps_writes_until_flush_then_reads_them_back_in_order(tmp_path):
    store = ClientStore(tmp_path / STORE)
    table = store.table("adapters")
    table[3] = {"z": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float16)}
    assert table.in_memory() == 1 and 3 in table and list(table) == [3]
    manifest = store.flush(1)
    assert manifest == {"adapters": {3: 1}} and table.in_memory() == 0
    again = table[3]
    assert list(again) == ["z", "a"]  # the order digests and messages follow, not safetensors' sorted one
    np.testing.assert_array_equal(again["z"], [0, 1, 2])
    assert again["a"].dtype == np.float16 and table.in_memory() == 0  # a read is not kept
    table[4] = {"z": np.zeros(3, np.float32), "a": np.zeros((2, 2), np.float16)}
    assert store.flush(2) == {"adapters": {3: 1, 4: 2}}  # client 3 did not change: not written again
    assert files(tmp_path, "adapters") == ["3.r1.safetensors", "4.r2.safetensors"]


def test_a_crash_before_the_record_leaves_the_previous_checkpoint_whole(tmp_path):
    store = ClientStore(tmp_path / STORE)
    table = store.table("adapters")
    table[0] = {"w": np.zeros(2, np.float32)}
    save_checkpoint(tmp_path, {"round": 1, "store": store.flush(1)})
    table[0] = {"w": np.ones(2, np.float32)}
    store.flush(2)  # round 2's file is written ... and the server dies before checkpoint.json names it
    assert files(tmp_path, "adapters") == ["0.r1.safetensors", "0.r2.safetensors"]
    resumed = ClientStore(tmp_path / STORE)
    resumed.load(load_checkpoint(tmp_path)["store"])
    np.testing.assert_array_equal(resumed.table("adapters")[0]["w"], [0, 0])
    save_checkpoint(tmp_path, {"round": 2, "store": {"adapters": {0: 1}}})  # the next record collects the orphan
    assert files(tmp_path, "adapters") == ["0.r1.safetensors"]


def test_a_store_file_the_record_names_must_exist(tmp_path):
    store = ClientStore(tmp_path / STORE)
    store.table("adapters")[5] = {"w": np.zeros(2, np.float32)}
    manifest = store.flush(1)
    (tmp_path / STORE / "adapters" / "5.r1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"checkpoint: .*5\.r1\.safetensors is missing"):
        ClientStore(tmp_path / STORE).load(manifest)


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(
    ("make", "kinds"),
    [
        (lambda **kw: FedBip(initial_adapter=INITIAL, **kw), {"adapters"}),
        (
            lambda **kw: FedAmp(initial_adapter=INITIAL, proximal_lambda=0.1, sigma=5.0, self_weight=0.5, **kw),
            {"adapters", "personal"},
        ),
    ],
    ids=["fedbip", "fedamp"],
)
def test_each_round_writes_only_its_clients_and_holds_none_in_memory_after(make, kinds, tmp_path):
    written = []

    def on_round_end(record):
        save_checkpoint(tmp_path, strategy.checkpoint())
        assert all(table.in_memory() == 0 for table in strategy.store._tables.values())
        versions = {
            kind: {int(p) for p, v in record_kind.items() if v == record["round"]}
            for kind, record_kind in load_checkpoint(tmp_path)["store"].items()
        }
        written.append((record["sampled"]["train"], versions))

    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    strategy = make(min_nodes=6, sampling=sampling, seed=3, on_round_end=on_round_end)
    strategy.store.attach(tmp_path / STORE)
    strategy.start(FakeGrid({10 + p: FakeClient(p) for p in range(6)}), ArrayRecord(), num_rounds=3)
    for sampled, versions in written:
        assert set(versions) == kinds
        assert all(changed == set(sampled) for changed in versions.values()), (sampled, versions)
    for kind in kinds:  # one file per client that ever trained: older versions were collected
        names = files(tmp_path, kind)
        assert len(names) == len({name.split(".")[0] for name in names})
