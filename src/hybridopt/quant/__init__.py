"""Quantization: the supported weight widths (`bits`, no torch), the weight and activation quantizers (pure
functions), the QAT layer and its in-place module swap (`qat.quantize_`), low-bit packing, and the
sensitivity-clustered precision plan.

May import: the core modules (errors, utils, kmeans).
"""
