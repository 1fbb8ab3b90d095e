"""`fastdiff kernels`: registers, spills and shared memory of every GPU kernel,
without a GPU (DESIGN.md section 4, layer 3).

(a) Every Triton kernel configuration listed in fastdiff.kernels.<op>.KERNEL_CONFIGS
    is compiled to a cubin for each arch with triton.compile(ASTSource, target=
    GPUTarget("cuda", cc, 32)); registers and local memory (spills) come from
    `cuobjdump --dump-resource-usage` on the cubin, shared memory from the
    compiled kernel's metadata (Triton allocates it dynamically).
(b) The CUDA kernels inside fastdiff/_C*.so are listed from the same cuobjdump
    (Triton's wheel ships one under triton/backends/nvidia/bin).

run() returns non-zero on any compile failure, any spill (LOCAL > 0) or any
kernel over the arch's shared-memory or register limit. Compiles run in
parallel worker processes and hit Triton's on-disk cache on later runs.
Nothing here needs a GPU or initializes CUDA.
"""
import argparse
import glob
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

from fastdiff.ops import OPS

DEFAULT_ARCHS = ("sm_80", "sm_90")
# Per-block limits: opt-in shared memory (bytes) and registers per thread.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255

_HERE = os.path.dirname(os.path.abspath(__file__))


def _interpreting():
    import triton

    return bool(triton.knobs.runtime.interpret)


def load_kernel_modules():
    """{op: module} of fastdiff.kernels."""
    return {op: importlib.import_module(f"fastdiff.kernels.{op}") for op in OPS}


def _arch_cc(arch):
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"fastdiff kernels: arch must look like sm_90, got {arch!r}")
    return int(m.group(1))


def _cuobjdump():
    import triton

    try:
        tool = triton.knobs.nvidia.cuobjdump
        if tool is not None:
            return tool.path
    except Exception:  # noqa: BLE001 - fall back to the wheel's default location
        pass
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    return path if os.path.exists(path) else None


def parse_resource_usage(text):
    """cuobjdump --dump-resource-usage output -> [(arch, function, {REG: .., LOCAL: ..})]."""
    rows, arch, func = [], None, None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"Function (.+):$", line)
        if m:
            func = m.group(1)
            continue
        if func is not None and line.startswith("REG:"):
            usage = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            rows.append((arch, func, usage))
            func = None
    return rows


def _cubin_usage(cubin, cuobjdump):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    rows = parse_resource_usage(out)
    if not rows:
        raise RuntimeError(f"no function in cuobjdump output:\n{out}")
    return rows[0][2]


def _compile_one(job):
    """Worker: compile config `index` of `op` for `arch` -> result dict."""
    op, index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget

    cfg = load_kernel_modules()[op].KERNEL_CONFIGS[index]
    res = {"op": op, "kernel": cfg["name"], "config": cfg["config"], "dtype": cfg["dtype"],
           "num_warps": cfg["num_warps"], "arch": arch}
    t0 = time.perf_counter()
    try:
        src = triton.compiler.ASTSource(cfg["kernel"], cfg["signature"],
                                        constexprs=cfg["constexprs"], attrs=cfg.get("attrs"))
        compiled = triton.compile(src, target=GPUTarget("cuda", _arch_cc(arch), 32),
                                  options={"num_warps": cfg["num_warps"]})
        usage = _cubin_usage(compiled.asm["cubin"], _cuobjdump())
        res.update(registers=usage.get("REG", 0), spills=usage.get("LOCAL", 0),
                   shared=max(int(compiled.metadata.shared), usage.get("SHARED", 0)),
                   error=None)
    except Exception as e:  # noqa: BLE001 - reported as a failed row
        lines = str(e).strip().splitlines()
        res.update(registers=None, spills=None, shared=None,
                   error=f"{type(e).__name__}: {lines[-1] if lines else ''}")
    res["seconds"] = time.perf_counter() - t0
    return res


def _jobs(mods, archs):
    return [(op, i, arch) for arch in archs for op in OPS
            for i in range(len(mods[op].KERNEL_CONFIGS))]


def compile_all(archs=DEFAULT_ARCHS, jobs=None):
    """Compile every KERNEL_CONFIGS entry for every arch; list of result dicts."""
    mods = load_kernel_modules()
    work = _jobs(mods, archs)
    workers = jobs or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else (os.cpu_count() or 1), 8)
    if workers > 1 and sys.platform.startswith("linux"):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fork: the workers inherit the loaded kernel modules; nothing here has
        # touched CUDA or started threads that a fork would break.
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
            return list(ex.map(_compile_one, work, chunksize=4))
    return [_compile_one(j) for j in work]


def so_kernels(archs=DEFAULT_ARCHS):
    """CUDA kernels of fastdiff/_C*.so: (path, rows or None, message)."""
    cuobjdump = _cuobjdump()
    out = []
    for path in sorted(glob.glob(os.path.join(_HERE, "_C*.so"))):
        if cuobjdump is None:
            out.append((path, None, "cuobjdump not found"))
            continue
        p = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                           capture_output=True, text=True)
        text = p.stdout + p.stderr
        if "does not contain device code" in text:
            out.append((path, [], "no CUDA device code (built without CUDA)"))
            continue
        if p.returncode != 0:
            out.append((path, None, f"cuobjdump failed: {text.strip()}"))
            continue
        rows = [r for r in parse_resource_usage(p.stdout) if r[0] in archs]
        out.append((path, _dedupe(rows), f"{len(rows)} kernel images"))
    return out


def _dedupe(rows):
    seen, out = set(), []
    for arch, func, usage in rows:
        if (arch, func) not in seen:
            seen.add((arch, func))
            out.append((arch, func, usage))
    return out


def _demangle(names):
    try:
        p = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                           check=True)
        lines = p.stdout.splitlines()
        if len(lines) == len(names):
            return lines
    except (OSError, subprocess.CalledProcessError):
        pass
    return list(names)


def _table(rows, header):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(lines)


def _problems(res):
    cc = _arch_cc(res["arch"])
    if res["error"]:
        return "COMPILE FAILED: " + res["error"]
    why = []
    if res["spills"]:
        why.append(f"spills {res['spills']} B")
    if res["registers"] > MAX_REGISTERS:
        why.append(f"registers {res['registers']} > {MAX_REGISTERS}")
    if res["shared"] > MAX_SHARED_BYTES.get(cc, 48 * 1024):
        why.append(f"shared {res['shared']} B over the {res['arch']} limit")
    return "; ".join(why)


def run(archs=DEFAULT_ARCHS, jobs=None, out=None):
    """Compile and report; the exit code (0 = every kernel compiled, no spills)."""
    out = out or sys.stdout
    archs = tuple(archs)
    for a in archs:
        _arch_cc(a)
    if _interpreting():
        # Under TRITON_INTERPRET=1 @triton.jit builds interpreter objects that
        # cannot be compiled: report from a child process that compiles.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "fastdiff.kernel_report", "--arch", *archs]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out.write(p.stdout + p.stderr)
        return p.returncode

    t0 = time.perf_counter()
    status = 0
    results = compile_all(archs, jobs)
    by_table = {}
    for r in results:
        by_table.setdefault((r["kernel"], r["arch"]), []).append(r)
    header = ("kernel", "config", "dtype", "warps", "arch", "registers", "spills(B)",
              "shared(B)", "problems")
    print("Triton kernels (fastdiff.kernels), compiled without a GPU:", file=out)
    for (kernel, arch), rows in by_table.items():
        table = []
        for r in rows:
            why = _problems(r)
            status |= bool(why)
            table.append((r["kernel"], r["config"], r["dtype"], r["num_warps"], r["arch"],
                          r["registers"], r["spills"], r["shared"], why))
        print(f"\n{kernel} [{arch}]", file=out)
        print(_table(table, header), file=out)
    ok = [r for r in results if not r["error"]]
    failed = len(results) - len(ok)
    print(f"\nTriton: {len(results)} configs over {', '.join(archs)} in "
          f"{time.perf_counter() - t0:.1f}s; {failed} failed; max registers "
          f"{max((r['registers'] for r in ok), default=0)}; spilling "
          f"{sum(1 for r in ok if r['spills'])}; max shared "
          f"{max((r['shared'] for r in ok), default=0)} B", file=out)

    print("\nCUDA kernels (fastdiff/_C*.so):", file=out)
    so = so_kernels(archs)
    if not so:
        print("  no fastdiff/_C*.so found (extension not built)", file=out)
    for path, rows, msg in so:
        name = os.path.basename(path)
        if not rows:
            print(f"  {name}: {msg}", file=out)
            status |= rows is None and "cuobjdump not found" not in msg
            continue
        names = _demangle([f for _, f, _ in rows])
        for arch in archs:
            table = []
            for (a, _, usage), pretty in zip(rows, names):
                if a != arch:
                    continue
                spills = usage.get("LOCAL", 0)
                regs = usage.get("REG", 0)
                shared = usage.get("SHARED", 0)
                why = []
                if spills:
                    why.append(f"spills {spills} B")
                if regs > MAX_REGISTERS:
                    why.append(f"registers {regs}")
                if shared > MAX_SHARED_BYTES.get(_arch_cc(arch), 48 * 1024):
                    why.append("shared over limit")
                status |= bool(why)
                short = pretty if len(pretty) <= 90 else pretty[:87] + "..."
                table.append((short, "-", arch, regs, spills, shared, "; ".join(why)))
            if table:
                print(f"\n{name} [{arch}]", file=out)
                print(_table(table, ("kernel", "config", "arch", "registers", "spills(B)",
                                     "shared(B)", "problems")), file=out)
            else:
                print(f"  {name}: no kernels for {arch}", file=out)
    print(f"\nfastdiff kernels: {'OK' if status == 0 else 'FAILED'}", file=out)
    return int(status)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastdiff kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS), help="e.g. sm_80 sm_90")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile processes")
    args = ap.parse_args(argv)
    return run(tuple(args.arch), jobs=args.jobs)


if __name__ == "__main__":
    sys.exit(main())
