"""Ray Serve applications: one per stage and model (``<model>-planner|dit|vae``) and the
pipeline ingress (``mammoth``). Each module exposes ``app(args) -> Application``, the builder
that ``services.render`` names in the rendered Serve config."""
