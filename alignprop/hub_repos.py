"""What alignprop knows of the presets' base models on the Hugging Face hub, without asking the hub.

Each model's licence (the card of a LoRA or fine-tune carries its base's: it is a derivative), its pipeline class
(the components a download needs, before model_index.json is cached) and whether the repository is gated (the hub
serves its files only to a logged-in user who accepted the licence on the model's page). As each model's hub page
declares them (its README's metadata and access settings).
"""

from __future__ import annotations

from dataclasses import dataclass

HUB_URL = "https://huggingface.co"


@dataclass(frozen=True)
class Licence:
    """A base model's licence as hub metadata (`license`, and for "other" its name and link) and in words."""

    license: str
    name: str = ""
    link: str = ""

    def metadata(self) -> list[str]:
        extra = [f"license_name: {self.name}", f"license_link: {self.link}"] if self.name else []
        return [f"license: {self.license}", *extra]


# The licences of the base models the presets name (FLUX.1-dev's: non-commercial).
LICENCES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": Licence("creativeml-openrail-m"),
    "runwayml/stable-diffusion-v1-5": Licence("creativeml-openrail-m"),
    "stabilityai/stable-diffusion-2-1": Licence("openrail++"),
    "stabilityai/stable-diffusion-2-1-base": Licence("openrail++"),
    "stabilityai/stable-diffusion-xl-base-1.0": Licence("openrail++"),
    **{
        f"stabilityai/{name}": Licence(
            "other", "stabilityai-ai-community", f"{HUB_URL}/stabilityai/{name}/blob/main/LICENSE.md"
        )
        for name in ("stable-diffusion-3-medium-diffusers", "stable-diffusion-3.5-medium", "stable-diffusion-3.5-large")
    },
    "black-forest-labs/FLUX.1-dev": Licence(
        "other",
        "flux-1-dev-non-commercial-license",
        f"{HUB_URL}/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    ),
    "black-forest-labs/FLUX.1-schnell": Licence("apache-2.0"),
}
# The pipeline classes of the presets' base models, for a card or a download list made before model_index.json is
# cached.
KNOWN_PIPELINES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "StableDiffusionPipeline",
    "stabilityai/stable-diffusion-xl-base-1.0": "StableDiffusionXLPipeline",
    "stabilityai/stable-diffusion-3-medium-diffusers": "StableDiffusion3Pipeline",
    "stabilityai/stable-diffusion-3.5-medium": "StableDiffusion3Pipeline",
    "stabilityai/stable-diffusion-3.5-large": "StableDiffusion3Pipeline",
    "black-forest-labs/FLUX.1-dev": "FluxPipeline",
    "black-forest-labs/FLUX.1-schnell": "FluxPipeline",
}


# Repositories whose files need a logged-in user who accepted the licence on the model's page.
GATED = (
    "stabilityai/stable-diffusion-3-medium-diffusers",
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3.5-large",
    "black-forest-labs/FLUX.1-dev",
)


def gated_note(repo: str) -> str:
    """What to do before downloading `repo`, "" when it is not gated (as far as alignprop knows)."""
    if repo not in GATED:
        return ""
    return f"gated: accept the licence at {HUB_URL}/{repo} and log in (hf auth login) before downloading"
