"""`python -m llmkernels bench`: runs every registered case on every available device, prints a
table per device and family, and writes the records and the environment to JSON.

Per case: first each function's check on a fresh input set (a function that fails it gives an
error record and is not timed); then our time and the anchor's (same process, same device, same
inputs), each the median of its calls after a warm-up that lasts until it is stable, with the
interquartile range (IQR) as the spread; achieved GB/s (or TFLOP/s for cases that define flops);
ratio = anchor median / our median (> 1: we are faster); and the fraction of the physical limit
measured at the start of the run: the device copy bandwidth, or the dense matmul peak for
compute-bound cases. A case whose spread exceeds core.MAX_TRUSTED_SPREAD is flagged "WIDE SPREAD".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from typing import Callable, Any, Dict, List, Optional

import torch

from .. import build_info, cuda_unusable_reason, cuda_usable
from . import core
from .core import short_dtype

COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 1 * 2**30}
BUDGET_SECONDS = {False: 2.0, True: 0.25}   # seconds of timed calls per function, by --quick
WARMUP_MAX_SECONDS = {False: core.WARMUP_MAX_SECONDS, True: 2.0}   # warm-up cap per function, by --quick


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmkernels bench",
        description="Time every registered benchmark case and its anchor on each device; print a table, write JSON.")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="where to run (default: every available device)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--filter", action="append", default=[], metavar="SUBSTR",
                        help="only cases with a label containing SUBSTR (case-insensitive); the labels are "
                             "the op name (mezo.update), the family (mezo), the dtype (fp32, bf16) and the "
                             "anchor name ('published loop'). Repeat to narrow: every SUBSTR must match")
    parser.add_argument("--out", metavar="PATH", help="JSON output (default: bench-out/bench-<devices>-<time>.json)")
    parser.add_argument("--plot", metavar="PATH.png", help="bar chart of ratio to anchor (needs matplotlib)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="timed calls per function (default: as many as fit in a time budget)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    return args


def matches(case: core.Case, filters: List[str]) -> bool:
    labels = [label.lower() for label in case.labels()]
    return all(any(wanted.lower() in label for label in labels) for wanted in filters)


def device_name(device: torch.device) -> str:
    """The GPU's name; for the CPU, its model and widest vector extension, which tells apart VMs
    that all report "AMD EPYC": two of them measured the default fp32 mezo.update at 17.5 ms (one
    with AVX-512) and 128 ms (AVX2 only)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "cpu"
    widest = next((isa for isa in ("avx512f", "avx2", "avx", "neon", "asimd") if isa in flags), None)
    return f"{model} ({widest})" if widest else model


def git_state() -> Dict[str, Any]:
    """The commit the installed native extension was built from, recorded by CMake at configure
    time (a folder's own git repository could be an unrelated one, e.g. a site-packages inside a
    pyenv checkout). None when the build did not come from a git checkout."""
    commit = build_info().get("git_commit") or ""
    if not commit or commit == "unknown":
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.removesuffix("-dirty"), "git_dirty": commit.endswith("-dirty")}


def measure_limits(device: torch.device, need_matmul: bool, repeats: Optional[int]) -> Dict[str, Any]:
    print(f"measuring {device.type} copy bandwidth{' and matmul peak' if need_matmul else ''} ...",
          file=sys.stderr, flush=True)
    load_average = os.getloadavg()[0]   # before we add our own load
    copy_bytes = COPY_BYTES[device.type]
    limits = {
        "name": device_name(device),
        "copy_bytes": copy_bytes,
        "copy_gbps": core.copy_bandwidth_gbps(device, copy_bytes, repeats=repeats),
        "matmul_tflops": core.matmul_peak_tflops(device, repeats=repeats) if need_matmul else None,
        "cache_bytes": core.last_level_cache_bytes(device),
    }
    if device.type == "cpu":
        # Other processes on the cores stall every parallel region (one late thread holds the
        # barrier): on a busy 2-core machine the published MeZO loop (~2000 small torch ops a call)
        # measured 66 ms to 3.8 s, our one-region sweep 38 to 72 ms. The load says how busy it was.
        limits.update(threads=torch.get_num_threads(), load_average=load_average, cores=os.cpu_count())
    return limits


def case_fields(case: core.Case) -> Dict[str, Any]:
    return {"family": case.family, "op": case.name, "description": case.description,
            "dtype": short_dtype(case.dtype), "device": str(case.device), "anchor": case.anchor_name,
            "bytes_moved": case.bytes_moved, "flops": case.flops}


class CheckFailed(Exception):
    """A case's function failed its check: it is reported as an error and not timed."""


def check_case(case: core.Case) -> None:
    """Each function once on its own fresh input set: a kernel that silently does nothing would
    otherwise be timed, and look fast."""
    for side, run, check in case.functions():
        try:
            check(case.setup(), run)
        except Exception as error:
            name = "ours" if side == "ours" else case.anchor_name
            raise CheckFailed(f"check of {name} failed: {type(error).__name__}: {error}") from error


def _timing_fields(prefix: str, timing: core.Timing) -> Dict[str, Any]:
    return {f"{prefix}_iqr_ms": timing.iqr, f"{prefix}_spread": timing.spread,
            f"{prefix}_warmup_calls": timing.warmup_calls, f"{prefix}_warmup_settled": timing.settled}


def run_case(case: core.Case, limits: Dict[str, Any], repeats: Optional[int], budget_seconds: float,
             warmup_max_seconds: float) -> Dict[str, Any]:
    record = case_fields(case)
    check_case(case)
    input_sets = [case.setup() for _ in range(core.input_sets_needed(case.bytes_moved, limits["cache_bytes"]))]
    timing = dict(repeats=repeats, budget_seconds=budget_seconds, warmup_max_seconds=warmup_max_seconds)
    ours = core.measure(case.run, input_sets, case.device, **timing)
    anchor = core.measure(case.anchor_run, input_sets, case.device, **timing)
    time_ms, anchor_ms = ours.median, anchor.median
    record.update(time_ms=time_ms, repeats=len(ours.samples), anchor_ms=anchor_ms,
                  anchor_repeats=len(anchor.samples), input_sets=len(input_sets), ratio=anchor_ms / time_ms,
                  gbps=case.bytes_moved / (time_ms * 1e-3) / 1e9, tflops=None)
    record.update(check_passed=True, **_timing_fields("time", ours), **_timing_fields("anchor", anchor),
                  spread_too_wide=max(ours.spread, anchor.spread) > core.MAX_TRUSTED_SPREAD)
    if case.flops:
        record["tflops"] = case.flops / (time_ms * 1e-3) / 1e12
        record.update(limit="matmul peak", fraction=record["tflops"] / limits["matmul_tflops"])
    else:
        record.update(limit="copy bandwidth", fraction=record["gbps"] / limits["copy_gbps"])
    record["targets"] = [{"text": t.text, "metric": t.metric, "minimum": t.minimum, "value": record[t.metric],
                          "meets": t.met_by(record)} for t in case.targets]
    return record


def flags(record: Dict[str, Any]) -> List[str]:
    """Why a measured record is not to be trusted, as short words for the table."""
    result = []
    if record.get("spread_too_wide"):
        result.append("WIDE SPREAD")
    if record.get("time_warmup_settled") is False or record.get("anchor_warmup_settled") is False:
        result.append("UNSETTLED")   # warm-up hit its cap before two batches agreed
    return result


def run_all(cases: List[core.Case], all_limits: Dict[str, Dict[str, Any]], repeats: Optional[int],
            budget_seconds: float, warmup_max_seconds: float,
            after_each: Callable[[List[Dict[str, Any]]], None] = lambda records: None) -> List[Dict[str, Any]]:
    """Runs every case; `after_each(records so far)` runs after each one (the JSON is rewritten then,
    so a run killed by a timeout keeps the cases it finished)."""
    records = []
    for index, case in enumerate(cases, 1):
        label = f"[{index}/{len(cases)}] {case.name} {short_dtype(case.dtype)} {case.device} vs {case.anchor_name}"
        print(f"{label} ...", end="", file=sys.stderr, flush=True)
        try:
            record = run_case(case, all_limits[str(case.device)], repeats, budget_seconds, warmup_max_seconds)
            print(f" {record['time_ms']:.3g} ms (IQR {record['time_spread']:.0%}), anchor {record['anchor_ms']:.3g} ms "
                  f"(IQR {record['anchor_spread']:.0%}), {record['ratio']:.2f}x {' '.join(flags(record))}".rstrip(),
                  file=sys.stderr, flush=True)
        except Exception as error:   # one broken case must not hide the others' numbers
            message = str(error) if isinstance(error, CheckFailed) else f"{type(error).__name__}: {error}"
            record = {**case_fields(case), "check_passed": not isinstance(error, CheckFailed), "error": message}
            print(f" FAILED: {record['error']}", file=sys.stderr, flush=True)
        records.append(record)
        after_each(records)
        if case.device.type == "cuda":   # cases differ in sizes: hand cached blocks back between them
            torch.cuda.empty_cache()
    return records


# -- report -------------------------------------------------------------------------------------

def _format_table(rows: List[List[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


TABLE_COLUMNS = ["op", "shape", "dtype", "device", "median ms", "IQR", "throughput", "anchor", "anchor median ms",
                 "IQR", "ratio", "of limit", "flags"]
TABLE_LEGEND = ("median ms: per call, after a warm-up until stable; IQR: interquartile range, in % of the median; "
                f"ratio: anchor median / our median; WIDE SPREAD: an IQR above {core.MAX_TRUSTED_SPREAD:.0%}, "
                "do not trust the ratio; UNSETTLED: the warm-up hit its time cap")



def _flops_text(tflops: float) -> str:
    """TFLOP/s on a GPU; GFLOP/s below 1 TFLOP/s (a CPU), where one decimal of TFLOP/s reads 0.0."""
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s"

def _table_row(record: Dict[str, Any]) -> List[str]:
    head = [record["op"], record["description"], record["dtype"], record["device"]]
    if "error" in record:
        return head + ["error", "", "", record["anchor"], "", "", "", "", record["error"]]
    throughput = _flops_text(record["tflops"]) if record["tflops"] else f"{record['gbps']:.1f} GB/s"
    return head + [f"{record['time_ms']:.3f}", f"{record['time_spread']:.0%}", throughput, record["anchor"],
                   f"{record['anchor_ms']:.3f}", f"{record['anchor_spread']:.0%}", f"{record['ratio']:.2f}x",
                   f"{record['fraction']:.0%} {record['limit']}", " ".join(flags(record))]


def device_header(device: str, limits: Dict[str, Any], info: Dict[str, Any]) -> str:
    cuda = f"CUDA built for {info.get('cuda_archs')}" if info.get("cuda_compiled") else "no CUDA build"
    native = (f"llmkernels {info.get('version')} ({cuda}, GPU usable: {info.get('gpu_usable')}, "
              f"OpenMP threads: {info.get('openmp_threads')})")
    threads = ""
    if "threads" in limits:
        threads = f", {limits['threads']} torch threads, load {limits['load_average']:.1f} on {limits['cores']} cores"
    ceilings = f"copy {limits['copy_gbps']:.1f} GB/s ({limits['copy_bytes'] // 2**20} MiB)"
    if limits.get("matmul_tflops"):
        ceilings += f", matmul {_flops_text(limits['matmul_tflops'])}"
    return f"== {device}: {limits['name']}{threads} | torch {torch.__version__} | {native} | {ceilings}"


def format_report(environment: Dict[str, Any], records: List[Dict[str, Any]]) -> str:
    dirty = " (uncommitted changes)" if environment["git_dirty"] else ""
    lines = [f"llmkernels bench {environment['timestamp']} commit {environment['git_commit']}{dirty}",
             TABLE_LEGEND]
    for device, limits in environment["devices"].items():
        lines += ["", device_header(device, limits, environment["build_info"])]
        on_device = [r for r in records if r["device"] == device]
        for family in dict.fromkeys(r["family"] for r in on_device):
            in_family = [r for r in on_device if r["family"] == family]
            lines += ["", f"{family} ({device})", _format_table([TABLE_COLUMNS] + [_table_row(r) for r in in_family])]
            targets = [(r, t) for r in in_family for t in r.get("targets", [])]
            if targets:
                lines.append(f"{family} targets (reported, not asserted):")
            for record, target in targets:
                verdict = {True: "meets", False: "below", None: "n/a"}[target["meets"]]
                doubt = "".join(f" ({flag})" for flag in flags(record))
                value = "n/a" if target["value"] is None else f"{target['value']:.2f}"
                lines.append(f"  {verdict:5}  {target['text']}: {record['op']} {record['dtype']} vs "
                             f"{record['anchor']}, {target['metric']} {value}{doubt}")
    return "\n".join(lines)


def default_out_path(devices: List[torch.device]) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("bench-out", f"bench-{'+'.join(d.type for d in devices)}-{stamp}.json")


def write_json(path: str, environment: Dict[str, Any], records: List[Dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump({"environment": environment, "records": records}, file, indent=1)


def plot_title(environment: Dict[str, Any]) -> str:
    """Which machine, which code, when: a chart copied out of its JSON still says what it measured."""
    names = "; ".join(f"{device}: {limits['name']}" for device, limits in environment["devices"].items())
    commit = (environment["git_commit"] or "unknown")[:12]
    if environment["git_dirty"]:
        commit += " + uncommitted changes"
    return f"llmkernels bench, {environment['timestamp'][:10]}, commit {commit}\n{names}"


def plot_ratios(path: str, environment: Dict[str, Any], records: List[Dict[str, Any]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    measured = [r for r in records if "error" not in r]
    labels = [" ".join([f"{r['op']} {r['dtype']} {r['device']} vs {r['anchor']}"] + [f"({f})" for f in flags(r)])
              for r in measured]
    # Constrained layout keeps the long case labels, the title and the axis label inside the figure.
    figure, axes = pyplot.subplots(figsize=(11, 0.35 * len(measured) + 1.8), layout="constrained")
    axes.barh(labels, [r["ratio"] for r in measured],
              color=["tab:gray" if flags(r) else "tab:blue" for r in measured])
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.invert_yaxis()
    axes.set_xlabel("anchor median / our median (> 1: llmkernels faster; gray: flagged in the table)")
    figure.suptitle(plot_title(environment), fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def matplotlib_installed() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with_cuda = cuda_usable()
    if args.device == "cuda" and not with_cuda:
        print(f"--device cuda: CUDA is not usable: {cuda_unusable_reason()}", file=sys.stderr)
        return 2
    if args.device == "all" and not with_cuda:
        print(f"--device all: CPU only; CUDA is not usable: {cuda_unusable_reason()}", file=sys.stderr)
    wanted = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if with_cuda else [])}[args.device]
    devices = [torch.device(name) for name in wanted]
    plot = args.plot
    if plot and not matplotlib_installed():
        print(f"--plot {plot}: skipped, matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        plot = None

    cases = [case for device in devices for case in core.build_cases(device, args.quick) if matches(case, args.filter)]
    if not cases:
        print(f"no benchmark case matches --filter {' '.join(map(repr, args.filter))}", file=sys.stderr)
        return 2
    environment = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "build_info": build_info(),
        "quick": args.quick,
        "repeats": args.repeats,
        "filter": args.filter,
        "spread": "interquartile range (q3 - q1, inclusive quartiles); *_spread fields divide it by the median",
        "max_trusted_spread": core.MAX_TRUSTED_SPREAD,
        "warmup_tolerance": core.WARMUP_TOLERANCE,
        "devices": {},
    }
    for device in devices:
        need_matmul = any(case.flops for case in cases if case.device == device)
        environment["devices"][str(device)] = measure_limits(device, need_matmul, args.repeats)

    out = args.out or default_out_path(devices)
    records = run_all(cases, environment["devices"], args.repeats, BUDGET_SECONDS[args.quick],
                      WARMUP_MAX_SECONDS[args.quick], after_each=lambda done: write_json(out, environment, done))
    print(format_report(environment, records), flush=True)
    print(f"\nwrote {out}", flush=True)
    if plot:
        plot_ratios(plot, environment, records)
        print(f"wrote {plot}", flush=True)
    return 1 if any("error" in record for record in records) else 0
