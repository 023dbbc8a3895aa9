"""Development tools, off the conversion and runtime paths.

fixture: the embedded real MoE fixture (SmolLM2-135M upcycled to Qwen2-MoE); routing: how a checkpoint routes text
(how peaked, how evenly its experts are used); tiny_models: tiny random models of every supported architecture;
scale: random checkpoints with real models' layer shapes.
"""
