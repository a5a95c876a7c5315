"""alignprop: reward backpropagation (AlignProp) for text-to-image diffusion models."""

import logging

__version__ = "0.1.0"

# Notices printed merely by importing diffusers when torchao (the int8 / fp8 base, `alignprop.quantization`) is
# installed: torch's pytree deprecation of torchao's enum registration, and diffusers' note that torchao 0.17+
# moved tensor classes it would allow-list for pickled torchao checkpoints (we never load those). Silenced before
# any import of either, so every command prints only its own lines.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
