"""Development tools for onnxq: example-model builders and benchmarks (not part of the package)."""
