"""Helpers every stage package may import (stage packages never import each other).

Only torch and the standard library live below this package, so importing it from
``planner``, ``dit_worker``, ``vae_worker``, ``services`` or ``bench`` adds no dependency edge.
"""
