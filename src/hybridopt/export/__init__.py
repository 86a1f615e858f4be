"""Leaving hybridopt: the packed safetensors format (`packed`: writer and verified loader) and GGUF for
llama.cpp (`gguf`: the writer; `gguf_codecs`: llama.cpp's block types, encoded exactly and decoded; `gguf_read`:
a GGUF file as a teacher; `llama_cpp`: running a GGUF with llama.cpp).

May import: the core modules and quant.
"""
