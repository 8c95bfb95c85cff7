"""diffalign: reward fine-tuning and reward-guided sampling for text-to-image generators.

Top-level import packages of the distribution:

* ``diffalign`` -- core contracts (records, config, generator adapters, the shapes world, checkpointing)
* ``samplers`` -- pure step functions with log-probs, schedules, rollout, guided sampling
* ``rewards`` -- reward registry, built-in rewards, transforms, remote reward client/server
* ``trainers`` -- one file per algorithm

Nothing here downloads anything at import time.
"""

__version__ = "0.1.0"
