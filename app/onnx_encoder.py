"""The served encoder run by ONNX Runtime instead of eager PyTorch (``RAGREC_INFERENCE``: "onnx",
or "auto", the default, where onnxruntime is installed and the device is the CPU).

A micro-batch is a few small matrices, and eager PyTorch spends much of a forward pass in
per-operator dispatch. The same graph exported to ONNX and run by ONNX Runtime on one thread
costs 0.12 ms per sequence at batch 16 against 0.18 ms eager on the 2-core development machine,
and a whole request with retrieval 0.28 against 0.40 ms of CPU (docs/serving.md). The export
happens in memory when the service starts (about a second); outputs match eager PyTorch to
~5e-6 (tests/unit/app/test_onnx_encoder.py).
CPU only: on a GPU the service keeps PyTorch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from training.model import SequenceEncoder


def onnx_available() -> bool:
    """Whether onnxruntime and onnx (the exporter needs it) are installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


class _HeadAndScores(torch.nn.Module):
    def __init__(self, model: SequenceEncoder, key_center: torch.Tensor | None,
                 key_proj: torch.nn.Module | None) -> None:
        super().__init__()
        self.model = model
        self.key_proj = key_proj
        self.register_buffer("key_center", key_center)

    def forward(self, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.model(items)
        if self.key_center is None:
            return h, self.model.scores(h)
        # training.ra.bank.unit_keys in the graph: normalize(proj(h - center))
        x = h - self.key_center
        if self.key_proj is not None:
            x = self.key_proj(x)
        return h, self.model.scores(h), x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class OnnxEncoder:
    """(B, L) int64 left-aligned item ids -> (h (B, D), scores (B, n_items)) float32 arrays,
    what ``model(items)`` and ``model.scores(h)`` give, and with ``key_center`` a third: the
    retrieval keys of h (``RetrievalBundle.keys_of``; a served request then computes its key
    inside the graph, not in a dozen numpy calls after it). Thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, model: SequenceEncoder, *, threads: int = 1, key_center: torch.Tensor | None = None,
                 key_proj: torch.nn.Module | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("RAGREC_INFERENCE=onnx needs onnxruntime and onnx: pip install 'ragrec[onnx]'") from e
        model = model.eval()
        buf = io.BytesIO()
        # An example with padding and unequal lengths, as a micro-batch has: traced on equal lengths,
        # the exporter would fold the per-row last positions into constants.
        width = model.cfg.max_len
        example = torch.zeros(3, width, dtype=torch.int64)
        for row, length in enumerate((width, max(1, width // 2), 1)):
            example[row, :length] = torch.arange(length) % model.cfg.n_items + 1
        with warnings.catch_warnings():  # the tracer's notes on the input checks, which the engine did already
            warnings.simplefilter("ignore")
            # eval() on the wrapper too: the exporter puts a module back in its mode of before, and a
            # new module is in training mode, which would switch the served model's dropout on
            center = None if key_center is None else torch.as_tensor(key_center, dtype=torch.float32).detach()
            outputs = ["h", "scores"] + ([] if center is None else ["keys"])
            torch.onnx.export(_HeadAndScores(model, center, key_proj).eval(), (example,), buf, input_names=["items"],
                              output_names=outputs, opset_version=17, dynamo=False,
                              dynamic_axes={"items": {0: "batch", 1: "length"}, **{o: {0: "batch"} for o in outputs}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting for the next run: between micro-batches the CPU belongs to the event loop
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, items: np.ndarray) -> list[np.ndarray]:
        """[h, scores] or, with keys, [h, scores, keys]."""
        return self.session.run(None, {"items": np.ascontiguousarray(items, dtype=np.int64)})
