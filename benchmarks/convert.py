"""Time and peak memory of converting a full-size SD1.5 single file (random weights, the real layout).

    python benchmarks/convert.py                      # fp32 .safetensors like v1-5-pruned-emaonly (4.3 GB)
    python benchmarks/convert.py --format ckpt --ema  # a .ckpt training checkpoint with the EMA copy (7.7 GB)
    python benchmarks/convert.py --quantize 4

The file's keys and shapes are those of the original SD1.5 checkpoint (tests/ldm_fixtures.full_size_file: the
original ldm modules built on the meta device), filled with random numbers and written tensor by tensor. Each
conversion runs in a fresh interpreter, whose wall time and peak RSS (from wait4) are reported, beside the RSS
of an interpreter that only imports the converter. The source was just written, so it is in the page cache:
these are warm-cache figures. Targets (issue 4): <= 60 s and peak RSS <= 1.5x the file size on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import mlx_sd  # noqa: F401  (first: OpenBLAS before mlx.core, which the fixtures import)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the original-layout key list comes from the test fixtures

_CHILD = r"""
import json, sys, time
start = time.perf_counter()
from mlx_sd_convert import convert
imported = time.perf_counter()
marks = {}
def progress(step):
    marks.setdefault(step.stage, time.perf_counter())
kwargs = json.loads(sys.argv[3])
convert(sys.argv[1], sys.argv[2], progress=progress, **kwargs)
end = time.perf_counter()
print(json.dumps({"import_s": imported - start, "hash_s": marks.get("write", end) - marks.get("hash", imported),
                  "write_s": end - marks.get("write", end), "total_s": end - imported, "peak_rss": peak_rss()}))
"""
# The child's own peak RSS (VmHWM: this process image's high-water mark, file-backed pages included). The rusage
# of a child (wait4, getrusage) is no use here: Linux carries the forking parent's RSS into it at exec.
_PEAK = r"""
def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""


def write_random_file(path: Path, ema: bool, seed: int = 0) -> int:
    """A full-size SD1.5 original-layout checkpoint of random float32 values; returns its size in bytes."""
    from ldm_fixtures import full_size_file

    from mlx_sd_convert.writer import Entry, SafetensorsWriter

    shapes = {k: v.shape for k, v in full_size_file("sd1").items() if ema or not k.startswith("model_ema.")}
    ints = {k for k in shapes if k.endswith("position_ids")}
    rng = np.random.default_rng(seed)
    entries = [Entry(k, "int64" if k in ints else "float32", tuple(shapes[k])) for k in sorted(shapes)]
    staging = path.with_suffix(".safetensors") if path.suffix != ".safetensors" else path
    with SafetensorsWriter(staging, entries) as writer:
        for entry in entries:
            if entry.dtype == "int64":
                writer.write(entry.name, np.arange(77, dtype=np.int64)[None])
                continue
            fan_in = int(np.prod(entry.shape[1:])) if len(entry.shape) > 1 else 1
            value = rng.standard_normal(entry.shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
            writer.write(entry.name, value)
    if staging != path:  # a .ckpt as torch.save writes it, from the safetensors file (memory-mapped)
        import torch

        from mlx_sd_convert.readers import open_checkpoint

        checkpoint = open_checkpoint(staging)
        with warnings.catch_warnings():  # torch.from_numpy of a read-only memory map: torch.save only reads it
            warnings.simplefilter("ignore", UserWarning)
            state = {k: torch.from_numpy(checkpoint[k]) for k in checkpoint}
        torch.save({"state_dict": state, "global_step": 840000}, path)
        del state
        staging.unlink()
    return path.stat().st_size


def run_child(code: str, *args: str) -> tuple[dict, float]:
    """(the child's JSON output, wall seconds) of a fresh interpreter running `code`."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK + code, *args], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"conversion failed: {done.stdout}")
    return json.loads(done.stdout), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("safetensors", "ckpt"), default="safetensors")
    parser.add_argument("--ema", action="store_true", help="include the model_ema.* copy (a training checkpoint)")
    parser.add_argument("--dtype", default=None, help="output dtype (default: the converter's, float16)")
    parser.add_argument("--quantize", type=int, choices=(4, 8))
    parser.add_argument("--workdir", default=None, help="where to write the ~4-8 GB source and the output")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=options.workdir, prefix="mlx-sd-bench-") as tmp:
        src = Path(tmp) / f"sd15-random.{options.format}"
        start = time.perf_counter()
        size = write_random_file(src, options.ema)
        print(f"wrote {src.name}: {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")
        baseline = run_child("import json, mlx_sd_convert; print(json.dumps(peak_rss()))")[0]
        kwargs = {"dtype": options.dtype, "quantize": options.quantize}
        timings, wall = run_child(_CHILD, str(src), str(Path(tmp) / "out"), json.dumps(kwargs))
        peak = timings.pop("peak_rss")
        out_size = sum(p.stat().st_size for p in (Path(tmp) / "out").rglob("*") if p.is_file())
    record = {
        "source": f"{options.format}{' with EMA' if options.ema else ''}, float32",
        "source_gib": round(size / 2**30, 3),
        "output_gib": round(out_size / 2**30, 3),
        "options": kwargs,
        "wall_s": round(wall, 1),
        **{k: round(v, 1) for k, v in timings.items()},
        "peak_rss_gib": round(peak / 2**30, 3),
        "import_only_rss_gib": round(baseline / 2**30, 3),
        "peak_rss_over_file": round(peak / size, 3),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(record, indent=2))
    ok = wall <= 60 and peak <= 1.5 * size
    print(f"targets (<= 60 s, <= 1.5x file size): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
