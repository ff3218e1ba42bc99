"""The README's configuration reference is the one the config classes generate."""

from __future__ import annotations

from pathlib import Path

from training.config import RunConfig
from training.config_doc import BEGIN, END, reference_markdown

README = Path(__file__).resolve().parents[3] / "README.md"


def _leaves(model: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields") and sub.__name__ != "UnfreezePhase":
            out |= _leaves(sub, f"{prefix}{name}.")
        else:
            out.add(prefix + name)
    return out


def test_readme_holds_the_generated_reference() -> None:
    text = README.read_text()
    block = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert block == reference_markdown(), "README is stale: paste `python -m training.config_doc` over its table"


def test_the_reference_lists_every_key_with_its_default() -> None:
    ref = reference_markdown()
    default = RunConfig()
    for key in _leaves(RunConfig):
        section, name = key.split(".", 1)
        want = getattr(getattr(default, section), name)
        assert f"| `{key}` | `{want!r}` |" in ref, key
