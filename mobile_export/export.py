"""Export the personal forecast model to ONNX (dynamo exporter, Scan horizon) and to .ort.

The ONNX graph is self-contained: no random ops (uniforms are an input), opset ≤ 21, a
dynamic horizon T, dynamic option count K and dynamic sample count M (M may be 0). Producer
metadata, doc strings and value names that only help debugging are stripped before the model
is hashed and signed, so the bytes are small and deterministic for a given torch/onnx version.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from mobile_export.errors import ExportError
from mobile_export.model import INPUT_NAMES, OUTPUT_NAMES, PersonalForecast, example_inputs

OPSET = 21
"""ONNX opset of exported models (≤ 21: DESIGN.md §4)."""


def _dynamic_shapes() -> tuple[dict[int, object], ...]:
    T = torch.export.Dim("T", min=1)
    K = torch.export.Dim("K", min=1)
    M = torch.export.Dim("M", min=0)
    return (
        {},  # state (3,)
        {0: K},  # contacts (K, L)
        {0: K},  # isolation (K,)
        {0: K},  # mask (K,)
        {0: T},  # prevalence (T, L)
        {},  # theta (2,)
        {0: T, 1: M, 2: K},  # uniforms (T, M, K)
    )


def strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove doc strings, producer info and metadata properties, in place; returns ``model``."""
    model.doc_string = ""
    model.producer_name = ""
    model.producer_version = ""
    model.domain = ""
    del model.metadata_props[:]

    def _graph(graph: onnx.GraphProto) -> None:
        graph.doc_string = ""
        del graph.metadata_props[:]
        for value in (*graph.input, *graph.output, *graph.value_info):
            value.doc_string = ""
            del value.metadata_props[:]
        for init in graph.initializer:
            init.doc_string = ""
            del init.metadata_props[:]
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                attr.doc_string = ""
                if attr.type == onnx.AttributeProto.GRAPH:
                    _graph(attr.g)
                for sub in attr.graphs:
                    _graph(sub)

    _graph(model.graph)
    # Intermediate shape annotations are re-inferred by onnxruntime; drop them for size.
    del model.graph.value_info[:]
    for function in model.functions:
        function.doc_string = ""
        del function.metadata_props[:]
    return model


def export_onnx(model: PersonalForecast | None = None, opset: int = OPSET) -> bytes:
    """Export ``model`` (default: a fresh :class:`PersonalForecast`) to ONNX bytes."""
    if opset > 21:
        raise ExportError(f"opset {opset} > 21 is not supported on device (DESIGN.md §4)")
    model = (model or PersonalForecast()).eval()
    args = example_inputs(horizon=7, options=8, samples=4, layers=len(model.layers))
    try:
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=_dynamic_shapes(),
            optimize=True,
            verbose=False,
        )
    except Exception as exc:  # torch raises many exception types; keep the cause
        raise ExportError(f"torch.onnx dynamo export failed: {exc}") from exc
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = strip_metadata(program.model_proto)
    ops = {node.op_type for node in proto.graph.node}
    if "Scan" not in ops:
        raise ExportError(f"exported graph has no Scan over the horizon (ops: {sorted(ops)})")
    if ops & {"Bernoulli", "RandomUniform", "RandomUniformLike", "RandomNormal", "Multinomial"}:
        raise ExportError("exported graph contains a random op")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def convert_to_ort(onnx_bytes: bytes) -> bytes:
    """Convert ONNX bytes to the onnxruntime ``.ort`` flatbuffer format (basic optimisations,
    as ``onnxruntime.tools.convert_onnx_models_to_ort`` does for a portable model)."""
    with tempfile.TemporaryDirectory(prefix="lpm-ort-") as tmp:
        out = Path(tmp) / "model.ort"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.fspath(out)
        options.add_session_config_entry("session.save_model_format", "ORT")
        try:
            ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"onnxruntime could not convert the model to .ort: {exc}") from exc
        if not out.exists():
            raise ExportError("onnxruntime did not write the .ort model")
        return out.read_bytes()


def opset_of(onnx_bytes: bytes) -> int:
    """The default-domain opset of an ONNX model."""
    proto = onnx.load_from_string(onnx_bytes)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("model has no default-domain opset import")


@dataclass(frozen=True)
class ModelArtifacts:
    """The exported model in both formats. ``onnx`` is for inspection; devices get ``ort``."""

    onnx: bytes
    ort: bytes
    opset: int


def export_artifacts(model: PersonalForecast | None = None, opset: int = OPSET) -> ModelArtifacts:
    """Export and convert ``model``; cached per process, since the graph does not depend on θ
    (θ is an input) but only on the layer configuration."""
    model = model or PersonalForecast()
    key = (
        model.layers,
        tuple(float(v) for v in model.isolation_applies.flatten().tolist()),
        opset,
    )
    return _export_cached(key)


@functools.lru_cache(maxsize=8)
def _export_cached(key: tuple[tuple[str, ...], tuple[float, ...], int]) -> ModelArtifacts:
    layers, isolation_applies, opset = key
    onnx_bytes = export_onnx(PersonalForecast(layers, isolation_applies), opset=opset)
    return ModelArtifacts(
        onnx=onnx_bytes, ort=convert_to_ort(onnx_bytes), opset=opset_of(onnx_bytes)
    )
