"""Graph passes of the onnxq pipeline, written as onnx_ir passes.

Each module holds one or a few ``onnx_ir.passes.InPlacePass`` classes named ``<Verb><Object>Pass``;
``call(model)`` rewrites the model in place and returns ``PassResult(model, modified)``. There is no
registry: a pipeline lists the passes it runs explicitly and imports them from their modules, e.g.
``from onnxq.passes.fold_bn import FoldBatchNormPass``. Passes that decline a rewrite record a
one-line reason that the report shows.

Preprocessing passes:

- :mod:`onnxq.passes.fold_constants`: ``FoldConstantsPass`` evaluates constant subgraphs once in
  ONNX Runtime and replaces them by initializers (Q/DQ and random ops excluded).
- :mod:`onnxq.passes.fold_bn`: ``FoldBatchNormPass`` folds inference BatchNormalization into a
  preceding Conv, ConvTranspose or Gemm.
"""
