"""Tests for the flan-json folder loader, the majority answer and the options parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbilevel.data.common import most_common_answer, seeded_subset
from fedbilevel.data.flan import answer_options, load_flan_json
from fedbilevel.data.types import Example

FLAN8 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flan8"
CATEGORIES = [
    "coreference",
    "entailment",
    "linguistic_acceptability",
    "paraphrase",
    "question_classification",
    "structure_to_text",
    "text_formatting",
    "word_disambiguation",
]
needs_flan8 = pytest.mark.skipif(not FLAN8.is_dir(), reason=f"flan8 reference data not found at {FLAN8}")


def _record(i, category="cat_a", **changes):
    return {"instruction": f"question {i}", "output": f"answer {i}", "task": "src", "category": category, **changes}


def _folder(tmp_path, clients, test_lines=None):
    """A flan-json folder: ``clients`` is a list of record lists; test lines default to one per category."""
    for k, records in enumerate(clients):
        (tmp_path / f"client_{k}.json").write_text(json.dumps(records))
    if test_lines is None:
        categories = sorted({r["category"] for records in clients for r in records})
        test_lines = [json.dumps(_record(100 + i, c)) for i, c in enumerate(categories)]
    (tmp_path / "test.jsonl").write_text("\n".join(test_lines) + "\n")
    return tmp_path


@needs_flan8
def test_flan8_client_0_is_coreference():
    data = load_flan_json(FLAN8, 0, 8)
    assert data.task == "coreference"
    assert (len(data.train), len(data.test)) == (300, 200)
    assert {e.task for e in data.train + data.test} == {"coreference"}
    first = json.loads((FLAN8 / "client_0.json").read_text())[0]
    assert data.train[0] == Example(first["instruction"], first["output"], "coreference")


@needs_flan8
def test_flan8_every_client_gets_its_category():
    test_lines = [json.loads(line) for line in (FLAN8 / "test.jsonl").read_text().splitlines()]
    for k, category in enumerate(CATEGORIES):
        data = load_flan_json(FLAN8, k, 8)
        expected = [(r["instruction"], r["output"]) for r in test_lines if r["category"] == category]
        assert data.task == category
        assert [(e.instruction, e.output) for e in data.test] == expected
        assert len(data.train) == 300


@needs_flan8
def test_flan8_subsets_are_deterministic_and_seeded():
    full = load_flan_json(FLAN8, 3, 8)
    small = load_flan_json(FLAN8, 3, 8, max_train=20, max_test=10, seed=1)
    assert (len(small.train), len(small.test)) == (20, 10)
    assert small == load_flan_json(FLAN8, 3, 8, max_train=20, max_test=10, seed=1)
    assert set(small.train) <= set(full.train) and set(small.test) <= set(full.test)
    # subsets keep file order
    assert small.test == [e for e in full.test if e in set(small.test)]
    other = load_flan_json(FLAN8, 3, 8, max_train=20, max_test=10, seed=2)
    assert other.train != small.train and other.test != small.test
    # the test subset depends on the seed only, not on the other options
    assert load_flan_json(FLAN8, 3, 8, max_test=10, seed=1).test == small.test
    assert load_flan_json(FLAN8, 3, 8, max_train=1000).train == full.train


@needs_flan8
def test_flan8_options_found_where_they_occur():
    with_options = {
        "coreference": 2,
        "entailment": 3,
        "linguistic_acceptability": 2,
        "paraphrase": 2,
        "question_classification": 6,
        "word_disambiguation": 2,
    }
    for k, category in enumerate(CATEGORIES):
        test = load_flan_json(FLAN8, k, 8).test
        options = [answer_options(e.instruction) for e in test]
        if category in with_options:
            assert all(o is not None and len(o) == with_options[category] for o in options), category
            assert all(e.output in o for e, o in zip(test, options)), category
        else:
            assert options == [None] * len(test), category


def test_seeded_subset():
    items = list(range(10))
    assert seeded_subset(items, None, 0) == items
    assert seeded_subset(items, 10, 0) == items
    picked = seeded_subset(items, 4, 0)
    assert len(picked) == 4 and picked == sorted(picked)
    assert set(picked) <= set(seeded_subset(items, 6, 0))
    assert {tuple(seeded_subset(items, 4, seed)) for seed in range(5)} != {tuple(picked)}


def test_reads_a_small_folder(tmp_path):
    folder = _folder(tmp_path, [[_record(0), _record(1)], [_record(2, "cat_b")]])
    data = load_flan_json(folder, 1, 2)
    assert data.task == "cat_b"
    assert data.train == [Example("question 2", "answer 2", "cat_b")]
    assert data.test == [Example("question 101", "answer 101", "cat_b")]


def test_error_missing_folder(tmp_path):
    with pytest.raises(ValueError, match=r"data folder .*nope: not found"):
        load_flan_json(tmp_path / "nope", 0, 1)


def test_error_wrong_number_of_client_files(tmp_path):
    folder = _folder(tmp_path, [[_record(0)], [_record(1)], [_record(2)]])
    with pytest.raises(ValueError, match=r"num-partitions 4 but folder .* has client_0\.\.client_2\.json"):
        load_flan_json(folder, 0, 4)
    with pytest.raises(ValueError, match=r"num-partitions 2 but folder .* has client_0\.\.client_2\.json"):
        load_flan_json(folder, 0, 2)


def test_error_missing_client_file(tmp_path):
    folder = _folder(tmp_path, [[_record(0)], [_record(1)], [_record(2)]])
    (folder / "client_1.json").unlink()
    (folder / "client_5.json").write_text(json.dumps([_record(5)]))
    with pytest.raises(
        ValueError, match=r"no client_1\.json \(it has client_0\.json, client_2\.json, client_5\.json\)"
    ):
        load_flan_json(folder, 1, 3)


def test_error_missing_test_file(tmp_path):
    folder = _folder(tmp_path, [[_record(0)]])
    (folder / "test.jsonl").unlink()
    with pytest.raises(ValueError, match=r"no test\.jsonl"):
        load_flan_json(folder, 0, 1)


def test_error_malformed_json(tmp_path):
    folder = _folder(tmp_path, [[_record(0)]])
    (folder / "client_0.json").write_text('[\n{"instruction": "x",\n]')
    with pytest.raises(ValueError, match=r"client_0\.json: invalid JSON at line 3"):
        load_flan_json(folder, 0, 1)


def test_error_malformed_jsonl_line(tmp_path):
    lines = [json.dumps(_record(7)), "", '{"instruction": "x", "output": }']
    folder = _folder(tmp_path, [[_record(0)]], test_lines=lines)
    with pytest.raises(ValueError, match=r"test\.jsonl line 3: invalid JSON"):
        load_flan_json(folder, 0, 1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"instruction": "q", "output": "a", "task": "t"}, r"client_0\.json record 1: missing key 'category'"),
        (_record(1, output=""), r"client_0\.json record 1: key 'output' is '' \(str\); allowed: a non-empty string"),
        (_record(1, instruction=3), r"client_0\.json record 1: key 'instruction' is '3' \(int\)"),
        (["q", "a"], r"client_0\.json record 1: expected a JSON object"),
    ],
)
def test_error_bad_record(tmp_path, record, message):
    folder = _folder(tmp_path, [[_record(0), record]], test_lines=[json.dumps(_record(9))])
    with pytest.raises(ValueError, match=message):
        load_flan_json(folder, 0, 1)


def test_error_bad_test_line(tmp_path):
    lines = [json.dumps(_record(7)), json.dumps({"instruction": "q", "output": "a", "category": "cat_a"})]
    folder = _folder(tmp_path, [[_record(0)]], test_lines=lines)
    with pytest.raises(ValueError, match=r"test\.jsonl line 2: missing key 'task'"):
        load_flan_json(folder, 0, 1)


def test_error_mixed_categories(tmp_path):
    folder = _folder(tmp_path, [[_record(0, "cat_a"), _record(1, "cat_b")]])
    with pytest.raises(ValueError, match=r"categories \['cat_a', 'cat_b'\]; allowed: exactly one category"):
        load_flan_json(folder, 0, 1)


def test_error_no_test_lines_for_category(tmp_path):
    # Issue input: test.jsonl has no line for client 2's category; the client must not vanish silently.
    clients = [[_record(0, "cat_a")], [_record(1, "cat_b")], [_record(2, "cat_c")]]
    folder = _folder(tmp_path, clients, test_lines=[json.dumps(_record(9, c)) for c in ("cat_a", "cat_b")])
    with pytest.raises(ValueError, match=r"no lines with category 'cat_c' \(the category of client_2\.json\)"):
        load_flan_json(folder, 2, 3)
    assert load_flan_json(folder, 0, 3).task == "cat_a"


def test_error_test_lines_of_a_category_no_client_holds(tmp_path):
    lines = [json.dumps(_record(9, "cat_a")), json.dumps(_record(8, "cat_z")), json.dumps(_record(7, "cat_z"))]
    folder = _folder(tmp_path, [[_record(0, "cat_a")]], test_lines=lines)
    with pytest.raises(ValueError, match=r"2 lines of category 'cat_z', which no client file holds; allowed: .*cat_a"):
        load_flan_json(folder, 0, 1)


def test_files_with_a_utf8_byte_order_mark_are_read(tmp_path):
    # Issue input: a client_1.json that starts with a BOM (as Windows editors write it).
    folder = _folder(tmp_path, [[_record(0, "cat_a")], [_record(1, "cat_b")]])
    for name in ("client_1.json", "test.jsonl"):
        path = folder / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    data = load_flan_json(folder, 1, 2)
    assert (data.task, len(data.train), len(data.test)) == ("cat_b", 1, 1)
    assert data.train[0].instruction == _record(1, "cat_b")["instruction"]


def test_error_bad_partition_and_max(tmp_path):
    folder = _folder(tmp_path, [[_record(0)]])
    with pytest.raises(ValueError, match="partition-id: 1"):
        load_flan_json(folder, 1, 1)
    with pytest.raises(ValueError, match="max-test-examples: 0"):
        load_flan_json(folder, 0, 1, max_test=0)


def test_most_common_answer():
    examples = [Example("q", out, "t") for out in ["no", "yes", "no", "maybe"]]
    assert most_common_answer(examples) == ("no", 0.5)
    # ties go to the lexicographically smallest answer
    assert most_common_answer([Example("q", out, "t") for out in ["b", "a", "b", "a", "c"]]) == ("a", 0.4)
    with pytest.raises(ValueError, match="no examples"):
        most_common_answer([])


@pytest.mark.parametrize(
    ("instruction", "options"),
    [
        ("Same meaning?\nOPTIONS:\n- no\n- yes", ["no", "yes"]),
        (
            "Premise.\n\nOPTIONS:\n- yes\n- it is not possible to tell\n- no",
            ["yes", "it is not possible to tell", "no"],
        ),
        ("Pick one.\nOptions:\n-  A  \n- B\n\nAnswer:", ["A", "B"]),
        ("From the following options, what is it?\n\nOPTIONS:\n- human\n- entity", ["human", "entity"]),
        ("From the following options, what is it?", None),
        ("Add punctuation: Multicurrency Options", None),
        ("OPTIONS:\nno list here", None),
        ("Old.\nOPTIONS:\n- x\nNew.\nOPTIONS:\n- y\n- z", ["y", "z"]),
    ],
)
def test_answer_options(instruction, options):
    assert answer_options(instruction) == options
