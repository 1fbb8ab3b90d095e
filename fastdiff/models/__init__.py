"""Reference diffusion models built from fastdiff's blocks. ``fused=False`` builds the eager
model a user has today (torch.nn and fastdiff/reference.py); ``fused=True`` the same
parameters and state_dict running fastdiff's fused ops."""

from .unet import UNet
from .vae import VAE

__all__ = ["UNet", "VAE"]
