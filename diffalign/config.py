"""Typed dataclass configs: YAML files, ``key=value`` overrides, validation with errors that say how to fix.

One machinery serves every section and every trainer:

* :func:`from_dict` builds a (nested) dataclass from plain data, coercing values by the field types
  (``int, float, bool, str, Optional[...], Literal[...], List/Tuple[...], Dict[str, ...]``, nested
  dataclasses and lists of them), rejecting unknown keys with the valid list, checking declared choices
  and bounds, then calling the dataclass's ``__post_init__`` and ``validate()`` hooks.
* :func:`load_yaml`, :func:`apply_overrides`, :func:`load_config`, :func:`to_dict`, :func:`save_config`.
* :func:`param` declares a field with help text, choices and bounds; :func:`describe` renders them.

Every user-facing error is a :class:`ConfigError` (a ``ValueError``) whose message starts with the full
dotted key (``train.lr: expected float, got 'abc' (str)``) and names the value, the rule and the fix.

The run config (:class:`RunConfig`) holds the shared sections. The trainer-specific section ``train`` is
kept raw here and parsed by the chosen trainer's dataclass, looked up in :data:`TRAINER_CONFIGS`
(trainers register into it with :func:`register_trainer_config`), so its errors still say ``train.lr``.

A trainer plugs in like this (its module is imported on first use of ``trainer: grpo``; a trainer outside the
``trainers`` package is named by its config class, ``trainer: my_pkg.my_module:MyConfig``, whose class attribute
``trainer_class = "my_pkg.my_module:MyTrainer"`` names the trainer ``diffalign train`` builds)::

    @register_trainer_config("grpo")
    @dataclass
    class GRPOConfig:
        lr: float = param(1e-4, help="learning rate", min=0.0)
        clip_range: float = param(1e-4, help="PPO clip range on the importance ratio")

        def validate_run(self, run_cfg):  # optional cross-section rules, full keys
            check(run_cfg.sample.group_size >= 2, "sample.group_size", "...; GRPO needs >= 2")

Overrides keep YAML semantics except that text fields take the raw string (``negative_prompt=no`` is
``"no"``, not False) and ``1e-4`` is a float (YAML 1.1 would read a string), in files too.

Nothing here imports torch: ``diffalign --help`` and ``diffalign config`` stay fast (a config naming a
trainer imports that trainer's module to validate ``train``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import math
import os
import pkgutil
import re
import tempfile
import textwrap
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml

__all__ = [
    "ConfigError",
    "param",
    "check",
    "from_dict",
    "load_yaml",
    "parse_override",
    "apply_overrides",
    "load_config",
    "to_dict",
    "dump_yaml",
    "save_config",
    "describe",
    "TRAINER_CONFIGS",
    "register_trainer_config",
    "trainer_config_class",
    "resolve_train_section",
    "check_lr_schedule",
    "TrainLoopConfig",
    "LoraConfig",
    "ModelConfig",
    "SampleConfig",
    "RewardSpec",
    "LoggingConfig",
    "CheckpointConfig",
    "GuidanceConfig",
    "RunConfig",
]

T = TypeVar("T")
_NoneType = type(None)


# ----------------------------------------------------------------------------------------------------
# errors and field declarations
# ----------------------------------------------------------------------------------------------------


class UserError(Exception):
    """An error whose message names the value, the rule and the fix: the CLI prints it as one ``error:`` line
    without a traceback (:class:`ConfigError`, ``CheckpointError``, ``NonFiniteError``)."""


class ConfigError(UserError, ValueError):
    """A user-facing config error. ``str(err)`` is one line: ``"<dotted.key>: <what is wrong; the fix>"``.

    ``key`` is the dotted key relative to where the error was raised; :meth:`under` prefixes a section,
    so a dataclass's ``__post_init__`` can say ``ConfigError("...", key="window")`` and the user reads
    ``sample.window: ...``.
    """

    def __init__(self, message: str, key: str = ""):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(self.detail, key=_join(prefix, self.key))


def _join(prefix: str, key: Any) -> str:
    key = str(key)
    if not prefix:
        return key
    return f"{prefix}.{key}" if key else prefix


def param(
    default: Any = MISSING,
    *,
    help: str,
    choices: Optional[Sequence[Any]] = None,
    min: Optional[float] = None,
    max: Optional[float] = None,
    default_factory: Any = MISSING,
) -> Any:
    """A dataclass field with help text and optional ``choices`` / inclusive ``min`` / ``max`` bounds.

    Plain ``field(metadata={"help": ..., "choices": (...)})`` works the same; this only saves typing and
    accepts a list/dict ``default`` (copied per instance).
    """
    metadata: Dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if min is not None:
        metadata["min"] = min
    if max is not None:
        metadata["max"] = max
    if isinstance(default, (list, dict, set)):
        value = default
        default, default_factory = MISSING, (lambda: copy.deepcopy(value))
    return field(default=default, default_factory=default_factory, metadata=metadata)


def check_guide_transforms(rewards, guidance) -> None:
    """Guided sampling scores candidates and particles of several prompts in one batch: a reward ranked within its
    batch (transform ``rank``) would score an image against whatever shares the batch, so it cannot guide.
    Checked by ``diffalign sample`` only (training may rank a reward; a config is shared by every command)."""
    for i, spec in enumerate(rewards):
        t = spec.transform
        names = [item if isinstance(item, str) else item.get("name")
                 for item in (t if isinstance(t, list) else [t]) if item is not None]
        check("rank" not in names, f"rewards.{i}.transform",
              f"got {t!r} on {spec.label or spec.name!r}, with guidance.method={guidance.method!r} and "
              f"compare={list(guidance.compare)}; guided sampling scores candidates and particles of several "
              "prompts in one batch, so a rank within the batch (or within a prompt's one image) says nothing about "
              "an image (a batch of noise ranks like a batch of clean images): guide on the reward without rank "
              f"(rewards.{i}.transform=null), and put a ranked copy in eval_rewards to judge the finished images")


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(message, key)`` unless ``ok`` (for ``__post_init__`` / ``validate`` hooks)."""
    if not ok:
        raise ConfigError(message, key=key)


def check_lr_schedule(train) -> None:
    """A trainer section's ``lr_schedule`` decays over ``lr_decay_steps``, which must then be set."""
    check(train.lr_schedule == "constant" or train.lr_decay_steps > 0, "train.lr_decay_steps",
          f"got 0 with lr_schedule={train.lr_schedule!r}; set the optimizer steps to decay over (the config's "
          "batch arithmetic gives optimizer steps per epoch), or lr_schedule=constant")


@dataclass
class TrainLoopConfig:
    """The keys every trainer's ``train`` section shares (GRPO, DiffusionNFT): AdamW and its learning-rate schedule,
    accumulation, clipping, the advantage std's epsilon, the EMA of the trained weights, evaluation and stopping.
    A trainer config subclasses it and adds its own keys (and its own ``num_epochs`` / ``batch_size`` defaults);
    its ``validate_run`` calls :meth:`validate_loop`."""

    learning_rate: float = param(3e-4, help="AdamW learning rate", min=0.0)
    adam_beta1: float = param(0.9, help="AdamW beta1, in [0, 1)", min=0.0, max=0.999999)
    adam_beta2: float = param(0.999, help="AdamW beta2, in [0, 1)", min=0.0, max=0.999999)
    weight_decay: float = param(1e-4, help="AdamW weight decay", min=0.0)
    adam_eps: float = param(1e-8, help="AdamW epsilon", min=0.0)
    warmup_steps: int = param(0, help="linear LR warmup in optimizer steps", min=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = param(
        "constant", help="learning rate after warmup: constant, or decayed to 0 (linear / cosine) over lr_decay_steps")
    lr_decay_steps: int = param(
        0, help="optimizer steps of the decay after warmup (then the rate stays 0); needed by linear / cosine", min=0)
    gradient_accumulation_steps: int = param(
        1, help="minibatches per optimizer step; each also accumulates over its trained timesteps (every step is the "
           "mean over its own minibatches, a shorter last window included)", min=1
    )
    num_inner_epochs: int = param(1, help="passes over the epoch's samples", min=1)
    max_grad_norm: float = param(1.0, help="gradient clipping norm; 0 = off", min=0.0)
    adv_eps: float = param(1e-4, help="added to the std", min=0.0)
    on_nonfinite: Literal["skip", "raise"] = param(
        "skip", help="a NaN / inf gradient: skip that optimizer step (weights, optimizer, LR schedule and EMA "
        "untouched; logged as train/skipped_steps) or stop the run with an error")
    loss_scale_growth_interval: int = param(
        200, help="model.dtype=float16: double the loss scale after this many optimizer steps without overflow",
        min=1)
    max_skipped_steps: int = param(
        3, help="with on_nonfinite=skip: stop with an error after more than this many skipped steps in a row", min=0)
    ema: bool = param(False, help="keep an EMA of the trained parameters (used for eval and export)")
    ema_decay: float = param(
        0.9, help="EMA decay (the cap of a warm-up min(decay, (1 + step) / (10 + step)), step = optimizer steps)",
        min=0.0, max=1.0)
    ema_every: int = param(1, help="EMA update every N optimizer steps", min=1)
    eval_every: int = param(10, help="evaluate every N epochs (and at the end); 0 = only at the end", min=0)
    eval_num_steps: Optional[int] = param(None, help="sampler steps for eval; null = sample.eval_num_steps", min=1)
    eval_guidance_scale: Optional[float] = param(
        None, help="CFG for eval (1 = no CFG); null = sample.guidance_scale", min=1.0)
    stop_after_epochs: Optional[int] = param(
        None, help="stop (after checkpointing) once this many epochs ran in this process (tests, time limits)", min=1
    )
    max_minutes: Optional[float] = param(
        None, help="stop after this many minutes of wall time (then a final evaluation, outside the budget, and "
        "a checkpoint)", min=0.0)

    def validate_loop(self) -> None:
        check_lr_schedule(self)

    def check_batch_split(self, sample) -> None:
        """An epoch's samples on a process (``sample.batch_size x sample.num_batches_per_epoch``) split into whole
        training minibatches of ``batch_size`` (a ``train`` key of every trainer). Checked by the trainers when
        they are built, not with the config: ``diffalign eval`` / ``sample`` share the config and may use another
        sampling batch (to fit memory) without training."""
        total = sample.batch_size * sample.num_batches_per_epoch
        check(total % self.batch_size == 0, "train.batch_size",
              f"{total} samples per process per epoch (sample.batch_size={sample.batch_size} x "
              f"sample.num_batches_per_epoch={sample.num_batches_per_epoch}) are not a multiple of "
              f"train.batch_size={self.batch_size}; use a divisor of {total}, e.g. "
              f"train.batch_size={math.gcd(total, self.batch_size)}")


# ----------------------------------------------------------------------------------------------------
# type introspection
# ----------------------------------------------------------------------------------------------------


_HINTS_CACHE: Dict[type, Dict[str, Any]] = {}


def _hints(cls: type) -> Dict[str, Any]:
    """Resolved field types (string annotations from ``from __future__ import annotations`` included)."""
    if cls not in _HINTS_CACHE:
        try:
            _HINTS_CACHE[cls] = get_type_hints(cls)
        except NameError as exc:
            raise TypeError(
                f"cannot resolve the field types of {cls.__qualname__} ({exc}); define config dataclasses at "
                "module level so string annotations can be resolved"
            ) from exc
    return _HINTS_CACHE[cls]


def _init_fields(cls: type) -> List[dataclasses.Field]:
    return [f for f in fields(cls) if f.init]


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _strip_optional(tp: Any) -> Tuple[Any, bool]:
    """``Optional[X] -> (X, True)``; other types unchanged."""
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not _NoneType]
        if len(args) < len(get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and is_dataclass(tp)


def _type_name(tp: Any) -> str:
    """Human name of a field type, as used in error messages and :func:`describe`."""
    if tp is Any or tp is object:
        return "any"
    if tp is _NoneType:
        return "null"
    if _is_union(tp):
        args = get_args(tp)
        names = [_type_name(a) for a in args if a is not _NoneType]
        if _NoneType in args:
            names.append("null")
        return " or ".join(names)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, Sequence) or tp is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple or tp is tuple:
        if not args:
            return "list"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin in (dict, Mapping) or tp is dict:
        if args and args[1] is not Any:
            return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
        return "mapping"
    if _is_dataclass_type(tp):
        return f"section ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _choices_text(choices: Sequence[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


# ----------------------------------------------------------------------------------------------------
# coercion
# ----------------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_error(key: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
    tail = f"; {extra}" if extra else ""
    return ConfigError(f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){tail}", key=key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (parsed YAML or an override) to field type ``tp``; ConfigError if it can't."""
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if _NoneType in args:
                return None
            raise _type_error(key, value, tp)
        options = [a for a in args if a is not _NoneType]
        if len(options) == 1:
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise _type_error(key, value, tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        for choice in args:  # "3" for Literal[3], 1 for Literal[1.0]
            try:
                if _coerce(value, type(choice), key) == choice:
                    return choice
            except ConfigError:
                pass
        raise ConfigError(
            f"invalid choice {value!r}; {_suggest(value, [str(a) for a in args])}"
            f"valid choices: {_choices_text(args)}",
            key=key,
        )
    if value is None:
        raise _type_error(key, value, tp, "this key cannot be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _type_error(key, value, tp, "use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    number = None
                if number is not None and number.is_integer():
                    return int(number)
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise _type_error(key, value, tp)
        if not math.isfinite(number):  # NaN passes every bound check (each comparison is False): refused here
            raise ConfigError(f"got {value!r}; must be a finite number", key=key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(key, value, tp, "quote the value if it is meant as text")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=key)
    if origin in (list, Sequence) or tp in (list, tuple) or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp, "write a list like [a, b]")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _type_error(key, value, tp, f"exactly {len(args)} items are needed")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, _join(key, i)) for i, (v, a) in pairs)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, _join(key, i)) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, value, tp, "write a mapping like {name: value}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, _join(key, k)) for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _type_error(key, value, tp)
    return value


def _check_metadata(value: Any, meta: Mapping[str, Any], key: str) -> None:
    """Declared ``choices`` and inclusive ``min`` / ``max`` bounds of one field (None always passes)."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"invalid choice {value!r}; {_suggest(value, [str(c) for c in choices])}"
            f"valid choices: {_choices_text(choices)}",
            key=key,
        )
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        raise ConfigError(f"got {value!r}; must be >= {low}; set {key} to a value >= {low}", key=key)
    if high is not None and value > high:
        raise ConfigError(f"got {value!r}; must be <= {high}; set {key} to a value <= {high}", key=key)


# ----------------------------------------------------------------------------------------------------
# building dataclasses
# ----------------------------------------------------------------------------------------------------


def _unknown_key_error(cls: type, name: Any, value: Any, prefix: str) -> ConfigError:
    valid = [f.name for f in _init_fields(cls)]
    where = f"of {prefix!r}" if prefix else "at the top level"
    return ConfigError(
        f"unknown key (value {value!r}); {_suggest(name, valid)}valid keys {where}: {', '.join(valid)}",
        key=_join(prefix, name),
    )


def from_dict(cls: Type[T], data: Optional[Mapping[str, Any]], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (missing keys keep their defaults).

    Values are coerced by the field types, declared choices and bounds are checked, then
    ``__post_init__`` runs and ``validate()`` (when the class defines one) is called. A class may define a
    classmethod ``prepare_data(data, prefix) -> data`` that rewrites shorthand forms first. ``prefix`` is the
    dotted key of this section, used in every error message (``from_dict(GRPOConfig, raw, "train")``).
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"expected a section (mapping of keys to values), got {data!r} ({type(data).__name__})",
            key=prefix,
        )
    prepare = getattr(cls, "prepare_data", None)
    if callable(prepare):  # a section's shorthand forms, normalised to the declared one (RunConfig's rewards)
        data = prepare(data, prefix)
    hints = _hints(cls)
    by_name = {f.name: f for f in _init_fields(cls)}
    for name, value in data.items():
        if name not in by_name:
            raise _unknown_key_error(cls, name, value, prefix)
    kwargs: Dict[str, Any] = {}
    for name, f in by_name.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                help_text = f.metadata.get("help")
                raise ConfigError("missing required key" + (f"; {help_text}" if help_text else ""), key=key)
            continue
        value = _coerce(data[name], hints[name], key)
        _check_metadata(value, f.metadata, key)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        raise exc.under(prefix) from None
    except ValueError as exc:  # TRL-style __post_init__ checks; TypeErrors are bugs
        raise ConfigError(str(exc), key=prefix) from exc
    hook = getattr(obj, "validate", None)
    if callable(hook):
        try:
            hook()
        except ConfigError as exc:
            raise exc.under(prefix) from None
        except ValueError as exc:  # TRL-style __post_init__ checks; TypeErrors are bugs
            raise ConfigError(str(exc), key=prefix) from exc
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe data of a config: dataclasses -> dicts, tuples -> lists (recursively)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


# ----------------------------------------------------------------------------------------------------
# YAML
# ----------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (line {key_node.start_mark.line + 1}, "
                    f"first on line {seen[key]}); "
                    "keep one of them"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists of scalars (``window: [0, 3]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(v, (int, float, bool, str, _NoneType)) for v in data) and len(data) <= 8
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{source}: invalid YAML: {detail}") from None


def load_yaml(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a YAML config file into a dict (an empty file is ``{}``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}; give the path of a YAML file (see configs/)")
    with open(path, encoding="utf-8") as f:
        data = _parse_yaml(f.read(), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def dump_yaml(cfg: Any) -> str:
    """YAML text of a config (a dataclass or plain data), keys in declaration order."""
    return yaml.dump(
        to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )


def save_config(cfg: Any, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config as YAML, atomically (a crash never leaves a half-written file)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".yaml.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(dump_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------------------------------

_YAML_NULLS = {"", "~", "null", "Null", "NULL"}


def _accepts_raw_string(tp: Any) -> bool:
    """True when a field takes text, so the override's right-hand side is kept verbatim (``name=yes``)."""
    tp, _ = _strip_optional(tp)
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    return False


def parse_override(text: str, tp: Any = Any) -> Tuple[str, Any]:
    """Split ``"a.b=value"`` into the key and the value parsed for a field of type ``tp``.

    Values are YAML (``true``, ``3``, ``1e-4``, ``[0, 3]``, ``{a: 1}``, ``null``), except for text fields,
    which keep the raw string (quotes stripped) so ``negative_prompt=no`` stays ``"no"``.
    """
    key, raw = _split_override(text)
    return key, _parse_value(raw, tp, key)


def _split_override(text: str) -> Tuple[str, str]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. sample.num_steps=10")
    if any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part; write e.g. sample.num_steps=10")
    return key, raw


def _parse_value(raw: str, tp: Any, key: str) -> Any:
    stripped = raw.strip()
    if _accepts_raw_string(tp):
        if _strip_optional(tp)[1] and stripped in _YAML_NULLS:
            return None
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
            return _parse_yaml(stripped, f"override {key}")
        return raw
    return _parse_yaml(raw, f"override {key}={raw}") if stripped else None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return copy.deepcopy(to_dict(f.default))
    if f.default_factory is not MISSING:
        return to_dict(f.default_factory())
    return MISSING


def _child(
    tp: Any, segment: str, key: str, parent_key: str, value: Any
) -> Tuple[Any, Optional[dataclasses.Field]]:
    """Type (and dataclass field, if any) of ``segment`` inside a value of type ``tp``."""
    tp, _ = _strip_optional(tp)
    if tp is Any or tp is object:
        return Any, None
    if _is_dataclass_type(tp):
        by_name = {f.name: f for f in _init_fields(tp)}
        if segment not in by_name:
            raise _unknown_key_error(tp, segment, value, parent_key)
        return _hints(tp)[segment], by_name[segment]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not re.fullmatch(r"\d+", segment):
            raise ConfigError(f"{parent_key} is a list; use a number as index, e.g. {parent_key}.0", key=key)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            index = int(segment)
            return (args[index] if index < len(args) else Any), None
        return (args[0] if args else Any), None
    if origin in (dict, Mapping) or tp is dict:
        return (args[1] if args else Any), None
    raise ConfigError(
        f"{parent_key} holds a value ({_type_name(tp)}), not a section; set {parent_key}=VALUE instead",
        key=key,
    )


def _empty_container(tp: Any) -> Any:
    tp, _ = _strip_optional(tp)
    origin = get_origin(tp)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        return []
    return {}


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str], cls: Optional[type] = None
) -> Dict[str, Any]:
    """Return a copy of ``data`` with ``key=value`` overrides applied (``data`` is not modified).

    Keys are dotted paths through sections, list indices and mapping keys: ``train.lr=1e-4``,
    ``rewards.0.weight=0.5`` (index ``len(list)`` appends), ``sample.window=[0,3]``. With ``cls`` (the
    dataclass ``data`` describes) unknown keys fail here, text fields keep the raw string, and a missing
    intermediate list starts from the field's default. Values are coerced later by :func:`from_dict`.
    """
    result: Dict[str, Any] = copy.deepcopy(dict(data))
    for text in overrides:
        key, raw = _split_override(text)
        parts = key.split(".")
        tp: Any = cls if cls is not None else Any
        node: Any = result
        path = ""
        for depth, segment in enumerate(parts):
            parent_key, path = path, _join(path, segment)
            tp, f = _child(tp, segment, path, parent_key, raw)
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not re.fullmatch(r"\d+", segment):
                    raise ConfigError(
                        f"{parent_key} is a list; use a number as index, e.g. {parent_key}.0", key=path
                    )
                index = int(segment)
                if index > len(node):
                    change = f"use 0..{len(node) - 1} to change one or " if node else "use "
                    raise ConfigError(
                        f"index {index} is out of range: {parent_key} has {len(node)} item(s); "
                        f"{change}{len(node)} to append",
                        key=path,
                    )
                if index == len(node):
                    node.append(MISSING)
                slot: Any = index
            elif isinstance(node, dict):
                slot = segment
            else:
                raise ConfigError(
                    f"{parent_key} is {node!r}, not a section or list; set {parent_key}=VALUE instead",
                    key=path,
                )
            if last:
                node[slot] = _parse_value(raw, tp, path)
                break
            child = node[slot] if (isinstance(node, list) or slot in node) else MISSING
            if child is MISSING or child is None:
                child = _field_default(f) if f is not None else MISSING
                if child is MISSING or child is None or not isinstance(child, (dict, list)):
                    child = _empty_container(tp)
                node[slot] = child
            node = child
    return result


def load_config(
    cls: Type[T], path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = ()
) -> T:
    """YAML file (optional) + ``key=value`` overrides -> validated dataclass ``cls``."""
    data = load_yaml(path) if path is not None else {}
    prepare = getattr(cls, "prepare_data", None)
    if not callable(prepare):
        return from_dict(cls, apply_overrides(data, overrides, cls))
    # shorthands are normalised before each override, so that rewards.0.weight=2 applies to the list form
    data = prepare(data, "")
    for override in overrides:
        data = prepare(apply_overrides(data, [override], cls), "")
    return from_dict(cls, data)


# ----------------------------------------------------------------------------------------------------
# documentation
# ----------------------------------------------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str:
    value = _field_default(f)
    if value is MISSING:
        return "(required)"
    if isinstance(value, dict) and not value:
        return "{}"
    text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def _rows(cls: type, prefix: str) -> List[Tuple[str, str, str, str]]:
    rows = []
    hints = _hints(cls)
    for f in _init_fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        inner, _ = _strip_optional(tp)
        if _is_dataclass_type(inner):
            rows.extend(_rows(inner, key))
            continue
        if get_origin(inner) is list and _is_dataclass_type(get_args(inner)[0]):
            rows.append((key, "list of sections", _default_text(f), f.metadata.get("help", "")))
            rows.extend(_rows(get_args(inner)[0], f"{key}.<i>"))
            continue
        help_text = f.metadata.get("help", "")
        notes = []
        type_text = _type_name(tp)
        literal = next((t for t in (inner, tp) if get_origin(t) is Literal), None)
        if literal is not None:
            type_text = type_text.replace(_type_name(literal), type(get_args(literal)[0]).__name__)
            notes.append("choices: " + ", ".join(str(c) for c in get_args(literal)))
        if "choices" in f.metadata:
            notes.append("choices: " + ", ".join(str(c) for c in f.metadata["choices"]))
        if "min" in f.metadata:
            notes.append(f">={f.metadata['min']}")
        if "max" in f.metadata:
            notes.append(f"<={f.metadata['max']}")
        if notes:
            help_text = f"{help_text} [{'; '.join(notes)}]".strip()
        rows.append((key, type_text, _default_text(f), help_text))
    return rows


def describe(cls: type, prefix: str = "", width: int = 120) -> str:
    """A text table of every key of ``cls`` (nested sections flattened): key, type, default, help."""
    rows = [("key", "type", "default", "help")] + _rows(cls, prefix)
    w_key = max(len(r[0]) for r in rows)
    w_type = min(max(len(r[1]) for r in rows), 20)
    w_def = min(max(len(r[2]) for r in rows), 20)
    indent = w_key + w_type + w_def + 6
    help_width = max(width - indent, 40)
    lines = []
    for i, (key, type_text, default, help_text) in enumerate(rows):
        head = f"{key:<{w_key}}  {type_text:<{w_type}}  {default:<{w_def}}  "
        wrapped = textwrap.wrap(help_text, help_width, break_long_words=False, break_on_hyphens=False)
        if len(head) > indent:  # an over-long type or default: its help starts on the next line
            lines.append(head.rstrip())
        else:
            lines.append((head + (wrapped.pop(0) if wrapped else "")).rstrip())
        lines.extend(" " * indent + more for more in wrapped)
        if i == 0:
            lines.append("-" * (indent + help_width))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# trainer registry
# ----------------------------------------------------------------------------------------------------

#: trainer name -> its config dataclass (or a ``"module:Class"`` path imported on first use). The built-in
#: trainers are listed as paths so that ``diffalign config --help-keys`` names them without importing torch;
#: importing their module replaces the path with the class.
BUILTIN_TRAINERS: Dict[str, str] = {"grpo": "trainers.grpo:GRPOConfig", "nft": "trainers.nft:NFTConfig"}
TRAINER_CONFIGS: Dict[str, Union[type, str]] = dict(BUILTIN_TRAINERS)


def register_trainer_config(name: str) -> Callable[[Type[T]], Type[T]]:
    """Class decorator: register a trainer's config dataclass under ``name`` (the value of ``trainer:``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"trainer name must be a non-empty string without ':', got {name!r}")

    def deco(cls: Type[T]) -> Type[T]:
        if not _is_dataclass_type(cls):
            raise TypeError(f"trainer config for {name!r} must be a dataclass, got {cls!r}")
        TRAINER_CONFIGS[name] = cls
        return cls

    return deco


def _import_object(path: str, key: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        hint = "check the 'module:Class' path"
        if isinstance(exc, ModuleNotFoundError) and exc.name and module_name.startswith(exc.name):
            hint = (f"check the 'module:Class' path, and put the folder that holds {exc.name.replace('.', '/')} on "
                    "PYTHONPATH or install the package (the `diffalign` command does not look in the current folder)")
        raise ConfigError(f"cannot import {path!r}: {exc}; {hint}", key=key) from None
    return obj


def _discover_trainers(name: Optional[str]) -> None:
    """Import ``trainers.<name>`` (or, with ``name=None``, every trainer module) so they register."""
    try:
        package = importlib.import_module("trainers")
    except ImportError:
        return
    if name is not None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            return
        try:
            importlib.import_module(f"trainers.{name}")
        except ModuleNotFoundError as exc:
            if exc.name not in (f"trainers.{name}",):
                raise
        return
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        if not info.name.startswith("_"):
            try:
                importlib.import_module(f"trainers.{info.name}")
            except Exception:  # noqa: BLE001 - listing choices must not fail on one broken module
                pass


def trainer_config_class(name: Optional[str]) -> type:
    """The config dataclass of trainer ``name``: registered, in module ``trainers.<name>``, or a
    ``"module:Class"`` path. Unknown names list the registered trainers."""
    if not name:
        _discover_trainers(None)
        raise ConfigError(
            "not set; choose a trainer, e.g. trainer=NAME with NAME one of: "
            f"{', '.join(sorted(TRAINER_CONFIGS))}",
            key="trainer",
        )
    entry = TRAINER_CONFIGS.get(name)
    if entry is None and ":" in name:
        entry = name
    if entry is None:
        _discover_trainers(name)
        entry = TRAINER_CONFIGS.get(name)
    if entry is None:
        _discover_trainers(None)
        valid = sorted(TRAINER_CONFIGS)
        raise ConfigError(
            f"invalid choice {name!r}; {_suggest(name, valid)}"
            f"valid choices: {_choices_text(valid) or '(none registered)'}"
            " (or a 'module:ConfigClass' path: a trainer registered with register_trainer_config in your own module "
            "is known only once that module is imported, so name it as my_module:MyConfig)",
            key="trainer",
        )
    cls = _import_object(entry, "trainer") if isinstance(entry, str) else entry
    if not _is_dataclass_type(cls):
        raise ConfigError(f"{entry!r} is not a dataclass; a trainer config must be one", key="trainer")
    return cls


def resolve_train_section(run_cfg: "RunConfig") -> Any:
    """Parse ``run_cfg.train`` with the chosen trainer's dataclass (errors say ``train.<key>``).

    When the trainer config defines ``validate_run(run_cfg)``, it is called for cross-section rules
    (e.g. ``sample.group_size >= 2`` for group-relative trainers); it raises ConfigErrors with full keys.
    """
    cls = trainer_config_class(run_cfg.trainer)
    train_cfg = from_dict(cls, run_cfg.train, prefix="train")
    hook = getattr(train_cfg, "validate_run", None)
    if callable(hook):
        try:
            hook(run_cfg)
        except ConfigError:
            raise
        except ValueError as exc:  # TRL-style __post_init__ checks; TypeErrors are bugs
            raise ConfigError(str(exc), key="train") from exc
    return train_cfg


# ----------------------------------------------------------------------------------------------------
# shared sections
# ----------------------------------------------------------------------------------------------------

_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class LoraConfig:
    """LoRA adapter on the denoiser (peft)."""

    enabled: bool = param(True, help="train a LoRA adapter instead of the full denoiser")
    rank: int = param(32, help="LoRA rank r", min=1)
    alpha: float = param(64.0, help="LoRA alpha; the update is scaled by alpha / rank")
    target_modules: Optional[List[str]] = param(
        None, help="module names to adapt; null = the adapter's default attention projections"
    )
    init: Literal["gaussian", "default"] = param(
        "gaussian", help="initialisation of the A matrix (B starts at zero either way), as in peft"
    )

    def __post_init__(self) -> None:
        check(self.alpha > 0, "alpha", f"got {self.alpha!r}; must be > 0; set alpha to e.g. 2 * rank")
        if self.target_modules is not None:
            check(len(self.target_modules) > 0, "target_modules", "got []; list module names or use null")


@dataclass
class ModelConfig:
    """Which generator to load and how."""

    path: str = param(
        "builtin:shapes-flow",
        help="local diffusers pipeline folder, hub id, or a built-in model (builtin:shapes-flow, ...)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = param(
        "float32", help="weight dtype of the frozen parts; trainable LoRA weights and log-probs stay float32"
    )
    device: str = param("auto", help="auto (accelerate's device), cpu, mps, cuda or cuda:N")
    lora: LoraConfig = param(default_factory=LoraConfig, help="LoRA adapter")
    gradient_checkpointing: bool = param(False, help="recompute activations in backward to save memory")
    attention: Literal["sdpa", "xformers"] = param("sdpa", help="attention kernel")

    def __post_init__(self) -> None:
        check(bool(self.path.strip()), "path", "got ''; give a local folder, a hub id or builtin:shapes-flow")
        check(
            _DEVICE_RE.fullmatch(self.device) is not None,
            "device",
            f"invalid choice {self.device!r}; valid choices: 'auto', 'cpu', 'mps', 'cuda', 'cuda:N'",
        )


@dataclass
class SampleConfig:
    """How images are sampled during training (rollouts) and evaluation."""

    num_steps: int = param(10, help="sampler steps per rollout during training", min=1)
    eval_num_steps: int = param(40, help="sampler steps for evaluation images", min=1)
    guidance_scale: float = param(1.0, help="classifier-free guidance scale; 1.0 = no CFG", min=1.0)
    negative_prompt: str = param("", help="negative prompt for CFG (ignored when guidance_scale = 1)")
    step: Literal["flow_sde", "flow_cps", "ddim", "flow_euler"] = param(
        "flow_sde",
        help="step function: flow_sde (Flow-GRPO SDE), flow_cps (coefficient-preserving), ddim (DDIM with "
        "eta), flow_euler (deterministic ODE)",
    )
    noise_level: float = param(
        0.7,
        help="noise knob of the step: a for flow_sde / flow_cps, eta for ddim; unused by flow_euler",
        min=0.0,
    )
    window: Optional[Tuple[int, int]] = param(
        None, help="[start, end): the steps that are stochastic and trained; null = all steps"
    )
    height: Optional[int] = param(None, help="image height in pixels; null = the model's native size", min=1)
    width: Optional[int] = param(None, help="image width in pixels; null = the model's native size", min=1)
    batch_size: int = param(8, help="images per forward pass on each process", min=1)
    group_size: int = param(8, help="images per prompt (K); group-relative trainers need >= 2", min=1)
    num_batches_per_epoch: int = param(
        1, help="sampling batches per process per epoch; samples/epoch = processes * batch_size * this", min=1
    )
    random_window: Optional[Tuple[int, int]] = param(
        None,
        help="Flow-GRPO-Fast: [lo, hi) range in which a window of `window` length is drawn anew each epoch; "
        "null = use `window` as given",
    )
    shared_group_noise: bool = param(
        False,
        help="all images of a prompt's group start from the same initial noise, so they differ only by the "
        "stochastic steps' noise and the group advantage credits the trained steps (useful with `window`; "
        "group-relative trainers with stochastic steps only)",
    )

    @property
    def drawn_window_length(self) -> int:
        """The length of the windows drawn inside ``random_window``: ``window``'s, or one step without it."""
        return (self.window[1] - self.window[0]) if self.window is not None else 1

    def __post_init__(self) -> None:
        if self.window is not None:
            start, end = self.window
            check(
                0 <= start < end <= self.num_steps,
                "window",
                f"got {list(self.window)}; must satisfy 0 <= start < end <= num_steps ({self.num_steps}); "
                f"use e.g. [0, {min(self.num_steps, 3)}], or null for all steps",
            )
        if self.random_window is not None:
            lo, hi = self.random_window
            k = self.drawn_window_length
            check(
                0 <= lo and lo + k <= hi <= self.num_steps,
                "random_window",
                f"got {list(self.random_window)}; windows of length {k} are drawn inside it, so it must satisfy "
                f"0 <= lo, lo + {k} <= hi <= num_steps ({self.num_steps}); use e.g. "
                f"[0, {max(k, self.num_steps // 2)}], or null",
            )


@dataclass
class RewardSpec:
    """One reward column. Fields match :class:`rewards.registry.RewardSpec` (see :meth:`registry_kwargs`)."""

    name: str = param(help="registered reward name or a dotted path my_pkg.my_module:my_reward")
    weight: float = param(1.0, help="weight of this column in the weighted sum (may be negative or 0)")
    kwargs: Dict[str, Any] = param({}, help="keyword arguments of the reward factory")
    transform: Optional[Any] = param(
        None,
        help="reward transform: a name (rank, affine, ...), {name: ..., **kwargs}, or a list of those; "
        "null = none",
    )
    transform_kwargs: Dict[str, Any] = param({}, help="keyword arguments of a transform given by name")
    on_error: Literal["raise", "skip"] = param("raise", help="on a failing sample: raise, or skip it (NaN)")
    batch_size: Optional[int] = param(None, help="chunk size inside the reward; null = its default", min=1)
    device: Optional[str] = param(None, help="device of the reward model; null = its default")
    label: Optional[str] = param(
        None, help="column name (default: name); needed when one reward appears twice"
    )
    allow_nan: Optional[bool] = param(None, help="override the reward's allows_nan; null = keep it")

    def __post_init__(self) -> None:
        check(
            bool(self.name.strip()),
            "name",
            "got ''; give a registered reward name or my_pkg.my_module:my_reward",
        )
        t = self.transform
        items = t if isinstance(t, list) else [t]
        for item in items:
            ok = isinstance(item, str) or (isinstance(item, Mapping) and isinstance(item.get("name"), str))
            check(
                t is None or ok,
                "transform",
                f"got {t!r}; use a transform name, {{name: NAME, ...kwargs}}, or a list of those",
            )
        check(
            not self.transform_kwargs or isinstance(t, str),
            "transform_kwargs",
            f"got {self.transform_kwargs!r} but transform is {t!r}; transform_kwargs needs transform=NAME "
            "(or put the kwargs inside {name: NAME, ...})",
        )

    def registry_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for :class:`rewards.registry.RewardSpec` (transform_kwargs folded in)."""
        data = to_dict(self)
        extra = data.pop("transform_kwargs")
        if extra:
            data["transform"] = {"name": data["transform"], **extra}
        return data


@dataclass
class LoggingConfig:
    """Metrics and images. A jsonl log is always written to output_dir."""

    tensorboard: bool = param(False, help="also write tensorboard event files")
    wandb: bool = param(False, help="also log to Weights & Biases (pip install diffalign[wandb])")
    wandb_project: str = param("diffalign", help="W&B project name")
    log_every: int = param(1, help="write a metrics row every N epochs (and at every evaluation, the last epoch and "
                                   "a stop); rows in between are not written", min=1)
    image_every: int = param(10, help="log an image grid every N epochs; 0 = never", min=0)


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    every: int = param(
        50,
        help="save every N iterations (sample-and-train rounds, or optimizer steps for offline trainers); "
        "0 = only at the end",
        min=0,
    )
    keep_last: Optional[int] = param(3, help="keep the N newest checkpoints; null = keep all", min=1)
    resume_from: Optional[str] = param(
        None, help="'latest' (newest checkpoint in output_dir) or a checkpoint folder; null = start fresh"
    )


@dataclass
class PromptsConfig:
    """Where training and evaluation prompts come from."""

    source: Literal["shapes", "file"] = param(
        "shapes", help="shapes: the built-in world's seeded prompt sampler; file: one prompt per line"
    )
    path: Optional[str] = param(None, help="prompt file (source=file); eval_path defaults to it")
    eval_path: Optional[str] = param(None, help="evaluation prompt file (source=file)")
    split: Literal["held_in", "held_out"] = param("held_in", help="shapes split used for training prompts")
    categories: Optional[List[str]] = param(None, help="shapes categories to train on; null = all of the split")
    eval_size: int = param(64, help="number of evaluation prompts", min=1)
    eval_split: Literal["held_in", "held_out"] = param("held_in", help="shapes split used for evaluation")

    def __post_init__(self) -> None:
        if self.source == "file":
            check(self.path is not None, "path", "source=file needs prompts.path (one prompt per line)")
            check(self.categories is None, "categories",
                  f"got {self.categories} with source=file; categories choose among the built-in shapes prompts: "
                  "set prompts.source=shapes, or categories=null")
            for key in ("split", "eval_split"):
                check(getattr(self, key) == "held_in", key,
                      f"got {getattr(self, key)!r} with source=file; the splits are the built-in shapes prompts' and "
                      "a prompt file is read as it is: for held-out evaluation prompts give prompts.eval_path, or "
                      "set prompts.source=shapes")
        else:  # a prompt file named with the default source=shapes was silently not read
            for key in ("path", "eval_path"):
                check(getattr(self, key) is None, key,
                      f"got {getattr(self, key)!r} with source=shapes, which draws the built-in prompts and reads no "
                      f"file: add prompts.source=file to use it (or drop prompts.{key})")
        if self.categories is not None:
            from diffalign.shapes.prompts import CATEGORIES, COLORED_CATEGORIES

            bad = [c for c in self.categories if c not in CATEGORIES]
            check(not bad, "categories", f"unknown shapes categories {bad}; valid categories are {list(CATEGORIES)}")
            check(bool(self.categories), "categories",
                  f"got []; name at least one of {list(CATEGORIES)}, or null for all of the split")
            plain = [c for c in self.categories if c not in COLORED_CATEGORIES]
            check(self.split != "held_out" or not plain, "categories",
                  f"{plain} have no colours, so split=held_out (colour-shape pairs held out of training) has no "
                  f"prompts of them: use categories among {list(COLORED_CATEGORIES)}, or split=held_in")


_GUIDANCE_METHODS = ("none", "doob", "fk", "svdd", "best_of_n")


@dataclass
class GuidanceConfig:
    """Training-free reward-guided sampling for ``diffalign sample`` (samplers.guided); rewards: ``rewards``."""

    method: Literal["none", "doob", "fk", "svdd", "best_of_n"] = param(
        "none",
        help="none (the plain sample grid), doob (DOIT Doob h-transform), fk (Feynman-Kac steering), svdd "
        "(per-step candidate selection), best_of_n",
    )
    compare: List[str] = param(
        [], help="more methods to run on the same prompts and noise for the comparison table, e.g. [none, best_of_n]"
    )
    num_particles: int = param(
        1, help="particles (samples) per prompt: N of best_of_n, FK's particles, DOIT/SVDD chains (best kept)", min=1
    )
    num_steps: Optional[int] = param(None, help="sampler steps; null = sample.eval_num_steps", min=1)
    step: Optional[Literal["flow_sde", "flow_cps", "ddim"]] = param(
        None, help="stochastic kernel of the guided sampler; null = sample.step (ddim for diffusion models)"
    )
    noise_level: Optional[float] = param(None, help="kernel noise (a or eta); null = sample.noise_level", min=0.0)
    window: Optional[Tuple[int, int]] = param(
        None, help="[start, end): steps that are guided (DOIT), resampled (FK) or selected (SVDD); null = all"
    )
    gamma: float = param(1.0, help="DOIT strength; 0 reproduces the unguided sampler exactly", min=0.0)
    num_candidates: int = param(8, help="DOIT / SVDD candidates M per step and sample", min=1)
    temperature: float = param(1.0, help="DOIT softmax temperature tau (on standardised rewards by default)")
    standardize: bool = param(True, help="DOIT: z-score each reward column over the M candidates")
    antithetic: bool = param(True, help="DOIT: antithetic candidate noise (M must be even)")
    lookahead: Literal["reuse_eps", "denoise", "rollout"] = param(
        "reuse_eps", help="DOIT candidate clean estimate: reuse_eps (free), denoise (M forwards per step) or "
        "rollout (each candidate completed by the ODE: the reward of a real sample, M x remaining steps forwards)"
    )
    keep_simulated: bool = param(
        False, help="DOIT with lookahead=rollout: a particle is replaced by the best completed candidate it "
        "simulated when that scored higher (no extra reward evaluation; search on top of steering)")
    resample_lambda: float = param(
        0.0, help="DOIT: at each guided step resample a prompt's particles by their simulated h = mean exp(lambda r) "
        "of the candidates over their ancestor's previous h (twisted SMC weights, no extra reward evaluation); "
        "0 = off, needs num_particles >= 2 and gamma > 0", min=0.0)
    fk_lambda: float = param(2.0, help="FK lambda: target p0 exp(lambda r) (to lower a reward, give it a negative "
                             "weight)", min=0.0)
    fk_potential: Literal["diff", "max", "add", "rt"] = param("max", help="FK potential")
    fk_every: int = param(1, help="FK: resample every N steps inside window", min=1)
    fk_ess_threshold: float = param(
        0.5, help="FK: resample when ESS < this * particles (1 = always, 0 = never)", min=0.0
    )
    svdd_alpha: float = param(0.0, help="SVDD selection temperature; 0 = argmax", min=0.0)
    svdd_lookahead: Literal["reuse_eps", "denoise"] = param(
        "denoise", help="SVDD candidate value: denoise (SVDD-PM, M forwards per step) or reuse_eps"
    )
    select: Literal["best", "all"] = param(
        "best", help="doob / fk: keep the best particle per prompt, or all particles (best_of_n and svdd always "
        "keep the best)")

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature", f"got {self.temperature!r}; must be > 0")
        doob = "doob" in (self.method, *self.compare)
        check(not (doob and self.resample_lambda > 0 and self.num_particles < 2),
              "resample_lambda", f"got {self.resample_lambda} with num_particles={self.num_particles}; resampling "
              "moves particles between each other: set guidance.num_particles >= 2 or resample_lambda=0")
        check(not (doob and self.resample_lambda > 0 and self.gamma == 0), "resample_lambda",
              f"got {self.resample_lambda} with gamma=0; resampling uses DOIT's simulated candidates, which gamma=0 "
              "does not draw: set guidance.gamma > 0 or resample_lambda=0")
        check(not self.keep_simulated or self.lookahead == "rollout", "keep_simulated",
              f"got true with lookahead={self.lookahead!r}; only rollout completes candidates into real samples: "
              "set guidance.lookahead=rollout")
        for i, m in enumerate(self.compare):
            check(
                m in _GUIDANCE_METHODS,
                f"compare.{i}",
                f"invalid choice {m!r}; {_suggest(m, list(_GUIDANCE_METHODS))}valid choices: "
                f"{_choices_text(_GUIDANCE_METHODS)}",
            )
        check(
            not (doob and self.gamma > 0 and self.antithetic and self.num_candidates % 2),
            "num_candidates",
            f"got {self.num_candidates}; antithetic DOIT needs an even number, use {self.num_candidates + 1} "
            "or antithetic=false",
        )
        check(not (doob and self.gamma > 0 and self.num_candidates < 2), "num_candidates",
              f"got {self.num_candidates}; DOIT weighs its candidates against each other and needs at least 2")
        if self.window is not None:
            check(0 <= self.window[0] < self.window[1], "window",
                  f"got {list(self.window)}; must be [start, end) with 0 <= start < end (sampler steps)")
            if self.num_steps is not None:
                check(self.window[1] <= self.num_steps, "window",
                      f"got {list(self.window)}; end must be <= guidance.num_steps={self.num_steps}")


def _weights_mapping_to_specs(value: Mapping[Any, Any], key: str) -> List[Dict[str, Any]]:
    """Flow-GRPO's reward section ``{name: weight}`` -> ``[{name: name, weight: weight}, ...]``."""
    if "name" in value:
        raise ConfigError(f"got a single spec {dict(value)!r}; write a list of specs, e.g. [{{name: ..., "
                          "weight: 1.0}], or Flow-GRPO's {name: weight} mapping", key=key)
    specs = []
    for name, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"expected a number (the weight of reward {name!r} in the {{name: weight}} form), got "
                              f"{weight!r} ({type(weight).__name__}); for kwargs, transforms or other options write "
                              f"the list form, e.g. [{{name: {name}, weight: 1.0, kwargs: {{...}}}}]",
                              key=_join(key, name))
        specs.append({"name": str(name), "weight": float(weight)})
    return specs


@dataclass
class RunConfig:
    """A whole run: shared sections plus the chosen trainer's raw ``train`` section."""

    seed: int = param(0, help="global seed; a run is reproducible from its config and seed", min=0, max=2**32 - 1)
    output_dir: str = param(
        "outputs/run", help="folder for checkpoints, logs, images and the resolved config"
    )
    trainer: Optional[str] = param(
        None, help="trainer name (registered in diffalign.config.TRAINER_CONFIGS) or module:ConfigClass"
    )
    model: ModelConfig = param(default_factory=ModelConfig, help="generator")
    sample: SampleConfig = param(default_factory=SampleConfig, help="sampling")
    prompts: PromptsConfig = param(default_factory=PromptsConfig, help="prompt source")
    rewards: List[RewardSpec] = param(
        [], help="reward columns, in order (Flow-GRPO's {name: weight} mapping is read as that list)")
    eval_rewards: List[RewardSpec] = param(
        [], help="extra reward columns scored only at evaluation (the trainers' eval_every and diffalign eval), "
        "after the training columns: e.g. train on a shaped or cheap proxy, evaluate on the target metric")
    train: Dict[str, Any] = param(
        {},
        help="trainer-specific keys, parsed by the trainer's config "
        "(see: diffalign config --help-keys trainer=NAME)",
    )
    logging: LoggingConfig = param(default_factory=LoggingConfig, help="logging")
    checkpoint: CheckpointConfig = param(default_factory=CheckpointConfig, help="checkpoints")
    guidance: GuidanceConfig = param(
        default_factory=GuidanceConfig, help="reward-guided sampling (diffalign sample)"
    )

    @classmethod
    def prepare_data(cls, data: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
        """``rewards`` / ``eval_rewards`` given as Flow-GRPO's ``{name: weight}`` mapping become the list form
        ``[{name: ..., weight: ...}, ...]`` (in the mapping's order)."""
        data = dict(data)
        for section in ("rewards", "eval_rewards"):
            value = data.get(section)
            if isinstance(value, Mapping):
                data[section] = _weights_mapping_to_specs(value, _join(prefix, section))
        return data

    def validate(self) -> None:
        """Parse the train section with the trainer's dataclass and keep it resolved (defaults filled in),
        so the saved config is complete. This imports the trainer's module."""
        check(not self.rewards or any(r.weight != 0 for r in self.rewards), "rewards",
              "every reward has weight 0, so the combined reward is undefined (0 / 0) and nothing is learned; give "
              "at least one reward a non-zero weight (an extra score to watch belongs in eval_rewards)")
        check(self.output_dir.strip() != "", "output_dir",
              "got ''; a run needs a folder for its checkpoints and logs, e.g. output_dir=outputs/my_run")
        g = self.guidance
        for key, step, eta in (("sample.noise_level", self.sample.step, self.sample.noise_level),
                               ("guidance.noise_level", g.step or self.sample.step,
                                self.sample.noise_level if g.noise_level is None else g.noise_level)):
            check(step != "ddim" or eta <= 1, key,
                  f"got {eta} with step ddim; DDIM's eta is at most 1 (1 = the DDPM posterior's noise; above it the "
                  "step's noise exceeds the next noise level and its mean is NaN): use e.g. 1.0")
        level = self.sample.noise_level if g.noise_level is None else g.noise_level
        needs_noise = [m for m in dict.fromkeys((g.method, *g.compare)) if m == "svdd" or (m == "doob" and g.gamma)]
        check(level > 0 or not needs_noise, "guidance.noise_level",
              f"got {level}{' (from sample.noise_level)' if g.noise_level is None else ''} with {needs_noise}; "
              "their candidates are draws of the kernel's noise, so they need a stochastic kernel: set "
              "guidance.noise_level, e.g. 0.7 (flow) or 1.0 (DDIM eta)")
        steps = g.num_steps or self.sample.eval_num_steps
        check(g.window is None or g.window[1] <= steps, "guidance.window",
              f"got {list(g.window or ())}; end must be <= the guided sampler's {steps} steps (guidance.num_steps, "
              "else sample.eval_num_steps)")
        if self.trainer is None:
            check(
                not self.train,
                "train",
                f"got keys {sorted(self.train)} but no trainer is set; add trainer=NAME",
            )
            return
        self.train = to_dict(resolve_train_section(self))
