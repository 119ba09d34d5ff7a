"""On-device models: personal forecast model, ONNX export, .ort conversion,
signed model bundles and their verification."""
