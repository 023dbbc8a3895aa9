"""The model side of a conversion.

checkpoint: a HF checkpoint directory on disk (validation, weight count); stream: the layer-streamed forward every
pass runs and what each MoE block saw; calibration: calibration token ids; names: every checkpoint / GGUF tensor
name. The per-architecture adapters are ``mcsharp_gguf.converters``.
"""
