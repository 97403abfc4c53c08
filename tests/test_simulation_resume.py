"""End to end: a run resumed from its checkpoint matches an unbroken one (Flower's simulation runtime)."""

from __future__ import annotations

import json

import pytest
from simulated import NUM_CLIENTS, simulate

from fedbilevel.config import RunConfig
from fedbilevel.server import _resume_point


def test_a_run_resumed_from_its_checkpoint_matches_an_unbroken_run(tmp_path):
    # "Killed after round 2": a 2-round run leaves the same checkpoint a crash in round 3 would.
    _, unbroken = simulate(tmp_path / "unbroken", strategy="fedbip", **{"num-server-rounds": 3})
    _, broken = simulate(tmp_path / "broken", strategy="fedbip", **{"num-server-rounds": 2})
    simulate(tmp_path / "broken", strategy="fedbip", **{"num-server-rounds": 3, "resume-from": str(broken)})
    expected = json.loads((unbroken / "results.json").read_text())
    resumed = json.loads((broken / "results.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    for mine, theirs in zip(resumed["rounds"], expected["rounds"]):
        assert {p: t["loss"] for p, t in mine["train"].items()} == {p: t["loss"] for p, t in theirs["train"].items()}

        def scores(record):
            return {p: {m: s[m] for m in ("rouge1", "rougeL", "exact_match")} for p, s in record["eval"].items()}

        assert scores(mine) == scores(theirs) and mine["weights"] == theirs["weights"]
    config = json.loads((broken / "config.json").read_text())
    assert config["run_config"]["num-server-rounds"] == 3 and [r["after_round"] for r in config["resumes"]] == [2]
    for p in range(NUM_CLIENTS):
        for name in ("adapter_model.safetensors",):
            assert (broken / "clients" / str(p) / name).read_bytes() == (
                unbroken / "clients" / str(p) / name
            ).read_bytes()
    # Changing what the run computes is refused, with the key named (the check a resumed ServerApp makes first).
    changed = {**json.loads((broken / "config.json").read_text())["run_config"], "learning-rate": 0.5}
    changed.update({"num-server-rounds": 4, "resume-from": str(broken)})
    with pytest.raises(
        Exception, match=r"run-config key 'learning-rate': value 0\.5 differs from the resumed run's 0\.01"
    ):
        _resume_point(RunConfig.from_run_config(changed))
    # A run saved before a key existed ran as that key's default: resuming at the default is allowed,
    # another value is refused and says why.
    record = json.loads((broken / "config.json").read_text())
    del record["run_config"]["eval-cross"]
    (broken / "config.json").write_text(json.dumps(record))
    same = {**record["run_config"], "eval-cross": False, "num-server-rounds": 4, "resume-from": str(broken)}
    assert _resume_point(RunConfig.from_run_config(same))[1]["round"] == 3  # resumed to 3 above
    with pytest.raises(Exception, match=r"'eval-cross': value True differs .* False \(its default: the run predates"):
        _resume_point(RunConfig.from_run_config({**same, "eval-cross": True}))
