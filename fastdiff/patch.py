"""fastdiff.patch(model): fastdiff's fused ops swapped into an existing model in place, with the
same parameters (nothing is copied or re-initialized); fastdiff.unpatch(model) restores it.

What is replaced, found by walking the module tree:
- diffusers ``ResnetBlock2D`` (UNet2DModel, UNet2DConditionModel, AutoencoderKL's Encoder /
  Decoder): GroupNorm then SiLU, twice per block, run as one fused group_norm_silu each (the
  second only with the default time-embedding norm; "scale_shift" puts an affine in between).
  The block's forward is replaced on the instance by one that follows diffusers 0.42's
  ResnetBlock2D.forward step for step.
- diffusers ``Attention`` modules using AttnProcessor2_0 / AttnProcessor: processor set to
  ``fastdiff.diffusers.AttnProcessor``.
- fastdiff's eager modules (``fused=False`` models): ``reference.GroupNormAct`` becomes
  ``nn.GroupNormSiLU``, ``reference.AttentionBlock`` becomes ``nn.AttentionBlock`` (subclasses
  with the same parameters: the instance's class is switched).
- ``nn.Sequential`` holding GroupNorm immediately followed by SiLU: the pair becomes
  GroupNormSiLU + Identity.
- diffusers ``AutoencoderKL``: ``encode`` returns ``fastdiff.DiagonalGaussian`` (fused sample
  and KL, same draws from the same generator) in place of DiagonalGaussianDistribution; the
  instance's ``encode`` wraps diffusers' own.
Everything else is left as it is; the report says what was replaced and what was left, and why.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch

from . import reference
from .distributions import DiagonalGaussian
from .nn import AttentionBlock, GroupNormSiLU
from .ops.group_norm_silu import group_norm_silu

_UNDO = "_fastdiff_undo"


@dataclass
class PatchReport:
    """What ``patch`` replaced and what it left (module path, what / why)."""

    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self):
        lines = [f"fastdiff.patch: {len(self.replaced)} replaced, {len(self.left)} left"]
        lines += [f"  replaced {path or '<root>'}: {what}" for path, what in self.replaced]
        lines += [f"  left     {path or '<root>'}: {why}" for path, why in self.left]
        return "\n".join(lines)


def _is_silu(m) -> bool:
    return isinstance(m, torch.nn.SiLU)


def _norm_act(norm, x, backend):
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, backend=backend)


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers 0.42 ResnetBlock2D.forward with each GroupNorm + SiLU fused."""
    backend = self._fastdiff_backend
    hidden_states = _norm_act(self.norm1, input_tensor, backend)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: nearest upsampling of large NHWC batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states) * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = _norm_act(self.norm2, hidden_states, backend)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def _diffusers_classes():
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError:
        return None
    return ResnetBlock2D, Attention, (AttnProcessor, AttnProcessor2_0), AutoencoderKL


def _undo_list(model):
    undo = getattr(model, _UNDO, None)
    if undo is None:
        undo = []
        object.__setattr__(model, _UNDO, undo)  # a plain attribute, not a submodule or buffer
    return undo


def patch(model: torch.nn.Module, *, backend=None) -> PatchReport:
    """Swaps fastdiff's fused ops into ``model`` in place (see the module docstring); returns a
    PatchReport. Parameters, buffers and the state_dict are unchanged. Patching twice is a no-op
    for what is already patched; ``unpatch`` undoes every patch."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    undo = _undo_list(model)
    dc = _diffusers_classes()
    for path, m in model.named_modules():
        if isinstance(m, reference.AttentionBlock) and not isinstance(m, AttentionBlock):
            m.__class__, m.backend = AttentionBlock, backend
            undo.append(lambda m=m: (setattr(m, "__class__", reference.AttentionBlock), delattr(m, "backend")))
            report.replaced.append((path, "reference.AttentionBlock -> nn.AttentionBlock"))
        elif isinstance(m, reference.GroupNormAct):
            cls = m.__class__
            m.__class__, m.backend = GroupNormSiLU, backend
            undo.append(lambda m=m, cls=cls: (setattr(m, "__class__", cls), delattr(m, "backend")))
            report.replaced.append((path, "reference.GroupNormAct -> nn.GroupNormSiLU"))
        elif isinstance(m, torch.nn.Sequential):
            _patch_sequential(path, m, backend, report, undo)
        elif dc is not None and isinstance(m, dc[0]):
            _patch_resnet(path, m, backend, report, undo)
        elif dc is not None and isinstance(m, dc[1]):
            _patch_attention(path, m, dc[2], backend, report, undo)
        if isinstance(getattr(m, "conv_norm_out", None), torch.nn.GroupNorm) and _is_silu(getattr(m, "conv_act", None)):
            report.left.append((path, f"{type(m).__name__}.conv_norm_out + conv_act: called in turn by the "
                                      "model's own forward (one pair per model), left eager"))
        if dc is not None and isinstance(m, dc[3]):
            _patch_posterior(path, m, backend, report, undo)
    return report


def _fused_encode(self, *args, **kwargs):
    """diffusers' AutoencoderKL.encode, its posterior returned as fastdiff.DiagonalGaussian."""
    out = type(self).encode(self, *args, **kwargs)
    posterior = out[0] if isinstance(out, tuple) else out.latent_dist
    fused = DiagonalGaussian(posterior.parameters, posterior.deterministic, backend=self._fastdiff_backend)
    if isinstance(out, tuple):
        return (fused, *out[1:])
    out.latent_dist = fused
    return out


def _patch_posterior(path, vae, backend, report, undo):
    if "encode" in vars(vae):
        return  # already patched
    vae.encode = types.MethodType(_fused_encode, vae)
    vae._fastdiff_backend = backend
    undo.append(lambda v=vae: (delattr(v, "encode"), delattr(v, "_fastdiff_backend")))
    report.replaced.append((path, "AutoencoderKL.encode: posterior -> fastdiff.DiagonalGaussian (fused sample + KL)"))


def _patch_sequential(path, seq, backend, report, undo):
    mods = list(seq)
    for i in range(len(mods) - 1):
        norm, act = mods[i], mods[i + 1]
        if type(norm) is torch.nn.GroupNorm and norm.affine and _is_silu(act):
            fused = GroupNormSiLU(norm.num_groups, norm.num_channels, norm.eps, backend=backend)
            fused.weight, fused.bias = norm.weight, norm.bias  # the same Parameter objects
            seq[i], seq[i + 1] = fused, torch.nn.Identity()

            def restore(seq=seq, i=i, norm=norm, act=act):
                seq[i], seq[i + 1] = norm, act
            undo.append(restore)
            report.replaced.append((f"{path}.{i}", "GroupNorm + SiLU -> nn.GroupNormSiLU + Identity"))


def _patch_resnet(path, block, backend, report, undo):
    if "forward" in vars(block):
        return  # already patched
    why = []
    if not (isinstance(block.norm1, torch.nn.GroupNorm) and isinstance(block.norm2, torch.nn.GroupNorm)):
        why.append(f"norms are {type(block.norm1).__name__} / {type(block.norm2).__name__}, not GroupNorm")
    if not _is_silu(block.nonlinearity):
        why.append(f"nonlinearity is {type(block.nonlinearity).__name__}, not SiLU")
    if why:
        report.left.append((path, "ResnetBlock2D: " + "; ".join(why)))
        return
    block.forward = types.MethodType(_resnet_forward, block)
    block._fastdiff_backend = backend
    undo.append(lambda b=block: (delattr(b, "forward"), delattr(b, "_fastdiff_backend")))
    fused = "norm1 + SiLU" + ("" if block.time_embedding_norm == "scale_shift" else ", norm2 + SiLU")
    report.replaced.append((path, f"ResnetBlock2D: {fused} fused (group_norm_silu)"))


def _patch_attention(path, attn, eager_processors, backend, report, undo):
    from .diffusers import AttnProcessor

    proc = attn.processor
    if isinstance(proc, AttnProcessor):
        return
    if type(proc) not in eager_processors:
        report.left.append((path, f"Attention with processor {type(proc).__name__} (only AttnProcessor2_0 / "
                                  "AttnProcessor are replaced)"))
        return
    if getattr(attn, "added_kv_proj_dim", None) is not None or getattr(attn, "is_causal", False):
        report.left.append((path, "Attention with added key/value projections or causal: not supported"))
        return
    attn.set_processor(AttnProcessor(backend=backend))
    undo.append(lambda a=attn, p=proc: a.set_processor(p))
    report.replaced.append((path, f"Attention: {type(proc).__name__} -> fastdiff.diffusers.AttnProcessor"))


def unpatch(model: torch.nn.Module) -> int:
    """Undoes every ``patch`` of ``model``; returns how many replacements were undone."""
    undo = getattr(model, _UNDO, None) or []
    for fn in reversed(undo):
        fn()
    n = len(undo)
    undo.clear()
    return n
