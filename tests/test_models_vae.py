"""fastdiff.models.vae.VAE: the fused model against the eager one with the same weights and the
same generator (reconstruction, posterior, loss and its parts, the gradients of x and of every
parameter), the posterior against diffusers', shapes, input checks, configs, and a few AdamW
steps."""
import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff import reference
from fastdiff.models.vae import CONFIGS, VAE, EagerDiagonalGaussian
from utils import assert_close, assert_within_eager_error

BETA = 0.05  # large enough that the KL's share of every encoder gradient is well above rounding


def _randomize(model):
    """GroupNorm starts at (1, 0) and ADM zero-initializes the attention's proj_out: make them
    random so that every gradient is non-trivial."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
            if isinstance(m, reference.AttentionBlock):
                m.proj_out.weight.copy_(torch.randn_like(m.proj_out.weight) / m.channels ** 0.5)
                m.proj_out.bias.copy_(0.1 * torch.randn_like(m.proj_out.bias))


def _pair(dtype=torch.float64, config="tiny", seed=0, **kw):
    torch.manual_seed(seed)
    eager = VAE.from_config(config, fused=False, **kw)
    _randomize(eager)
    eager = eager.to(dtype)
    fused = VAE.from_config(config, fused=True, **kw).to(dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _image(shape, dtype=torch.float64, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _run(model, x, seed=2, beta=BETA):
    """Everything the comparison looks at: forward outputs, loss and parts, and the gradients."""
    with torch.no_grad():
        recon, posterior = model(x, generator=torch.Generator().manual_seed(seed))
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    loss, parts = model.loss(x, beta, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    out = {"recon": recon, "mean": posterior.mean, "logvar": posterior.logvar, "loss": loss.detach(),
           "loss.recon": parts["recon"].detach(), "loss.kl": parts["kl"].detach(), "d x": x.grad}
    return out | {f"d {name}": p.grad.clone() for name, p in model.named_parameters()}


def _run_with_noise(model, x, noise, beta=BETA):
    """The loss written out from its definition with given noise (the float64 truth for a
    float32 run, whose generator draws float32 noise)."""
    with torch.no_grad():
        posterior = model.encode(x)
        recon = model.decode(reference.reparameterize(posterior.mean, posterior.logvar, noise))
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad()
    posterior = model.encode(x)
    z, kl = reference.sample_and_kl(posterior.mean, posterior.logvar, noise)
    rec = F.mse_loss(model.decode(z), x)
    loss = rec + beta * kl.mean()
    loss.backward()
    out = {"recon": recon, "mean": posterior.mean.detach(), "logvar": posterior.logvar.detach(),
           "loss": loss.detach(), "loss.recon": rec.detach(), "loss.kl": kl.mean().detach(), "d x": x.grad}
    return out | {f"d {name}": p.grad.clone() for name, p in model.named_parameters()}


def _assert_rel(actual, expected, rel, what):
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the expected value is all zero (a comparison that cannot fail)"
    assert_close(actual, expected, rel * scale, rel, what)


# (config overrides, image shape): the tiny config; two heads in the mid attention and two
# ResBlocks per level; no attention, odd batch, non-square image.
FP64_CASES = [
    ({}, (2, 3, 8, 8)),
    ({"num_head_channels": 32, "layers_per_block": 2}, (2, 3, 8, 8)),
    ({"mid_attention": False, "latent_channels": 3}, (3, 3, 8, 12)),
]


@pytest.mark.parametrize("kw,shape", FP64_CASES)
def test_fused_matches_eager_float64(kw, shape):
    eager, fused = _pair(**kw)
    x = _image(shape)
    ref, out = _run(eager, x), _run(fused, x)
    assert out.keys() == ref.keys()
    for name in ref:
        _assert_rel(out[name], ref[name], 1e-8, name)


def test_fused_within_eager_error_float32():
    # The float64 eager model with the float32 run's noise is the truth. Measured here (tiny,
    # 2x3x16x16, three seeds): over all outputs and gradients, the largest error of either
    # float32 model is 1.1e-6..1.5e-6 of the tensor's max |value|; per tensor the ratio of the
    # fused error to the eager one spans 0.04..3.3, and up to 44 on the scalar KL where eager
    # happened to land within 2e-9. Hence flash-attention's 2x rule plus a floor of 1e-6 of each
    # tensor's scale (about 8 float32 ulps): a real defect (another eps, other noise) is O(1).
    eager, fused = _pair(torch.float32)
    exact_model = VAE.from_config("tiny", fused=False).double()
    exact_model.load_state_dict(eager.state_dict())
    x = _image((2, 3, 16, 16), torch.float32)
    noise = torch.randn(eager.latent_shape(x.shape), generator=torch.Generator().manual_seed(2))
    exact = _run_with_noise(exact_model, x.double(), noise.double())
    ref, out = _run(eager, x), _run(fused, x)
    for name in exact:
        floor = 1e-6 * exact[name].abs().max().item()
        assert_within_eager_error(out[name], ref[name], exact[name], name, slack=2.0, floor=floor)


@pytest.mark.parametrize("fused", [False, True])
def test_loss_is_its_definition_with_diffusers_noise(fused):
    # loss = mse + beta * mean per-sample KL, with z drawn as diffusers draws it
    model = _pair()[int(fused)]
    x = _image((2, 3, 8, 8))
    noise = torch.randn(model.latent_shape(x.shape), generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)
    got, want = _run(model, x), _run_with_noise(model, x, noise)
    for name in want:
        _assert_rel(got[name], want[name], 1e-10, name)


@pytest.mark.parametrize("fused", [False, True])
def test_posterior_matches_diffusers(fused):
    vae_mod = pytest.importorskip("diffusers.models.autoencoders.vae", reason="diffusers not installed")
    model = _pair()[int(fused)]
    x = _image((2, 3, 8, 8))
    with torch.no_grad():
        posterior = model.encode(x)
        theirs = vae_mod.DiagonalGaussianDistribution(model.encoder(x))
    assert isinstance(posterior, fastdiff.DiagonalGaussian)
    assert isinstance(posterior, EagerDiagonalGaussian) != fused
    for name in ("mean", "logvar"):
        assert_close(getattr(posterior, name), getattr(theirs, name), 0, 0, name)
    s = posterior.sample(torch.Generator().manual_seed(3))
    assert_close(s, theirs.sample(torch.Generator().manual_seed(3)), 1e-12, 1e-12, "sample")
    assert_close(posterior.kl(), theirs.kl(), 1e-10, 1e-12, "kl")
    z, kl = posterior.sample_and_kl(torch.Generator().manual_seed(3))
    assert_close(z, s, 1e-12, 1e-12, "sample_and_kl z")
    assert_close(kl, theirs.kl(), 1e-10, 1e-12, "sample_and_kl kl")


def test_fused_flag_picks_the_modules():
    eager, fused = _pair()
    norms = lambda m, cls: [n for n, mod in m.named_modules() if isinstance(mod, cls)]  # noqa: E731
    # every norm of the eager model is GroupNormAct (ResBlocks, norm_out) or an attention's GroupNorm
    assert norms(fused, fastdiff.nn.GroupNormSiLU) == norms(eager, reference.GroupNormAct) != []
    assert norms(eager, fastdiff.nn.GroupNormSiLU) == []
    assert norms(fused, fastdiff.nn.AttentionBlock) == norms(eager, reference.AttentionBlock) != []
    assert norms(eager, fastdiff.nn.AttentionBlock) == []


def test_state_dict_identical_and_loads_both_ways():
    torch.manual_seed(0)
    eager, fused = VAE.from_config("tiny", fused=False), VAE.from_config("tiny", fused=True)
    assert list(eager.state_dict()) == list(fused.state_dict())
    assert all(eager.state_dict()[k].shape == v.shape for k, v in fused.state_dict().items())
    fused.load_state_dict(eager.state_dict())
    eager.load_state_dict(fused.state_dict())
    # ADM's zero-initialized output projection is kept: a fresh mid attention block is the identity
    assert not fused.encoder.mid.attn.proj_out.weight.any()


@pytest.mark.parametrize("config,shape,latent", [
    ("tiny", (2, 3, 16, 16), (2, 4, 8, 8)),  # 2 levels: /2
    ("tiny", (1, 3, 6, 10), (1, 4, 3, 5)),  # odd latent sizes
    ("small", (1, 3, 16, 8), (1, 4, 4, 2)),  # 3 levels: /4
])
def test_shapes(config, shape, latent):
    torch.manual_seed(0)
    model = VAE.from_config(config)
    assert model.latent_shape(shape) == latent
    x = torch.randn(shape)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == latent
        assert posterior.sample(torch.Generator().manual_seed(0)).shape == latent
        assert model.decode(posterior.mode()).shape == shape
        recon, _ = model(x, sample_posterior=False)
        assert_close(recon, model.decode(posterior.mean), 0, 0, "forward(sample_posterior=False)")
        recon, _ = model(x, generator=torch.Generator().manual_seed(0))
        assert recon.shape == shape


def test_bad_inputs():
    model = VAE.from_config("small")  # 3 levels: H, W divisible by 4
    for shape in [(1, 3, 16, 18), (1, 3, 14, 16), (1, 4, 16, 16), (3, 16, 16), (1, 3, 0, 16)]:
        with pytest.raises(ValueError, match=rf"x must have shape .*got {tuple(shape)}".replace("(", r"\(")
                           .replace(")", r"\)")):
            model.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, H, W\), got \(1, 3, 4, 4\)"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.loss([[0.0]])


def test_configs():
    with pytest.raises(ValueError, match="unknown VAE config 'huge'; known: small, tiny"):
        VAE.from_config("huge")
    assert set(CONFIGS) == {"tiny", "small"}
    model = VAE.from_config("tiny", latent_channels=8, fused=False)
    assert (model.block_channels, model.latent_channels, model.norm_groups, model.fused) == ((32, 64), 8, 8, False)
    assert model.encoder.conv_out.out_channels == 16  # mean | logvar
    with pytest.raises(ValueError, match="norm_groups = 32 must divide"):
        VAE(block_channels=(48, 64))
    with pytest.raises(ValueError, match="num_head_channels = 24 must divide"):
        VAE.from_config("tiny", num_head_channels=24)
    with pytest.raises(ValueError, match="block_channels must name at least one level"):
        VAE(block_channels=())


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_steps_lower_the_loss(fused):
    # Smooth images (bilinear from 4x4) and fixed posterior noise. Measured here: 0.232 -> 0.102
    # in 8 steps, below the 0.162 of a model that outputs zeros (mean(x^2)).
    torch.manual_seed(0)
    model = VAE.from_config("tiny", fused=fused)
    x = F.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=(16, 16), mode="bilinear", align_corners=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss, _ = model.loss(x, beta=1e-4, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = model.loss(x, beta=1e-4, generator=torch.Generator().manual_seed(0))[0].item()
    assert final < 0.6 * losses[0], losses + [final]
    assert final < 0.8 * x.pow(2).mean().item(), losses + [final]
