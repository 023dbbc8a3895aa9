"""Quantisation of the weights.

gptq: GPTQ on a ggml grid; experts: one expert / one layer's experts; dense: the non-expert linears and their
types; sequential: the layer-streamed pass over the whole model into a resumable work dir.
"""
