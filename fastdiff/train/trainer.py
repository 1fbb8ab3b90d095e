"""The training loop behind ``fastdiff train``: a DDPM U-Net or a VAE, fused or eager, on one
process or under torchrun (DistributedDataParallel), with exact resume.

Exactness: everything random in a step comes from state that the checkpoint holds. The data
order is a function of (seed, step) through DistributedSampler's per-epoch permutation; the
timesteps and noise come from one CPU generator that every rank advances identically, drawing
for the *global* batch and keeping its own rows (rank::world_size, the rows DistributedSampler
gives it), so K steps + resume + K steps equals 2K steps, and N ranks of batch B/N see the same
samples, timesteps and noise as one process of batch B.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import resource
import time

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ..gaussian_diffusion import GaussianDiffusion
from ..models import UNet, VAE
from ..models import unet as unet_module
from ..models import vae as vae_module
from ..schedule import NoiseSchedule
from . import data as data_module
from .images import save_grid

MODELS = ("ddpm", "vae")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastdiff.train/1"
# Fields that define the network's shape: a checkpoint resumes only into the same ones.
MODEL_FIELDS = ("model", "config", "image_size", "channels")
# Fields that define the data order and the random draws: resuming with other values trains on,
# but no longer reproduces an uninterrupted run.
ORDER_FIELDS = ("data", "batch", "seed", "num_images")


class TrainError(Exception):
    """A user error (bad argument, data, checkpoint): the CLI prints the message, exits 2."""


@dataclasses.dataclass
class TrainConfig:
    model: str = "ddpm"            # "ddpm": UNet + GaussianDiffusion; "vae": VAE with the ELBO loss
    config: str = "tiny"           # fastdiff.models config name
    data: str | None = None        # None / "shapes": the embedded dataset; a folder, .npz or .pt
    num_images: int = 4096         # size of the embedded dataset
    steps: int = 1000              # total optimizer steps (a resumed run continues to this)
    batch: int = 16                # global batch (split across torchrun ranks)
    image_size: int = 32
    channels: int = 3
    lr: float = 1e-3
    grad_clip: float = 1.0         # max gradient norm (0: off)
    ema: bool = True
    ema_decay: float = 0.999
    amp: str = "none"              # "none" | "bf16" | "fp16" (fp16 with a GradScaler)
    backend: str | None = None     # fastdiff backend of the fused ops (None: auto)
    reference: bool = False        # train the eager reference model instead of the fused one
    compile: bool = False          # torch.compile the model
    channels_last: bool = False    # weights and activations in channels_last (NHWC) memory format
    device: str = "auto"           # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0
    beta: float = 1e-6             # VAE: KL weight of the ELBO loss
    sample_steps: int = 50         # DDIM steps of the samples grid
    num_samples: int = 36
    sample_every: int = 0          # also write samples every K steps (0: only at the end)
    checkpoint_every: int = 200
    log_every: int = 10
    out: str = "runs/fastdiff"
    resume: bool = False

    def check(self):
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")

        if self.model not in MODELS:
            raise TrainError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        configs = unet_module.CONFIGS if self.model == "ddpm" else vae_module.CONFIGS
        if self.config not in configs:
            raise TrainError(f"--config {self.config!r} is not a {self.model} config; known: {', '.join(configs)}")
        if self.amp not in AMP_DTYPES:
            raise TrainError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {self.amp!r}")
        for name in ("steps", "batch", "image_size", "num_images", "sample_steps", "num_samples", "log_every"):
            positive_int(name)
        for name in ("sample_every", "checkpoint_every"):
            positive_int(name, 0)
        if self.channels not in (1, 3):
            raise TrainError(f"--channels must be 1 or 3, got {self.channels!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainError(f"--ema-decay must be in [0, 1), got {self.ema_decay!r}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise TrainError(f"--beta must be a number >= 0, got {self.beta!r}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise TrainError(f"--grad-clip must be >= 0, got {self.grad_clip!r}")
        from .._backend import BACKENDS

        if self.backend not in (None, "auto", *BACKENDS):
            raise TrainError(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.reference and self.backend not in (None, "auto", "reference"):
            raise TrainError(f"--reference trains the eager model; --backend {self.backend!r} does not apply")


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise TrainError(f"--device {name!r} is not a device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {name!r}: this machine has no usable CUDA GPU")
        count = torch.cuda.device_count()
        if device.index is None:
            if local_rank >= count:
                raise TrainError(f"local rank {local_rank} has no GPU of its own: this machine has {count}; "
                                 f"launch at most {count} processes per node")
            device = torch.device("cuda", local_rank)
        elif world_size > 1:
            raise TrainError(f"--device {name!r}: under torchrun each process takes the GPU of its local rank; "
                             f"pass --device cuda")
        elif device.index >= count:
            raise TrainError(f"--device {name!r}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The network of ``cfg`` (fused unless cfg.reference); a shape it cannot take is a TrainError."""
    fused = not cfg.reference
    backend = None if cfg.backend in (None, "auto") else cfg.backend
    try:
        if cfg.model == "ddpm":
            return UNet.from_config(cfg.config, image_size=cfg.image_size, in_channels=cfg.channels,
                                    fused=fused, backend=backend)
        vae = VAE.from_config(cfg.config, in_channels=cfg.channels, fused=fused, backend=backend)
    except ValueError as e:
        raise TrainError(f"the {cfg.model} model ({cfg.config!r}) cannot be built for --image-size "
                         f"{cfg.image_size}: {e}") from None
    if cfg.image_size % vae.downscale:
        raise TrainError(f"--image-size {cfg.image_size} must be divisible by {vae.downscale} for the "
                         f"{cfg.config!r} VAE (it halves the size {len(vae.block_channels) - 1} times)")
    return vae


class VAELoss(torch.nn.Module):
    """The VAE's ELBO loss as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, vae, beta):
        super().__init__()
        self.vae, self.beta = vae, beta

    def forward(self, x, noise):
        return self.vae.loss(x, beta=self.beta, noise=noise)


def atomic_save(obj, path):
    """torch.save to a temp file beside ``path``, fsync, rename: a crash or a kill mid-write
    leaves the previous file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"no checkpoint to resume from: {path} does not exist") from None
    except Exception as e:  # truncated zip, not a torch file, unpickling refused ...
        raise TrainError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"it is damaged or not a fastdiff checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Trainer:
    """One training run. ``rank`` / ``world_size`` > 1 when launched by torchrun (the process
    group must be initialized); ``progress`` shows the tqdm bar (rank 0)."""

    def __init__(self, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 progress: bool = True, log=print):
        cfg.check()
        if cfg.batch % world_size:
            raise TrainError(f"--batch {cfg.batch} must be divisible by the number of processes ({world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.is_main = rank == 0
        self.progress, self.log = progress and self.is_main, log if rank == 0 else (lambda *a, **k: None)
        self.device = resolve_device(cfg.device, local_rank, world_size)
        self.out = os.path.abspath(cfg.out)
        if self.is_main:
            try:
                os.makedirs(self.out, exist_ok=True)
            except OSError as e:
                raise TrainError(f"--out {cfg.out!r} cannot be used as the run folder: {e.strerror}") from None
            if not os.access(self.out, os.W_OK | os.X_OK):
                raise TrainError(f"--out {cfg.out!r} is not writable")
        self.local_batch = cfg.batch // world_size

        try:
            self.images = data_module.load_images(cfg.data, cfg.image_size, cfg.channels,
                                                  num_images=cfg.num_images, seed=cfg.seed)
        except data_module.DataError as e:
            raise TrainError(str(e)) from None
        if self.images.shape[0] < cfg.batch:
            raise TrainError(f"the dataset has {self.images.shape[0]} images, fewer than --batch {cfg.batch}")
        self.sampler = DistributedSampler(range(self.images.shape[0]), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        self._epoch_indices = (None, None)

        torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run
        self.net = build_model(cfg).to(self.device)
        if cfg.channels_last:  # before the EMA copy and the optimizer: both follow the weights' layout
            self.net = self.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval() if cfg.ema else None
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        # the losses summed since the last metrics row (checkpointed: a resumed run's rows average
        # the same steps as an uninterrupted run's)
        self.log_sums, self.log_count = None, 0
        self.schedule = NoiseSchedule.linear(1000).to(self.device)

        module = self.net if cfg.model == "ddpm" else VAELoss(self.net, cfg.beta)
        if world_size > 1:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            module = torch.compile(module)
        self.module = module
        backend = None if cfg.backend in (None, "auto") or cfg.reference else cfg.backend
        if cfg.model == "ddpm":
            self.diffusion = GaussianDiffusion(self.module, self.schedule, backend=backend)
        self.latent_shape = None
        if cfg.model == "vae":
            s = cfg.image_size // self.net.downscale
            self.latent_shape = (self.net.latent_channels, s, s)

    # -- data and random draws -----------------------------------------------------------

    def batch_indices(self, step: int) -> torch.Tensor:
        """This rank's dataset rows of ``step``: DistributedSampler's permutation of the step's epoch."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch_indices[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._epoch_indices = (epoch, torch.tensor(list(iter(self.sampler))))
        return self._epoch_indices[1][k * self.local_batch:(k + 1) * self.local_batch]

    def _global_draw(self, draw):
        """``draw(generator)`` for the global batch (dim 0), this rank's rows (in the model's layout)."""
        full = draw(self.generator)
        return self._layout(full[self.rank::self.world_size].contiguous().to(self.device))

    def _layout(self, x):
        """x in the memory format the model runs in (channels_last for 4-D under --channels-last)."""
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last and x.dim() == 4 else x

    # -- one step --------------------------------------------------------------------------

    def loss(self, x0):
        """(loss, parts) of one local batch, the random draws advanced for the global batch."""
        b = self.cfg.batch
        if self.cfg.model == "ddpm":
            t = self._global_draw(lambda g: torch.randint(0, self.schedule.num_timesteps, (b,), generator=g))
            noise = self._global_draw(lambda g: torch.randn((b, *x0.shape[1:]), generator=g))
            return self.diffusion.training_loss(x0, t=t, noise=noise), {}
        noise = self._global_draw(lambda g: torch.randn((b, *self.latent_shape), generator=g))
        return self.module(x0, noise)

    def train_step(self):
        """One optimizer step; returns (loss, parts) as detached tensors."""
        # uint8 to the device, converted there: a quarter of the bytes of a float copy
        x0 = self._layout(data_module.to_model_range(self.images[self.batch_indices(self.step)].to(self.device)))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, parts = self.loss(x0)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            # Warm-up (decay grows from 0.1 toward ema_decay): short runs still get a useful EMA.
            decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():  # else autograd records the update and the graph grows every step
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1.0 - decay)
        self.step += 1
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    # -- checkpoints -----------------------------------------------------------------------

    @property
    def checkpoint_path(self):
        return os.path.join(self.out, CHECKPOINT)

    def state_dict(self) -> dict:
        state = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.cfg), "step": self.step,
                 "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "log_count": self.log_count}
        if self.log_sums is not None:
            state["log_sums"] = self.log_sums.cpu()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self):
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            atomic_save(self.state_dict(), self.checkpoint_path)
        if self.world_size > 1:
            dist.barrier()

    def resume(self, path=None):
        path = path or self.checkpoint_path
        state = load_checkpoint(path)
        saved = state["config"]
        mismatched = [f for f in MODEL_FIELDS if saved.get(f) != getattr(self.cfg, f)]
        if mismatched:
            raise TrainError(f"checkpoint {path} was trained with " + ", ".join(
                f"--{f.replace('_', '-')} {saved.get(f)!r}" for f in mismatched) + "; this run has " + ", ".join(
                f"{getattr(self.cfg, f)!r}" for f in mismatched) + " (use the same values or another --out)")
        changed = [f for f in ORDER_FIELDS if saved.get(f) != getattr(self.cfg, f)]
        if changed:
            self.log(f"note: resuming with other {', '.join(changed)} than the checkpoint's: training goes on, "
                     f"but no longer retraces an uninterrupted run")
        if self.ema is not None and "ema" not in state:
            raise TrainError(f"checkpoint {path} has no EMA weights; resume with --no-ema")
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.scaler.is_enabled() and state["scaler"]:  # empty: the run had no fp16 scaler
                self.scaler.load_state_dict(state["scaler"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if self.device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        except (KeyError, RuntimeError, ValueError) as e:
            raise TrainError(f"checkpoint {path} does not fit this model: {str(e).splitlines()[0][:300]}") from None
        for group in self.optimizer.param_groups:  # --lr of this run, not the checkpoint's
            group["lr"] = self.cfg.lr
        self.step = int(state["step"])
        self.log_sums, self.log_count = state.get("log_sums"), int(state.get("log_count", 0))
        return self.step

    # -- samples ---------------------------------------------------------------------------

    def sample_model(self):
        return self.ema if self.ema is not None else self.net

    def _vae_grid(self):
        """(rows, cols) of the VAE grid's input/reconstruction row pairs, within the dataset."""
        n, available = self.cfg.num_samples, self.images.shape[0]
        rows = min(max(1, math.isqrt(n) // 2), available)
        return rows, max(1, min(n // (2 * rows), available // rows))

    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        """The samples grid's images in [-1, 1]: DDIM samples (ddpm) or inputs over reconstructions
        (vae), always from the same seed so grids of one run compare step to step."""
        model = self.sample_model()
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        n, shape = self.cfg.num_samples, (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        try:
            if self.cfg.model == "ddpm":
                noise = torch.randn((n, *shape), generator=gen).to(self.device)
                diffusion = GaussianDiffusion(model, self.schedule, backend=self.diffusion.backend)
                return diffusion.sample(noise.shape, steps=min(self.cfg.sample_steps, 1000), sampler="ddim",
                                        noise=noise, progress=self.progress).float().cpu()
            rows, cols = self._vae_grid()
            x = data_module.to_model_range(self.images[:rows * cols]).to(self.device)
            recon = model.decode(model.encode(x).mode()).float().cpu().clamp(-1, 1)
            pairs = torch.stack([x.cpu().view(rows, cols, *shape), recon.view(rows, cols, *shape)], dim=1)
            return pairs.reshape(-1, *shape)  # each row of inputs followed by its reconstructions
        finally:
            model.train(was_training)

    def write_samples(self, name="samples.png"):
        """Writes the samples grid (rank 0; the sampling model is not the DDP-wrapped one)."""
        if not self.is_main:
            return None
        images = self.samples()
        nrow = None if self.cfg.model == "ddpm" else self._vae_grid()[1]
        path = os.path.join(self.out, name)
        save_grid(images, path, nrow=nrow)
        return path

    # -- the run ---------------------------------------------------------------------------

    def _stop_agreed(self, stop_requested) -> int:
        """The stop signal's number (0: go on), the same on all ranks: all stop after the same
        step, also those the signal did not reach (with several ranks, at the next log step)."""
        signum = int(stop_requested() or 0)
        if self.world_size > 1:
            if self.step % self.cfg.log_every:
                return 0  # ranks compare notes at log steps only (an all_reduce syncs the GPU)
            t = torch.tensor([signum], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        return signum

    def _mean_across_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.to(self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(values)
            values = values / self.world_size
        return values.cpu()

    def run(self, stop_requested=lambda: 0) -> dict:
        """Trains from ``self.step`` to cfg.steps, logging every log_every steps to metrics.csv,
        checkpointing every checkpoint_every steps and at the end (or when ``stop_requested()``
        returns a signal number: then ``summary["interrupted"]`` is that number), writing samples
        grids."""
        cfg = self.cfg
        metrics = MetricsLog(os.path.join(self.out, "metrics.csv"), self.step, enabled=self.is_main)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True,
                   desc=f"{cfg.model} {'reference' if cfg.reference else 'fused'}")
        start_step, t_start = self.step, time.perf_counter()
        t_log, timed, interrupted = t_start, 0, 0
        throughput = []
        try:
            while self.step < cfg.steps:
                interrupted = self._stop_agreed(stop_requested)
                if interrupted:
                    break
                loss, parts = self.train_step()
                values = torch.stack([loss.float(), *(v.float() for v in parts.values())])
                self.log_sums = values if self.log_sums is None else self.log_sums.to(values) + values
                self.log_count += 1
                timed += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    means = self._mean_across_ranks(self.log_sums / self.log_count)
                    now = time.perf_counter()
                    images_per_s = timed * cfg.batch / (now - t_log)
                    throughput.append(images_per_s)
                    row = {"step": self.step, "loss": means[0].item(),
                           **{k: means[i + 1].item() for i, k in enumerate(parts)},
                           "images_per_s": images_per_s, "elapsed_s": now - t_start}
                    metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
                    t_log, timed = now, 0
                    self.log_sums, self.log_count = None, 0
                bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                    self.write_samples(f"samples_{self.step:06d}.png")
        finally:
            bar.close()
            metrics.close()
        self.save_checkpoint()
        wall = time.perf_counter() - t_start
        summary = {"model": cfg.model, "config": cfg.config, "fused": not cfg.reference,
                   "backend": cfg.backend or "auto", "device": str(self.device), "world_size": self.world_size,
                   "amp": cfg.amp, "compile": cfg.compile, "start_step": start_step, "step": self.step,
                   "steps_run": self.step - start_step, "wall_s": round(wall, 3),
                   # the first interval holds warm-up (and compilation): left out when there are others
                   "images_per_s": (sum(throughput[1:]) / len(throughput[1:]) if len(throughput) > 1
                                    else (throughput[0] if throughput else None)),
                   "final_loss": metrics.last.get("loss"), "peak_memory_mb": round(_peak_memory_mb(self.device), 1),
                   "interrupted": interrupted, "checkpoint": self.checkpoint_path}
        if not interrupted:
            summary["samples"] = self.write_samples()
        if self.is_main:
            with open(os.path.join(self.out, "metrics.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


class MetricsLog:
    """metrics.csv, one row per log interval. On resume, rows past the checkpoint's step (logged
    by the interrupted run after its last checkpoint) are dropped, so the file has each step once."""

    def __init__(self, path, start_step, enabled=True):
        self.path, self.enabled, self.last = path, enabled, {}
        self.rows, self.fields, self._file = [], None, None
        if enabled and os.path.exists(path):
            try:
                with open(path, newline="") as f:
                    self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
            except (KeyError, TypeError, ValueError):
                raise TrainError(f"{path} is not a metrics.csv written by fastdiff train (a row without a "
                                 f"step number); move it away to resume") from None
            if self.rows:
                self.fields = list(self.rows[0])

    def write(self, row):
        self.last = row
        if not self.enabled:
            return
        if self.fields is None:
            self.fields = list(row)
        if self._file is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self.path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.fields)
            self._writer.writeheader()
            self._writer.writerows(self.rows)
        self._writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
