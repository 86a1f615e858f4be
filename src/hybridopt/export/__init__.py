"""Leaving hybridopt: the packed safetensors format (`packed`: writer and verified loader) and GGUF for
llama.cpp (`gguf`: writer, codecs, reader for GGUF teachers, the llama.cpp runner).

May import: the core modules and quant.
"""
