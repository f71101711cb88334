"""Structured outputs: grammars compiled once per distinct constraint, token masks per step.

`grammars.GrammarCache` compiles (llguidance, imported only here) and `masks.StepMasks` fills
one step's masks for every constrained row at once. Nothing here is imported by `import
batchllm` or the planner.
"""
