"""Running a GGUF on the patched llama.cpp through llama-cpp-python.

llama: load a model and read logits; prune: the expert-pruning knobs; evaluate: perplexity / KLD; bench: speed;
chat: the chat template.
"""
