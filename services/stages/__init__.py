"""Stage services: each wraps one stage engine behind the handoff types.

They hold no Ray code: the Ray Serve deployments in ``services.apps`` wrap them, and the
in-process pipeline (``services.local``) calls them directly, so both paths run the same code.
"""
