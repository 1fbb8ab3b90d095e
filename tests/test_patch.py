"""fastdiff.patch / unpatch: diffusers' UNet2DModel, UNet2DConditionModel and AutoencoderKL
(tiny configs, nothing downloaded), fastdiff's eager models and plain nn.Sequential pairs:
outputs and gradients equal to the unpatched model, parameters untouched, unpatch restores."""
import copy

import pytest
import torch

import fastdiff
from fastdiff import reference
from fastdiff.models.unet import UNet
from utils import assert_close

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (the reference for these tests)")


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialized output layers would hide gradient differences
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)
    return model


def _unet_cond():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _unet_plain():
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8)


def _vae():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=16, layers_per_block=1)


def _inputs(name, seed=3):
    g = torch.Generator().manual_seed(seed)
    if name == "unet_cond":
        return {"sample": torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
                "encoder_hidden_states": torch.randn(2, 77, 32, generator=g, dtype=torch.float64)}
    if name == "unet_plain":
        return {"sample": torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)}
    return {"sample": torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)}


def _call(name, model, inp):
    if name == "vae":
        return model(inp["sample"], sample_posterior=False).sample
    t = torch.tensor([10, 500])
    kw = {"encoder_hidden_states": inp["encoder_hidden_states"]} if name == "unet_cond" else {}
    return model(inp["sample"], t, **kw).sample


def _step(name, model, inp):
    inp = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    model.zero_grad()
    out = _call(name, model, inp)
    out.square().mean().backward()
    return out.detach(), {k: v.grad for k, v in inp.items()} | {n: p.grad.clone() for n, p in model.named_parameters()}


BUILDERS = {"unet_cond": _unet_cond, "unet_plain": _unet_plain, "vae": _vae}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_diffusers_models_match_unpatched(name):
    torch.manual_seed(0)
    eager = _randomize(BUILDERS[name]().double())
    patched = copy.deepcopy(eager)
    report = fastdiff.patch(patched, backend="cpu")
    kinds = " ".join(what for _, what in report.replaced)
    assert "ResnetBlock2D" in kinds and "AttnProcessor" in kinds, str(report)
    assert any("conv_norm_out + conv_act" in why for _, why in report.left), str(report)
    assert sum(isinstance(m, diffusers.models.resnet.ResnetBlock2D) for m in patched.modules()) == sum(
        "ResnetBlock2D" in w for _, w in report.replaced)
    inp = _inputs(name)
    out_e, grads_e = _step(name, eager, inp)
    out_p, grads_p = _step(name, patched, inp)
    assert_close(out_p, out_e, 1e-10, 1e-9, "out")
    for k in grads_e:
        scale = grads_e[k].abs().max().item()
        assert_close(grads_p[k], grads_e[k], 1e-10 * max(scale, 1.0), 1e-8, f"d {k}")
    # parameters are the same objects' values; state_dict unchanged
    for (k1, v1), (k2, v2) in zip(eager.state_dict().items(), patched.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_unpatch_restores_and_patch_is_idempotent():
    model = _unet_plain().double()
    first = fastdiff.patch(model)
    second = fastdiff.patch(model)
    assert first.replaced and not second.replaced  # nothing left to patch
    assert any("forward" in vars(m) for m in model.modules())
    n = fastdiff.unpatch(model)
    assert n == len(first.replaced)
    assert not any("forward" in vars(m) for m in model.modules())
    procs = {type(m.processor).__name__ for m in model.modules() if isinstance(m, diffusers.models.attention_processor.Attention)}
    assert procs == {"AttnProcessor2_0"}


def test_training_step_runs_patched():
    model = _unet_plain()
    fastdiff.patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 8, 8)
    loss = model(x, torch.tensor([1, 900])).sample.square().mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_fastdiff_eager_unet_becomes_fused():
    torch.manual_seed(0)
    eager = UNet.from_config("tiny", image_size=16, fused=False).double()
    _randomize(eager, seed=1)
    patched = copy.deepcopy(eager)
    report = fastdiff.patch(patched, backend="cpu")
    assert any(isinstance(m, fastdiff.nn.AttentionBlock) for m in patched.modules())
    assert not any(type(m) is reference.GroupNormAct for m in patched.modules())
    assert any("GroupNormAct" in w for _, w in report.replaced)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t = torch.tensor([3, 700])
    assert_close(patched(x, t), eager(x, t), 1e-10, 1e-9, "out")
    fastdiff.unpatch(patched)
    assert not any(isinstance(m, (fastdiff.nn.AttentionBlock, fastdiff.nn.GroupNormSiLU)) for m in patched.modules())


def test_sequential_pairs_and_what_is_left():
    seq = torch.nn.Sequential(torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 1),
                              torch.nn.GroupNorm(4, 8), torch.nn.ReLU())
    weight = seq[0].weight
    x = torch.randn(2, 8, 5, 5)
    want = seq(x)
    report = fastdiff.patch(seq)
    assert isinstance(seq[0], fastdiff.nn.GroupNormSiLU) and isinstance(seq[1], torch.nn.Identity)
    assert seq[0].weight is weight  # the same Parameter
    assert type(seq[3]) is torch.nn.GroupNorm  # followed by ReLU: left
    assert_close(seq(x), want, 1e-5, 1e-5, "out")
    assert len(report.replaced) == 1
    fastdiff.unpatch(seq)
    assert type(seq[0]) is torch.nn.GroupNorm and isinstance(seq[1], torch.nn.SiLU)

    block = diffusers.models.resnet.ResnetBlock2D(in_channels=16, out_channels=16, temb_channels=8, groups=8,
                                                  non_linearity="mish")
    report = fastdiff.patch(block)
    assert not report.replaced and "nonlinearity is Mish, not SiLU" in str(report)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastdiff.patch("unet")


def test_autoencoder_kl_posterior_is_fused():
    """The patched AutoencoderKL's encode returns fastdiff.DiagonalGaussian: the ELBO terms of a
    VAE training step (sample with a generator, KL to N(0, I)) and every gradient match diffusers'."""
    torch.manual_seed(0)
    eager = _randomize(_vae().double(), seed=1)
    patched = copy.deepcopy(eager)
    report = fastdiff.patch(patched, backend="cpu")
    assert any("AutoencoderKL.encode" in what for _, what in report.replaced), str(report)
    x = _inputs("vae")["sample"]

    def elbo_step(model):
        model.zero_grad()
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(5))
        loss = (model.decode(z).sample - x).square().mean() + 1e-3 * posterior.kl().mean()
        loss.backward()
        return posterior, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    post_e, loss_e, grads_e = elbo_step(eager)
    post_p, loss_p, grads_p = elbo_step(patched)
    assert isinstance(post_p, fastdiff.DiagonalGaussian) and not isinstance(post_e, fastdiff.DiagonalGaussian)
    assert_close(loss_p, loss_e, 1e-12, 1e-10, "loss")
    for k in grads_e:
        assert_close(grads_p[k], grads_e[k], 1e-10 * max(grads_e[k].abs().max().item(), 1.0), 1e-8, f"d {k}")
    # return_dict=False and the model's own forward (posterior sample with a generator)
    (post_t,) = patched.encode(x, return_dict=False)
    assert isinstance(post_t, fastdiff.DiagonalGaussian)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert_close(patched(x, sample_posterior=True, generator=g1).sample,
                 eager(x, sample_posterior=True, generator=g2).sample, 1e-12, 1e-10, "forward")
    fastdiff.unpatch(patched)
    assert "encode" not in vars(patched)
    assert not isinstance(patched.encode(x).latent_dist, fastdiff.DiagonalGaussian)
