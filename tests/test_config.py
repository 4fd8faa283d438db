import pytest

from compress.config import Config, DataConfig, EvalConfig, parse_override
from compress.errors import UserError
from compress.profiles import available_profiles, load_pipeline
from compress.registry import get_pass, list_passes, register_pass

ALL_CONFIGS = [DataConfig, EvalConfig] + [s.config for s in list_passes()]


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_round_trip_and_canonical_json(cls):
    cfg = cls()
    again = cls.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.canonical_json() == cfg.canonical_json()
    typed = cfg.to_typed_dict()
    assert typed["type"] == cls.__name__ and typed["version"] == cls.VERSION


@pytest.mark.parametrize("cls", ALL_CONFIGS, ids=lambda c: c.__name__)
def test_unknown_key_is_rejected_with_allowed_keys(cls):
    with pytest.raises(UserError) as e:
        cls.from_dict({"no_such_key": 1})
    msg = str(e.value)
    assert "'no_such_key'" in msg and cls.field_names()[0] in msg


def test_every_field_is_documented():
    for cls in ALL_CONFIGS:
        assert all(h for h in cls.field_help().values()), cls.__name__


def test_string_values_are_coerced_and_checked():
    cfg = get_pass("distill").config.from_dict({"lr": "1e-4", "steps": "12", "bf16": "OFF"})
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 12 and cfg.train.bf16 == "off"
    with pytest.raises(UserError, match="expected an integer"):
        get_pass("distill").config.from_dict({"steps": "many"})
    with pytest.raises(UserError, match="expected one of"):
        get_pass("distill").config.from_dict({"bf16": "maybe"})
    with pytest.raises(UserError, match="must be at least 1"):
        get_pass("distill").config.from_dict({"steps": 0})
    with pytest.raises(UserError, match="expected an integer"):
        EvalConfig.from_dict({"window": True})


def test_yaml_booleans_and_numbers_reach_string_choices():
    # YAML 1.1 reads `--set quantize.block_ap=on` as True and `embeddings: 8` as 8
    q = get_pass("quantize").config
    assert q.from_dict({"block_ap": True}).block_ap == "on" and q.from_dict({"block_ap": False}).block_ap == "off"
    assert q.from_dict({"embeddings": 8}).embeddings == "8"
    assert get_pass("distill").config.from_dict({"bf16": False}).train.bf16 == "off"
    _, key, value = parse_override("quantize.block_ap=on")
    assert q.from_dict({key: value}).block_ap == "on"
    with pytest.raises(UserError, match="expected one of"):
        q.from_dict({"embeddings": 5})


def test_parse_override():
    assert parse_override("distill.lr=1e-4") == ("distill", "lr", "1e-4")
    assert parse_override("evaluation.window=256") == ("evaluation", "window", 256)
    assert parse_override("distill.train.lr=1e-4") == ("distill", "train.lr", "1e-4")
    for bad in ("distill.lr", "lr=1", "a.b.c.d=1", ".x=1", "a..b=1"):
        with pytest.raises(UserError):
            parse_override(bad)


def test_profile_overrides_apply_and_reject(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text("description: t\npasses:\n  - name: distill\n    config: {steps: 3}\n")
    pipe = load_pipeline(str(prof), ["distill.steps=7", "evaluation.window=64", "data.seq_len=32",
                                     "target.threads=3"])
    assert pipe.stages[0].config.train.steps == 7 and pipe.evaluation.window == 64 and pipe.data.seq_len == 32
    assert pipe.target.threads == 3 and pipe.target.device == "cpu"
    assert load_pipeline(str(prof), ["distill.train.steps=9"]).stages[0].config.train.steps == 9
    with pytest.raises(UserError, match="unknown key 'threadz'"):
        load_pipeline(str(prof), ["target.threadz=1"])
    with pytest.raises(UserError, match="unknown section 'quantize'"):
        load_pipeline(str(prof), ["quantize.bits=4"])
    with pytest.raises(UserError, match="unknown key 'stepz'"):
        load_pipeline(str(prof), ["distill.stepz=4"])
    prof.write_text("passes: [{name: nope}]\n")
    with pytest.raises(UserError, match="unknown pass 'nope'"):
        load_pipeline(str(prof))
    prof.write_text("pases: []\n")
    with pytest.raises(UserError, match="unknown key 'pases'"):
        load_pipeline(str(prof))


def test_shipped_profiles_resolve():
    assert "baseline" in available_profiles()
    for name in available_profiles():
        load_pipeline(name)


def test_shipped_subnet_tables_time_decode_as_the_profile_stage_does():
    """A pick budget is read against the table's ms/token and checked by profile_latency: both must
    time the same prompt and the same number of new tokens (a 64-token table under a 128-token
    profile picked a subnet at 2.87 ms that deployed at 3.11 ms against a 3.0 ms budget)."""
    checked = 0
    for name in available_profiles():
        stages = {s.spec.name: s.config for s in load_pipeline(name).stages}
        if "amoeba" in stages and "profile_latency" in stages:
            a, p = stages["amoeba"], stages["profile_latency"]
            assert (a.prompt_tokens, a.new_tokens) == (p.prompt_tokens, p.new_tokens), name
            checked += 1
    assert checked >= 1


def test_embedded_training_section_merges_over_the_pass_defaults():
    q = get_pass("quantize").config
    d = get_pass("distill").config
    # each pass has its own training defaults; a partial section keeps the rest of them
    assert q().train.lr == 2e-4 and q().train.bf16 == "off" and d().train.lr == 2e-5 and d().train.bf16 == "auto"
    cfg = q.from_dict({"train": {"steps": 7}})
    assert cfg.train.steps == 7 and cfg.train.lr == 2e-4 and cfg.train.batch_size == 2
    # flat (unambiguous) and dotted keys reach the section; the canonical form is nested
    assert q.from_dict({"steps": 7}) == cfg == q.from_dict({"train.steps": 7})
    assert q.from_dict(cfg.to_dict()) == cfg and '"train":{' in cfg.canonical_json()
    with pytest.raises(UserError, match=r"quantize\.train\.steps: must be >= 0"):
        q.from_dict({"train": {"steps": -1}})
    with pytest.raises(UserError, match=r"quantize\.train: unknown key 'stepz'; allowed keys: steps, lr"):
        q.from_dict({"train": {"stepz": 1}})
    assert "train.lr" in q.field_help() and "train" not in q.field_help()


def test_registry_rejects_duplicates_and_bad_names():
    kw = dict(entry="x:y", summary="", algorithm=1, accepts=("hf",), produces="hf")
    with pytest.raises(ValueError, match="already registered"):
        register_pass("distill", config=Config, **kw)
    with pytest.raises(ValueError, match="lowercase"):
        register_pass("Bad-Name", config=Config, **kw)
    with pytest.raises(ValueError, match="unknown or missing formats"):
        register_pass("new_pass", config=Config, **{**kw, "accepts": ("gguf",)})
    with pytest.raises(ValueError, match="algorithm"):
        register_pass("new_pass", config=Config, **{**kw, "algorithm": 0})
    with pytest.raises(UserError, match="unknown pass"):
        get_pass("nope")


def test_no_base_60_numbers_in_profiles_or_overrides():
    """YAML 1.1 reads 2:4 as the integer 124 (base 60): a sparsity pattern must stay a string."""
    from compress.config import parse_override
    from compress.untrusted import load_yaml

    assert parse_override("sparse_ft.pattern=2:4") == ("sparse_ft", "pattern", "2:4")
    assert parse_override("quantize.lr=0.5")[2] == 0.5 and parse_override("quantize.steps=10")[2] == 10
    assert load_yaml("pattern: 4:8\nsteps: 12\nlr: 2.0e-4\nflag: true", "t") == {
        "pattern": "4:8", "steps": 12, "lr": 2.0e-4, "flag": True}
