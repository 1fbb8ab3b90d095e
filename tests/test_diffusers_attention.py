"""fastdiff.diffusers.AttnProcessor against diffusers' AttnProcessor2_0 (installed diffusers is
the reference): tiny UNet2DConditionModel / UNet2DModel / AutoencoderKL built from configs,
output and every gradient (parameters and inputs) in float64 to 1e-9 and by the eager error
rule in float32; single Attention modules over the options AttnProcessor2_0 handles
(group_norm, spatial_norm, norm_cross, qk norms, 4-D inputs, residual, rescale, dropout);
attention masks (SDPA path); processor plumbing (dict, state_dict, kwargs, imports)."""
import copy
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (the reference for these tests)")

import fastdiff  # noqa: E402
import fastdiff.diffusers as fdd  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor as DiffusersAttnProcessor  # noqa: E402
from utils import assert_close, assert_within_eager_error, fused_backends_here  # noqa: E402

# None: auto (the cpu kernel on CPU tensors). Triton (interpreted here: slow) runs on a few
# single modules; the processor's code is the same for every backend.
MODEL_BACKENDS = ["cpu", None] if "cpu" in fused_backends_here("attention") else [None]
MODULE_BACKENDS = fused_backends_here("attention") + [None]
TRITON_MODULE_CASES = ("cross_77_bias", "4d_group_norm_residual", "head_dim_odd")
F64_RTOL = 1e-9
# Absolute floor for gradients that are zero in exact arithmetic (a key projection's bias:
# softmax ignores a shift shared by all keys); both processors leave ~1e-16 of rounding there.
F64_ATOL_FLOOR = 1e-13
# float32, flash-attention's rule: fastdiff's error against the float64 truth is at most
# F32_SLACK x AttnProcessor2_0's error in float32. Per tensor for the output and the input
# gradients (measured here over 12 model/seed draws: worst ratio 1.31; diffusers' own eager
# AttnProcessor 1.68). Parameter gradients: pooled, the sum over tensors of max-abs error / the
# tensor's largest entry (measured: worst 1.17). Per parameter tensor the ratio is rounding noise
# through a deep network: diffusers' AttnProcessor vs AttnProcessor2_0 reaches 3.75 there,
# fastdiff 2.68. Gradients that are zero in exact arithmetic (key biases: softmax ignores a
# shift shared by all keys) carry only rounding and are left out of the pool.
F32_SLACK = 2.0
ZERO_GRAD_REL = 1e-9


def _seeded(dtype=torch.float64, *shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Tiny models (configs only, nothing downloaded); built once, converted per test.


@pytest.fixture(scope="module")
def unet_cond():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).double()


@pytest.fixture(scope="module")
def unet_plain():
    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=8).double()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(2)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        norm_num_groups=8, sample_size=16, layers_per_block=1).double()


def _cond_inputs():
    # 77 text tokens (odd), timesteps per sample.
    return {"sample": _seeded(torch.float64, 2, 4, 8, 8, seed=10),
            "encoder_hidden_states": _seeded(torch.float64, 2, 77, 32, seed=11)}, torch.tensor([10, 500])


def _call_cond(model, x, t):
    return model(x["sample"], t, encoder_hidden_states=x["encoder_hidden_states"]).sample


def _call_plain(model, x, t):
    return model(x["sample"], t).sample


def _call_vae(model, x, t):
    return model(x["sample"], sample_posterior=False).sample


MODELS = {
    "unet_cond": (_call_cond, _cond_inputs),
    "unet_plain": (_call_plain, lambda: ({"sample": _seeded(torch.float64, 2, 3, 8, 8, seed=12)},
                                         torch.tensor([3, 700]))),
    "vae": (_call_vae, lambda: ({"sample": _seeded(torch.float64, 2, 3, 16, 16, seed=13)}, None)),
}


class _CountingAttention:
    """Wraps fastdiff.attention as the processor sees it: proves the kernels ran."""

    def __init__(self):
        self.backends = []
        self.fn = fdd.attention

    def __call__(self, q, k, v, scale=None, *, backend=None):
        self.backends.append(backend)
        return self.fn(q, k, v, scale, backend=backend)


def _run(model, processor, dtype, call, inputs, t, monkeypatch=None):
    """Output, input gradients and parameter gradients (dict name -> tensor)."""
    model = copy.deepcopy(model)
    model = model.double() if dtype == torch.float64 else model.float()  # (.to(dtype) logs a diffusers warning)
    n = fdd.set_attn_processor(model, processor)
    counter = None
    if monkeypatch is not None and isinstance(processor, fdd.AttnProcessor):
        counter = _CountingAttention()
        monkeypatch.setattr(fdd, "attention", counter)
    x = {k: v.to(dtype).clone().requires_grad_(True) for k, v in inputs.items()}
    out = call(model, x, t)
    out.backward(_seeded(dtype, *out.shape, seed=99))
    if counter is not None:
        monkeypatch.setattr(fdd, "attention", counter.fn)
        assert counter.backends == [processor.backend] * n, f"fastdiff.attention calls: {counter.backends}, {n} modules"
    res = {"out": out.detach()}
    res.update({f"d{k}": v.grad for k, v in x.items()})
    res.update({f"param {k}": p.grad for k, p in model.named_parameters()})
    assert all(g is not None for g in res.values()), [k for k, g in res.items() if g is None]
    return res


def _assert_f32_rule(fused, eager, truth, what):
    """F32_SLACK rule: per tensor for the output and input gradients, pooled for parameters."""
    assert fused.keys() == eager.keys() == truth.keys()
    top = max(t.abs().max().item() for t in truth.values())
    pooled = {"fastdiff": 0.0, "AttnProcessor2_0": 0.0}
    for name, exact in truth.items():
        assert fused[name].dtype == eager[name].dtype == torch.float32
        if not name.startswith("param "):
            assert_within_eager_error(fused[name], eager[name], exact, f"{what} float32 {name}", slack=F32_SLACK)
            continue
        scale = exact.abs().max().item()
        if scale <= ZERO_GRAD_REL * top:
            continue
        for who, res in (("fastdiff", fused), ("AttnProcessor2_0", eager)):
            pooled[who] += (res[name].double() - exact).abs().max().item() / scale
    assert pooled["AttnProcessor2_0"] > 0
    assert pooled["fastdiff"] <= F32_SLACK * pooled["AttnProcessor2_0"], f"{what} float32 parameter gradients: {pooled}"


def _assert_f64_close(got, want, what):
    assert got.keys() == want.keys()
    for name, w in want.items():
        atol = max(F64_RTOL * w.abs().max().item(), F64_ATOL_FLOOR)  # relative to the tensor's scale
        assert_close(got[name], w, atol, F64_RTOL, f"{what} {name}")


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_model_float64(model_name, backend, request, monkeypatch):
    model = request.getfixturevalue(model_name)
    call, make_inputs = MODELS[model_name]
    inputs, t = make_inputs()
    want = _run(model, AttnProcessor2_0(), torch.float64, call, inputs, t)
    got = _run(model, fdd.AttnProcessor(backend), torch.float64, call, inputs, t, monkeypatch)
    _assert_f64_close(got, want, f"{model_name} backend={backend}")


@pytest.mark.parametrize("model_name", list(MODELS))
def test_model_float32_within_eager_error(model_name, request, monkeypatch):
    model = request.getfixturevalue(model_name)
    call, make_inputs = MODELS[model_name]
    inputs, t = make_inputs()
    truth = _run(model, AttnProcessor2_0(), torch.float64, call, inputs, t)
    eager = _run(model, AttnProcessor2_0(), torch.float32, call, inputs, t)
    fused = _run(model, fdd.AttnProcessor(MODEL_BACKENDS[0]), torch.float32, call, inputs, t, monkeypatch)
    _assert_f32_rule(fused, eager, truth, model_name)


# ---------------------------------------------------------------------------------------------
# Single Attention modules: each option AttnProcessor2_0 handles.

# (Attention kwargs, query shape, encoder hidden states shape or None, temb shape or None)
MODULE_CASES = {
    "self_3d": (dict(query_dim=32, heads=4, dim_head=8), (2, 37, 32), None, None),  # odd length
    "cross_77_bias": (dict(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, bias=True),
                      (2, 13, 32), (2, 77, 24), None),
    "norm_cross_layer": (dict(query_dim=16, cross_attention_dim=24, heads=2, dim_head=8,
                              cross_attention_norm="layer_norm"), (2, 9, 16), (2, 11, 24), None),
    "norm_cross_group": (dict(query_dim=16, cross_attention_dim=24, heads=2, dim_head=8,
                              cross_attention_norm="group_norm", cross_attention_norm_num_groups=4),
                         (2, 9, 16), (2, 11, 24), None),
    "qk_layer_norm": (dict(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm"), (2, 21, 32), None, None),
    "qk_rms_norm": (dict(query_dim=32, cross_attention_dim=8, heads=2, dim_head=16, qk_norm="rms_norm"),
                    (1, 21, 32), (1, 5, 8), None),
    # VAE/ADM style: (B, C, H, W) in, GroupNorm, residual, rescale, one head.
    "4d_group_norm_residual": (dict(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True,
                                    rescale_output_factor=2.0, bias=True, upcast_softmax=True),
                               (2, 32, 5, 7), None, None),
    "4d_cross": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, residual_connection=True),
                 (1, 16, 3, 5), (1, 77, 12), None),
    # MoVQ style: SpatialNorm conditioned on a (B, zq, h, w) temb.
    "spatial_norm": (dict(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True),
                     (2, 32, 6, 6), None, (2, 4, 3, 3)),
    "out_dim": (dict(query_dim=32, heads=4, dim_head=8, out_dim=48), (2, 10, 32), None, None),
    "head_dim_odd": (dict(query_dim=20, heads=1, dim_head=37), (1, 6, 20), None, None),
}


def _module(kwargs, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    attn = Attention(**kwargs).to(dtype)
    with torch.no_grad():  # non-trivial norms: affine parameters away from (1, 0)
        for name, p in attn.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return attn


def _module_run(attn, processor, hidden, context, temb, **kwargs):
    attn.set_processor(processor)
    attn.zero_grad()
    hidden = hidden.clone().requires_grad_(True)
    context = None if context is None else context.clone().requires_grad_(True)
    call_kwargs = {} if temb is None else {"temb": temb}
    out = attn(hidden, encoder_hidden_states=context, **call_kwargs, **kwargs)
    out.backward(_seeded(out.dtype, *out.shape, seed=7))
    res = {"out": out.detach(), "dhidden": hidden.grad}
    if context is not None:
        res["dcontext"] = context.grad
    res.update({f"param {k}": p.grad.clone() for k, p in attn.named_parameters() if p.grad is not None})
    return res


def _module_inputs(case, dtype=torch.float64):
    _, q_shape, c_shape, t_shape = MODULE_CASES[case]
    hidden = _seeded(dtype, *q_shape, seed=1)
    context = None if c_shape is None else _seeded(dtype, *c_shape, seed=2)
    temb = None if t_shape is None else _seeded(dtype, *t_shape, seed=3)
    return hidden, context, temb


@pytest.mark.parametrize("case,backend", [(c, b) for c in MODULE_CASES for b in MODULE_BACKENDS
                                          if b != "triton" or c in TRITON_MODULE_CASES])
def test_module_float64(case, backend, monkeypatch):
    attn = _module(MODULE_CASES[case][0])
    hidden, context, temb = _module_inputs(case)
    want = _module_run(attn, AttnProcessor2_0(), hidden, context, temb)
    counter = _CountingAttention()
    monkeypatch.setattr(fdd, "attention", counter)
    got = _module_run(attn, fdd.AttnProcessor(backend), hidden, context, temb)
    assert counter.backends == [backend]
    _assert_f64_close(got, want, f"{case} backend={backend}")


def test_to_out_dropout_same_as_diffusers():
    """Training mode with dropout in to_out: the same RNG draws give the same masks."""
    attn = _module(dict(query_dim=16, heads=2, dim_head=8, dropout=0.5)).train()
    hidden, _, _ = _module_inputs("norm_cross_layer")
    results = []
    for proc in (AttnProcessor2_0(), fdd.AttnProcessor()):
        torch.manual_seed(123)
        results.append(_module_run(attn, proc, hidden, None, None))
    assert (results[0]["out"] == 0).float().mean() > 0.2  # dropout did act
    _assert_f64_close(results[1], results[0], "dropout")


def test_scale_qk_false_uses_attn_scale():
    """scale_qk=False (softmax scale 1): diffusers picks its AttnProcessor, which honours
    attn.scale; AttnProcessor2_0 would ignore it. fastdiff's processor honours it."""
    attn = _module(dict(query_dim=16, heads=2, dim_head=8, scale_qk=False))
    assert attn.scale == 1.0 and isinstance(attn.processor, DiffusersAttnProcessor)
    hidden, _, _ = _module_inputs("norm_cross_layer")
    want = _module_run(attn, DiffusersAttnProcessor(), hidden, None, None)
    got = _module_run(attn, fdd.AttnProcessor(), hidden, None, None)
    _assert_f64_close(got, want, "scale_qk=False")


def test_module_float32_within_eager_error():
    attn = _module(MODULE_CASES["cross_77_bias"][0])
    hidden, context, temb = _module_inputs("cross_77_bias")
    truth = _module_run(attn, AttnProcessor2_0(), hidden, context, temb)
    attn32 = copy.deepcopy(attn).float()
    h32, c32 = hidden.float(), context.float()
    eager = _module_run(attn32, AttnProcessor2_0(), h32, c32, None)
    fused = _module_run(attn32, fdd.AttnProcessor(MODEL_BACKENDS[0]), h32, c32, None)
    _assert_f32_rule(fused, eager, truth, "module")


# ---------------------------------------------------------------------------------------------
# attention_mask: torch's SDPA with the mask prepared as AttnProcessor2_0 prepares it.

MASK_CASES = {
    "bias_b1k": lambda b, nq, nk: torch.where(_seeded(torch.float64, b, 1, nk, seed=5) > 0, 0.0, -10000.0),
    "bool_b1k": lambda b, nq, nk: torch.arange(nk).expand(b, 1, nk) < torch.tensor([nk, nk // 2]).view(b, 1, 1),
    "bias_bqk": lambda b, nq, nk: _seeded(torch.float64, b, nq, nk, seed=6),
}


@pytest.mark.parametrize("mask_case", list(MASK_CASES))
@pytest.mark.parametrize("cross", [False, True])
def test_attention_mask_same_as_attn_processor2_0(mask_case, cross, monkeypatch):
    attn = _module(MODULE_CASES["cross_77_bias"][0] if cross else MODULE_CASES["self_3d"][0])
    hidden, context, _ = _module_inputs("cross_77_bias" if cross else "self_3d")
    nk = context.shape[1] if cross else hidden.shape[1]
    mask = MASK_CASES[mask_case](2, hidden.shape[1], nk)
    want = _module_run(attn, AttnProcessor2_0(), hidden, context, None, attention_mask=mask)
    no_mask = _module_run(attn, AttnProcessor2_0(), hidden, context, None)
    assert not torch.allclose(want["out"], no_mask["out"])  # the mask matters
    monkeypatch.setattr(fdd, "attention", None)  # a masked call must not reach fastdiff.attention
    got = _module_run(attn, fdd.AttnProcessor("cpu" if "cpu" in MODEL_BACKENDS else None), hidden, context, None,
                      attention_mask=mask)
    for name, w in want.items():  # the same SDPA call on the same tensors: bitwise equal
        assert torch.equal(got[name], w), f"{mask_case} cross={cross} {name}"


def test_unet_encoder_attention_mask(unet_cond):
    """encoder_attention_mask through the UNet: masked cross-attention on SDPA, self-attention on fastdiff."""
    inputs, t = _cond_inputs()
    mask = torch.ones(2, 77)
    mask[1, 40:] = 0
    want = _run(unet_cond, AttnProcessor2_0(), torch.float64,
                lambda m, x, tt: m(x["sample"], tt, encoder_hidden_states=x["encoder_hidden_states"],
                                   encoder_attention_mask=mask).sample, inputs, t)
    got = _run(unet_cond, fdd.AttnProcessor(MODEL_BACKENDS[0]), torch.float64,
               lambda m, x, tt: m(x["sample"], tt, encoder_hidden_states=x["encoder_hidden_states"],
                                  encoder_attention_mask=mask).sample, inputs, t)
    assert got["dencoder_hidden_states"][1, 40:].abs().max() == 0  # masked tokens get no gradient
    _assert_f64_close(got, want, "encoder_attention_mask")


# ---------------------------------------------------------------------------------------------
# Plumbing: set_attn_processor, state_dict, kwargs, errors, imports.


def test_set_attn_processor_dict_and_state_dict(unet_cond):
    inputs, t = _cond_inputs()
    unet = copy.deepcopy(unet_cond)
    names = list(unet.attn_processors)
    assert len(names) == 8

    def forward(model):
        with torch.no_grad():
            return _call_cond(model, inputs, t)

    unet.set_attn_processor(fdd.AttnProcessor("cpu"))
    single = forward(unet)
    unet.set_attn_processor({name: fdd.AttnProcessor("cpu") for name in names})
    assert all(isinstance(p, fdd.AttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(forward(unet), single)  # deterministic kernels: bitwise

    # Mixed: self-attention (attn1) on fastdiff, cross-attention (attn2) on AttnProcessor2_0.
    unet.set_attn_processor({n: fdd.AttnProcessor() if ".attn1." in n else AttnProcessor2_0() for n in names})
    mixed = forward(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    assert_close(mixed, forward(unet), 1e-12, F64_RTOL, "mixed processors")

    # Nothing of the processor enters a state_dict; loading one keeps the processors set.
    unet.set_attn_processor(fdd.AttnProcessor("cpu"))
    state = unet.state_dict()
    assert state.keys() == unet_cond.state_dict().keys()
    assert not any("processor" in k for k in state)
    torch.manual_seed(5)
    other = UNet2DConditionModel.from_config(unet_cond.config).double()
    other.set_attn_processor(fdd.AttnProcessor("cpu"))
    other.load_state_dict(state)
    unet.load_state_dict(state)
    assert all(isinstance(p, fdd.AttnProcessor) for m in (unet, other) for p in m.attn_processors.values())
    assert torch.equal(forward(other), single)
    assert torch.equal(forward(copy.deepcopy(other)), single)


def test_set_attn_processor_helper(unet_plain):
    model = copy.deepcopy(unet_plain)
    assert not hasattr(model, "set_attn_processor")  # why the helper exists
    proc = fdd.AttnProcessor("cpu")
    assert fdd.set_attn_processor(model, proc) == 4
    assert all(m.processor is proc for m in model.modules() if isinstance(m, Attention))
    with pytest.raises(ValueError, match="no attention module"):
        fdd.set_attn_processor(torch.nn.Linear(2, 2), proc)


def test_signature_and_extra_kwargs(unet_cond):
    assert (list(inspect.signature(fdd.AttnProcessor.__call__).parameters)
            == list(inspect.signature(AttnProcessor2_0.__call__).parameters))
    attn = _module(MODULE_CASES["self_3d"][0])
    hidden, _, _ = _module_inputs("self_3d")
    attn.set_processor(fdd.AttnProcessor())
    with torch.no_grad():
        plain = attn(hidden)
        # Unknown cross_attention_kwargs: diffusers' Attention.forward drops them (it logs a warning).
        assert torch.equal(attn(hidden, foo=1.0, ip_adapter_masks=None), plain)
        # Called directly, extra kwargs are ignored and `scale` warns as in AttnProcessor2_0
        # (through diffusers' own deprecate: the real package, not this module).
        with pytest.warns(FutureWarning, match="`scale` argument is deprecated"):
            assert torch.equal(attn.processor(attn, hidden, scale=0.5, bar=2), plain)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(attn.processor(attn, hidden, bar=2), plain)
        inputs, t = _cond_inputs()
        unet = copy.deepcopy(unet_cond)
        unet.set_attn_processor(fdd.AttnProcessor())
        base = _call_cond(unet, inputs, t)
        out = unet(inputs["sample"], t, encoder_hidden_states=inputs["encoder_hidden_states"],
                   cross_attention_kwargs={"foo": 1}).sample
        assert torch.equal(out, base)


def test_errors():
    with pytest.raises(ValueError, match="backend"):
        fdd.AttnProcessor("nope")
    hidden = _seeded(torch.float64, 1, 3, 8)
    big = _module(dict(query_dim=8, heads=1, dim_head=264))  # past MAX_HEAD_DIM
    big.set_processor(fdd.AttnProcessor())
    with pytest.raises(ValueError, match="head dim D = 264"):
        big(hidden)
    added = _module(dict(query_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6))
    added.set_processor(fdd.AttnProcessor())
    with pytest.raises(ValueError, match="added key/value"):
        added(hidden, encoder_hidden_states=_seeded(torch.float64, 1, 2, 6))
    causal = _module(dict(query_dim=8, heads=2, dim_head=4, is_causal=True))
    causal.set_processor(fdd.AttnProcessor())
    with pytest.raises(ValueError, match="is_causal"):
        causal(hidden)


def test_repr_and_backend_context():
    """backend=None defers to fastdiff.use_backend / FASTDIFF_BACKEND; an explicit one wins."""
    assert repr(fdd.AttnProcessor("cpu")) == "AttnProcessor(backend='cpu')"
    attn = _module(MODULE_CASES["self_3d"][0])
    hidden, _, _ = _module_inputs("self_3d")
    with torch.no_grad():
        want = attn(hidden)  # AttnProcessor2_0, diffusers' default
        with fastdiff.use_backend("reference"):
            attn.set_processor(fdd.AttnProcessor())
            assert_close(attn(hidden), want, 1e-12, F64_RTOL, "use_backend('reference')")
        with fastdiff.use_backend("xformers"):  # never usable on CPU tensors
            with pytest.raises(fastdiff.BackendError, match="fastdiff.use_backend"):
                attn(hidden)
            attn.set_processor(fdd.AttnProcessor(MODEL_BACKENDS[0]))
            assert_close(attn(hidden), want, 1e-12, F64_RTOL, "explicit backend inside use_backend")


def test_import_without_diffusers():
    """`import fastdiff` does not import fastdiff.diffusers; both import with diffusers missing;
    with diffusers present, `import diffusers` is the real package, not this submodule."""
    code = (
        "import sys\n"
        "sys.modules['diffusers'] = None  # as if not installed: importing it raises ImportError\n"
        "import fastdiff\n"
        "assert 'fastdiff.diffusers' not in sys.modules\n"
        "import fastdiff.diffusers as fdd\n"
        "assert fdd.AttnProcessor('cpu').backend == 'cpu'\n"
        "del sys.modules['diffusers']\n"
        "import diffusers\n"
        "from diffusers.models.attention_processor import AttnProcessor2_0\n"
        "assert diffusers is not fdd and diffusers.__name__ == 'diffusers', diffusers\n"
        "assert not diffusers.__file__.startswith(fastdiff.__path__[0]), diffusers.__file__\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
