"""``TrainConfig``: one dataclass tree for a training run, loadable from YAML.

Every section is strict: an unknown key is an error that names the valid ones, so a typo never
silently falls back to a default. ``TrainConfig.override(["optim.lr=3e-4", ...])`` applies
command-line overrides (values are parsed as YAML scalars).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..modeling.config import CrossAttentionConfig, PerceiverConfig

PRECISIONS = ("fp32", "amp_bf16", "bf16")
DISTRIBUTED = ("none", "ddp", "fsdp")
SCHEDULES = ("constant", "linear", "cosine")
DATA_KINDS = ("pairs", "interleaved")
# The paper's loss weights: LAION-style pairs count 0.2, MMC4-style interleaved documents 1.0.
DEFAULT_LOSS_WEIGHTS = {"pairs": 0.2, "interleaved": 1.0}


class ConfigError(ValueError):
    """A training configuration that is invalid, or that does not fit the model or the data."""


class DataError(RuntimeError):
    """The training data could not be found or read. (Here, beside :class:`ConfigError`, so that the
    command line names both without importing torch: see :func:`flamingo_vlm.train.cli.user_errors`.)"""


@dataclass
class ModelConfig:
    """Either ``from_pretrained`` (a flamingo-vlm directory / Hub repo / released OpenFlamingo id),
    or the arguments of :func:`flamingo_vlm.create_model_and_transforms`.

    With ``from_pretrained``, architecture fields left at ``None`` take the saved model's values;
    a field that is set must agree with the saved model (otherwise :class:`ConfigError`).
    ``perceiver`` / ``cross_attention`` are typed (:class:`~flamingo_vlm.modeling.config.PerceiverConfig`,
    :class:`~flamingo_vlm.modeling.config.CrossAttentionConfig`; options not given take their defaults);
    YAML may also call them ``perceiver_kwargs`` / ``cross_attn_kwargs``, OpenFlamingo's names.
    """

    from_pretrained: str | None = None
    vision: str | None = None
    vision_pretrained: str | None = None
    vision_tokens_ln_post: bool = False
    lm: str | None = None
    tokenizer: str | None = None
    cross_attn_every_n_layers: int | None = None
    decoder_layers_attr_name: str | None = None
    freeze_lm_embeddings: bool | None = None
    perceiver: PerceiverConfig | None = None
    cross_attention: CrossAttentionConfig | None = None
    cache_dir: str | None = None
    local_files_only: bool = False
    # true: LM layers and cross-attention blocks recompute activations in backward; "lm": the LM's
    # decoder layers only (most of the memory, less recomputation); false: off.
    gradient_checkpointing: bool | str = False
    # Set every tanh gate to this value (tanh(gate) = gate_init) when the model is built; None keeps
    # the weights' own gates (0 for a new model: the LM starts unchanged, as in Flamingo).
    gate_init: float | None = None


@dataclass
class DataConfig:
    """One dataset of the mixture; mirrors :class:`flamingo_vlm.data.DatasetSpec`.

    ``loss_weight`` defaults to 0.2 for ``pairs`` and 1.0 for ``interleaved`` (the paper's).
    ``name`` only labels the dataset in logs (default: ``<kind><index>``).
    """

    kind: str = "interleaved"
    urls: list = field(default_factory=list)
    batch_size: int = 8
    loss_weight: float | None = None
    max_tokens: int | None = None
    max_images: int = 6
    min_images: int = 1
    similarity_threshold: float = 0.24
    min_image_bytes: int = 0
    # text between an interleaved document's chunks; None: the model's own demo_separator (the built-in
    # model's "\n"; a new model's "", OpenFlamingo's MMC4 layout), so a fine-tune keeps its few-shot format
    chunk_separator: str | None = None
    loss_after: list = field(default_factory=list)  # e.g. ["Short answer:", "Output:"]: train answers only
    caption_prefix: str = ""  # pairs: text between <image> and the caption, e.g. "Output:" (the built-in model's prompt)
    name: str | None = None

    def effective_loss_weight(self, alone: bool = False) -> float:
        """``loss_weight``, else its kind's weight in a mixture (OpenFlamingo's 0.2 for pairs beside
        MMC4), else 1 for a run's only dataset (its loss was shown at a fifth of the per-token loss)."""
        if self.loss_weight is not None:
            return float(self.loss_weight)
        return 1.0 if alone else float(DEFAULT_LOSS_WEIGHTS[self.kind])


@dataclass
class OptimConfig:
    """AdamW. ``weight_decay`` applies to the gated cross-attention parameters only (as in the
    paper and OpenFlamingo); the perceiver, new-token rows and LoRA weights get none."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    # The tanh gates' lr is lr * gate_lr_scale, without weight decay (1.0: OpenFlamingo's grouping,
    # gates decayed with the rest of the cross-attention). Short runs want > 1: Adam moves a gate
    # by about lr per step, so at lr 3e-4 a gate needs thousands of steps to open.
    gate_lr_scale: float = 1.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    fused: bool | None = None  # fused AdamW kernel; None: on for CPU/CUDA parameters


@dataclass
class ScheduleConfig:
    """Linear warmup from 0 to ``optim.lr`` over ``warmup_steps``, then constant, or a linear or
    cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""

    kind: str = "constant"
    warmup_steps: int = 1875
    min_lr_ratio: float = 0.0


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the frozen LM's linear layers. ``target_modules``: ``"auto"``
    (every linear layer inside the LM's decoder blocks, never the cross-attention) or a list
    of layer names (``[q_proj, v_proj]``) matched inside the decoder blocks."""

    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Any = "auto"


@dataclass
class AimConfig:
    """The aiming loss (not in Flamingo; stages 12-14 of the built-in model): an attention loss that
    tells the first ``heads`` heads of every cross-attention block where to look, on a dataset of
    one-image synthetic questions added to the mixture as ``aim`` (answer loss weight 1). Off while
    ``loss_weight`` is 0. Needs a model whose perceiver passes its input cells through
    (``media_passthrough``; ``flamingo-vlm grow-adapter --media-passthrough``) and a feature-grid
    vision encoder with colour tokens (``color_encoding: tokens`` or ``both``). See
    :mod:`flamingo_vlm.train.losses` and :mod:`flamingo_vlm.train.aiming`."""

    loss_weight: float = 0.0  # weight of the attention loss; 0: no aiming data, no loss
    heads: int = 4  # supervised heads of each block (the first ones)
    batch_size: int = 16  # aiming questions per micro-step
    start: int = 800000  # first scene index of the generator's pretrain split (the data's position)
    questions: list = field(default_factory=lambda: ["color", "shape"])  # of AIM_QUESTIONS
    # relative weight of a kind when a scene has several, e.g. {word: 4, number: 4}; null: uniform
    question_weights: dict | None = None
    max_tokens: int = 64
    # share of the scenes drawn as the in-context episodes draw theirs (random training style, off the grid)
    style_rate: float = 0.0
    # share of the rows that are in-context episodes (1 to episode_shots demonstrations and a query in
    # the training split's phrasings, framings, answer maps and styles; max_tokens must hold them)
    episode_rate: float = 0.0
    episode_shots: int = 4

    @property
    def enabled(self) -> bool:
        return self.loss_weight > 0


AIM_QUESTIONS = ("color", "shape", "position", "count", "word", "number")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: list = field(default_factory=list)  # list[DataConfig]
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    aim: AimConfig = field(default_factory=AimConfig)
    precision: str = "fp32"
    grad_accum: int = 1
    max_steps: int = 1000
    checkpoint_every: int = 500
    keep_last: int = 3
    output_dir: str = "runs/flamingo"
    seed: int = 0
    distributed: str = "none"
    log_every: int = 10
    resume: str | None = None  # None: fresh run; "latest": newest checkpoint; "auto": latest if any; or a path
    export: bool = True  # write output_dir/final in the from_pretrained format at the end
    tensorboard: bool = True
    wandb: dict | None = None  # e.g. {project: flamingo, name: run1}; needs `pip install wandb`
    progress: bool = True  # tqdm bar on rank 0
    plot: bool = True  # loss-curve PNG at the end (needs matplotlib)
    # Same math, less time/memory (see flamingo_vlm.train.fastpath):
    chunked_loss: bool = True  # loss from hidden states in chunks, no full logits (checked once)
    cpu_matmul: str = "auto"  # "onednn": fp32 GEMMs on oneDNN; "default": torch's; "auto": oneDNN on CPU where measured faster (modeling.kernels)
    # perceiver and cross-attention keep less for backward: LayerNorm/GELU outputs recomputed, tanh gates
    # folded into the last products, under amp_bf16 trained weights re-cast in backward (train.lean; same
    # forward, gradients equal up to rounding). Formerly recompute_gelu (still accepted).
    lean_backward: bool = True
    # amp_bf16: frozen linear/convolution weights stored in bf16 (what autocast computes with anyway).
    # null: on when the trainer builds the model, without LoRA or FSDP; true: also for a model passed
    # in; false: off. fit() (at its end) and close() put them back in fp32 (values bf16-rounded).
    frozen_bf16: bool | None = None
    # CPU + glibc: allocations >= this many bytes are returned to the OS when freed (lower peak
    # memory, but fresh pages cost time: ~+40% step time here). null: glibc's default.
    malloc_mmap_threshold: int | None = None
    # CPU + glibc with no allocator preloaded (code calling the Trainer; the CLI preloads tcmalloc):
    # keep freed blocks for reuse instead of returning them to the OS (fastpath.glibc_reuse_freed_memory;
    # amp_bf16 steps 5-14% faster at the same peak, fp32 the same). Process-wide. Off where
    # malloc_mmap_threshold is set.
    glibc_reuse: bool = True

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict | None, *, require_model: bool = True) -> "TrainConfig":
        """``require_model=False``: the model is passed to :class:`Trainer` in code (benchmarks)."""
        cfg = _build(cls, d or {}, "")
        cfg.validate(require_model=require_model)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            # one line naming the file and the place (str(e) spans lines and says "<unicode string>")
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            what = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
            raise ConfigError(f"{path} is not valid YAML{where}: {what or ' '.join(str(e).split())}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not a text (UTF-8) YAML file: {e}") from e
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def override(self, assignments: list[str]) -> "TrainConfig":
        """Apply ``dotted.key=value`` assignments (values parsed as YAML) and re-validate."""
        import yaml

        d = self.to_dict()
        for item in assignments:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            parts = key.strip().split(".")
            if len(parts) > 1 and parts[0] == "model":
                parts[1] = _MODEL_ALIASES.get(parts[1], parts[1])
            node = d
            for i, part in enumerate(parts[:-1]):
                if isinstance(node, list):
                    node = node[_list_index(node, part, item, ".".join(parts[:i]))]
                else:
                    if part not in node:
                        raise ConfigError(f"override {item!r}: no config section {'.'.join(parts[: i + 1])!r}")
                    if node[part] is None:
                        node[part] = {}
                    node = node[part]
            last = parts[-1]
            parsed = yaml.safe_load(value) if value.strip() else None
            if isinstance(node, list):
                node[_list_index(node, last, item, ".".join(parts[:-1]))] = parsed
            else:
                node[last] = parsed
        return TrainConfig.from_dict(d)

    # -- checks --------------------------------------------------------------------------------
    def validate(self, *, require_model: bool = True) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("distributed", self.distributed, DISTRIBUTED)
        _choice("schedule.kind", self.schedule.kind, SCHEDULES)
        _choice("cpu_matmul", self.cpu_matmul, ("auto", "onednn", "default"))
        for name in ("grad_accum", "max_steps", "checkpoint_every", "keep_last", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frozen_bf16 and self.precision != "amp_bf16":
            raise ConfigError(f"frozen_bf16: true stores frozen weights in autocast's dtype and needs "
                              f"precision: amp_bf16, got {self.precision}")
        if self.frozen_bf16 and (self.lora.enabled or self.distributed == "fsdp"):
            raise ConfigError("frozen_bf16: true cannot be combined with LoRA (merging the adapters writes the "
                              "frozen weights out) or FSDP (one shard unit needs one dtype); leave it null")
        if self.schedule.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.schedule.warmup_steps}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.optim.gate_lr_scale <= 0:
            raise ConfigError(f"optim.gate_lr_scale must be > 0, got {self.optim.gate_lr_scale}")
        if self.optim.max_grad_norm is not None and self.optim.max_grad_norm <= 0:
            raise ConfigError("optim.max_grad_norm must be > 0 (or null for no clipping)")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {self.optim.betas}")
        m = self.model
        if m.from_pretrained is None and m.lm is None and require_model:
            raise ConfigError("model needs `from_pretrained: <dir or repo>`, or `vision` and `lm` to build one")
        if m.from_pretrained is None and m.vision is None and m.lm is not None:
            raise ConfigError("model.vision is required when building a model (or use model.from_pretrained)")
        if m.from_pretrained is not None:
            clashing = [k for k in ("vision", "vision_pretrained", "lm", "tokenizer") if getattr(m, k)]
            if clashing:
                raise ConfigError(
                    f"model.from_pretrained loads a complete model; remove model.{', model.'.join(clashing)}"
                )
        if isinstance(m.gradient_checkpointing, str) and m.gradient_checkpointing not in ("lm",):
            raise ConfigError(f"model.gradient_checkpointing must be true, false or 'lm', got {m.gradient_checkpointing!r}")
        if m.cross_attn_every_n_layers is not None and m.cross_attn_every_n_layers < 1:
            raise ConfigError("model.cross_attn_every_n_layers must be >= 1")
        for i, d in enumerate(self.data):
            _choice(f"data[{i}].kind", d.kind, DATA_KINDS)
            if isinstance(d.urls, str):
                d.urls = [d.urls]
            if not d.urls:
                raise ConfigError(f"data[{i}] ({d.kind}) has no urls: list its shard files or patterns")
            if d.batch_size < 1:
                raise ConfigError(f"data[{i}].batch_size must be >= 1")
            if d.loss_weight is not None and d.loss_weight < 0:
                raise ConfigError(f"data[{i}].loss_weight must be >= 0")
            if not all(isinstance(m, str) and m for m in d.loss_after):
                raise ConfigError(f"data[{i}].loss_after must be a list of non-empty marker strings, "
                                  f"e.g. ['Short answer:', 'Output:'], got {d.loss_after!r}")
            if d.caption_prefix and d.kind != "pairs":  # (an interleaved document's text is its own)
                raise ConfigError(f"data[{i}].caption_prefix applies to pairs; data[{i}] is {d.kind}")
        if self.lora.enabled:
            if self.lora.r < 1:
                raise ConfigError("lora.r must be >= 1")
            tm = self.lora.target_modules
            if not (tm == "auto" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm))):
                raise ConfigError(f"lora.target_modules must be 'auto' or a list of layer names, got {tm!r}")
        self._validate_aim()
        if self.resume is not None and not isinstance(self.resume, str):
            self.resume = "latest" if self.resume is True else None

    def _validate_aim(self) -> None:
        a = self.aim
        if a.loss_weight < 0:
            raise ConfigError(f"aim.loss_weight must be >= 0 (0: off), got {a.loss_weight}")
        for name in ("heads", "batch_size", "max_tokens"):
            if getattr(a, name) < 1:
                raise ConfigError(f"aim.{name} must be >= 1, got {getattr(a, name)}")
        if a.start < 0:
            raise ConfigError(f"aim.start must be >= 0, got {a.start}")
        if not 0.0 <= a.style_rate <= 1.0:
            raise ConfigError(f"aim.style_rate must be between 0 and 1, got {a.style_rate}")
        if not 0.0 <= a.episode_rate <= 1.0:
            raise ConfigError(f"aim.episode_rate must be between 0 and 1, got {a.episode_rate}")
        if a.episode_shots < 1:
            raise ConfigError(f"aim.episode_shots must be >= 1, got {a.episode_shots}")
        if a.episode_rate and a.max_tokens < 32 * (a.episode_shots + 1):
            raise ConfigError(f"aim.max_tokens ({a.max_tokens}) cannot hold episodes of {a.episode_shots} "
                              f"demonstrations; set it to at least {32 * (a.episode_shots + 1)}")
        if a.episode_rate and not set(a.questions) - {"number"}:
            raise ConfigError("aim.episode_rate needs a kind of aim.questions that the episodes ask "
                              "(color, shape, position, count, word)")
        if not a.questions or not set(a.questions) <= set(AIM_QUESTIONS):
            raise ConfigError(f"aim.questions must be a non-empty list of {', '.join(AIM_QUESTIONS)}; got {a.questions!r}")
        weights = a.question_weights or {}
        if set(weights) - set(a.questions) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights.values()):
            raise ConfigError(f"aim.question_weights must give positive numbers to kinds of aim.questions "
                              f"({', '.join(a.questions)}), got {a.question_weights!r}")

    def loss_weights(self) -> list[float]:
        """Each dataset's loss weight (:meth:`DataConfig.effective_loss_weight`; a run's only one: 1)."""
        return [d.effective_loss_weight(alone=len(self.data) == 1) for d in self.data]

    def dataset_names(self) -> list[str]:
        """Names of the config's datasets (the aiming data, when on, follows them as ``aim``)."""
        return [d.name or f"{d.kind}{i}" for i, d in enumerate(self.data)]


# other frameworks' names for a setting, for the "did you mean" of an unknown key (too far for difflib)
_SYNONYMS = {"learning_rate": "lr", "warmup": "warmup_steps", "num_warmup_steps": "warmup_steps",
             "lr_scheduler": "kind", "scheduler": "kind", "steps": "max_steps", "num_steps": "max_steps",
             "train_steps": "max_steps", "grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm",
             "gradient_accumulation_steps": "grad_accum", "save_steps": "checkpoint_every", "logging_steps": "log_every",
             "output": "output_dir", "save_dir": "output_dir", "dtype": "precision", "mixed_precision": "precision"}


def _list_index(node: list, part: str, item: str, where: str) -> int:
    """The entry ``part`` of the list ``where`` in an override (an IndexError or ValueError before)."""
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override {item!r}: {where} has {len(node)} entr{'y' if len(node) == 1 else 'ies'}; "
                          f"give an index 0..{len(node) - 1}, e.g. {where}.0")
    return int(part)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


_SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "lora": LoraConfig,
             "aim": AimConfig}
# model keys under their OpenFlamingo names (create_model_and_transforms' arguments), same meaning
_MODEL_ALIASES = {"perceiver_kwargs": "perceiver", "cross_attn_kwargs": "cross_attention"}
# top-level keys under an earlier name, same meaning
_TOP_ALIASES = {"recompute_gelu": "lean_backward"}
_TYPED_FIELDS = {"perceiver": PerceiverConfig, "cross_attention": CrossAttentionConfig}


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(d).__name__}: {d!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        aliases = _MODEL_ALIASES if cls is ModelConfig else _TOP_ALIASES if cls is TrainConfig else {}
        if key in aliases:
            alias, key = key, aliases[key]
            if key in d:
                raise ConfigError(f"{where}{alias} and {where}{key} are the same setting; keep one")
        if key not in names:
            close = ([_SYNONYMS[key]] if _SYNONYMS.get(key) in names else []) or difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {where + key!r}{hint}; valid keys: {', '.join(names)}")
        if cls is TrainConfig and key in _SECTIONS:
            value = _build(_SECTIONS[key], value or {}, key + ".")
        elif cls is TrainConfig and key == "data":
            if value is None:
                value = []
            if not isinstance(value, list):
                raise ConfigError("data must be a list of datasets (each with kind and urls)")
            value = [_build(DataConfig, v, f"data[{i}].") for i, v in enumerate(value)]
        elif cls is ModelConfig and key in _TYPED_FIELDS and value is not None:
            try:
                value = _TYPED_FIELDS[key].coerce(value)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where + key}: {e}") from None
        else:
            value = _coerce(cls, key, value, where)
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(cls, key: str, value, where: str):
    """Light type checking: ints/floats/bools/strings as the field says (YAML's 1e-4 is a str)."""
    hint = get_type_hints(cls)[key]
    import types

    options = get_args(hint) if get_origin(hint) in (types.UnionType, __import__("typing").Union) else (hint,)
    if value is None:
        if type(None) in options or hint is Any:
            return None
        raise ConfigError(f"{where + key} cannot be null")
    for t in options:
        if t is Any:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if t is str and isinstance(value, (str, os.PathLike)):
            return str(value)
        if t is str and isinstance(value, bool) and key == "resume":
            return "latest" if value else None
        if get_origin(t) is list or t is list:
            if isinstance(value, (list, tuple)):
                return list(value)
            if key == "urls" and isinstance(value, str):
                return [value]
        if get_origin(t) is dict or t is dict:
            if isinstance(value, dict):
                return value
    names = [getattr(t, "__name__", str(t)) for t in options]
    raise ConfigError(f"{where + key} must be {' or '.join(names)}, got {value!r}")


def config_fingerprint(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
