"""Smoke test of scripts/bench_aggregation.py in --quick mode."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from fedbilevel.aggregation import fedbip_aggregate

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_aggregation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_aggregation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_the_table(bench, tmp_path, capsys):
    out = tmp_path / "bench.md"
    rows = bench.main(["--quick", "--repeats", "1", "--out", str(out)])
    expected = [(n, adapter) for adapter in bench.QUICK_ADAPTERS for n in bench.QUICK_CLIENTS]
    assert [(row["N"], row["adapter"]) for row in rows] == expected
    for row in rows:
        for column in bench.COLUMNS[4:]:
            assert math.isfinite(row[column]) and row[column] > 0, (column, row)

    table = [line for line in out.read_text().splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(bench.COLUMNS) + " |"
    assert len(table) == 2 + len(expected)
    for line, (n, adapter) in zip(table[2:], expected):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:2] == [str(n), adapter]
        assert all(float(cell.rstrip("*").replace(",", "")) > 0 for cell in cells[2:])
    assert "Goals:" in capsys.readouterr().out


def test_naive_loop_computes_fedbip(bench):
    personalized, trained = bench.make_clients(5, layers=2, hidden=16, rank=2)
    adapters, seconds, extrapolated = bench.naive_fedbip(personalized, trained)
    assert not extrapolated and seconds > 0
    for naive, fast in zip(adapters, fedbip_aggregate(personalized, trained)):
        for name in fast:
            np.testing.assert_allclose(naive[name], fast[name], rtol=1e-4, atol=1e-5)


def test_naive_loop_extrapolates_past_its_budget(bench):
    personalized, trained = bench.make_clients(6, layers=1, hidden=8, rank=2)
    adapters, seconds, extrapolated = bench.naive_fedbip(personalized, trained, budget_s=0.0)
    assert extrapolated and len(adapters) == 1 and seconds > 0
