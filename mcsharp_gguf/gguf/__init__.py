"""GGUF files.

convert: HF checkpoint → GGUF through the pinned llama.cpp converter; pack: the converter hooks that write the
planned tensors; edit: rewrite a GGUF with keys/tensors added or removed; inspect: what a GGUF holds.
"""
