"""lowbit: extreme low-bit (2/3/4-bit) post-training quantization of LLMs."""

__version__ = "0.1.0"
