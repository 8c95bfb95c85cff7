"""Reward registry: a plain dict of factories plus a dotted-path fallback for user plugins.

``REWARDS[name]`` is a factory ``factory(*, batch_size=None, device=None, **kwargs) -> reward``; setup
(loading weights, building OCR engines) happens in the factory, once. ``build_reward(spec)`` turns a config
entry into a reward object. A name that is not registered may be a dotted path ``my_pkg.my_module:attr``
where ``attr`` is

* a factory (a class, or a function decorated with :func:`register_reward` / :func:`reward_factory`):
  called with the spec's ``kwargs`` (plus ``batch_size`` / ``device`` when the spec sets them); or
* a plain function ``fn(images, prompts, metadata, **kwargs)``: wrapped in
  :class:`rewards.base.FunctionReward` with the spec's ``kwargs`` bound.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from rewards.base import FunctionReward, RewardBuildError, RewardFileError

__all__ = [
    "REWARDS",
    "ON_ERROR_POLICIES",
    "RewardSpec",
    "register_reward",
    "reward_factory",
    "build_reward",
    "get_factory",
    "parse_reward_specs",
]

REWARDS: Dict[str, Callable[..., Any]] = {}
ON_ERROR_POLICIES = ("raise", "skip")
_FACTORY_MARK = "_diffalign_reward_factory"
_PROTOCOL_ATTRS = ("name", "differentiable", "trainable", "range", "allows_nan")


def reward_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as a reward *factory* (so a dotted path to it is called once, not wrapped as a reward)."""
    setattr(fn, _FACTORY_MARK, True)
    return fn


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a factory (function or class) under ``name`` in :data:`REWARDS`."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        existing = REWARDS.get(name)
        if existing is not None and existing is not factory and _qualname(existing) != _qualname(factory):
            raise ValueError(
                f"reward {name!r} is already registered by {_qualname(existing)}; pick another name"
            )
        REWARDS[name] = reward_factory(factory)
        return factory

    return deco


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


@dataclass
class RewardSpec:
    """One reward entry of a config.

    Attributes:
        name: registry name (``list(REWARDS)``) or dotted path ``my_pkg.my_module:my_reward``.
        weight: weight of this column in :func:`rewards.multi.weighted_sum` (may be negative or 0).
        kwargs: keyword arguments for the factory (or bound to a plain-function reward).
        transform: ``None``, a transform name, ``{"name": ..., **kwargs}``, or a list of those applied in
            order (see :mod:`rewards.transforms`).
        on_error: ``"raise"`` (default) or ``"skip"`` (failed entries become NaN and are counted).
        batch_size: chunk size the reward uses internally (``None``: the reward's default).
        device: device of the reward's model (``None``: the reward's default, usually cuda if available).
        label: column name in the reward matrix (default ``name``); needed when one reward appears twice.
        allow_nan: override the reward's ``allows_nan`` attribute (``None``: keep it).
    """

    name: str
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)
    transform: Any = None
    on_error: str = "raise"
    batch_size: Optional[int] = None
    device: Optional[str] = None
    label: Optional[str] = None
    allow_nan: Optional[bool] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardSpec.name must be a non-empty string, got {self.name!r}")
        if self.on_error not in ON_ERROR_POLICIES:
            raise ValueError(
                f"reward {self.name!r}: on_error={self.on_error!r} is not valid; "
                f"use one of {list(ON_ERROR_POLICIES)}"
            )
        if self.kwargs is None:
            self.kwargs = {}
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(
                f"reward {self.name!r}: kwargs must be a mapping, got {type(self.kwargs).__name__}"
            )
        self.kwargs = dict(self.kwargs)
        self.weight = float(self.weight)
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be >= 1 or None, got {self.batch_size}")

    @property
    def column(self) -> str:
        return self.label or self.name

    @classmethod
    def from_any(cls, spec: Union["RewardSpec", str, Mapping[str, Any]]) -> "RewardSpec":
        """Accept a RewardSpec, a bare name, or a dict with the fields above (unknown keys are rejected)."""
        if isinstance(spec, RewardSpec):
            return spec
        if isinstance(spec, str):
            return cls(name=spec)
        if isinstance(spec, Mapping):
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(spec) - set(valid))
            if unknown:
                raise ValueError(
                    f"reward spec {dict(spec)!r} has unknown key(s) {unknown}; valid keys are {valid} "
                    "(put reward-specific options under 'kwargs')"
                )
            if "name" not in spec:
                raise ValueError(
                    f"reward spec {dict(spec)!r} needs a 'name' (one of {sorted(REWARDS)} or a dotted path)"
                )
            return cls(**dict(spec))
        raise TypeError(f"a reward spec must be a RewardSpec, a name or a dict, got {type(spec).__name__}")


def parse_reward_specs(config: Any) -> List[RewardSpec]:
    """Parse a reward section of a config into specs, in order.

    Accepts a list of specs (names, dicts or RewardSpec), a single spec, or Flow-GRPO's ``{name: weight}``
    mapping (when every value is a number).
    """
    if isinstance(config, (RewardSpec, str)):
        return [RewardSpec.from_any(config)]
    if isinstance(config, Mapping):
        if "name" not in config and config and all(isinstance(v, (int, float)) for v in config.values()):
            return [RewardSpec(name=k, weight=float(v)) for k, v in config.items()]
        return [RewardSpec.from_any(config)]
    if isinstance(config, Sequence):
        return [RewardSpec.from_any(s) for s in config]
    raise TypeError(f"cannot parse reward specs from {type(config).__name__}")


def _import_dotted(path: str) -> Any:
    """The object at ``my_pkg.my_module:attr``; a ValueError that names what is missing and the fix: the module
    (not on PYTHONPATH), an import inside it failing (its original message kept) or the attribute (close names)."""
    import difflib

    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"dotted reward path {path!r} must look like 'my_pkg.my_module:my_reward'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        parents = {".".join(module_name.split(".")[: i + 1]) for i in range(module_name.count(".") + 1)}
        if isinstance(exc, ModuleNotFoundError) and exc.name in parents:
            raise ValueError(
                f"cannot import module {module_name!r} for reward {path!r}: {exc}; put the folder that holds "
                f"{exc.name.replace('.', '/')}.py (or the package) on PYTHONPATH, or install the package"
            ) from exc
        raise ValueError(
            f"importing module {module_name!r} for reward {path!r} failed inside the module: "
            f"{type(exc).__name__}: {exc}; install what it imports or fix the import in {module_name}"
        ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            hint = f"did you mean {module_name}:{close[0]}? " if close and obj is module else ""
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (reward {path!r}); {hint}"
                             f"its callables are {names[:20]}") from None
    return obj


def get_factory(name: str) -> Callable[..., Any]:
    """Registered factory for ``name``, or the object at a dotted path; unknown names list the valid ones."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        return _import_dotted(name)
    raise ValueError(
        f"unknown reward {name!r}; registered rewards are {sorted(REWARDS)}. "
        "A reward outside diffalign can be given as a dotted path 'my_pkg.my_module:my_reward'."
    )


def _is_factory(obj: Any) -> bool:
    return isinstance(obj, type) or bool(getattr(obj, _FACTORY_MARK, False))


def build_reward(spec: Union[RewardSpec, str, Mapping[str, Any]]) -> Any:
    """Build the reward object described by ``spec`` (a RewardSpec, a name or a dict).

    The returned object follows :class:`rewards.base.Reward`. Its ``name`` (the column name) is the spec's
    ``label`` when given, else the reward's own name (for a plugin function: its ``name`` attribute or
    ``__name__``).
    Weight, transform and on_error are used by :class:`rewards.multi.MultiReward`, not here.
    """
    spec = RewardSpec.from_any(spec)
    target = get_factory(spec.name)
    placement: Dict[str, Any] = {}
    if spec.batch_size is not None:
        placement["batch_size"] = int(spec.batch_size)
    if spec.device is not None:
        placement["device"] = spec.device
    if not callable(target):
        raise TypeError(f"reward {spec.name!r} resolved to a non-callable {type(target).__name__}")
    if _is_factory(target):
        try:
            reward = target(**spec.kwargs, **placement)
        except RewardBuildError:  # an option the reward does not take: the user's, one line
            raise
        except FileNotFoundError as exc:  # weights or files named in the spec (its kwargs): the user's, one line
            said = str(exc)
            raise RewardFileError(said if said.startswith("reward ") else f"reward {spec.name!r}: {said}") from None
        except TypeError as exc:
            bad = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
            if bad and bad.group(1) in spec.kwargs:  # a factory passing its options on: one it does not take
                raise RewardBuildError(f"reward {spec.name!r}: unknown option {bad.group(1)!r} in its kwargs ({exc}); "
                                       "see the reward's options in the README's Rewards section") from None
            where = f" {placement}" if placement else ""
            raise TypeError(f"could not build reward {spec.name!r} with kwargs {spec.kwargs!r}{where}: {exc}") from exc
        if not callable(reward):
            raise TypeError(
                f"factory of reward {spec.name!r} returned a non-callable {type(reward).__name__}"
            )
        if not all(hasattr(reward, a) for a in _PROTOCOL_ATTRS):
            # A factory returning a bare function: add batching and the protocol attributes.
            # the column: the label, else the function's own name, else the factory's (a class plugin's
            # instance has no __name__: it was logged as "reward")
            name = spec.label or getattr(reward, "name", None) or getattr(reward, "__name__", None) or \
                getattr(target, "__name__", None)
            reward = FunctionReward(reward, name=name, **placement)
    else:
        reward = FunctionReward(target, name=spec.label, **spec.kwargs, **placement)  # checks the options
    if spec.label:
        reward.name = spec.label
    elif not getattr(reward, "name", None):
        reward.name = spec.name
    return reward


def check_reward_config(run_cfg: Any) -> None:
    """Registered names and transforms of a run config's ``rewards`` and ``eval_rewards``, so a typo stops a
    command before any model loads, naming the key and the valid choices (:class:`diffalign.config.ConfigError`).
    Dotted ``module:function`` paths are imported and resolved here too (a missing module or attribute is a
    ConfigError on ``<section>.<i>.name``; an import failing inside the user's module keeps its message); the
    reward is built only when the run builds it. Called by ``diffalign train``, ``eval`` and ``sample``;
    ``diffalign config`` stays free of torch and does not check them."""
    from diffalign.config import ConfigError
    from rewards.base import option_problem
    from rewards.transforms import build_transform

    if not run_cfg.rewards:
        raise ConfigError("the run has no reward; add at least one, e.g. rewards: [{name: shapes}]",
                          key="rewards")
    for section in ("rewards", "eval_rewards"):
        for i, spec in enumerate(getattr(run_cfg, section)):
            if ":" not in spec.name and spec.name not in REWARDS:
                raise ConfigError(f"unknown reward {spec.name!r}; registered rewards are {sorted(REWARDS)} (or give "
                                  "a dotted path my_pkg.my_module:my_reward; a name registered with @register_reward "
                                  "in your own module is known only once that module is imported, so give its "
                                  "factory's path my_module:my_factory)", key=f"{section}.{i}.name")
            if spec.name not in REWARDS:
                try:
                    target = _import_dotted(spec.name)
                except ValueError as exc:
                    raise ConfigError(str(exc), key=f"{section}.{i}.name") from None
                if not callable(target):
                    raise ConfigError(f"{spec.name!r} is a {type(target).__name__}, not a reward function or factory; "
                                      "point the path at a function fn(images, prompts, metadata, **kw) or a factory",
                                      key=f"{section}.{i}.name")
            try:
                build_transform(spec.registry_kwargs()["transform"])
            except (ValueError, TypeError) as exc:
                raise ConfigError(str(exc), key=f"{section}.{i}.transform") from None
            target = get_factory(spec.name)
            problem = option_problem(target, spec.kwargs, positional=0 if _is_factory(target) else 3)
            if problem:  # found here, before any model loads (building the reward raised a TypeError later)
                raise ConfigError(f"reward {spec.name!r}: {problem}", key=f"{section}.{i}.kwargs")
