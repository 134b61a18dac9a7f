"""Decoding: one search loop (greedy and beam) over arrays, with one step per runtime.

* :mod:`~stepwise.decode.search`: the loop, written once over numpy arrays;
* :mod:`~stepwise.decode.pytorch`: the PyTorch step (a :class:`~stepwise.model.Transformer` with its KV cache);
* :mod:`~stepwise.decode.onnx_runtime`: the ONNX Runtime step over an export directory (no torch).
"""
