"""Device side: Flower ClientApp, local encrypted store, risk and local gradient,
ONNX forecast runner."""
