"""The contract every registered pass keeps (a new pass adds its row to ``CONTRACT``):
its entry resolves, its config round-trips, a tiny run writes a valid manifest in the format it
registered, a rerun is a cache hit, and a run interrupted before the stage is committed leaves
nothing half-written and resumes to the same stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from compress import api
from compress.artifact import read_artifact
from compress.formats import detect_format
from compress.registry import BUILTIN_PASS_PACKAGES, list_passes

#: per pass: a tiny config (seconds on the tiny model); a new pass adds its row here
CONTRACT = {
    "distill": {"steps": 2, "batch_size": 2, "warmup_steps": 0, "checkpoint_every": 1},
    "quantize": {"group_size": 32, "calibration_blocks": 4, "steps": 2, "warmup_steps": 0, "heldout_blocks": 1,
                 "checkpoint_every": 1},
    "export_onnx": {"greedy_tokens": 4},
    "sparse_ft": {"calibration_blocks": 4, "block_size": 16, "steps": 2, "batch_size": 2, "warmup_steps": 0,
                  "heldout_blocks": 1, "checkpoint_every": 1},
    "profile_latency": {"prompt_tokens": 8, "new_tokens": 2, "runs": 1, "warmup": 0, "eager_baseline": False},
    "pat": {"hidden": 32, "rank": 4, "steps": 10, "batch_size": 2, "warmup_steps": 0, "heldout_blocks": 1,
            "checkpoint_every": 1},
    "amoeba": {"min_layers": 1, "widths": [1.0, 0.5], "dp_sequences": 4, "dp_seq_len": 16, "flap_blocks": 2,
               "lora_rank": 2, "steps": 2, "batch_size": 2, "warmup_steps": 0, "heldout_blocks": 1,
               "checkpoint_every": 1, "latency_points": 1, "runs": 1, "prompt_tokens": 4, "new_tokens": 2,
               "latency_group": 32},
    "pick": {"depth": 1, "width": 0.5},
}
#: passes that take another pass's output: the stages run before them
BEFORE = {"pick": ["amoeba"]}
#: what a pass that changes the model's shape makes of the tiny model's (every other pass keeps it)
SHAPE = {"pat": {"hidden_size": 32}, "pick": {"num_layers": 1, "intermediate_size": 64, "num_heads": 2}}
BUILTIN = [s for s in list_passes() if s.entry.split(":")[0].rsplit(".", 1)[0] in BUILTIN_PASS_PACKAGES]


def test_every_builtin_pass_has_a_contract_row():
    assert sorted(s.name for s in BUILTIN) == sorted(CONTRACT)


def _profile(tmp_path: Path, name: str) -> str:
    path = tmp_path / "contract.yaml"
    path.write_text("description: contract\ntarget: {name: cpu, threads: 1}\ndata: {seq_len: 32}\n"
                    "evaluation: {max_tokens: 256, window: 64}\n"
                    "passes: [" + ", ".join(f"{{name: {n}, config: {json.dumps(CONTRACT[n])}}}"
                                            for n in [*BEFORE.get(name, []), name]) + "]\n")
    return str(path)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "metrics.json")}


@pytest.mark.parametrize("spec", BUILTIN, ids=lambda s: s.name)
def test_pass_contract(spec, tiny_dir, tiny_text, tmp_path, monkeypatch):
    assert callable(spec.load())
    cfg = spec.config.from_dict(CONTRACT[spec.name])
    assert spec.config.from_dict(cfg.to_dict()) == cfg
    prof = _profile(tmp_path, spec.name)
    plan = api.plan(str(tiny_dir), prof, data=str(tiny_text), eval_data=str(tiny_text))

    # a tiny run: a valid manifest, in the registered format, with the source's invariants carried
    rep = api.run(plan, tmp_path / "a", quiet=True)
    k = len(BEFORE.get(spec.name, [])) + 1  # this pass's stage
    stage = tmp_path / "a" / rep["stages"][k]["path"]
    man = read_artifact(stage).manifest
    src = read_artifact(tmp_path / "a" / "stages" / "00-source").manifest
    parent = read_artifact(tmp_path / "a" / rep["stages"][k - 1]["path"]).manifest
    assert man["pass"] == spec.name and man["pass_version"] == spec.version and man["parent"] == parent["id"]
    assert man["format"] == detect_format(stage) == spec.output_format(parent.get("format", "hf"))
    assert man["changes_model"] == spec.changes_model and man["config"] == cfg.to_dict()
    assert man["invariants"]["shape"] == {**src["invariants"]["shape"], **SHAPE.get(spec.name, {})}
    assert isinstance(man["report"], list) and man["metrics"]["pass_seconds"] > 0
    assert (man["parameters"] < src["parameters"]) if spec.name in SHAPE else man["parameters"] == src["parameters"]
    listed = {f["name"] for f in man["files"]}
    assert listed == {str(p.relative_to(stage)) for p in stage.rglob("*")
                      if p.is_file() and p.name not in ("manifest.json", "metrics.json")}

    # a rerun is a cache hit
    again = api.run(plan, tmp_path / "a", quiet=True)
    assert all(s["cached"] for s in again["stages"]) and again["stages"][k]["id"] == man["id"]

    # interrupted just before the stage commits: nothing half-written; a rerun makes the same stage
    import compress.runner as runner

    real = runner.atomic_write_json

    def interrupt(path, data):
        if Path(path).name == "manifest.json" and data.get("pass") == spec.name:
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(runner, "atomic_write_json", interrupt)
    with pytest.raises(KeyboardInterrupt):
        api.run(plan, tmp_path / "b", quiet=True)
    monkeypatch.setattr(runner, "atomic_write_json", real)
    stages = tmp_path / "b" / "stages"
    # the stages before committed, this pass's temp folder gone
    assert [p.name for p in sorted(stages.iterdir())] == [s["name"] for s in rep["stages"][:k]]
    resumed = api.run(plan, tmp_path / "b", quiet=True)
    assert all(s["cached"] for s in resumed["stages"][:k]) and not resumed["stages"][k]["cached"]
    assert resumed["stages"][k]["id"] == man["id"]
    a, b = _digest(tmp_path / "b" / rep["stages"][k]["path"]), _digest(stage)
    assert a == b, sorted(k for k in a if a[k] != b.get(k))  # every pass is deterministic on one machine
