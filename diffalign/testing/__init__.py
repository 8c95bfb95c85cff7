"""Test helpers: tiny random-weight pipelines built offline (see :mod:`diffalign.testing.tiny`)."""

from diffalign.testing.tiny import (  # noqa: F401
    make_clip_tokenizer,
    make_t5_tokenizer,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
