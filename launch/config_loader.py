"""YAML config + command-line overrides -> ``NSAConfig`` and the run's other settings.

A config file has up to seven sections::

    model:      any NSAConfig / TransformerConfig field (num_layers, hidden_size, ...)
                plus attention_type and position_embedding_type
    nsa:        NSA fields without their ``nsa_`` prefix (cmp_block, topk, window, ...)
    parallel:   tensor/pipeline/context/expert parallel sizes, sequence_parallel,
                use_distributed_optimizer
    data:       corpus, tokenizer, sequence length, batch sizes
    training:   iterations, optimizer, LR schedule, clipping, bf16, seed, eval cadence
    checkpoint: save / load folders and the save interval
    logging:    log interval, TensorBoard folder, progress bar

Overrides, applied in order after the file: ``section.key=value``, ``key=value`` (when the
key is unique across sections) or Megatron-style flags ``--num-layers 4``, ``--bf16``,
``--nsa-topk 8``, ``--attention-type full``. Values are parsed as YAML scalars. Unknown keys
and type errors raise :class:`ConfigError` with a one-line message naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml


class ConfigError(ValueError):
    """A bad config file or override; ``str()`` is the one line shown to the user."""


@dataclass
class ParallelArgs:
    """How the model is split across GPUs; data parallel size = world / (tp * pp * cp)."""

    tensor_model_parallel_size: int = 1
    """TP: shards attention heads and MLP columns across this many GPUs."""
    pipeline_model_parallel_size: int = 1
    """PP: splits the layers into this many consecutive stages."""
    context_parallel_size: int = 1
    """CP: splits every sequence across this many GPUs (NSA's own CP path)."""
    expert_model_parallel_size: int = 1
    """EP: spreads MoE experts across this many GPUs."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence inside the TP group."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state (and the fp32 master weights) across the data-parallel group."""


@dataclass
class DataArgs:
    """Where tokens come from and how they are batched."""

    seq_length: int = 256
    """Tokens per training sequence (the model's max_sequence_length)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one GPU."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the rest)."""
    train_data_path: Optional[str] = None
    """Prefix of a Megatron indexed dataset (``.bin``/``.idx``); None: the embedded stdlib corpus."""
    valid_data_path: Optional[str] = None
    """Prefix of the validation dataset; None with train_data_path set: no evaluation."""
    tokenizer: str = "byte"
    """``byte`` (built-in, offline) or a path to a Hugging Face ``tokenizer.json``."""
    make_vocab_size_divisible_by: int = 64
    """Pad the embedding table to a multiple of this (times TP) for fast GEMMs."""
    cache_dir: str = "data/cache"
    """Where the embedded corpus and Megatron's dataset index caches are written."""
    corpus_max_mb: float = 4.0
    """Size budget of the embedded corpus (MB of source text)."""
    loss_from_token: Optional[int] = None
    """Token id: train only on the labels from its first occurrence in each sequence on (prompt
    masking, e.g. a task's query marker); a sequence without it contributes no loss. None: all."""


@dataclass
class TrainingArgs:
    """Optimizer, schedule and loop settings (names follow Megatron-LM's flags)."""

    train_iters: int = 100
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 10
    """Linear warm-up steps from 0 to ``lr``."""
    lr_decay_iters: Optional[int] = None
    """Steps of the decay after warm-up ends; None: ``train_iters``."""
    lr_decay_style: str = "cosine"
    """``cosine``, ``linear``, ``constant``, ``inverse-square-root`` or ``WSD``."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    bf16: bool = False
    """bf16 parameters/activations with fp32 master weights in the optimizer."""
    seed: int = 1234
    """Seed of weights, dropout and data order."""
    eval_interval: int = 0
    """Run validation every this many steps (0: only at the end)."""
    eval_iters: int = 4
    """Validation batches (of global_batch_size sequences) per evaluation; 0 turns evaluation off."""
    exit_interval: int = 0
    """Stop (after saving) once the iteration is a multiple of this; 0: never. For tests/jobs
    with a time limit."""


@dataclass
class CheckpointArgs:
    """Distributed checkpoints (``megatron.core.dist_checkpointing``)."""

    save: Optional[str] = None
    """Folder of checkpoints (``iter_XXXXXXX/`` + ``latest_checkpointed_iteration.txt``); None: no saving."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end)."""
    load: Optional[str] = None
    """Folder to resume from; None: the ``save`` folder (automatic resume from its latest)."""
    no_load: bool = False
    """Start fresh even if a checkpoint exists."""


@dataclass
class LoggingArgs:
    """What is printed and recorded."""

    log_interval: int = 10
    """Print one Megatron-style line every this many steps."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (None: off)."""
    progress_bar: Optional[bool] = None
    """Show a tqdm bar; None: only when stdout is a terminal."""
    metrics_file: Optional[str] = None
    """Append every logged value as JSON lines here (exact floats, for tools and tests)."""


SECTIONS = {
    "parallel": ParallelArgs,
    "data": DataArgs,
    "training": TrainingArgs,
    "checkpoint": CheckpointArgs,
    "logging": LoggingArgs,
}
MODEL_EXTRAS = {"position_embedding_type": str}
"""Model-section keys that are GPTModel arguments rather than config fields."""
MODEL_OWNED_ELSEWHERE = {"bf16", "fp16", "params_dtype", "pipeline_dtype", "seq_length",
                         "tensor_model_parallel_size", "pipeline_model_parallel_size",
                         "context_parallel_size", "expert_model_parallel_size", "sequence_parallel"}
"""NSAConfig fields set from other sections, so never written under ``model:``."""


@dataclass
class RunConfig:
    """Everything one training run needs; ``model`` is built by :func:`build_model_config`."""

    model: Dict[str, Any] = field(default_factory=dict)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    source: str = "<defaults>"


def _model_fields() -> Dict[str, Any]:
    """NSAConfig field name -> type hint (unresolvable hints become ``Any``)."""
    from nsa_megatron.config import NSAConfig

    try:
        hints = typing.get_type_hints(NSAConfig)
    except Exception:  # some megatron versions carry hints that do not resolve
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(NSAConfig) if f.init}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(key: str, value: Any, tp) -> Any:
    """Return ``value`` converted to ``tp`` where lossless, else raise ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(key, value, option)
            except ConfigError:
                continue
        raise bad
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_check_type(f"{key}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)  # YAML reads "1e-3" as a string
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(tp, type) and tp.__module__ == "torch":
        raise ConfigError(f"{key}: cannot be set from a config (use training.bf16)")
    return value  # callables and other rich types: passed through as written


class _Schema:
    """Section -> key -> type, with the lookups overrides need."""

    def __init__(self) -> None:
        model = _model_fields()
        self.types: Dict[str, Dict[str, Any]] = {
            "model": {k: v for k, v in model.items()
                      if not k.startswith("nsa_") and k not in MODEL_OWNED_ELSEWHERE},
            "nsa": {k[4:]: v for k, v in model.items() if k.startswith("nsa_")},
        }
        self.types["model"].update(MODEL_EXTRAS)
        for name, cls in SECTIONS.items():
            hints = typing.get_type_hints(cls)
            self.types[name] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def _suggest(self, key: str, names) -> str:
        close = difflib.get_close_matches(key, list(names), n=1)
        return f" (did you mean '{close[0]}'?)" if close else ""

    def resolve(self, dotted: str) -> Tuple[str, str]:
        """``section.key`` or a unique bare ``key`` (``nsa_`` prefix allowed) -> (section, key)."""
        if "." in dotted:
            section, key = dotted.split(".", 1)
            if section not in self.types:
                raise ConfigError(f"unknown section '{section}'{self._suggest(section, self.types)}")
            if section == "model" and key.startswith("nsa_") and key[4:] in self.types["nsa"]:
                raise ConfigError(f"unknown key '{dotted}' (did you mean 'nsa.{key[4:]}'?)")
            if key not in self.types[section]:
                raise ConfigError(f"unknown key '{dotted}'{self._suggest(key, self.types[section])}")
            return section, key
        hits = [(s, dotted) for s, keys in self.types.items() if dotted in keys]
        if dotted.startswith("nsa_") and dotted[4:] in self.types["nsa"]:
            hits.append(("nsa", dotted[4:]))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConfigError(f"key '{dotted}' is ambiguous: write one of "
                              + ", ".join(f"{s}.{k}" for s, k in hits))
        every = [k for keys in self.types.values() for k in keys]
        raise ConfigError(f"unknown key '{dotted}'{self._suggest(dotted, every)}")


def _parse_overrides(argv: List[str]) -> List[Tuple[str, Any]]:
    """``key=value`` and ``--flag [value]`` tokens -> [(dotted key, parsed value)]."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            name = tok[2:]
            if "=" in name:
                name, raw = name.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
                raw, i = argv[i + 1], i + 1
            else:
                raw = "true"  # a bare Megatron boolean flag such as --bf16
            out.append((name.replace("-", "_"), _yaml_scalar(raw, name)))
        elif "=" in tok:
            key, raw = tok.split("=", 1)
            out.append((key.strip(), _yaml_scalar(raw, key)))
        else:
            raise ConfigError(f"cannot parse argument '{tok}': use key=value or --flag value")
        i += 1
    return out


def _yaml_scalar(raw: str, key: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse value {raw!r}") from None


def load_config(path: Optional[str], overrides: List[str] = ()) -> RunConfig:
    """Read ``path`` (YAML; None: defaults only), apply ``overrides``, type-check everything.

    Raises:
        ConfigError: missing/unparsable file, unknown section or key, wrong value type.
    """
    schema = _Schema()
    raw: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: invalid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    values: Dict[str, Dict[str, Any]] = {s: {} for s in schema.types}
    for section, body in raw.items():
        if section not in schema.types:
            raise ConfigError(f"unknown section '{section}'{schema._suggest(str(section), schema.types)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"section '{section}' must be a mapping of key: value")
        for key, value in body.items():
            schema.resolve(f"{section}.{key}")
            values[section][key] = value
    for dotted, value in _parse_overrides(list(overrides)):
        section, key = schema.resolve(dotted)
        values[section][key] = value
    for section, body in values.items():
        for key in body:
            body[key] = _check_type(f"{section}.{key}", body[key], schema.types[section][key])
    cfg = RunConfig(source=path or "<defaults>")
    cfg.model = dict(values["model"])
    cfg.model.update({f"nsa_{k}": v for k, v in values["nsa"].items()})
    for name, cls in SECTIONS.items():
        setattr(cfg, name, cls(**values[name]))
    return cfg


def build_model_config(cfg: RunConfig, **runtime: Any):
    """Build the ``NSAConfig`` of ``cfg`` (parallel sizes and dtype from their sections).

    Args:
        cfg: from :func:`load_config`.
        runtime: extra NSAConfig fields decided at run time (e.g. ``use_cpu_initialization``).
    Raises:
        ConfigError: NSAConfig / TransformerConfig rejected the combination (message kept).
    """
    import torch
    from nsa_megatron.config import NSAConfig

    kwargs = {k: v for k, v in cfg.model.items() if k not in MODEL_EXTRAS}
    if isinstance(kwargs.get("activation_func"), str):  # YAML names torch.nn.functional.<name>
        name = kwargs["activation_func"]
        kwargs["activation_func"] = getattr(torch.nn.functional, name, None)
        if not callable(kwargs["activation_func"]):
            raise ConfigError(f"model.activation_func: no torch.nn.functional.{name}")
    p = cfg.parallel
    kwargs.update(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=cfg.training.bf16,
        params_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
    )
    kwargs.update(runtime)
    try:
        config = NSAConfig(**kwargs)
        config.validate_sequence_length(cfg.data.seq_length)
    except (ValueError, AssertionError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"invalid model config: {msg}") from None
    return config


def to_flat_dict(cfg: RunConfig) -> Dict[str, Any]:
    """``section.key -> value`` of every setting, for logging and checkpoints."""
    flat = {f"model.{k}": v for k, v in cfg.model.items()}
    for name in SECTIONS:
        flat.update({f"{name}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, name)).items()})
    return flat
