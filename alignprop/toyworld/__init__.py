"""Toy world: a tiny but *trained* text-to-image model on synthetic scenes, with ground truth and rewards.

Scenes are one shape (circle, square, triangle) of one colour on a background of another colour, 32x32
RGB, captioned "a red circle on a blue background". Everything here is built by the project's own code:

- `world`, `render`, `captions`, `vocab`: the scenes, their pixels, their captions and the tokenizer;
- `components`, `data`, `train_vae`, `train_unet`: the Stable Diffusion components and the scripts that
  train them; `components_flow`, `train_flow`: the flow-matching edition (an SD3 pipeline on the same VAE and
  captions); `build` runs every training script in order; the results ship in assets/toyworld/;
- `checker`: a non-differentiable ground-truth judge of generated images;
- `classifier`, `augment`, `train_classifier`, `rewards`: differentiable rewards (colour, a learned shape
  reward, area and position), each with a ground-truth counterpart in the checker;
- `control`: generate for prompts and measure how well the images follow them;
- `splits`, `figures`: held-out captions and plots for experiments (fine-tuning itself is `alignprop.train`).
"""

from pathlib import Path

from alignprop import shipped

ASSETS = shipped.ASSETS / "toyworld"
PIPELINE_DIR = ASSETS / "pipeline"
FLOW_PIPELINE_DIR = ASSETS / "flow_pipeline"  # the flow-matching (SD3-style) edition
CLASSIFIER_FILE = ASSETS / "classifier" / "shape_classifier.safetensors"
PROMPTS_DIR = ASSETS / "prompts"


def pipeline_dir() -> Path:
    """The shipped toy pipeline's directory (for `alignprop.models.SHORT_NAMES`)."""
    return PIPELINE_DIR


def flow_pipeline_dir() -> Path:
    """The shipped flow-matching toy pipeline's directory (short name `toyworld_flow`)."""
    return FLOW_PIPELINE_DIR
