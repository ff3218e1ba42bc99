"""The configuration reference in README.md, generated from the config classes themselves
(``python -m training.config_doc``), so that the README lists every key with its one default.
A test checks the README's copy against this output."""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from pydantic import BaseModel

from training.config import RunConfig
from training.model import ModelConfig
from training.ra.config import RetrievalConfig

BEGIN, END = "<!-- config reference: python -m training.config_doc -->", "<!-- end of config reference -->"


def _comments(cls: type) -> dict[str, str]:
    """{field: its trailing comment, or the comment lines just above it} from ``cls``'s source."""
    out: dict[str, str] = {}
    above: list[str] = []
    try:
        source = inspect.getsource(cls)
    except OSError:  # made by create_model (the model section): its fields are ModelConfig's
        return {}
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+): [^=]+?(?:=.*?)?(?:\s+#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "class ", "@", "return")):
            out[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return out


def _default(field: Any) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    return "required" if value is ... or repr(value) == "PydanticUndefined" else f"`{value!r}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    notes = _comments(model)
    if any(f.name in model.model_fields for f in dataclasses.fields(ModelConfig)):
        notes = {**_comments(ModelConfig), **notes}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and sub.__name__ != "UnfreezePhase":
            rows += _rows(sub, f"{prefix}{name}.")
        else:
            rows.append(f"| `{prefix}{name}` | {_default(field)} | {notes.get(name, '').replace('|', '/')} |")
    return rows


def reference_markdown() -> str:
    lines = [BEGIN, "", "| key | default | meaning |", "|---|---|---|"]
    lines += _rows(RunConfig, "")
    lines += ["", "A retrieval-stage config (`configs/ml100k-ra.yaml`) holds only a `retrieval` section:", "",
              "| key | default | meaning |", "|---|---|---|"]
    lines += _rows(RetrievalConfig, "")
    return "\n".join([*lines, "", END])


if __name__ == "__main__":
    print(reference_markdown())
