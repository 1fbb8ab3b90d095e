"""fastdiff.models.UNet: the fused model against the eager one with the same weights (outputs and
the gradients of x and of every parameter), state_dict compatibility, shapes, input checks and a
training step that learns."""
import pytest
import torch

import fastdiff
from fastdiff import reference
from fastdiff._backend import reasons_not_usable
from fastdiff.models.unet import CONFIGS, UNet, timestep_embedding
from utils import assert_close, assert_within_eager_error

# The fused modules run on fastdiff's C++ CPU kernels, asked for by name: under "auto" a missing
# extension would fall back to the reference and the comparison could not fail.
_WHY = reasons_not_usable("cpu", "group_norm_silu", torch.device("cpu")) + reasons_not_usable(
    "cpu", "attention", torch.device("cpu"))
needs_cpu_backend = pytest.mark.skipif(bool(_WHY), reason=f"fastdiff's cpu backend cannot run here: {_WHY}")

TINY = dict(image_size=16, attention_resolutions=(16, 8))  # "tiny" at 16x16, attention on both levels (1 and 2 heads)


def _randomize(model, seed=0):
    """ADM zero-initializes each ResBlock's conv2, the attention proj_out and the output conv, and
    GroupNorm starts at weight 1 / bias 0: give them random values so every gradient is non-trivial."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and not m.weight.any():
                m.reset_parameters()  # PyTorch's default (Kaiming-uniform) init
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return model


def _models(dtype, **kw):
    """(eager, fused) UNets with identical random weights."""
    torch.manual_seed(0)
    eager = _randomize(UNet.from_config("tiny", **{**TINY, **kw}, fused=False)).to(dtype)
    fused = eager.fused_copy(backend="cpu")
    return eager, fused


def _inputs(model, batch=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = None if model.num_classes is None else torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


def _run(model, x, t, y, grad_out):
    """Output and the gradients of x and every parameter (by name)."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x, t, y)
    out.backward(grad_out)
    grads = {"x": x.grad.detach().clone()}
    grads |= {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.detach(), grads


# (overrides): the plain model, learned variance (2C outputs), class-conditional.
VARIANTS = [{}, {"learn_sigma": True}, {"num_classes": 10}]


@needs_cpu_backend
@pytest.mark.parametrize("kw", VARIANTS, ids=["plain", "learn_sigma", "class_cond"])
def test_fused_matches_eager_float64(kw):
    eager, fused = _models(torch.float64, **kw)
    x, t, y = _inputs(eager)
    grad_out = torch.randn(x.shape[0], eager.out_channels, *x.shape[2:], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    out_e, grads_e = _run(eager, x, t, y, grad_out)
    out_f, grads_f = _run(fused, x, t, y, grad_out)
    assert out_e.abs().max() > 0.1  # the randomized output conv makes the output non-trivial
    scale = out_e.abs().max().item()
    assert_close(out_f, out_e, 1e-8 * scale, 1e-8, "out")
    assert grads_f.keys() == grads_e.keys()
    for name, ge in grads_e.items():
        assert ge.abs().max() > 0, f"d {name} is zero: the comparison would be vacuous"
        assert_close(grads_f[name], ge, 1e-8 * ge.abs().max().item(), 1e-8, f"d {name}")


@needs_cpu_backend
def test_fused_float32_within_eager_error():
    """float32: the fused model's error against the float64 eager model is at most 2x eager float32's
    own error, for the output and d x (per tensor) and for the parameter gradients (pooled, each
    tensor scaled by its own max so the pool measures relative error: small tensors such as a
    GroupNorm bias have too few entries for a max-error ratio of their own to be stable)."""
    eager64, _ = _models(torch.float64, num_classes=10)
    eager32 = eager64.fused_copy(fused=False).float()
    fused32 = eager64.fused_copy(backend="cpu").float()
    x, t, y = _inputs(eager64)
    grad_out = torch.randn(x.shape[0], eager64.out_channels, *x.shape[2:], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    out_x, grads_x = _run(eager64, x, t, y, grad_out)
    out_e, grads_e = _run(eager32, x.float(), t, y, grad_out.float())
    out_f, grads_f = _run(fused32, x.float(), t, y, grad_out.float())
    assert_within_eager_error(out_f, out_e, out_x, "out")
    assert_within_eager_error(grads_f["x"], grads_e["x"], grads_x["x"], "d x")
    names = [n for n in grads_x if n != "x"]
    pooled = [torch.cat([(g[n].double() / grads_x[n].abs().max()).flatten() for n in names])
              for g in (grads_f, grads_e, grads_x)]
    assert_within_eager_error(pooled[0].float(), pooled[1].float(), pooled[2], "d parameters (relative, pooled)")
    for n in names:  # and no single tensor far off: 2x eager's pooled relative error
        rel = ((grads_f[n].double() - grads_x[n]).abs().max() / grads_x[n].abs().max()).item()
        eager_rel = (pooled[1].double() - pooled[2]).abs().max().item()
        assert rel <= 2 * eager_rel, f"d {n}: relative error {rel:.3e} > 2 x eager's {eager_rel:.3e}"


def test_state_dict_identical_and_loads():
    eager = UNet.from_config("tiny", fused=False, num_classes=5)
    fused = UNet.from_config("tiny", fused=True, num_classes=5)
    sd_e, sd_f = eager.state_dict(), fused.state_dict()
    assert list(sd_e) == list(sd_f)
    assert all(sd_e[k].shape == sd_f[k].shape for k in sd_e)
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in fused.named_parameters()]
    fused.load_state_dict(sd_e)  # strict
    assert all(torch.equal(sd_e[k], v) for k, v in fused.state_dict().items())
    copy = eager.fused_copy()
    assert copy.fused and all(torch.equal(sd_e[k], v) for k, v in copy.state_dict().items())
    assert copy.training and not eager.eval().fused_copy().training  # the mode is kept
    assert eager.double().fused_copy().time_embed[0].weight.dtype == torch.float64  # and the dtype
    # the fused model's blocks are fastdiff's, the eager model's the reference's
    assert any(isinstance(m, fastdiff.nn.GroupNormSiLU) for m in fused.modules())
    assert any(isinstance(m, fastdiff.nn.AttentionBlock) for m in fused.modules())
    assert not any(isinstance(m, (fastdiff.nn.GroupNormSiLU, fastdiff.nn.AttentionBlock)) for m in eager.modules())
    assert any(isinstance(m, reference.GroupNormAct) for m in eager.modules())


def test_layout_attention_where_asked():
    """"tiny" at 32x32 has attention at 16x16 only: after level 1's ResBlock, in the middle and
    after level 1's up ResBlocks; "small" at 64x64 at 32, 16 and 8 (levels 1-3), not 64."""
    def attn_count(m):
        return sum(isinstance(b, reference.AttentionBlock) for b in m.modules())
    tiny = UNet.from_config("tiny", fused=False)
    assert attn_count(tiny) == 1 + 1 + 2  # down level 1 (1 block), middle, up level 1 (2 blocks)
    assert attn_count(UNet.from_config("tiny", attention_resolutions=())) == 1  # the middle only
    small = UNet.from_config("small", fused=False)
    assert attn_count(small) == 3 * 2 + 1 + 3 * 3


@pytest.mark.parametrize("kw,out_ch", [({}, 3), ({"learn_sigma": True}, 6), ({"in_channels": 4}, 4),
                                       ({"in_channels": 4, "learn_sigma": True}, 8), ({"out_channels": 5}, 5)])
def test_output_shape(kw, out_ch):
    model = UNet.from_config("tiny", **TINY, **kw)
    x = torch.randn(3, model.in_channels, 16, 16)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 1, 999])).shape == (3, out_ch, 16, 16)


def test_timesteps_int_and_float():
    model = _randomize(UNet.from_config("tiny", **TINY))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out_int = model(x, torch.tensor([10, 400]))
        out_float = model(x, torch.tensor([10.0, 400.0]))
        out_frac = model(x, torch.tensor([10.5, 400.0]))
    assert torch.equal(out_int, out_float)
    assert not torch.equal(out_int, out_frac)  # fractional timesteps are used as they are


def test_timestep_embedding_is_adm():
    """ADM's timestep_embedding: [cos(t f_i) | sin(t f_i)], f_i = 10000^(-i / half)."""
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 8)
    f = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    want = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], dim=1)
    assert_close(emb, want, 1e-4, 1e-5, "embedding")
    assert timestep_embedding(t, 7).shape == (3, 7) and not timestep_embedding(t, 7)[:, -1].any()


def test_bad_inputs():
    model = UNet.from_config("tiny", **TINY)
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\by\b.*without num_classes"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    cond = UNet.from_config("tiny", **TINY, num_classes=4)
    with pytest.raises(ValueError, match=r"\by\b.*required"):
        cond(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\by\b must be an integer tensor"):
        cond(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0.0, 1.0]))


def test_bad_configs():
    with pytest.raises(ValueError, match=r"unknown UNet config 'huge'.*'small'.*'tiny'"):
        UNet.from_config("huge")
    with pytest.raises(ValueError, match=r"image_size = 30 .* divisible"):
        UNet(image_size=30, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"norm_groups = 32"):
        UNet(model_channels=48, channel_mult=(1,))
    with pytest.raises(ValueError, match=r"num_head_channels"):
        UNet.from_config("tiny", num_head_channels=48)
    assert set(CONFIGS) >= {"tiny", "small"}


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_cpu_backend)])
def test_training_step_lowers_loss(fused):
    """AdamW on the epsilon MSE over a fixed noised batch: the loss goes down within a few steps."""
    torch.manual_seed(0)
    model = UNet.from_config("tiny", fused=fused, backend="cpu" if fused else None)  # 32x32
    schedule = fastdiff.NoiseSchedule.linear(1000)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    x_t = fastdiff.q_sample(x0, t, noise, schedule)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(model(x_t, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], f"losses {losses}"


# -- against diffusers' UNet2DModel, the same architecture under other names ----------------------
def _diffusers_unet(model):
    """diffusers' UNet2DModel with the layout of ``model`` (ADM's ResBlocks = ResnetBlock2D with the
    default time-embedding add, attention blocks where model has them) and its weights."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the cross-check")
    cfg = model.config
    res = [cfg["image_size"] // 2 ** i for i in range(len(cfg["channel_mult"]))]
    attn = [r in cfg["attention_resolutions"] for r in res]
    ref = diffusers.UNet2DModel(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        block_out_channels=tuple(cfg["model_channels"] * m for m in cfg["channel_mult"]),
        layers_per_block=cfg["num_res_blocks"], norm_num_groups=cfg["norm_groups"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=cfg["num_head_channels"], num_class_embeds=cfg["num_classes"],
        flip_sin_to_cos=True, freq_shift=0)  # ADM's [cos | sin] embedding
    sd, out = model.state_dict(), {}

    def copy(ours, theirs):
        out[theirs + ".weight"], out[theirs + ".bias"] = sd[ours + ".weight"], sd[ours + ".bias"]

    def resblock(ours, theirs):
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2")) + ((("skip", "conv_shortcut"),) if ours + ".skip.weight" in sd else ()):
            copy(f"{ours}.{a}", f"{theirs}.{b}")

    def attention(ours, theirs, block):
        copy(ours + ".norm", theirs + ".group_norm")
        c, heads = block.channels, block.num_heads
        w = sd[ours + ".qkv.weight"].reshape(heads, 3, c // heads, c)  # ADM: each head's q, k, v adjacent
        b = sd[ours + ".qkv.bias"].reshape(heads, 3, c // heads)
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{theirs}.{name}.weight"], out[f"{theirs}.{name}.bias"] = w[:, i].reshape(c, c), b[:, i].reshape(c)
        out[theirs + ".to_out.0.weight"] = sd[ours + ".proj_out.weight"].squeeze(-1)
        out[theirs + ".to_out.0.bias"] = sd[ours + ".proj_out.bias"]

    def level(blocks, k, theirs, n):
        for j in range(n):
            resblock(f"{blocks}.{k}.0", f"{theirs}.resnets.{j}")
            layer = getattr(model, blocks)[k]
            if len(layer) > 1 and isinstance(layer[1], reference.AttentionBlock):
                attention(f"{blocks}.{k}.1", f"{theirs}.attentions.{j}", layer[1])
            k += 1
        return k

    copy("time_embed.0", "time_embedding.linear_1")
    copy("time_embed.2", "time_embedding.linear_2")
    if cfg["num_classes"] is not None:
        out["class_embedding.weight"] = sd["label_emb.weight"]
    copy("input_blocks.0.0", "conv_in")
    k, levels = 1, len(cfg["channel_mult"])
    for lvl in range(levels):
        k = level("input_blocks", k, f"down_blocks.{lvl}", cfg["num_res_blocks"])
        if lvl != levels - 1:
            copy(f"input_blocks.{k}.0.conv", f"down_blocks.{lvl}.downsamplers.0.conv")
            k += 1
    resblock("middle_block.0", "mid_block.resnets.0")
    attention("middle_block.1", "mid_block.attentions.0", model.middle_block[1])
    resblock("middle_block.2", "mid_block.resnets.1")
    k = 0
    for u in range(levels):
        k = level("output_blocks", k, f"up_blocks.{u}", cfg["num_res_blocks"] + 1)
        if u != levels - 1:
            copy(f"output_blocks.{k - 1}.{len(model.output_blocks[k - 1]) - 1}.conv", f"up_blocks.{u}.upsamplers.0.conv")
    copy("out.0", "conv_norm_out")
    copy("out.1", "conv_out")
    ref.load_state_dict(out)  # strict: every diffusers parameter is mapped
    return ref


@pytest.mark.parametrize("kw", [{"num_classes": 10}, {"channel_mult": (1, 2, 2), "num_res_blocks": 2,
                                                      "attention_resolutions": (8,)}],
                         ids=["tiny_class_cond", "three_levels"])
def test_eager_matches_diffusers_unet2d(kw):
    """The eager UNet computes diffusers' UNet2DModel (same layout, mapped weights): float32 outputs
    of both lie within 2x of each other's error against our float64 model. (diffusers computes the
    timestep embedding in float32 whatever the model's dtype, so the comparison is in float32.)"""
    eager64, _ = _models(torch.float64, **kw)
    ours32 = eager64.fused_copy(fused=False).float()
    theirs32 = _diffusers_unet(ours32).eval()
    x, t, y = _inputs(eager64)
    with torch.no_grad():
        exact = eager64(x, t, y)
        ours = ours32(x.float(), t, y)
        theirs = theirs32(x.float(), t, class_labels=y).sample
    assert exact.abs().max() > 0.1
    assert_within_eager_error(theirs, ours, exact, "diffusers vs ours (float32)")
    assert_within_eager_error(ours, theirs, exact, "ours vs diffusers (float32)")
