"""mmbench2-lab: a workbench for hallucination in generative world models (MMBench2).

Rooms: ``config`` (presets), ``tasks`` (the 210 tasks), ``envs`` (live simulators), ``data`` (raw layout,
shards, windows, hub), ``model`` (tokenizer, dynamics, heads), ``sampler``, ``checkpoints``,
``predictors``, ``calibration``, ``training``, ``session`` (interactive rollouts).
"""
__version__ = "0.1.0"
