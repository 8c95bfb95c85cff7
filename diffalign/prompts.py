"""Prompt sources for training and evaluation: the shapes world's sampler or a prompt file.

A source is a pure function of ``(seed, epoch)``, which is what makes resume exact: the prompts of
epoch ``e`` do not depend on what happened before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from diffalign.distributed import seed_for

__all__ = ["PromptSource", "build_prompt_source"]


class PromptSource:
    """``epoch_prompts(epoch, n)`` gives the n distinct-draw prompts of an epoch; ``eval_prompts()`` a fixed set."""

    def __init__(self, kind: str, seed: int, *, split: str = "held_in", categories: Optional[List[str]] = None,
                 lines: Optional[List[str]] = None, eval_lines: Optional[List[str]] = None,
                 eval_size: int = 64, eval_split: str = "held_in") -> None:
        self.kind, self.seed = kind, seed
        self.split, self.categories = split, categories
        self.lines, self.eval_lines = lines, eval_lines
        self.eval_size, self.eval_split = eval_size, eval_split

    def epoch_prompts(self, epoch: int, n: int, position: Optional[int] = None) -> List[str]:
        """The ``n`` prompts of ``epoch``. Shapes prompts are the sampler's stream from ``position`` (default
        ``epoch x n``; a resumed run passes where its last epoch stopped, so a resume with fewer prompts per epoch
        does not repeat earlier ones); a prompt file's are drawn from a stream of the epoch."""
        if self.kind == "shapes":
            from diffalign.shapes.prompts import PromptSampler

            sampler = PromptSampler(seed=self.seed, split=self.split, categories=self.categories)
            start = epoch * n if position is None else int(position)
            sampler.load_state_dict({**sampler.state_dict(), "position": start})
            return sampler.sample_batch(n)
        rng = np.random.default_rng(seed_for(self.seed, epoch, 3))
        return [self.lines[i] for i in rng.choice(len(self.lines), size=n, replace=n > len(self.lines))]

    def eval_prompts(self) -> List[str]:
        if self.kind == "shapes":
            from diffalign.shapes.prompts import prompt_set

            return prompt_set(self.eval_split, self.eval_size, seed=12345)
        return list(self.eval_lines[: self.eval_size])


def _read_lines(path: str, key: str = "prompts.path") -> List[str]:
    from diffalign.config import ConfigError

    p = Path(path)
    if p.is_dir() or not p.exists():  # a pipe or `<(grep red prompts.txt)` reads as a file
        what = "is a folder" if p.is_dir() else "does not exist"
        raise ConfigError(f"prompt file {path!r} {what}; give a text file with one prompt per line", key=key)
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"prompt file {path!r} has no prompts (only empty lines); write one prompt per "
                          "line", key=key)
    if _is_json_object(lines[0]):
        raise ConfigError(
            f"prompt file {path!r} starts with a JSON object ({lines[0][:60]!r}...), as in Flow-GRPO's GenEval "
            "metadata .jsonl; a prompt file is plain text, one prompt per line, and JSON lines would be trained on as "
            "prompts: extract the prompts, e.g. jq -r .prompt FILE.jsonl > prompts.txt, and let the reward look up "
            "the metadata by prompt (see configs/gpu/sd35m_geneval_flow_grpo.yaml)", key=key)
    return lines


def _is_json_object(line: str) -> bool:
    """True when ``line`` is a JSON object (a jsonl record, not a prompt)."""
    if not line.startswith("{"):
        return False
    import json

    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def build_prompt_source(cfg, seed: int) -> PromptSource:
    """From a :class:`diffalign.config.PromptsConfig`."""
    if cfg.source == "shapes":
        return PromptSource("shapes", seed, split=cfg.split, categories=cfg.categories, eval_size=cfg.eval_size,
                            eval_split=cfg.eval_split)
    lines = _read_lines(cfg.path)
    eval_lines = _read_lines(cfg.eval_path, "prompts.eval_path") if cfg.eval_path else lines
    return PromptSource("file", seed, lines=lines, eval_lines=eval_lines, eval_size=cfg.eval_size)
