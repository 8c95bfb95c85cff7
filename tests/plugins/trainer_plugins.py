"""A trainer defined outside the ``trainers`` package (tests/test_cli.py): a GRPO subclass whose config names it
through ``trainer_class``, used as ``trainer: plugins.trainer_plugins:MyGRPOConfig``."""

from dataclasses import dataclass

from diffalign.config import param
from trainers.grpo import GRPOConfig, GRPOTrainer

INSTANCES = []


@dataclass
class MyGRPOConfig(GRPOConfig):
    trainer_class = "plugins.trainer_plugins:MyGRPOTrainer"  # a class attribute, not a config key

    tag: str = param("plain", help="a key of this trainer only")


class MyGRPOTrainer(GRPOTrainer):
    def __init__(self, run_cfg, accelerator=None) -> None:
        super().__init__(run_cfg, accelerator)
        INSTANCES.append(self)


@dataclass
class NoTrainerConfig(GRPOConfig):
    """Names no trainer class."""


@dataclass
class BadTrainerConfig(GRPOConfig):
    trainer_class = "plugins.trainer_plugins:MyGRPOTrainr"
