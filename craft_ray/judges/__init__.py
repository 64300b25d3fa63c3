"""The judges on Ray Serve: prompt enricher, checklist builder and checklist judge behind one HTTP ingress.

- :mod:`craft_ray.judges.app`: the Serve application (``serve run deployments/judges.yaml``) and its API.
- :mod:`craft_ray.judges.deployments`: the three model deployments, each holding an LLM engine.
- :mod:`craft_ray.judges.schemas`: request/response models, limits, image decoding.
- :mod:`craft_ray.judges.client`: HTTP and DeploymentHandle clients (``p_yes`` plugs into CAS).

``python -m craft_ray.serve`` starts the app on a local Ray cluster.
"""
