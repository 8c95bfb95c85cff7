"""Command line: ``diffalign train|sample|eval|export|serve-reward|config``.

Works as the ``diffalign`` console script, as ``python -m diffalign`` and under
``accelerate launch -m diffalign ...`` (every process runs :func:`main`).

Commands are looked up lazily in :data:`COMMANDS` (``"module:function"``), so a later module plugs in by
existing, without touching the parser, and ``--help`` / ``config`` never import torch or diffusers. Two
calling conventions:

* ``"config"`` commands (train, sample, eval) take ``CONFIG [key=value ...]``; the CLI loads and validates
  a :class:`~diffalign.config.RunConfig` and calls ``fn(cfg)``.
* ``"argv"`` commands (export, serve-reward) get the remaining arguments, ``fn(argv)``, and parse them.

The function's return value (``None`` = 0) is the exit status. Config errors print one line
``error: <key>: ...`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Dict, NamedTuple, Optional, Sequence

from diffalign import __version__
from diffalign.config import (
    _GUIDANCE_METHODS,
    TRAINER_CONFIGS,
    ConfigError,
    UserError,
    RunConfig,
    apply_overrides,
    describe,
    dump_yaml,
    load_config,
    load_yaml,
    save_config,
    trainer_config_class,
)

__all__ = ["COMMANDS", "Command", "main", "build_parser", "resolve_command", "NotImplementedCommand"]


class Command(NamedTuple):
    target: str  # "module:function"
    style: str  # "config": fn(cfg: RunConfig); "argv": fn(argv: list[str])
    help: str


COMMANDS: Dict[str, Command] = {
    "train": Command("trainers.run:train_main", "config", "train a generator with the config's trainer"),
    "sample": Command("trainers.run:sample_main", "config", "generate images with the config's model"),
    "eval": Command("trainers.run:eval_main", "config", "score generated images with the config's rewards"),
    "export": Command("diffalign.export:export_main", "argv", "export a checkpoint to diffusers / peft"),
    "serve-reward": Command("rewards.remote:serve_main", "argv", "serve a reward model over HTTP"),
}

EXIT_USAGE = 2


class NotImplementedCommand(Exception):
    """The module or function behind a command does not exist (yet)."""


def resolve_command(name: str) -> Callable[..., Optional[int]]:
    """Import the function behind command ``name``; NotImplementedCommand if its module/function is absent."""
    target = COMMANDS[name].target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the target module (or a parent package) being absent means "not implemented"; a missing
        # dependency inside an existing module is a real error and propagates.
        parents = {".".join(module_name.split(".")[: i + 1]) for i in range(module_name.count(".") + 1)}
        if exc.name in parents:
            raise NotImplementedCommand(name) from None
        raise
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise NotImplementedCommand(name)
    return fn


def _add_config_args(parser: argparse.ArgumentParser, config_optional: bool = False) -> None:
    parser.add_argument(
        "config",
        metavar="CONFIG",
        nargs="?" if config_optional else None,
        help="YAML config file (see configs/)",
    )
    parser.add_argument(
        "overrides",
        metavar="key=value",
        nargs="*",
        help="overrides with dotted keys, e.g. sample.num_steps=20 train.learning_rate=1e-4 rewards.0.weight=0.5",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffalign",
        description="Reward fine-tuning and reward-guided sampling for text-to-image generators.",
        epilog="Run 'diffalign config --help-keys' for every config key, its type, default and meaning.",
    )
    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, command in COMMANDS.items():
        if command.style == "config":
            p = sub.add_parser(name, help=command.help, description=command.help)
            _add_config_args(p)
            if name == "sample":
                p.add_argument("--guidance", metavar="METHOD", choices=list(_GUIDANCE_METHODS),
                               help="training-free guided sampling (short for guidance.method=METHOD; the other "
                               "guidance.* keys set its options)")
        else:
            # listed for --help only: main() hands these commands their arguments before parsing
            sub.add_parser(name, help=command.help, description=command.help, add_help=False)
    p = sub.add_parser(
        "config",
        help="print the resolved config (YAML + overrides, defaults filled in) or its errors",
        description="Load CONFIG, apply overrides, validate, and print the resolved YAML.",
    )
    _add_config_args(p, config_optional=True)
    p.add_argument("--out", metavar="PATH", help="also write the resolved config to PATH")
    p.add_argument(
        "--help-keys",
        action="store_true",
        help="list every key with type, default and help (add trainer=NAME for the train section)",
    )
    return parser


def _split_config_arg(args: argparse.Namespace) -> None:
    """``diffalign config a.b=1``: an optional CONFIG that looks like an override is one."""
    if args.config is not None and "=" in args.config and not os.path.exists(args.config):
        args.overrides = [args.config, *args.overrides]
        args.config = None


#: the options a command takes among its ``key=value`` overrides: ``{command: {option: takes a value}}``
_HOISTED = {"sample": {"--guidance": True}, "config": {"--out": True, "--help-keys": False}}


def _hoist_options(argv: list) -> None:
    """Move a command's options (:data:`_HOISTED`: ``--guidance METHOD`` of ``sample``, ``--out PATH`` and
    ``--help-keys`` of ``config``; ``--opt=VALUE`` too) to just after the command, wherever they stand among the
    ``key=value`` overrides (argparse cannot intermix an option with a trailing positional list, and failed with
    "unrecognized arguments"); argparse then parses and validates them."""
    options = _HOISTED.get(argv[0]) if argv else None
    if not options:
        return
    moved, rest, i = [], [argv[0]], 1
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in options and ("=" in a or not options[name]):
            moved.append(a)
        elif a in options and i + 1 < len(argv):
            moved += argv[i:i + 2]
            i += 1
        else:
            rest.append(a)
        i += 1
    argv[:] = [rest[0], *moved, *rest[1:]]


def _load(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    if getattr(args, "guidance", None):
        overrides.append(f"guidance.method={args.guidance}")
    return load_config(RunConfig, args.config, overrides)


def _help_keys(args: argparse.Namespace) -> str:
    text = describe(RunConfig)
    data = load_yaml(args.config) if args.config else {}
    trainer = apply_overrides(data, args.overrides, RunConfig).get("trainer")
    if trainer:
        cls = trainer_config_class(trainer)
        text += f"\n\ntrain section of trainer {trainer!r} ({cls.__name__}):\n" + describe(
            cls, prefix="train"
        )
    else:
        names = ", ".join(sorted(TRAINER_CONFIGS))
        text += f"\n\ntrain.*: add trainer=NAME to list a trainer's keys (trainers: {names})"
    return text


def _run_config_command(args: argparse.Namespace) -> int:
    _split_config_arg(args)
    if args.help_keys:
        print(_help_keys(args))
        return 0
    cfg = _load(args)
    if args.out:
        if os.path.isdir(args.out) or args.out.endswith(os.sep):
            raise ConfigError(f"--out {args.out!r} is a folder; give a file path for the resolved config, e.g. "
                              f"{os.path.join(args.out, 'config.yaml')}")
        save_config(cfg, args.out)
    sys.stdout.write(dump_yaml(cfg))
    if cfg.trainer is not None:  # a rule of training only (eval and sample take any sampling batch): a warning here
        from diffalign.config import resolve_train_section

        try:
            resolve_train_section(cfg).check_batch_split(cfg.sample)
        except ConfigError as exc:
            print(f"warning: diffalign train would stop with: {exc}", file=sys.stderr)
    return 0


def _dispatch(name: str, make_arg: Callable[[], object]) -> int:
    fn = resolve_command(name)
    result = fn(make_arg())
    return 0 if result is None else int(result)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``diffalign`` and ``python -m diffalign``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].style == "argv":
            # Everything after the name belongs to the command, `--help` included (argparse's REMAINDER
            # would not take a leading option).
            return _dispatch(argv[0], lambda: argv[1:])
        _hoist_options(argv)
        args = build_parser().parse_args(argv)
        if args.command == "config":
            return _run_config_command(args)
        # The command is resolved before the config is read: "not implemented yet" wins over config errors.
        return _dispatch(args.command, lambda: _load(args))
    except NotImplementedCommand as exc:
        print(f"not implemented yet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `diffalign config x.yaml | head`: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at interpreter exit
        return 0
    except KeyboardInterrupt as exc:  # Ctrl-C outside a training loop, or twice inside one (diffalign.interrupt)
        print(f"\ninterrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130
    except UserError as exc:
        # a message that names the value, the rule and the fix (a checkpoint that cannot be used, a run stopped by
        # non-finite gradients): one line, no traceback; anything else is a bug and keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover - python -m diffalign.cli
    sys.exit(main())
