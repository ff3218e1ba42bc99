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


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[3].joinpath("configs").glob("*.yaml"))
    assert configs, "no configs found"
    for path in configs:
        _load_shipped(path)


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
def test_shipped_configs_load(path):
    cfg = _load_shipped(path)
    assert cfg.retrieval.k_search >= 1 if hasattr(cfg, "retrieval") else cfg.data.max_seq_len >= 1
