from pathlib import Path

import pytest

from training.config import ConfigError, load_config


def test_defaults_follow_design():
    cfg = load_config()
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.inner) == (64, 2, 2, 256)
    assert cfg.model.dropout == 0.5 and cfg.data.max_seq_len == 50


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\nloss:\n  contrastive: none\n")
    cfg = load_config(p, ["train.lr=0.002", "eval.ks=[10, 20]", "train.grad_clip=1.5"])
    assert cfg.train.lr == 0.002
    assert cfg.loss.contrastive == "none"
    assert cfg.eval.ks == [10, 20]
    assert cfg.train.grad_clip == 1.5


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("train:\n  lrr: 0.01\n", [], "unknown key 'train.lrr'"),
        ("bogus: 1\n", [], "unknown key 'bogus'"),
        ("train:\n  epochs: many\n", [], "'train.epochs'"),
        ("loss:\n  contrastive: xx\n", [], "'loss.contrastive'"),
        ("", ["model.dim=-3"], "'model.dim'"),
        ("", ["train.nope=1"], "unknown key 'train.nope'"),
        ("", ["eval.ks=[5]"], "include 10"),
        ("", ["noequals"], "key.sub=value"),
        ("- a\n- b\n", [], "mapping"),
        ("a: [1, 2\n", [], "not valid YAML"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match.replace("[", r"\[")):
        load_config(p, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/cfg.yaml")


def _load_shipped(path):
    """A base-run config (RunConfig) or a retrieval-stage config (a ``retrieval`` section only)."""
    import yaml

    from training.ra.config import load_retrieval_config

    if "retrieval" in (yaml.safe_load(path.read_text()) or {}):
        return load_retrieval_config(path)
    return load_config(path)


def test_window_chunk_cannot_exceed_the_input_length():
    with pytest.raises(ConfigError, match="window_chunk"):
        load_config(None, ["data.max_seq_len=10", "train.window_chunk=11"])
    assert load_config(None, ["data.max_seq_len=10", "train.window_chunk=10"]).train.window_chunk == 10


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[3].joinpath("configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load_and_start_with_their_command(path):
    _load_shipped(path)  # validated: an unknown key or a bad value raises ConfigError
    assert path.read_text().startswith(f"# ragrec train --config configs/{path.name} --out runs/")


def test_a_saved_config_of_older_code_loads(tmp_path):
    """A run directory's config.yaml names keys renamed or retired since: renamed ones are read
    under the new name, retired ones dropped at the value that code used, refused otherwise."""
    import yaml

    raw = load_config(None, []).model_dump()
    raw["ra"]["quality_threshold"] = raw["ra"].pop("usefulness_threshold")
    raw["ra"]["rebuild_switch_epoch"] = 7
    del raw["ra"]["rebuild_early_epochs"]
    raw["model"]["layer_norm_eps"] = 1e-12
    raw["train"]["compile"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.ra.rebuild_early_epochs == 7 and cfg.ra.usefulness_threshold is None
    raw["train"]["compile"] = True
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"'train\.compile' was removed"):
        load_config(path)
