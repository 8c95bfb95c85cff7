"""Shared setup for GRPO trainer tests: a tiny random SD3 / SD1.5 pipeline saved to disk and a run config."""

from __future__ import annotations

from pathlib import Path

from diffalign.config import RunConfig, from_dict


def load_script(name: str):
    """``scripts/NAME.py`` imported as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny(tmp: Path, kind: str = "sd3") -> str:
    from diffalign.testing.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd15_pipeline

    folder = tmp / f"tiny-{kind}"
    if not folder.exists():
        build = {"sd3": lambda: tiny_sd3_pipeline(seed=0), "flux": lambda: tiny_flux_pipeline(seed=0)}
        pipe = build.get(kind, lambda: tiny_sd15_pipeline(seed=0))()
        pipe.save_pretrained(folder)
    return str(folder)


def run_config(model_path: str, out: Path, **overrides) -> RunConfig:
    sample = {"num_steps": 4, "eval_num_steps": 4, "guidance_scale": 1.0, "step": "flow_sde", "noise_level": 0.7,
              "height": 32, "width": 32, "batch_size": 4, "group_size": 4, "num_batches_per_epoch": 2}
    train = {"num_epochs": 2, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 2,
             "eval_every": 0, "shuffle": False, "timestep_fraction": 0.99}
    sample.update(overrides.pop("sample", {}))
    train.update(overrides.pop("train", {}))
    data = {
        "seed": 3,
        "output_dir": str(out),
        "trainer": "grpo",
        "model": {"path": model_path, "lora": {"enabled": True, "rank": 4, "alpha": 8.0}},
        "prompts": {"source": "shapes", "eval_size": 4},
        "sample": sample,
        "rewards": [{"name": "jpeg_compressibility"}],
        "train": train,
        "logging": {"image_every": 0},
        "checkpoint": {"every": 1, "keep_last": 3, "resume_from": "latest"},
    }
    data.update(overrides)
    return from_dict(RunConfig, data)


def train_run(cfg, trainer_cls=None):
    """Set up, train and clean up a trainer (GRPO unless ``trainer_cls``); returns it for inspection."""
    if trainer_cls is None:
        from trainers.grpo import GRPOTrainer as trainer_cls
    trainer = trainer_cls(cfg)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer
