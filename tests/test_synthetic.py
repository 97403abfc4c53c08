"""Tests for the embedded synthetic federation."""

import re

import pytest

from fedbilevel.data import synthetic
from fedbilevel.data.prompts import format_prompt
from fedbilevel.data.synthetic import (
    MAX_WORDS,
    MIN_WORDS,
    PER_TASK_INSTRUCTIONS,
    TASK_NAMES,
    TASKS,
    WORDS,
    make_client_data,
    make_example,
    make_instruction,
    task_of_client,
)
from fedbilevel.data.types import Example

WORDS_IN = ["cat", "dog", "sun", "big"]
ALLOWED_TASKS = "reverse, uppercase, count, initials"


def _data(partition_id=0, num_partitions=8, **kwargs):
    kwargs = {"seed": 0, "num_train": 20, "num_test": 10, **kwargs}
    return make_client_data(partition_id, num_partitions, **kwargs)


def test_format_prompt():
    assert format_prompt("Do it") == "### Instruction:\nDo it\n\n### Response:\n"


def test_word_list():
    assert len(WORDS) == len(set(WORDS)) >= 200
    assert all(w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 6 for w in WORDS)


def test_task_registry_order():
    assert TASK_NAMES == ("reverse", "uppercase", "count", "initials")
    assert list(TASKS) == list(TASK_NAMES)


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ("reverse", "big sun dog cat"),
        ("uppercase", "CAT DOG SUN BIG"),
        ("count", "4"),
        ("initials", "c d s b"),
    ],
)
def test_task_functions(task, expected):
    assert TASKS[task](WORDS_IN) == expected


def test_task_functions_three_words():
    words = ["red", "apple", "tree"]
    assert TASKS["reverse"](words) == "tree apple red"
    assert TASKS["count"](words) == "3"
    assert TASKS["initials"](words) == "r a t"


def test_shared_instruction_identical_across_tasks_outputs_differ():
    examples = [make_example(WORDS_IN, task) for task in TASK_NAMES]
    assert {e.instruction for e in examples} == {"Transform the words: cat dog sun big"}
    assert len({e.output for e in examples}) == len(TASK_NAMES)
    assert [e.task for e in examples] == list(TASK_NAMES)


def test_per_task_instructions_differ():
    instructions = [make_instruction(WORDS_IN, task, "per-task") for task in TASK_NAMES]
    assert len(set(instructions)) == len(TASK_NAMES)
    assert all(i.endswith(": cat dog sun big") for i in instructions)
    assert instructions[0] == "Reverse the order of the words: cat dog sun big"


def test_make_example_fields():
    assert make_example(["cat", "dog"], "count", "per-task") == Example(
        instruction="Count the words: cat dog", output="2", task="count"
    )


def test_task_of_client_8_clients_4_tasks():
    assert [task_of_client(p, 8, TASK_NAMES) for p in range(8)] == [
        "reverse", "reverse", "uppercase", "uppercase",
        "count", "count", "initials", "initials",
    ]  # fmt: skip


def test_task_of_client_6_clients_4_tasks():
    # Task index = p * 4 // 6 -> 0, 0, 1, 2, 2, 3.
    assert [task_of_client(p, 6, TASK_NAMES) for p in range(6)] == [
        "reverse", "reverse", "uppercase", "count", "count", "initials",
    ]  # fmt: skip


def test_task_of_client_comma_separated_tasks():
    assert [task_of_client(p, 2, "count, reverse") for p in range(2)] == ["count", "reverse"]


def test_client_data_shape_and_task():
    train, test = _data(partition_id=5)
    assert len(train) == 20 and len(test) == 10
    assert {e.task for e in train + test} == {"count"}
    for e in train + test:
        words = e.instruction.removeprefix("Transform the words: ").split()
        assert MIN_WORDS <= len(words) <= MAX_WORDS
        assert set(words) <= set(WORDS)
        assert e.output == str(len(words))


def test_determinism():
    assert _data(seed=7) == _data(seed=7)
    assert _data(seed=7) != _data(seed=8)


def test_same_task_partitions_differ():
    assert task_of_client(0, 8, TASK_NAMES) == task_of_client(1, 8, TASK_NAMES)
    train0, test0 = _data(partition_id=0)
    train1, test1 = _data(partition_id=1)
    assert {e.instruction for e in train0} != {e.instruction for e in train1}
    assert test0 != test1


def test_inputs_do_not_depend_on_task_or_mode():
    shared, _ = _data(tasks=["reverse"], num_partitions=1)
    per_task, _ = _data(tasks=["count"], num_partitions=1, instruction="per-task")
    words = [e.instruction.split(": ", 1)[1] for e in shared]
    assert words == [e.instruction.split(": ", 1)[1] for e in per_task]


def test_no_train_test_overlap():
    for partition_id in range(8):
        train, test = _data(partition_id, num_train=300, num_test=100)
        train_inputs = {e.instruction for e in train}
        test_inputs = {e.instruction for e in test}
        assert len(test_inputs) == len(test)
        assert not train_inputs & test_inputs


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"tasks": ["reverse", "sort"]}, ["synthetic-tasks", "'sort'", ALLOWED_TASKS]),
        ({"tasks": "reverse,sort"}, ["synthetic-tasks", "'sort'", ALLOWED_TASKS]),
        ({"tasks": []}, ["synthetic-tasks", "[]", ALLOWED_TASKS]),
        ({"tasks": ["count", "count"]}, ["synthetic-tasks", "'count'", "at most once"]),
        ({"instruction": "mixed"}, ["synthetic-instruction", "'mixed'", "shared, per-task"]),
        ({"num_train": 0}, ["synthetic-train-examples", "0", ">= 1"]),
        ({"num_test": -2}, ["synthetic-test-examples", "-2", ">= 1"]),
        ({"partition_id": 8}, ["partition-id", "8", "0 <= partition-id < num-partitions (8)"]),
        ({"partition_id": -1}, ["partition-id", "-1", "0 <= partition-id"]),
        ({"num_partitions": 0, "partition_id": 0}, ["num-partitions", "0", ">= 1"]),
        ({"seed": -1}, ["seed", "-1", ">= 0"]),
    ],
)
def test_one_line_errors(kwargs, fragments):
    with pytest.raises(ValueError, match=re.escape(fragments[0])) as info:
        _data(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_task_message_exact():
    with pytest.raises(ValueError, match="unknown task 'sort'") as info:
        task_of_client(0, 4, ["sort"])
    assert str(info.value) == ("synthetic-tasks: unknown task 'sort'; allowed: reverse, uppercase, count, initials")


def test_no_overlap_when_collisions_are_likely(monkeypatch):
    # With 5 words there are only 300 possible inputs, so 60 random draws
    # collide almost surely; dedupe must still keep every input distinct.
    monkeypatch.setattr(synthetic, "WORDS", ("ant", "bed", "cow", "dog", "egg"))
    train, test = _data(num_train=40, num_test=20)
    inputs = [e.instruction for e in train + test]
    assert len(set(inputs)) == len(inputs) == 60


def test_iid_split_cycles_tasks_and_needs_per_task_instructions():
    train, test = make_client_data(1, 8, seed=0, num_train=8, num_test=4, instruction="per-task", split="iid")
    assert [e.task for e in train[:5]] == ["uppercase", "count", "initials", "reverse", "uppercase"]
    assert all(e.instruction.startswith(PER_TASK_INSTRUCTIONS[e.task].split("{")[0]) for e in train + test)
    same_inputs, _ = make_client_data(1, 8, seed=0, num_train=8, num_test=4, instruction="per-task")
    assert [e.instruction.split(": ", 1)[1] for e in train] == [e.instruction.split(": ", 1)[1] for e in same_inputs]
    with pytest.raises(ValueError, match="synthetic-split: 'iid' needs synthetic-instruction 'per-task'"):
        make_client_data(1, 8, seed=0, num_train=8, num_test=4, split="iid")
    with pytest.raises(ValueError, match="synthetic-split: 'mixed'; allowed: task, iid"):
        make_client_data(1, 8, seed=0, num_train=8, num_test=4, split="mixed")
