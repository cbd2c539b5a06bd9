"""Serving layer: the only code that knows Ray. Deployments, orchestrators, ingress, config, CLI."""
