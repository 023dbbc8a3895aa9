"""OTP: a tiny learned router per MoE layer that drops some of the top-k expert slots of each token.

capture: training data; router: the router and the runtime's keep rule; train: layer-wise training and the whole
stage; refine: end-to-end KL refinement; io: the router file and the GGUF tensors/keys.
"""
