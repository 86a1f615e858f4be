"""Models: teacher loading (Hugging Face folders and GGUF files), student construction, parameter groups, and
tokenizers (byte-level BPE training and loading).

May import: the core modules, quant, export (to read a GGUF teacher) and the run configs.
"""
