"""fastdiff attention inside diffusers models: ``fastdiff.diffusers.AttnProcessor``.

    import fastdiff.diffusers
    unet.set_attn_processor(fastdiff.diffusers.AttnProcessor())          # every Attention module
    vae.set_attn_processor(fastdiff.diffusers.AttnProcessor("cpu"))     # one backend for all calls
    fastdiff.diffusers.set_attn_processor(model, fastdiff.diffusers.AttnProcessor())
        # any nn.Module, including models without set_attn_processor (UNet2DModel)

This submodule is imported explicitly (``import fastdiff`` does not import it) and does not
import diffusers itself: it only reads the ``Attention`` module it is handed, so it imports
without diffusers installed. Its name shadows nothing: imports are absolute, so
``import diffusers`` anywhere (here included) is the real package.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ._backend import _check_name
from .ops.attention import attention

if TYPE_CHECKING:  # pragma: no cover
    from diffusers.models.attention_processor import Attention

__all__ = ["AttnProcessor", "set_attn_processor"]


class AttnProcessor:
    r"""diffusers attention processor running ``fastdiff.attention`` (no (Nq, Nk) score
    tensor; deterministic backward), a drop-in for diffusers' ``AttnProcessor2_0``:

        unet.set_attn_processor(fastdiff.diffusers.AttnProcessor(backend=None))

    Everything around the attention product is done as ``AttnProcessor2_0`` does it, in the
    same order and with the module's own layers: ``spatial_norm`` (with ``temb``), 4-D
    (B, C, H, W) inputs flattened to (B, H*W, C) tokens, ``group_norm``, ``to_q`` / ``to_k`` /
    ``to_v``, ``norm_cross`` on the encoder hidden states (cross-attention only), ``norm_q`` /
    ``norm_k`` per head, ``to_out`` (linear, then dropout), the reshape back to 4-D,
    ``residual_connection`` and ``rescale_output_factor``.

    backend: passed to ``fastdiff.attention`` on every call ("cpu", "cuda", "triton", "sdpa",
    "xformers", "reference", or None / "auto": ``fastdiff.use_backend`` / FASTDIFF_BACKEND /
    the fastest usable one). Checked here, when the processor is built.

    Where it differs from ``AttnProcessor2_0``:

    - ``attention_mask``: fastdiff's kernels take no mask. A call given a mask (including the
      UNet's ``encoder_attention_mask``, which diffusers passes on as a mask) is computed by
      ``torch.nn.functional.scaled_dot_product_attention`` with the mask prepared exactly as
      ``AttnProcessor2_0`` prepares it (``attn.prepare_attention_mask``, viewed as
      (B, heads, Nq or 1, Nk)); ``backend`` does not apply to that call. Calls without a mask
      in the same model still run fastdiff.
    - Softmax scale: ``attn.scale`` (what diffusers' ``AttnProcessor`` uses). With diffusers'
      defaults (``scale_qk=True``) this is 1/sqrt(head dim), the scale ``AttnProcessor2_0``
      uses, so outputs match; modules built with ``scale_qk=False`` (scale 1), for which
      diffusers itself picks ``AttnProcessor`` over ``AttnProcessor2_0``, get their scale
      instead of having it ignored.
    - Modules ``AttnProcessor2_0`` computes silently wrong raise ``NotImplementedError``
      instead: added key/value projections (``added_kv_proj_dim``: use diffusers'
      ``AttnAddedKVProcessor2_0``) and causal attention (``is_causal=True``).
    - Head dims above 256 raise ``ValueError`` from ``fastdiff.attention`` (no silent fallback).

    Extra keyword arguments (diffusers' ``cross_attention_kwargs``) are accepted and ignored
    as ``AttnProcessor2_0`` ignores them, with the same deprecation warning for ``scale``.
    The processor holds no parameters or buffers: nothing enters a state_dict, and loading
    one leaves the processors as set. diffusers' ``set_default_attn_processor`` refuses
    processors it does not know; ``set_attn_processor(AttnProcessor2_0())`` switches back.
    """

    def __init__(self, backend: str | None = None):
        if backend is not None:
            _check_name(backend)
        self.backend = backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            _deprecate_scale()
        if getattr(attn, "add_k_proj", None) is not None:
            raise NotImplementedError(
                "fastdiff.diffusers.AttnProcessor does not run Attention modules with added key/value projections "
                f"(added_kv_proj_dim={getattr(attn, 'added_kv_proj_dim', None)}); set diffusers' "
                "AttnAddedKVProcessor2_0 on those modules (set_attn_processor with a dict)")
        if getattr(attn, "is_causal", False):
            raise NotImplementedError("fastdiff.diffusers.AttnProcessor runs non-causal attention only, but this "
                                      "Attention module has is_causal=True")

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, H*W, C) tokens
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.reshape(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape

        if attention_mask is not None:
            # As AttnProcessor2_0: (B * heads, Nq or 1, Nk) -> (B, heads, Nq or 1, Nk) for SDPA.
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:  # over channels: (B, N, C) -> (B, C, N) and back
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states  # after group_norm, as AttnProcessor2_0
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        # (B, N, heads * D) -> (B, heads, N, D): views with stride 1 along D, the kernels' contract.
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # None: each kernel's own 1/sqrt(D), bitwise what AttnProcessor2_0 computes.
        scale = None if attn.scale == head_dim ** -0.5 else attn.scale
        if attention_mask is None:
            out = attention(query, key, value, scale, backend=self.backend)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False, scale=scale)
        # fastdiff's (B, heads, Nq, D) is stored as (B, Nq, heads, D): this reshape is a view.
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def set_attn_processor(model: torch.nn.Module, processor) -> int:
    """Set ``processor`` on every submodule of ``model`` (itself included) that has
    ``set_processor`` (diffusers' ``Attention`` modules), as diffusers' ``set_attn_processor``
    does, for any ``nn.Module``: ``UNet2DModel`` has no ``set_attn_processor`` of its own.
    Returns how many modules were set (0 raises: nothing would run fastdiff)."""
    count = 0
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
            count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__} has no attention module with set_processor (diffusers' Attention)")
    return count


def _deprecate_scale() -> None:
    """The warning AttnProcessor2_0 gives for a ``scale`` argument, through diffusers' own
    ``deprecate`` (which turns it into an error from diffusers 1.0.0 on)."""
    message = ("The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise "
               "an error in the future. `scale` should directly be passed while calling the underlying pipeline "
               "component i.e., via `cross_attention_kwargs`.")
    try:
        from diffusers.utils import deprecate
    except ImportError:  # called outside diffusers: a plain warning
        import warnings

        warnings.warn(message, FutureWarning, stacklevel=3)
        return
    deprecate("scale", "1.0.0", message)
