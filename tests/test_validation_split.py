"""val-fraction (a validation split held out of each client's training examples) and eval-split."""

import json
from types import SimpleNamespace

import pytest
from in_process import client_context

from fedbilevel.client import app as client_app
from fedbilevel.client.app import ClientSession
from fedbilevel.client.metrics import answer_text, score_answers
from fedbilevel.config import ConfigError, RunConfig, load_app_config
from fedbilevel.data import DATA_LOADERS, load_client_data
from fedbilevel.data.common import hold_out_validation, most_common_answer
from fedbilevel.data.types import ClientData, Example, data_digest


def settings(**changes):
    return RunConfig.from_run_config(load_app_config(), changes).data


def key(example):
    return (example.instruction, example.output, example.task)


def test_sizes_and_order():
    data = load_client_data(settings(**{"val-fraction": 0.25}), 2, 8, seed=0)
    full = load_client_data(settings(), 2, 8, seed=0)
    assert (len(data.train), len(data.validation), len(data.test)) == (36, 12, 32)
    assert data.test == full.test and data.task == full.task
    # Both splits keep the loader's order: each is a subsequence of the full training list.
    positions = {key(e): i for i, e in enumerate(full.train)}
    for split in (data.train, data.validation):
        assert [positions[key(e)] for e in split] == sorted(positions[key(e)] for e in split)


def test_the_split_is_disjoint_from_train_and_test():
    data = load_client_data(settings(**{"val-fraction": 0.25}), 5, 8, seed=3)
    full = load_client_data(settings(), 5, 8, seed=3)
    validation = {key(e) for e in data.validation}
    assert len(validation) == len(data.validation)
    assert not validation & {key(e) for e in data.train}
    assert not validation & {key(e) for e in data.test}
    assert validation | {key(e) for e in data.train} == {key(e) for e in full.train}


def test_the_split_is_seeded():
    fraction = settings(**{"val-fraction": 0.25})
    first, again = (load_client_data(fraction, 0, 8, seed=1) for _ in range(2))
    assert first == again
    # Another seed draws other inputs; another partition draws another hold-out of the same size.
    assert load_client_data(fraction, 0, 8, seed=2).validation != first.validation
    data = ClientData("t", [Example(f"q{i}", f"a{i}", "t") for i in range(20)], [])
    zero, one = (hold_out_validation(data, 0.5, seed=0, partition_id=p) for p in (0, 1))
    assert len(zero.validation) == len(one.validation) == 10 and zero.validation != one.validation


def test_val_fraction_zero_is_todays_data_bit_for_bit():
    data = load_client_data(settings(), 2, 8, seed=0)
    raw = DATA_LOADERS["synthetic"](settings(), 2, 8, 0, None)
    assert data == raw and data.validation == []
    # The digest of the code before validation splits existed (resumed runs compare it).
    assert data_digest(data) == "3a4ce50c33e75582"
    held = load_client_data(settings(**{"val-fraction": 0.25}), 2, 8, seed=0)
    assert data_digest(held) != data_digest(data)
    # A different hold-out is different data to a resumed run, though train and test as sets are alike.
    moved = ClientData(held.task, held.train + held.validation[:1], held.test, held.validation[1:])
    assert data_digest(moved) != data_digest(held)


def test_every_loader_gets_the_split(tmp_path):
    records = [{"instruction": f"q {i}", "output": f"a {i}", "task": "src", "category": "c"} for i in range(10)]
    (tmp_path / "client_0.json").write_text(json.dumps(records))
    (tmp_path / "test.jsonl").write_text(json.dumps({**records[0], "instruction": "t", "output": "u"}) + "\n")
    flan = load_client_data(
        settings(data="flan-json", **{"data-path": str(tmp_path), "val-fraction": 0.3}), 0, 1, seed=0
    )
    assert (len(flan.train), len(flan.validation), len(flan.test)) == (7, 3, 1)
    digits = load_client_data(settings(data="digits", **{"val-fraction": 0.2}), 1, 8, seed=0)
    whole = load_client_data(settings(data="digits"), 1, 8, seed=0)
    assert len(digits.validation) == round(0.2 * len(whole.train)) and len(digits.test) == len(whole.test)
    assert len(digits.train) + len(digits.validation) == len(whole.train)


def test_a_fraction_that_leaves_a_split_empty_is_one_line():
    with pytest.raises(
        ConfigError,
        match=r"^run-config key 'val-fraction': value 0\.001 is not allowed; client 2 \(uppercase\) has 48 training "
        r"examples, so it would hold out 0 and keep 48, leaving no validation examples; expected a fraction that "
        r"keeps at least one of each$",
    ):
        load_client_data(settings(**{"val-fraction": 0.001}), 2, 8, seed=0)
    with pytest.raises(ConfigError, match=r"hold out 3 and keep 0, leaving no training examples"):
        load_client_data(settings(**{"val-fraction": 0.9, "synthetic-train-examples": 3}), 0, 8, seed=0)
    with pytest.raises(
        ConfigError, match=r"^run-config key 'val-fraction': value 1\.0 is not allowed; .*\[0\.0, 1\.0\)"
    ):
        settings(**{"val-fraction": 1.0})


def test_eval_split_validation_needs_a_validation_split():
    with pytest.raises(
        ConfigError,
        match=r"^run-config key 'eval-split': value 'validation' is not allowed; with val-fraction = 0 there is no "
        r"validation split: set val-fraction > 0$",
    ):
        RunConfig.from_run_config(load_app_config(), {"eval-split": "validation"})
    with pytest.raises(ConfigError, match="run-config key 'eval-split': value 'train' is not allowed; choose one of"):
        RunConfig.from_run_config(load_app_config(), {"eval-split": "train", "val-fraction": 0.25})


def session(**run_config):
    context = client_context({**load_app_config(), **run_config}, partition_id=4, num_partitions=8, node_id=7)
    return ClientSession(context, overrides=None)


@pytest.mark.parametrize("split", ["test", "validation"])
def test_the_client_scores_the_chosen_split(monkeypatch, split):
    scored = []
    monkeypatch.setattr(client_app, "evaluate_adapter", lambda model, tokenizer, items, **_: scored.append(items))
    client = session(**{"val-fraction": 0.25, "eval-split": split})
    client.score(SimpleNamespace(device="cpu"), None)
    items = client.data.validation if split == "validation" else client.data.test
    assert scored == [items] and len(items) == (12 if split == "validation" else 32)
    # The majority baseline (client 4 counts words: its answers repeat) is measured on the same items.
    majority, _ = most_common_answer(client.data.train, key=answer_text)
    expected = score_answers([majority] * len(items), [e.output for e in items])["exact_match"]
    assert client.majority_score() == pytest.approx(expected) and 0 < expected < 1
