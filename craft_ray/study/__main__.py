"""``python -m craft_ray.study``: create a blinded reader study, issue reader tokens, serve it, compute results."""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
from pathlib import Path

from craft_ray.cli import Parser, run
from craft_ray.errors import UserError

DEFAULT_PORT = 8765  # away from Ray Serve's 8000, which the judges use
EPILOG = """examples:
  python -m craft_ray.study create cxr-pref --runs runs/evaluations/demo-sft runs/evaluations/demo-craft
  python -m craft_ray.study create cxr-3arm --runs RUN_ID_A RUN_ID_B --real --n-pairs 60 --per-label
  python -m craft_ray.study token cxr-pref --reader alice --reader bob
  python -m craft_ray.study serve cxr-pref --port 8765
  python -m craft_ray.study results cxr-pref
"""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def study_folder(name: str, root: str | None) -> Path:
    """``<root>/<name>`` (root defaults to ./studies); the name must be a plain folder name."""
    if not _NAME.match(name):
        raise UserError(f"study name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    return (Path(root) if root else Path.cwd() / "studies").absolute() / name


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    # No --print-config: a study is set up by its command-line options, not by the experiment config.
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m craft_ray.study", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="blinded reader study: create a study, issue reader tokens, serve it, compute results")
    _debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{create,token,serve,results}")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("name", metavar="NAME", nargs="?" if name == "create" else None, help="study name")
        p.add_argument("--dir", help="folder holding studies (default ./studies); the study is DIR/NAME")
        _debug_flag(p)
        return p

    create = command("create", "draw matched image pairs from evaluations into a new study")
    create.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for the real arm's dataset, e.g. data.n_test=64")
    create.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                        help="two or more evaluations (folders of craft_ray.evaluate or MLflow run ids)")
    create.add_argument("--real", action="store_true", help="add held-out real images of the same label as an arm")
    create.add_argument("--n-pairs", type=int, help="pairs to draw (default: every matched pair)")
    create.add_argument("--per-label", action="store_true", help="split --n-pairs evenly across labels")
    create.add_argument("--seed", type=int, default=0, help="seed of the draw, left/right order and reader orders")
    create.add_argument("--tracking-uri", help="MLflow tracking URI for run ids (default: the config's)")

    token = command("token", "issue reader tokens (each reader gets every pair, in their own order) or list readers")
    token.add_argument("--reader", action="append", default=[], metavar="READER", help="reader name (repeatable)")
    token.add_argument("--list", action="store_true", help="list readers and their progress")
    token.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}", help="server URL for the sign-in links")

    serve = command("serve", "serve the reader web app")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free port)")

    results = command("results", "win rates, sign tests, Bradley-Terry, kappa; results.md/.html/.json and MLflow")
    results.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    return parser


def _config(tracking_uri: str | None):
    from craft_ray.config import load_config

    return load_config(None, [f"tracking.tracking_uri={tracking_uri}"] if tracking_uri else [])


def _create(ns: argparse.Namespace) -> None:
    from craft_ray.study.create import create_study

    if ns.name is None:
        raise UserError("create needs the study NAME before --runs (which takes every argument after it): "
                        "create NAME --runs RUN_A RUN_B")
    for ref in ns.runs:
        if "=" in ref and not Path(ref).exists():
            raise UserError(f"--runs got {ref!r}, which looks like a key=value override; put overrides before --runs")
    folder = study_folder(ns.name, ns.dir)
    meta = create_study(folder, ns.name, ns.runs, real=ns.real, n_pairs=ns.n_pairs, per_label=ns.per_label,
                        seed=ns.seed, tracking_uri=_config(ns.tracking_uri).tracking.tracking_uri,
                        overrides=ns.overrides)
    print(f"study {ns.name!r}: {meta['n_pairs']} pairs of {meta['modality']} images from "
          f"{meta['matched_units']} matched (label, seed) units; arms: {', '.join(meta['arms'])}")
    print(f"folder: {folder}")
    print(f"next: python -m craft_ray.study token {ns.name} --reader NAME", flush=True)


def _token(ns: argparse.Namespace) -> None:
    from craft_ray.study.store import Store

    store = Store.open(study_folder(ns.name, ns.dir))
    if not ns.reader and not ns.list:
        raise UserError("token needs --reader NAME (to issue a token) or --list")
    for reader in ns.reader:
        token = store.add_reader(reader)
        print(f"{reader}\t{token}\t{ns.url.rstrip('/')}/?token={token}")
    if ns.reader:
        print("tokens are shown only now (the study keeps their hashes); hand each reader their own", file=sys.stderr)
    if ns.list:
        for r in store.readers():
            print(f"{r['name']}\t{r['answered']} / {r['total']} answered\tissued {r['created']}")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port right after a crash
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections queue from now on, so the printed URL works before uvicorn is up
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port, or 0 for a free one") from None
    return sock


def _serve(ns: argparse.Namespace) -> None:
    import uvicorn

    from craft_ray.study.app import create_app
    from craft_ray.study.store import Store

    folder = study_folder(ns.name, ns.dir)
    app = create_app(folder)
    sock = _bind(ns.host, ns.port)
    port = sock.getsockname()[1]
    shown = f"[{ns.host}]" if ":" in ns.host else ns.host
    try:
        loopback = ipaddress.ip_address(ns.host).is_loopback
    except ValueError:
        loopback = ns.host == "localhost"
    if not loopback:
        print(f"warning: listening on {ns.host}, reachable from other machines over plain HTTP; put it behind "
              "HTTPS (a reverse proxy) before readers send tokens over a network", file=sys.stderr)
    readers = Store(folder).readers()
    print(f"serving study {ns.name!r} ({len(readers)} readers) at http://{shown}:{port}/", flush=True)
    if not readers:
        print(f"no readers yet: python -m craft_ray.study token {ns.name} --reader NAME", flush=True)
    # No access log: sign-in URLs carry tokens.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


def _results(ns: argparse.Namespace) -> None:
    from craft_ray.study.results import log_mlflow, markdown, write_results
    from craft_ray.study.store import Store

    folder = study_folder(ns.name, ns.dir)
    res, paths = write_results(folder)
    meta = Store(folder).meta()
    print(markdown(meta, res))
    print(f"written: {paths['md']}, {paths['html']}, {paths['json']}")
    cfg = _config(ns.tracking_uri)
    run_id = log_mlflow(cfg, meta, res, paths)
    print(f"MLflow: {cfg.tracking.tracking_uri} run {run_id}", flush=True)


def main(argv: list[str]) -> int:
    """Dispatch to create / token / serve / results."""
    parser = _parser()
    ns, extra = parser.parse_known_args(argv)
    if ns.command == "create":  # argparse leaves overrides after an option unparsed; they are still overrides
        ns.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if x not in ns.overrides]
        if ns.overrides and not ns.real:
            raise UserError(f"overrides {' '.join(ns.overrides)} only choose the real arm's dataset; add --real")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    {"create": _create, "token": _token, "serve": _serve, "results": _results}[ns.command](ns)
    return 0


if __name__ == "__main__":
    run(main, sys.argv[1:])
