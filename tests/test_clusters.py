"""Cluster configs: the launcher YAMLs pass Ray's own validation, the KubeRay manifests name real modules,
files and import paths, and the RayService's Serve config is generated from deployments/llm-vllm.yaml."""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import json
import runpy
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from craft_ray.config import load_config
from craft_ray.sweep import base_config, load_spec

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
KUBERAY = CLUSTERS / "kuberay"
LAUNCHER = {"aws": CLUSTERS / "aws.yaml", "gcp": CLUSTERS / "gcp.yaml"}
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
KINDS = {"RayCluster", "RayJob", "RayService"}
RAY_MAJOR_MINOR = ".".join(ray.__version__.split(".")[:2])
GENERATE = runpy.run_path(str(KUBERAY / "generate.py"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d is not None]


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return spec if key is None else spec[key]


def _entrypoint(name: str) -> list[str]:
    return shlex.split(_load(KUBERAY / name)["spec"]["entrypoint"])


# ------------------------------------------------------------------------------------------- launcher


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_passes_ray_validation(cloud):
    raw = _load(LAUNCHER[cloud])
    validate_config(raw)  # the file as written (it carries cluster_synced_files, so no defaults are needed)
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating; offline for aws/gcp
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud
    assert prepared["available_node_types"]["head"]["max_workers"] == 0  # filled in by prepare_config


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_node_types(cloud):
    cfg = _load(LAUNCHER[cloud])
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["train_gpu"]["resources"]["GPU"] == 8 and types["train_gpu"]["resources"]["train_node"] == 8
    assert types["judge_gpu"]["resources"]["GPU"] == 1 and types["judge_gpu"]["resources"]["judge_node"] == 1
    instance = {"aws": ("InstanceType", "p5.48xlarge", "g6.2xlarge"),
                "gcp": ("machineType", "a3-highgpu-8g", "g2-standard-8")}
    key, train, judge = instance[cloud]
    assert types["train_gpu"]["node_config"][key] == train and types["judge_gpu"]["node_config"][key] == judge
    assert cfg["max_workers"] == sum(t.get("max_workers", 0) for t in types.values()) == 4
    assert all(t.get("min_workers", 0) == 0 for t in types.values())  # GPU nodes scale to zero


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_installs_the_project_on_the_installed_ray(cloud):
    cfg = _load(LAUNCHER[cloud])
    image = cfg["docker"]["image"]
    repo, tag = image.split(":")
    assert repo == "rayproject/ray" and tag.endswith("-gpu")
    assert ".".join(tag.split("-")[0].split(".")[:2]) == RAY_MAJOR_MINOR
    assert cfg["docker"]["container_name"] and cfg["docker"]["pull_before_run"] is True
    assert cfg["file_mounts"]["~/craft_ray"] == "."
    setup = " && ".join(cfg["setup_commands"])
    assert "cd ~/craft_ray" in setup and "pip install -e '.[vllm]'" in setup
    assert f"'ray[llm]=={tag.split('-')[0]}'" in setup  # pip cannot move Ray off the image's version
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_workers_can_write_shared_storage():
    aws = _load(LAUNCHER["aws"])["available_node_types"]
    gcp = _load(LAUNCHER["gcp"])["available_node_types"]
    for t in ("train_gpu", "judge_gpu"):
        arn = aws[t]["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.endswith(":instance-profile/ray-autoscaler-v1")
        assert gcp[t]["node_config"]["serviceAccounts"][0]["email"].startswith("ray-autoscaler-sa-v1@")
    assert "s3://BUCKET/craft_ray" in LAUNCHER["aws"].read_text()
    assert "gs://BUCKET/craft_ray" in LAUNCHER["gcp"].read_text()


# -------------------------------------------------------------------------------------------- KubeRay


def test_manifests_are_ray_io_v1_of_known_kinds():
    docs = _docs()
    assert sorted(name for name, _ in docs) == [
        "raycluster.yaml", "rayjob-sweep.yaml", "rayjob-train.yaml", "rayservice-judges.yaml"]
    for name, doc in docs:
        assert doc["apiVersion"] == "ray.io/v1", name
        assert doc["kind"] in KINDS, name
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, name
        assert spec["authOptions"] == {"mode": "token"}, name
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name  # nothing scheduled on the head


def _containers(spec: dict) -> list[tuple[dict, dict]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_gpu_requests_match_ray_start_params():
    for name, doc in _docs():
        for group, container in _containers(_cluster_spec(doc)):
            res = container["resources"]
            gpus = res["limits"].get("nvidia.com/gpu")
            assert res["limits"] == res["requests"], (name, group.get("groupName"))
            if "num-gpus" in group["rayStartParams"] or gpus is not None:
                assert group["rayStartParams"]["num-gpus"] == gpus, (name, group.get("groupName"))
            assert container["image"].endswith(f":ray{ray.__version__}-py311-gpu"), name


def test_custom_resources_mark_the_worker_groups():
    for name, doc in _docs():
        for group in _cluster_spec(doc).get("workerGroupSpecs", []):
            # KubeRay passes the value to `ray start --resources` as a quoted JSON string
            custom = json.loads(json.loads(group["rayStartParams"]["resources"]))
            expected = {"train-gpu": {"train_node": 8}, "judge-gpu": {"judge_node": 1}}[group["groupName"]]
            assert custom == expected, name
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name


def test_rayjob_clusters_copy_the_raycluster():
    cluster = _load(KUBERAY / "raycluster.yaml")["spec"]
    train = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "train-gpu")
    for name in ("rayjob-train.yaml", "rayjob-sweep.yaml"):
        job = _load(KUBERAY / name)["spec"]
        assert job["shutdownAfterJobFinishes"] is True
        assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == "/home/ray/craft_ray"
        spec = job["rayClusterSpec"]
        assert spec["headGroupSpec"] == cluster["headGroupSpec"], name
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["train-gpu"], name
        for key in ("rayStartParams", "template"):
            assert spec["workerGroupSpecs"][0][key] == train[key], (name, key)


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-sweep.yaml"])
def test_rayjob_entrypoint_runs_an_existing_module(name):
    argv = _entrypoint(name)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("craft_ray.")
    assert importlib.util.find_spec(argv[2]) is not None
    for arg in argv[3:]:
        if "=" not in arg and arg.endswith((".yaml", ".yml")):
            assert (REPO / arg).is_file(), f"{name} names {arg}, which is not in the repository"


def test_rayjob_train_overrides_are_valid_config():
    argv = _entrypoint("rayjob-train.yaml")
    cfg = load_config(None, argv[3:])  # unknown keys or bad values raise UserError
    assert cfg.profile == "sd" and cfg.train.num_workers == 8 and cfg.train.use_gpu is True
    assert dict(cfg.train.worker_resources) == {"train_node": 1.0}
    assert cfg.ray.storage_path == "/mnt/shared/ray_results"
    assert cfg.judges.url == "http://craft-judges-serve-svc:8000"  # the RayService's Serve Service


def test_rayjob_sweep_spec_and_base_config_are_valid():
    argv = _entrypoint("rayjob-sweep.yaml")
    assert argv[3] == "sweeps/cas_weights_gpu.yaml"
    spec = load_spec(REPO / argv[3], argv[4:])
    shipped = load_spec(REPO / argv[3])
    assert spec.modalities == ["cxr"] and spec.dir == "/mnt/shared/sweeps_out"
    assert set(shipped.base_overrides) <= set(spec.base_overrides)  # the spec's own overrides, repeated
    cfg = base_config(spec, "cxr")
    assert cfg.train.num_workers == 1 and dict(cfg.train.worker_resources) == {"train_node": 1.0}
    assert cfg.judges.url == "http://craft-judges-serve-svc:8000"


# -------------------------------------------------------------------------------------- RayService


def test_rayservice_is_the_generated_file():
    assert (KUBERAY / "rayservice-judges.yaml").read_text() == GENERATE["render"](), (
        "clusters/kuberay/rayservice-judges.yaml is stale: run python clusters/kuberay/generate.py")


def _diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def test_rayservice_serve_config_is_the_deployment_file_with_the_documented_changes():
    service = _load(KUBERAY / "rayservice-judges.yaml")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = _load(REPO / "deployments" / "llm-vllm.yaml")
    assert _diff(local, serve) == [
        (".applications[0].args.llm_configs[0].accelerator_type", None, "L4"),
        (".http_options.host", "127.0.0.1", "0.0.0.0"),
        (".proxy_location", "HeadOnly", "EveryNode"),
    ]
    assert [g["groupName"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["judge-gpu"]


def _import_paths() -> list[str]:
    serve = yaml.safe_load(_load(KUBERAY / "rayservice-judges.yaml")["spec"]["serveConfigV2"])
    return [app["import_path"] for app in serve["applications"]]


def test_import_paths_are_defined_in_their_modules():
    """Static check (no import): the module exists and defines or imports the attribute."""
    assert _import_paths() == ["ray.serve.llm:build_openai_app", "craft_ray.judges.app:build_app"]
    for path in _import_paths():
        module, attr = path.split(":")
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, path
        tree = ast.parse(Path(spec.origin).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert attr in names, path


@pytest.mark.parametrize("path", ["craft_ray.judges.app:build_app", "ray.serve.llm:build_openai_app"])
def test_import_paths_resolve(path):
    module, attr = path.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if module == "ray.serve.llm" and "vLLM" in str(exc):
            pytest.skip("ray.serve.llm needs vLLM (pip install 'ray[llm]'), not part of the CPU install")
        raise
    assert callable(getattr(mod, attr))
