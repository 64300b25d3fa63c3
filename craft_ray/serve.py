"""``python -m craft_ray.serve [CONFIG.yaml] [key=value ...]``: start the judges on Ray Serve, print the URL.

Connects to the Ray cluster named by ``ray.address`` (or a running local one), else starts a local
instance, deploys the judges app (``judges.*``) and blocks until Ctrl-C, which shuts Serve down. The
same app starts from Serve's own CLI with ``serve run deployments/judges.yaml``.
"""

from __future__ import annotations

import os
import sys
import time

from craft_ray.cli import config_parser, resolve, run
from craft_ray.errors import UserError

EPILOG = """examples:
  python -m craft_ray.serve                                   # the tiny judge on 127.0.0.1:8000
  python -m craft_ray.serve judges.port=8001 judges.max_batch_size=32
  CRAFT_JUDGES_TOKEN=secret python -m craft_ray.serve judges.host=0.0.0.0   # require a bearer token
  python -m craft_ray.serve judges.engine.kind=openai judges.engine.base_url=http://127.0.0.1:8000/v1 \\
      judges.engine.model=qwen2.5-vl-7b judges.port=8001     # judges over a vLLM server
"""


def main(argv: list[str]) -> int:
    """Entry point; returns the exit code."""
    parser = config_parser("serve", "Start the judges (enricher, checklist builder, checklist judge) on Ray Serve.",
                           EPILOG)
    cfg = resolve(parser.parse_args(argv))
    import ray
    from ray import serve

    from craft_ray.judges.app import application
    from craft_ray.judges.client import base_url

    j = cfg.judges
    app = application(cfg)  # checks the model before Ray starts
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 runtime_env={"env_vars": env})
    serve.start(http_options={"host": j.host, "port": int(j.port)})
    try:
        serve.run(app, name=j.app_name, route_prefix=j.route_prefix)
    except RuntimeError as exc:
        serve.shutdown()
        raise UserError(f"the judges app failed to start: {' '.join(str(exc).split())[:800]}") from exc
    url = base_url(j)
    auth = f"bearer token from ${j.token_env}" if os.environ.get(j.token_env) else "no auth"
    print(f"judges ready at {url} (model {j.engine.model}, engine {j.engine.kind}, {auth}); Ctrl-C stops them")
    print(f"  curl {url}/v1/health", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down the judges", file=sys.stderr)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    run(main)
