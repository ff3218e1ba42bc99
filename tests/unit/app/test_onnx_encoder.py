"""RAGREC_INFERENCE=onnx: the exported encoder gives what eager PyTorch gives, for every batch shape,
and the service's rankings do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from app.engine import Engine, Query
from app.onnx_encoder import OnnxEncoder
from training.data.sequences import Vocabulary
from training.model import ModelConfig, SequenceEncoder


@pytest.fixture(scope="module")
def model() -> SequenceEncoder:
    torch.manual_seed(0)
    m = SequenceEncoder(ModelConfig(n_items=300, max_len=20, dim=32, n_heads=2, inner=64, position="both"))
    with torch.no_grad():  # a trained-looking recency bias, so the relative-position path matters
        for block in m.blocks:
            block.attn.recency.normal_(0, 0.5)
    return m.eval()


def _batch(rng: np.random.Generator, b: int, width: int) -> np.ndarray:
    x = np.zeros((b, width), dtype=np.int64)
    for i in range(b):
        n = int(rng.integers(1, width + 1))
        x[i, :n] = rng.integers(1, 301, n)
    return x


@pytest.mark.parametrize(("b", "width"), [(1, 1), (1, 20), (3, 7), (16, 20), (64, 13)])
def test_outputs_match_eager_pytorch(model: SequenceEncoder, b: int, width: int) -> None:
    enc = OnnxEncoder(model)
    assert not any(m.training for m in model.modules())  # the export left the model in eval mode
    x = _batch(np.random.default_rng(b * 100 + width), b, width)
    h, scores = enc(x)
    with torch.inference_mode():
        h_ref = model(torch.from_numpy(x))
        s_ref = model.scores(h_ref)
    np.testing.assert_allclose(h, h_ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, s_ref.numpy(), atol=1e-4)


def test_the_engine_ranks_the_same_with_either_backend(model: SequenceEncoder) -> None:
    vocab = Vocabulary([f"i{j}" for j in range(1, 301)])
    popularity = np.full(300, 1 / 300)
    eager = Engine(model, vocab, popularity, model_version="m", inference="torch")
    onnx = Engine(model, vocab, popularity, model_version="m", inference="onnx")
    assert onnx.onnx is not None and eager.onnx is None
    assert Engine(model, vocab, popularity, model_version="m").onnx is not None  # "auto", onnxruntime installed
    rng = np.random.default_rng(7)
    queries = [Query(items=[f"i{j}" for j in rng.integers(1, 301, int(rng.integers(1, 30)))], k=10) for _ in range(40)]
    queries.append(Query(items=["unknown"], k=5))  # a cold row beside warm ones
    for a, b in zip(eager.recommend_batch(queries), onnx.recommend_batch(queries), strict=True):
        assert a.items == b.items and a.fallback == b.fallback
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    with pytest.raises(ValueError, match="inference must be"):
        Engine(model, vocab, popularity, model_version="m", inference="tensorrt")


@pytest.mark.parametrize("with_proj", [False, True])
def test_the_graph_gives_the_bundles_retrieval_keys(model: SequenceEncoder, with_proj: bool) -> None:
    """With a key center (and a trained key projection) the graph's third output is what
    ``unit_keys`` computes from its h: the service then searches with the graph's keys."""
    from training.ra.bank import unit_keys
    from training.ra.keys import KeyProjection

    torch.manual_seed(1)
    center = torch.randn(32) * 0.1
    proj = KeyProjection(32).eval() if with_proj else None
    if proj is not None:  # a trained-looking projection (a new one is the identity)
        torch.nn.init.normal_(proj.down.weight, std=0.2)
    enc = OnnxEncoder(model, key_center=center, key_proj=proj)
    x = _batch(np.random.default_rng(5), 9, 20)
    h, scores, keys = enc(x)
    np.testing.assert_allclose(keys, unit_keys(torch.from_numpy(h), center, proj), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-6)
    assert keys.dtype == np.float32 and keys.flags.c_contiguous
    plain_h, plain_scores = OnnxEncoder(model)(x)  # the keys change nothing else
    np.testing.assert_allclose(h, plain_h, atol=1e-6)
    np.testing.assert_allclose(scores, plain_scores, atol=1e-5)
