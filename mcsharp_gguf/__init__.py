"""mcsharp-gguf: MC# compression (PMQ + OTP) for Mixture-of-Experts LLMs, written as GGUF for llama.cpp."""

__version__ = "0.1.0"
