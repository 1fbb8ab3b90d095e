"""fastdiff: fused training and sampling kernels for diffusion models and VAEs.

Every op runs on one of the backends ``reference`` (eager PyTorch), ``cpu`` (C++),
``cuda`` (C++/CUDA) and ``triton``, chosen per call (``backend=``), per block
(``fastdiff.use_backend``) or by FASTDIFF_BACKEND; "auto" picks the fastest usable one.
Import never fails: ``fastdiff.info()`` says what was built and what can run.
"""
from . import _C_loader  # noqa: F401  (loads the extension, recording failures)
from . import nn
from ._backend import BACKENDS, BackendError, use_backend
from ._info import info
from .distributions import DiagonalGaussian
from .gaussian_diffusion import GaussianDiffusion
from .ops.attention import attention
from .ops.ddim_step import ddim_step
from .ops.ddpm_step import ddpm_step
from .ops.diffusion_loss import diffusion_loss
from .ops.group_norm_silu import group_norm_silu
from .ops.q_sample import q_sample
from .ops.sample_and_kl import gaussian_kl, reparameterize, sample_and_kl
from .ops.vb_loss import discretized_gaussian_log_likelihood, learned_range, normal_kl, vb_loss
from .patch import PatchReport, patch, unpatch
from .schedule import NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "DiagonalGaussian",
    "GaussianDiffusion",
    "NoiseSchedule",
    "PatchReport",
    "attention",
    "ddim_step",
    "ddpm_step",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "group_norm_silu",
    "gaussian_kl",
    "info",
    "learned_range",
    "nn",
    "normal_kl",
    "patch",
    "q_sample",
    "reparameterize",
    "sample_and_kl",
    "unpatch",
    "use_backend",
    "vb_loss",
]
