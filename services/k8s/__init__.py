"""Kubernetes: the KubeRay RayService rendered from the serving config, and apply/status/delete."""
