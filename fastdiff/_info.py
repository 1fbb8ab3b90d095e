"""fastdiff.info(): versions, what the extension holds, which backends run where and why not."""
from __future__ import annotations

import platform

import torch

from . import _C_loader
from ._backend import BACKENDS, OP_ONLY, reasons_not_usable
from .ops import OPS



def _build_config():
    try:
        from . import _build_config as cfg
    except ImportError:
        return None
    return cfg


def info(as_dict: bool = False):
    """Prints (or returns, with as_dict=True) the build and backend report."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - report, never fail
        triton_version = f"not importable ({type(e).__name__})"
    cfg = _build_config()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    report = {
        "fastdiff": "0.1.0",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "extension": {
            "_C loaded": _C_loader.loaded_main,
            "cpu kernels": (f"fastdiff._C_cpu_{_C_loader.cpu_capability} (CPU capability "
                            f"{torch.backends.cpu.get_cpu_capability()})" if _C_loader.cpu_capability else "none"),
            "cpu capabilities built": list(cfg.CPU_CAPS) if cfg else "unknown (no _build_config)",
            "cuda kernels": (f"built for archs {cfg.CUDA_ARCHS}" if cfg and cfg.CUDA_BUILT
                             else f"not built ({cfg.CUDA_REASON if cfg else 'unknown'})"),
            "kernels registered (op: dispatch keys)": {
                op: [k for k in ("CPU", "CUDA") if _C_loader.has_kernel(op, k)] for op in OPS},
            "load errors": dict(_C_loader.errors),
        },
        "backends": {
            str(dev): {b: (reasons_not_usable(b, OP_ONLY.get(b, "q_sample"), dev) or "usable") for b in BACKENDS}
            for dev in devices
        },
    }
    if as_dict:
        return report
    print(format_report(report))
    return None


def format_report(report) -> str:
    lines = [f"fastdiff {report['fastdiff']}  python {report['python']}  torch {report['torch']} "
             f"(CUDA {report['torch_cuda']})  triton {report['triton']}  GPU available: {report['cuda_available']}",
             "extension:"]
    for k, v in report["extension"].items():
        lines.append(f"  {k}: {v}")
    lines.append("backends:")
    for dev, table in report["backends"].items():
        for b, why in table.items():
            lines.append(f"  {dev:5s} {b:9s} {why if why == 'usable' else 'no: ' + '; '.join(why)}")
    return "\n".join(lines)
