"""Experiment configuration: OmegaConf structured dataclasses, profiles and overrides.

Precedence (lowest first): dataclass defaults < profile YAML (``craft_ray/profiles/<name>.yaml``)
< experiment YAML < ``key=value`` overrides. The profile is chosen by the ``profile`` key of the
experiment file or of an override (``profile=sd``). Every field is documented once, here, with
its unit. Relative paths are resolved against the working directory by :func:`load_config`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    GrammarParseError,
    OmegaConfBaseException,
    ValidationError,
)

from craft_ray.errors import UserError
from craft_ray.modalities import MODALITY_NAMES

PROFILES_DIR = Path(__file__).parent / "profiles"
PACKAGE_ROOT = Path(__file__).resolve().parent


@dataclass
class DataConfig:
    source: str = "phantom"  # phantom (generated on the fly, cached) | manifest (real data via a CSV)
    dataset: str = "phantom"  # label set inside the modality: phantom | chexpert | ham10000 | ...
    manifest: str | None = None  # path to manifest.csv (path,label[,split]); required when source=manifest
    size: int = 64  # image side in pixels (square)
    n_train: int = 512  # phantom: images generated per split (train)
    n_val: int = 128  # phantom: images in the validation split
    n_test: int = 256  # phantom: held-out real images (CAS threshold, audits)
    phantom_seed: int = 0  # phantom: seed of the generated dataset
    cache_dir: str = "${cwd:}/.craft_cache/data"  # where generated phantom datasets are written once and reused
    corrupt_images: str = "fail"  # fail | skip (with a counted warning) when an image cannot be decoded
    loader_workers: int = 0  # torch DataLoader worker processes per training worker


@dataclass
class LoraConfig:
    rank: int = 4  # LoRA rank r
    alpha: int = 4  # LoRA alpha (scale = alpha / rank)
    dropout: float = 0.0  # LoRA dropout probability
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class EvaluatorConfig:
    model: str = "local-dir:${tiny_world}/evaluator_vit"  # open_clip id: local-dir:PATH | hf-hub:ORG/NAME | architecture name
    pretrained: str | None = None  # open_clip pretrained tag or weights file for a named architecture
    family: str = "vit"  # architecture family, checked to differ between training and out-of-family evaluators


@dataclass
class ModelConfig:
    pretrained: str = "${tiny_world}/diffusion"  # diffusers pipeline folder or hub id (Stable Diffusion family)
    revision: str | None = None  # hub revision (branch, tag or commit) for hub ids
    resolution: int = 64  # generated image side in pixels
    lora: LoraConfig = field(default_factory=LoraConfig)
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast; GPU only)
    gradient_checkpointing: bool = True  # recompute UNet/VAE activations in the backward pass
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)  # training evaluator (reward)
    ood_evaluator: EvaluatorConfig = field(
        default_factory=lambda: EvaluatorConfig(model="local-dir:${tiny_world}/evaluator_conv", family="convnet")
    )  # out-of-family evaluator: audits and sweep objectives, never the reward


@dataclass
class KnowledgeConfig:
    path: str | None = None  # knowledge YAML; null = the shipped file for (modality, data.dataset)
    online_enrichment: bool = False  # ask the enricher for extra prompts at training start
    n_enriched: int = 4  # online enrichment: prompts requested per label


@dataclass
class EngineConfig:
    kind: str = "transformers"  # transformers | openai | vllm
    model: str = "${tiny_world}/judge"  # HF folder/hub id (transformers, vllm) or served model name (openai)
    base_url: str | None = None  # openai engine: http://host:port/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai engine: environment variable holding the API key
    timeout_s: float = 60.0  # openai engine: per-request timeout in seconds
    max_retries: int = 3  # openai engine: retries with exponential backoff
    max_new_tokens: int = 256  # generation budget in tokens
    temperature: float = 0.0  # sampling temperature (0 = greedy)
    dtype: str = "auto"  # transformers/vllm weights dtype: auto | float32 | bfloat16 | float16
    device: str = "auto"  # transformers: auto | cpu | cuda
    gpu_memory_utilization: float = 0.85  # vllm: fraction of GPU memory for weights + KV cache
    max_model_len: int = 4096  # vllm: context length in tokens
    batch_size: int = 16  # transformers: (image, question) pairs per forward pass in p_yes
    top_logprobs: int = 20  # openai/vllm: alternatives of the first token read for P(yes)
    concurrency: int = 8  # openai: p_yes requests in flight


@dataclass
class JudgesConfig:
    app_name: str = "craft_judges"  # Ray Serve application name
    url: str | None = None  # judges HTTP base URL; null = http://{host}:{port}
    host: str = "127.0.0.1"  # bind address of the Serve HTTP proxy
    port: int = 8000  # Serve HTTP port
    route_prefix: str = "/"  # Serve route prefix of the ingress
    token_env: str = "CRAFT_JUDGES_TOKEN"  # env var holding the bearer token; unset = no auth
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_batch_size: int = 16  # ChecklistJudge @serve.batch maximum batch size (images x items)
    batch_wait_timeout_s: float = 0.02  # @serve.batch wait for a fuller batch, seconds
    num_replicas: int = 1  # replicas per deployment
    # The enricher and the checklist builder (knowledge builds, online enrichment; never an evaluation) start on
    # their first request, a cold start of seconds on CPU with tiny models, and stop after generators_idle_s
    # without one. false: they start with the app, as the judge does
    generators_on_demand: bool = False
    generators_idle_s: float = 600.0
    replica_cpus: float = 0.25  # CPUs reserved per replica (fractional on small machines)
    replica_gpus: float = 0.0  # GPUs reserved per replica
    max_ongoing_requests: int = 64  # per replica; beyond max_queued_requests the server answers 503
    max_queued_requests: int = 256  # per deployment handle queue before 503
    max_request_bytes: int = 16_000_000  # request body limit in bytes (413 above)
    max_image_pixels: int = 4_194_304  # per decoded image (413 above)
    max_images: int = 64  # images per /v1/judge request (413 above)
    request_timeout_s: float = 30.0  # client: per-request timeout in seconds
    client_retries: int = 4  # client: retries with exponential backoff on connection errors and 5xx


@dataclass
class CASWeights:
    label: float = 0.25  # pathology fidelity
    checklist: float = 0.25  # clinical checklist satisfaction
    modality: float = 0.25  # modality/anatomy consistency
    realism: float = 0.25  # in-distribution plausibility


@dataclass
class CASConfig:
    weights: CASWeights = field(default_factory=CASWeights)  # evaluation weights (simplex), fixed across runs
    q: float = 0.10  # quantile of real-image CAS that defines the tail threshold tau_q
    realism_k: int = 5  # realism: nearest real neighbours averaged
    use_judge: bool = True  # evaluation: also compute the MLLM checklist twin via the judges
    judge_gating: bool = True  # DSG-style gating: a child item counts 0 when its parent is answered no
    bootstrap: int = 1000  # bootstrap resamples for 95 % confidence intervals


@dataclass
class RewardConfig:
    weights: CASWeights = field(default_factory=CASWeights)  # reward weights (simplex) of the CAS dimensions
    beta: float = 0.5  # weight of the diffusion loss on a real batch (anti reward hacking)
    form: str = "cas"  # cas: sum_i w_i dim_i (the CAS itself); log: sum_i w_i log(dim_i + 1e-4)
    shifts: int = 0  # score this many randomly shifted copies of each image and average (0 = the image as is)
    max_shift: float = 0.0625  # largest shift of a copy, as a fraction of the image side (reflect-padded)
    grad_sigma: float = 0.0  # blur the reward's image gradient by a Gaussian of this many pixels (0 = off)
    draft_weight: float = 1.0  # weight of DRaFT-K's -reward term (0 = off: the preference term and the anchor only)
    # Reward-ranked preference term (online Diffusion-DPO): each micro-step samples `preference_candidates`
    # images for each of `preference_prompts` prompts with the LoRA being trained, ranks them by the reward, and
    # trains the LoRA to prefer the better of each pair (`preference_pairs`), relative to the LoRA CRAFT started from.
    preference_weight: float = 0.0  # weight of the preference term (0 = off)
    preference_prompts: int = 0  # prompts per micro-step (0 = train.batch_size)
    preference_candidates: int = 4  # samples per prompt ranked by the reward (>= 2)
    preference_pairs: str = "extremes"  # extremes: the best against the worst; all: every two candidates of a prompt
    preference_timesteps: int = 1  # noise levels each pair is scored at (more: a less noisy gradient, same samples)
    preference_beta: float = 5000.0  # Diffusion-DPO's beta: larger keeps the LoRA closer to the SFT LoRA


@dataclass
class SamplingConfig:
    num_steps: int = 10  # DDIM steps T
    guidance_scale: float = 7.5  # classifier-free guidance scale
    # model: the model's scheduler config; leading (SD) ends at t=1; trailing ends at t=1000/num_steps-1
    timestep_spacing: str = "model"
    eta: float = 0.0  # DDIM eta (0 = deterministic)
    k: int = 1  # DRaFT-K: backpropagate through the last K steps
    k_range: list[int] | None = None  # AlignProp: draw K uniformly from [lo, hi] per batch; null = fixed k
    draft_lv: bool = False  # DRaFT-LV: extra low-variance reward gradient samples at the last step
    draft_lv_n: int = 2  # DRaFT-LV: number of re-noised samples


@dataclass
class TrainConfig:
    num_workers: int = 1  # Ray Train workers (DDP ranks); 0 = run the loop in the driver's process
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 0.5  # CPUs reserved per Train worker (fractional on small machines)
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker, e.g. {train_node: 1}
    batch_size: int = 8  # images per step (per worker!)
    grad_accum: int = 1  # gradient accumulation steps
    sft_steps: int = 200  # optimizer steps of the SFT stage
    craft_steps: int = 60  # optimizer steps of the CRAFT stage
    sft_lr: float = 1e-3  # AdamW learning rate, SFT
    craft_lr: float = 3e-4  # AdamW learning rate, CRAFT
    init_lora: str | None = None  # CRAFT: SFT LoRA file/folder to start from; null = this run's own SFT stage
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0
    max_grad_norm: float = 1.0  # gradient clipping (L2 norm)
    eval_every: int = 20  # steps between periodic evaluations
    sft_eval_every: int | None = None  # steps between the SFT stage's periodic evaluations; null = eval_every
    eval_images_per_label: int = 16  # periodic evaluation: images per label (fixed seed set)
    final_images_per_label: int = 64  # final SFT-vs-CRAFT evaluation: images per label (another fixed seed set)
    # Ray actors of the final SFT-vs-CRAFT evaluation (stage=all), which split each LoRA's labels between them.
    # On CPU they start with the run (the first prepares the thresholds), with GPUs at SFT's end:
    # sft_eval_workers of them evaluate the SFT LoRA beside the CRAFT loop (one leaves the other cores to
    # training), all of them the CRAFT LoRA after CRAFT
    final_eval_workers: int = 1
    sft_eval_workers: int = 1
    final_eval_cpus: float | None = None  # CPUs per final-evaluation actor (null = cpus_per_worker)
    log_every: int = 10  # steps between progress lines and MLflow metric logs
    checkpoint_every: int = 20  # steps between checkpoints
    keep_checkpoints: int = 2  # CheckpointConfig.num_to_keep
    max_failures: int = 1  # FailureConfig.max_failures (worker restarts from the last checkpoint)
    hacking_patience: int = 3  # evaluations of training CAS up while a watched out-of-family score falls, before acting
    # out-of-family scores the hacking guard watches: cas and/or the CAS dimensions label, checklist, modality, realism
    hacking_watch: list[str] = field(default_factory=lambda: ["cas", "realism"])
    hacking_action: str = "warn"  # warn | stop | rollback (to the best checkpoint under out-of-family CAS)
    torch_threads: int = 1  # torch intra-op threads per worker process
    # Python threads that share no-grad DDIM sampling (CRAFT's candidates, rank 0's periodic evaluation),
    # each a part of the batch: on CPU with torch_threads=1, 2 puts a second core to work
    sample_threads: int = 1


@dataclass
class EvaluationConfig:
    images_per_label: int = 64  # generated images per label (python -m craft_ray.evaluate)
    seed_offset: int = 1_000_000  # first seed of the fixed seed set (= the final SFT-vs-CRAFT evaluation's)
    num_workers: int = 1  # Ray actors that generate and score; each loads the generator and evaluators once
    cpus_per_worker: float = 1.0  # CPUs reserved per evaluation actor (fractional on small machines)
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per actor, e.g. {eval_node: 1}
    use_gpu: bool = False  # one GPU per evaluation actor
    batch_size: int = 16  # images per generation / scoring call (one progress-bar tick)
    start_timeout_s: float = 600.0  # seconds to wait for the actors to be placed and load their models
    embedding: str = "ood"  # evaluator whose image embeddings memorization, FD and precision/recall use: train | ood
    memorization_threshold: float = 0.95  # cosine to the nearest real training image at or above which an image is a copy
    save_images: bool = True  # keep the generated images (PNG + images.csv) in the output folder and MLflow
    top_pairs: int = 8  # memorization: most similar (generated, real) pairs shown in the report
    pr_k: int = 5  # k of the k-NN manifolds behind precision / recall / density / coverage
    classifier_epochs: int = 15  # downstream classifier: training epochs
    classifier_lr: float = 2.0e-3  # downstream classifier: AdamW learning rate
    classifier_batch_size: int = 32  # downstream classifier: images per step


@dataclass
class SweepConfig:
    spec: str | None = None  # sweep spec YAML (see sweeps/cas_weights.yaml)


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///${cwd:}/mlflow.db"  # MLflow tracking URI (absolute sqlite:/// or http://)
    experiment: str = "craft_ray"  # MLflow experiment name
    artifact_location: str | None = None  # artifact root for a new experiment; null = MLflow's default


@dataclass
class RayConfig:
    address: str | None = None  # null = connect to a running cluster if any, else start a local one
    num_cpus: int | None = None  # local Ray only: CPUs to register (null = all)
    object_store_memory: int = 1_000_000_000  # local Ray only: object store size in bytes
    storage_path: str = "${cwd:}/ray_results"  # Ray Train/Tune storage (local path, s3:// or gs://)


@dataclass
class ExperimentConfig:
    profile: str = "tiny"  # profile YAML applied over these defaults: tiny | sd
    name: str = "craft-${modality}"  # run name; rerunning with the same name resumes
    modality: str = "cxr"  # cxr | derm | fundus | histo
    stage: str = "all"  # sft | craft | all (sft, then craft, then evaluation of both)
    seed: int = 0  # global seed (model init, sampling, data order)
    output_dir: str = "${cwd:}/runs"  # local outputs (grids, tables, LoRA files)
    tiny_world: str = "${pkg:}/tiny_world"  # folder of the shipped tiny models (python -m craft_ray.bootstrap)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    judges: JudgesConfig = field(default_factory=JudgesConfig)
    cas: CASConfig = field(default_factory=CASConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# Paths a user may give relative to the working directory; made absolute so Ray workers agree.
PATH_KEYS: tuple[str, ...] = ("data.manifest", "data.cache_dir", "knowledge.path", "output_dir", "train.init_lora")

# Values checked after merging; OmegaConf checks keys and types, these check choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "modality": MODALITY_NAMES,
    "stage": ("sft", "craft", "all"),
    "data.source": ("phantom", "manifest"),
    "data.corrupt_images": ("fail", "skip"),
    "model.mixed_precision": ("no", "fp16", "bf16"),
    "judges.engine.kind": ("transformers", "openai", "vllm"),
    "train.hacking_action": ("warn", "stop", "rollback"),
    "reward.form": ("cas", "log"),
    "sampling.timestep_spacing": ("model", "leading", "trailing", "linspace"),
    "evaluation.embedding": ("train", "ood"),
}


def profile_names() -> list[str]:
    """Names of the shipped profiles (YAML files in craft_ray/profiles)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _register_resolvers() -> None:
    # ${cwd:} is the working directory at load time, ${pkg:} the installed craft_ray package folder.
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_resolver("cwd", _cwd)
    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_resolver("pkg", _pkg)


def _cwd() -> str:
    return os.getcwd()


def _pkg() -> str:
    return str(PACKAGE_ROOT)


def _read_yaml(path: Path, what: str) -> DictConfig:
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} not found (no such file); pass an existing YAML file")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: report the parser's line, not a traceback
        raise UserError(f"{what} {str(path)!r} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{what} {str(path)!r} must hold a mapping of config keys, got a {type(loaded).__name__}")
    return loaded


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"malformed override {item!r}; expected key=value, e.g. train.sft_steps=100")
    try:
        return OmegaConf.from_dotlist(overrides)
    except (GrammarParseError, OmegaConfBaseException, ValueError) as exc:
        raise UserError(f"malformed override in {overrides}: {' '.join(str(exc).split())}") from exc


def _known_keys(node: Any) -> list[str]:
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _merge_error(exc: OmegaConfBaseException, schema: DictConfig, source: str) -> UserError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(schema, parent) if parent else schema
        where = f" in section '{parent}'" if parent else ""
        return UserError(
            f"unknown config key '{key}' (from {source}){where}; known: {', '.join(_known_keys(node))}"
        )
    if isinstance(exc, (ValidationError, ConfigTypeError)):
        expected = OmegaConf.select(schema, key, throw_on_missing=False) if key != "?" else None
        want = type(expected).__name__ if expected is not None else "the declared type"
        msg = str(exc).splitlines()[0]
        return UserError(f"wrong type for config key '{key}' (from {source}): {msg}; expected {want}")
    return UserError(f"bad config value for '{key}' (from {source}): {str(exc).splitlines()[0]}")


# List values checked after merging: each item must be one of these, and the list must not be empty.
LIST_CHOICES: dict[str, tuple[str, ...]] = {
    "train.hacking_watch": ("cas", "label", "checklist", "modality", "realism"),
}


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise UserError(f"bad value {value!r} for config key '{key}'; valid choices: {', '.join(allowed)}")
    for key, allowed in LIST_CHOICES.items():
        values = list(OmegaConf.select(cfg, key))
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise UserError(f"bad value {values!r} for config key '{key}': a non-empty list of "
                            f"{', '.join(allowed)}")


def load_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    schema: type = ExperimentConfig,
) -> DictConfig:
    """Merge defaults < profile < experiment YAML < overrides into a typed, resolved config."""
    _register_resolvers()
    overrides = list(overrides or [])
    base = OmegaConf.structured(schema)
    layers: list[tuple[str, DictConfig]] = []
    if config_file is not None:
        layers.append((f"config file {config_file}", _read_yaml(Path(config_file), "config file")))
    layers.append(("overrides", _parse_overrides(overrides)))

    # The profile can be named by the experiment file or an override; the last one wins.
    profile = base.profile if "profile" in base else None
    for _, layer in layers:
        if "profile" in layer:
            profile = layer.profile
    if profile is not None:
        if profile not in profile_names():
            raise UserError(f"unknown profile {profile!r}; known: {', '.join(profile_names())}")
        layers.insert(0, (f"profile {profile}", _read_yaml(PROFILES_DIR / f"{profile}.yaml", "profile")))

    cfg = base
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _merge_error(exc, base, source) from exc
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise UserError(f"cannot resolve config: {str(exc).splitlines()[0]}") from exc
    if schema is ExperimentConfig:
        _check_choices(cfg)
        for key in PATH_KEYS:
            value = OmegaConf.select(cfg, key)
            if isinstance(value, str) and "://" not in value and not os.path.isabs(value):
                OmegaConf.update(cfg, key, os.path.abspath(value))
    OmegaConf.set_readonly(cfg, False)
    return cfg


# ----------------------------------------------------------------------------------------------- checks
# Pure checks of a config, here so that a driver can refuse a config before importing torch.


def check_craft_objective(reward: DictConfig) -> None:
    """Refuse CRAFT objective settings that cannot train (``cfg.reward``)."""
    if float(reward.draft_weight) < 0 or float(reward.preference_weight) < 0:
        raise UserError(f"reward.draft_weight and reward.preference_weight must be >= 0, got "
                        f"{reward.draft_weight} and {reward.preference_weight}")
    if float(reward.draft_weight) == 0 and float(reward.preference_weight) == 0:
        raise UserError("reward.draft_weight and reward.preference_weight are both 0: nothing would reward the model")
    if str(reward.preference_pairs) not in ("extremes", "all"):
        raise UserError(f"reward.preference_pairs must be extremes or all, got {reward.preference_pairs!r}")
    if (int(reward.preference_candidates) < 2 or float(reward.preference_beta) <= 0
            or int(reward.preference_prompts) < 0 or int(reward.preference_timesteps) < 1):
        raise UserError(f"reward.preference_candidates must be >= 2, reward.preference_beta > 0, "
                        f"reward.preference_prompts >= 0 and reward.preference_timesteps >= 1; got "
                        f"{reward.preference_candidates}, {reward.preference_beta}, {reward.preference_prompts} "
                        f"and {reward.preference_timesteps}")


def check_out_of_family(train: Any, ood: Any) -> None:
    """Raise UserError unless the out-of-family evaluator's family differs from the training one's
    (``model.evaluator`` and ``model.ood_evaluator``, or loaded evaluators)."""
    train_family, ood_family = str(train.family).lower(), str(ood.family).lower()
    if train_family == ood_family:
        train_id = getattr(train, "id", None) or train.model
        ood_id = getattr(ood, "id", None) or ood.model
        raise UserError(
            f"out-of-family evaluator {ood_id!r} has family {ood_family!r}, the same as the training "
            f"evaluator {train_id!r}; set model.ood_evaluator to a model of another architecture family "
            "(e.g. vit for training, convnet for audits) so the audit is not the score being optimised"
        )


def to_yaml(cfg: DictConfig | ListConfig) -> str:
    """The resolved config as YAML text (what ``--print-config`` prints and MLflow stores)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig, prefix: str = "") -> dict[str, Any]:
    """Flat ``{'train.sft_steps': 200, ...}`` view, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            out.update(flatten(value, prefix=f"{full}."))
        elif isinstance(value, ListConfig):
            out[full] = list(value)
        else:
            out[full] = value
    return out
