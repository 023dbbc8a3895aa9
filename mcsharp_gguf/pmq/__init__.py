"""PMQ: per-expert (and per-tensor) bit budgets.

budget (presets: llama-quantize's types) → measure (eps, sensitivity) → importance → plan (the MILP over the
candidates) → report.
"""
