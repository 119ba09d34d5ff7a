"""Exported graph vs torch: ONNX and .ort in onnxruntime, expected-value and Monte Carlo modes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mobile_export.errors import ExportError
from mobile_export.export import OPSET, export_artifacts, export_onnx
from mobile_export.model import INPUT_NAMES, OUTPUT_NAMES, PersonalForecast, example_inputs


@pytest.fixture(scope="module")
def artifacts():
    return export_artifacts()  # exported once per process (cached)


def _session(model: bytes, fmt: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.load_model_format", fmt)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_graph_shape(artifacts) -> None:
    proto = onnx.load_from_string(artifacts.onnx)
    ops = [node.op_type for node in proto.graph.node]
    assert "Scan" in ops
    assert not {"Bernoulli", "RandomUniform", "RandomUniformLike", "RandomNormal"} & set(ops)
    assert artifacts.opset == OPSET <= 21
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    assert proto.producer_name == "" and proto.doc_string == "" and not proto.metadata_props
    assert all(node.doc_string == "" and not node.metadata_props for node in proto.graph.node)
    # the horizon, option count and sample count are symbolic
    uniforms = proto.graph.input[INPUT_NAMES.index("uniforms")].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in uniforms)


@pytest.mark.parametrize("fmt", ["ONNX", "ORT"])
@pytest.mark.parametrize(
    ("horizon", "options", "samples"),
    [(1, 1, 0), (7, 8, 0), (7, 8, 64), (3, 33, 5), (30, 4, 200)],
)
def test_parity(artifacts, fmt: str, horizon: int, options: int, samples: int) -> None:
    session = _session(artifacts.onnx if fmt == "ONNX" else artifacts.ort, fmt)
    model = PersonalForecast()
    inputs = example_inputs(horizon, options, samples, seed=horizon * 100 + options)
    with torch.no_grad():
        expected = [t.numpy() for t in model(*inputs)]
    got = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)})
    for name, e, g in zip(OUTPUT_NAMES, expected, got, strict=True):
        assert g.shape == e.shape, name
        if name == "mc_infection_day":
            np.testing.assert_array_equal(g, e)  # identical outcomes for the same uniforms
        else:
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=0, err_msg=name)
    if samples:
        assert (got[3] >= 0).any()  # the Monte Carlo comparison is not vacuous


def test_parity_at_uniform_boundaries(artifacts) -> None:
    """Uniforms far below / far above p give certain outcomes in both runtimes."""
    session = _session(artifacts.ort, "ORT")
    state, contacts, isolation, mask, prevalence, theta, _ = example_inputs(5, 3, 0, seed=9)
    uniforms = torch.zeros(5, 2, 3)
    uniforms[:, 1, :] = 0.999999
    with torch.no_grad():
        expected = PersonalForecast()(state, contacts, isolation, mask, prevalence, theta, uniforms)
    feeds = dict(
        zip(
            INPUT_NAMES,
            (state, contacts, isolation, mask, prevalence, theta, uniforms),
            strict=True,
        )
    )
    got = session.run(None, {n: t.numpy() for n, t in feeds.items()})
    np.testing.assert_array_equal(got[3], expected[3].numpy())
    assert (got[3][0] == np.where(expected[0].numpy() > 0, 0, -1)).all()
    assert (got[3][1] == -1).all()


def test_opset_above_21_is_refused() -> None:
    with pytest.raises(ExportError, match="opset 22"):
        export_onnx(opset=22)
