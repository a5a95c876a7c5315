"""Model families: every place where Stable Diffusion 1.x/2.x, SDXL and the flow-matching families differ,
behind one object.

A `Family` wraps a loaded pipeline and answers, for the sampler and the trainer:

    encode(prompts, guided)              -> Conditioning   prompt encoding and extra conditioning
    guided(options)                      -> bool           whether a step is one CFG call over [uncond; cond]
    predict(latents, t, kwargs)          -> model output   the denoiser call
    set_timesteps / step(...)                              the scheduler
    latent_shape / prepare_noise / unpack                  the latents (shape, scaling, packing)
    save_lora(directory, layers, meta)                     the LoRA file layout

The family is chosen from the model itself: `model_index.json`'s pipeline class. Adding a family is adding
a module here with a `Family` subclass and listing it in `FAMILIES`; the other families are not edited.
"""

from __future__ import annotations

from alignprop.errors import UserError
from alignprop.families.base import Family
from alignprop.families.flux import Flux
from alignprop.families.sd3 import StableDiffusion3
from alignprop.families.sdxl import StableDiffusionXL

FAMILIES = (Family, StableDiffusionXL, StableDiffusion3, Flux)


def family_class(pipeline_class_name: str) -> type[Family]:
    """The family of a pipeline class named in `model_index.json`."""
    for family in FAMILIES:
        if family.pipeline_class.__name__ == pipeline_class_name:
            return family
    known = ", ".join(f.pipeline_class.__name__ for f in FAMILIES)
    raise UserError(f"unsupported pipeline {pipeline_class_name!r}; supported: {known}")


def family_of(pipeline) -> Family:
    """The family object for a loaded pipeline."""
    return family_class(type(pipeline).__name__)(pipeline)


__all__ = ["FAMILIES", "Family", "Flux", "StableDiffusion3", "StableDiffusionXL", "family_class", "family_of"]
