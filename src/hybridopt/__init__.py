"""hybridopt: distil a language model into a tiny low-bit Llama student."""

__version__ = "0.1.0"
