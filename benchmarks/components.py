"""Speed and memory of each model component, mlx-sd and diffusers (torch) side by side in one run.

    python benchmarks/components.py                              # SD1.5 at 512x512 on the CPU, 5 interleaved repeats
    python benchmarks/components.py --family sd1,sd2 --sizes 256,512,768,1024 --repeats 3
    python benchmarks/components.py --parts unet --sizes 512 --repeats 9 --out result.json
    python benchmarks/components.py --device gpu --family sd1,sdxl --repeats 20   # against torch CUDA (Mac: MPS)

Random-weight models of the published sizes (convert/families.py). The torch side builds each model and writes its
weights; the mlx side converts them with mlx_sd_convert (as the parity tests do) and saves component folders in
float32 and float16, which the load-time probe then reads in fresh processes. Each side runs in its own worker
process (benchmarks/_worker.py) and the two are asked in turn (A, B, B, A, ...), so that load from other programs
falls on both alike: report medians and the ratio, not single timings, and the range of each round's own ratio.
The machine's sgemm rate is measured in the same rounds, and the UNet's achieved FLOP rate (FLOPs counted by torch's
FlopCounterMode) is set against it.

SDXL side by side holds one side's model in memory at a time (`--one-at-a-time`, the default for SDXL): each turn
loads the side's saved copy, runs an untimed step and the timed one, and drops it; two float32 SDXL UNets and their
activations exceed 24 GB. Repeats of a UNet step are the steps of one request: the mlx side keeps the text's keys and
values (layers.TextContext), as its pipeline does; torch's FLOP count still includes them.

Parts: unet (one guided step: batch 2 at each size), vae (decode and encode, batch 1), text (each text tower: batch 2,
77 tokens),
load (fresh process -> component loaded and evaluated, fp16 and fp32 folders). Writes a JSON record of every figure.

SD3 (`--family sd3`: SD3 medium; `sd3.5-medium`, `sd3.5-large`: their MMDiTs, with SD3's text encoders and VAE):
"unet" times the MMDiT ("transformer") on SD3's guided batch, 2 x (77 CLIP + 256 T5 tokens); "text" CLIP-L, bigG and
T5-XXL (batch 2, 256 tokens); "vae" the 16-channel VAE. Side by side one model at a time on the CPU, as SDXL. A model
whose setup needs more memory than the machine has (T5-XXL, 4.8B parameters, and SD3.5 large's 8.1B MMDiT on a 24 GB
machine: torch builds each in float32 and the mlx side converts it) is skipped with a note, and recorded as skipped.

`--device gpu` runs MLX on its GPU (CUDA on Linux, Metal on a Mac) and torch on CUDA (MPS on a Mac), UNet and text
towers in float16 (`--dtype`), the VAE in float32 on both sides; the product rate is then float16's at 8192^3, and
each side's device peak is reported (MLX's allocator; torch.cuda.max_memory_allocated, none on MPS). Both models fit
in a GPU's memory, so SDXL runs side by side without `--one-at-a-time` there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _worker import FAMILY_NAMES, SD3_RELEASES, denoiser, run_dtype, text_encoders

HERE = Path(__file__).resolve().parent
# what is timed -> the model it runs
COMPONENTS = {
    "unet": "unet",
    "transformer": "transformer",
    "vae_decode": "vae",
    "vae_encode": "vae",
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
}
PARTS = ("text", "unet", "vae")
# Families whose float32 models are run one side at a time on the CPU (see --one-at-a-time): SDXL's UNet is 10.3 GB,
# SD3 medium's MMDiT 8.1 GB, and the mlx side's conversion holds a second copy while it runs.
ONE_AT_A_TIME = {"sdxl", *SD3_RELEASES}


def part_components(part: str, family: str) -> list[str]:
    """What a part times for a family: "text" is each of the family's text encoders (SDXL: CLIP-L and OpenCLIP-G;
    SD3: those and T5-XXL), "unet" its denoiser (SD3: the MMDiT, "transformer")."""
    if part == "text":
        return text_encoders(family)
    if part == "unet":
        return [denoiser(family)]
    return ["vae_decode", "vae_encode"]


def too_large(workers: dict, model: str, family: str, torch_holds: str | None, memory_gb: float) -> str | None:
    """Why `model` cannot be set up on this machine, or None. Setting it up takes, roughly: torch builds it in float32
    and writes it, the mlx side converts that file (numpy's float32 copy and MLX's, tensor by tensor; counted as two
    whole copies) while torch still holds its own, in `torch_holds` (its run dtype), unless the sides take turns;
    mlx-only: one float32 copy."""
    parameters = workers["mlx"]("parameters", component=model, family=family)["parameters"]
    if "torch" not in workers:
        need = 4 * parameters / 1e9
    else:
        need = (2 * 4 + (np.dtype(torch_holds).itemsize if torch_holds else 0)) * parameters / 1e9
    if need <= memory_gb:
        return None
    how = "the mlx side converts that file" + ("" if torch_holds is None else " while torch holds its copy")
    return (
        f"{parameters / 1e9:.1f}B parameters need ~{need:.0f} GB to set up (torch builds them in float32 and writes "
        f"them, {how}); this machine has {memory_gb} GB: run it where there is more (a GPU host: --device gpu)"
    )


class Worker:
    """A benchmark side in its own process, spoken to in JSON lines."""

    def __init__(self, side: str, device: str = "cpu", dtype: str = "float32"):
        self.side = side
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if side == "torch":
            # The torch side imports mlx_sd_convert (for the configs), which imports mlx_sd. Its BLAS preload
            # would capture torch's own BLAS calls (torch's CPU attention runs ~10x slower then), and its malloc
            # tuning is ours to measure, not torch's: keep both out of the reference process.
            env.update({"MLX_SD_BLAS": "mlx", "MLX_SD_MALLOC": "0"})
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_worker.py"), side, device, dtype],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def __call__(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker died during {op} {kw} (out of memory?)")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"{self.side} worker: {op} {kw}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def interleaved(workers: dict[str, Worker], repeats: int, op: str, **kw) -> dict[str, list[dict]]:
    """`repeats` rounds of `op` on every worker, the order reversed every other round (A B, B A, ...)."""
    results = {name: [] for name in workers}
    names = list(workers)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(workers[name](op, **kw))
    return results


class KernelSide:
    """Adapts a worker to `interleaved`: one named kernel of one side (benchmarks/attention.py, convolutions.py)."""

    def __init__(self, worker: Worker, kernel: str):
        self.worker, self.kernel = worker, kernel

    def __call__(self, op: str, **kw) -> dict:
        return self.worker(op, **kw, kernel=self.kernel)


class OneAtATime:
    """Adapts a worker so that only the side being timed holds its model in memory: two float32 SDXL UNets (10.3 GB
    each) and their activations exceed a 24 GB machine. Each turn loads the model from the side's own saved copy,
    runs one untimed step (the fresh heap's page faults), the timed one, and drops the model again; the turns stay
    interleaved, so both sides still share the machine's phases."""

    def __init__(self, worker: Worker, folder: Path, family: str):
        self.worker, self.folder, self.family = worker, folder, family

    def _saved(self, model: str) -> str:
        return str(self.folder / f"{self.worker.side}-{model}")

    def park(self, model: str) -> None:
        self.worker("park", component=model, folder=self._saved(model))

    def __call__(self, op: str, **kw) -> dict:
        if op != "run":
            return self.worker(op, **kw)
        model = COMPONENTS[kw["component"]]
        self.worker("unpark", component=model, folder=self._saved(model), family=self.family)
        self.worker("run", **{**kw, "save": None})
        reply = self.worker("run", **kw)
        self.park(model)
        return reply


def set_up(workers, parked, family, needed, for_load, workdir, torch_holds, memory_gb) -> dict[str, str]:
    """Build each needed model on every side: torch writes the weights the mlx side converts (mlx-only: the mlx side's
    own random init); with `parked` (one side at a time) each side then parks its copy. Returns model -> why it was
    skipped, for the models too large for this machine."""
    skipped = {}
    for model in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae"):
        if model not in needed:
            continue
        held = torch_holds and run_dtype(model, torch_holds)
        reason = too_large(workers, model, family, held, memory_gb)
        if reason:
            skipped[model] = reason
            print(f"{family} {model}: skipped: {reason}", flush=True)
            continue
        weights, folder = str(workdir / f"{model}.safetensors"), str(workdir / f"{family}-{model}")
        for name in reversed(list(workers)):
            save = for_load and model == denoiser(family)  # component folders for the load-time probe
            workers[name]("setup", component=model, family=family, weights=weights, folder=folder, save=save)
            if parked:
                parked[name].park(model)
        Path(weights).unlink(missing_ok=True)
    return skipped


def median_seconds(sides: dict, repeats: int, op: str, warmup: bool = False, **kw) -> dict[str, float]:
    """Median seconds of `op` per side over interleaved repeats, after one discarded round if `warmup`."""
    runs = interleaved(sides, repeats + warmup, op, **kw)
    return {name: statistics.median(r["seconds"] for r in rows[warmup:]) for name, rows in runs.items()}


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def paired_ratios(ours: list[dict], ref: list[dict]) -> list[float]:
    """mlx / torch seconds per round. The two runs of a round are back to back, so they share the machine's phase:
    on a VM whose speed drifts by tens of percent within minutes, the spread of these ratios says how far the ratio of
    medians can be trusted, which the medians alone hide."""
    return [a["seconds"] / b["seconds"] for a, b in zip(ours, ref, strict=True)]


def bench_component(workers, component, family, latent, repeats, workdir, record, counter=None) -> None:
    """Warm-up with an output comparison, then interleaved timed repeats of one component at one size."""
    kw = {"component": component, "family": family, "latent": latent}
    saved = {name: str(workdir / f"{name}-{component}-{latent}.npy") for name in workers}
    for name, w in workers.items():
        w("run", **kw, save=saved[name])
    err = relative_error(np.load(saved["mlx"]), np.load(saved["torch"])) if "torch" in workers else None
    runs = interleaved(workers, repeats, "run", **kw)
    entry = {"component": component, "family": family, "latent": latent, "pixels": 8 * latent, "rel_err": err}
    for name, rows in runs.items():
        entry[name] = {
            "seconds": [r["seconds"] for r in rows],
            "median_s": median(rows, "seconds"),
            "cpu_s": [r["cpu_s"] for r in rows],
            "median_cpu_s": median(rows, "cpu_s"),
        }
        for key in [k for k in rows[0] if k.endswith("_mb")]:  # peak RSS, MLX's allocator, torch's CUDA allocator
            entry[name][key] = max(r[key] for r in rows)
    if "torch" in workers:
        entry["ratio_mlx_over_torch"] = entry["mlx"]["median_s"] / entry["torch"]["median_s"]
        entry["pair_ratios"] = paired_ratios(runs["mlx"], runs["torch"])
        entry["cpu_ratio_mlx_over_torch"] = entry["mlx"]["median_cpu_s"] / entry["torch"]["median_cpu_s"]
    if counter is not None:
        entry["flops"] = counter("flops", component=component, family=family, latent=latent)["flops"]
        for name in workers:
            entry[name]["gflops"] = entry["flops"] / entry[name]["median_s"] / 1e9
    record["results"].append(entry)
    _print_entry(entry)


def _print_entry(e: dict) -> None:
    line = f"{e['family']:5s} {e['component']:13s} {e['pixels']:5d}px  mlx {e['mlx']['median_s']:7.2f} s"
    if "torch" in e:
        line += f"  torch {e['torch']['median_s']:7.2f} s  ratio {e['ratio_mlx_over_torch']:.2f}"
        pairs = e["pair_ratios"]
        line += f" (rounds {min(pairs):.2f}-{max(pairs):.2f}; CPU time {e['cpu_ratio_mlx_over_torch']:.2f})"
        line += f"  rel err {e['rel_err']:.1e}"
    if "gflops" in e["mlx"]:
        line += f"  mlx {e['mlx']['gflops']:6.1f} GFLOP/s"
    line += f"  peak RSS {e['mlx']['peak_rss_mb'] / 1024:.1f} GB (MLX peak {e['mlx']['mlx_peak_mb'] / 1024:.1f} GB"
    if "cuda_peak_mb" in e.get("torch", {}):
        line += f", torch CUDA peak {e['torch']['cuda_peak_mb'] / 1024:.1f} GB"
    print(line + ")", flush=True)


_LOAD_PROBE = r"""
import sys, time, json
start = float(sys.argv[3])
t0 = time.time()
import mlx_sd, mlx.core as mx
from mlx_sd.components import load_component
t1 = time.time()
model = load_component(sys.argv[1], dtype={"fp32": mx.float32, "fp16": mx.float16}[sys.argv[2]])
mx.eval(model.parameters())
t2 = time.time()
print(json.dumps({"process_to_ready_s": t2 - start, "imports_s": t1 - t0, "load_s": t2 - t1}))
"""
# (stored folder, dtype the model runs in): fp16 -> fp16 is a GPU load, fp16 -> fp32 a CPU one.
LOAD_CASES = (("fp16", "fp16"), ("fp16", "fp32"), ("fp32", "fp32"))


def bench_load(folder: Path, repeats: int, record: dict) -> None:
    """Fresh process -> component loaded and evaluated, per (stored dtype, run dtype); interleaved repeats."""
    results = {case: [] for case in LOAD_CASES}
    for r in range(repeats):
        for stored, run in LOAD_CASES if r % 2 == 0 else LOAD_CASES[::-1]:
            start = time.time()
            out = subprocess.run(
                [sys.executable, "-c", _LOAD_PROBE, f"{folder}-{stored}", run, repr(start)],
                capture_output=True,
                text=True,
                check=True,
            )
            results[stored, run].append(json.loads(out.stdout))
    for (stored, run), rows in results.items():
        entry = {"component": "load", "folder": folder.name, "stored": stored, "dtype": run, "runs": rows}
        for key in ("process_to_ready_s", "imports_s", "load_s"):
            entry[key] = median(rows, key)
        record["results"].append(entry)
        print(
            f"load {folder.name} {stored} folder -> {run} model: process start -> ready "
            f"{entry['process_to_ready_s']:.2f} s (imports {entry['imports_s']:.2f} s, load {entry['load_s']:.2f} s)",
            flush=True,
        )


def scaling(record: dict) -> None:
    """Step-time growth exponent between the smallest and largest denoiser (UNet, MMDiT) sizes: t ~ pixels^k."""
    steps = [e for e in record["results"] if e["component"] in ("unet", "transformer") and "mlx" in e]
    for family in sorted({e["family"] for e in steps}):
        rows = sorted((e for e in steps if e["family"] == family), key=lambda e: e["pixels"])
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        for side in ("mlx", "torch"):
            if side in lo:
                k = np.log(hi[side]["median_s"] / lo[side]["median_s"]) / np.log((hi["pixels"] / lo["pixels"]) ** 2)
                record.setdefault("scaling", []).append(
                    {"family": family, "side": side, "from_px": lo["pixels"], "to_px": hi["pixels"], "exponent": k}
                )
                print(f"{family} {side}: step time grows as pixels^{k:.2f} from {lo['pixels']} to {hi['pixels']}")


def summarise(record: dict, sgemm: dict[str, list[float]]) -> None:
    """The product rate per side (median over the run so far) and each UNet's share of it."""
    record["sgemm_gflops"] = {name: statistics.median(v) for name, v in sgemm.items() if v}
    for e in record["results"]:
        if "gflops" in e.get("mlx", {}) and "mlx" in record["sgemm_gflops"]:
            e["mlx"]["fraction_of_sgemm"] = e["mlx"]["gflops"] / record["sgemm_gflops"]["mlx"]


def write(record: dict, out: Path) -> None:
    """Replace the result file whole; written after every measurement, so a run stopped early keeps what it has."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(out)


def _have_torch() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers"))


def machine(device: str) -> dict:
    # isort: off
    from mlx_sd import backend  # before mlx.core: BLAS preload
    import mlx.core as mx

    # isort: on

    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(), **backend.describe()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cores"] = os.cpu_count()
    info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    try:
        import diffusers
        import torch

        info.update(torch=torch.__version__, diffusers=diffusers.__version__)
        if device == "gpu":
            info["torch_gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "mps"
    except ImportError:
        pass
    if device == "gpu" and mx.is_available(mx.gpu):
        info["mlx_gpu"] = mx.device_info(mx.gpu)
    info["mlx"] = mx.__version__
    info["numpy"] = np.__version__
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="sd1", help=f"comma-separated: {', '.join(FAMILY_NAMES)}")
    p.add_argument("--sizes", default="512", help="comma-separated image sizes in pixels (denoiser); VAE at the first")
    p.add_argument("--parts", default="text,unet,vae,load", help="comma-separated: text, unet, vae, load")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mlx-only", action="store_true", help="time mlx-sd alone (torch still counts FLOPs when present)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="gpu: MLX's GPU against torch CUDA or MPS")
    p.add_argument("--dtype", choices=("float32", "float16"), help="UNet and text encoder (default: float16 on gpu)")
    p.add_argument(
        "--one-at-a-time",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hold one side's model in memory at a time, loading it for each turn (default: SDXL side by side on cpu)",
    )
    p.add_argument("--out", default=None, help="JSON result file (default benchmarks/results/<date>-<host>.json)")
    args = p.parse_args()
    families, parts = args.family.split(","), args.parts.split(",")
    unknown = sorted(set(families) - set(FAMILY_NAMES))
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(FAMILY_NAMES)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    args.dtype = args.dtype or {"cpu": "float32", "gpu": "float16"}[args.device]

    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(args.device)}
    record["args"] = vars(args)
    record["results"] = []
    out = Path(args.out or HERE / "results" / f"{record['date'][:10]}-{platform.node()}-components.json")
    print(json.dumps(record["machine"]), flush=True)
    names = ["mlx"] + ([] if args.mlx_only else ["torch"])
    workers = {name: Worker(name, args.device, args.dtype) for name in names}
    # FLOPs are counted by torch on meta-device models (no memory); in --mlx-only runs by a worker that times nothing.
    counter = workers.get("torch") or (Worker("torch") if _have_torch() else None)
    sgemm = {name: [] for name in workers}
    try:
        with tempfile.TemporaryDirectory(prefix="mlx-sd-bench-") as tmp:
            workdir = Path(tmp)
            for family in families:
                default = family in ONE_AT_A_TIME and args.device == "cpu"  # a GPU holds both models
                wanted = default if args.one_at_a_time is None else args.one_at_a_time
                swap = wanted and "torch" in workers  # only side by side holds two models
                sides = {n: OneAtATime(w, workdir, family) for n, w in workers.items()} if swap else workers
                needed = {COMPONENTS[c] for part in parts if part in PARTS for c in part_components(part, family)}
                if "load" in parts:
                    needed.add(denoiser(family))
                held = None if swap or args.device == "gpu" else args.dtype  # torch's copy during the mlx setup
                memory = record["machine"]["memory_gb"]
                skipped = set_up(workers, swap and sides, family, needed, "load" in parts, workdir, held, memory)
                for part in [p for p in parts if p in PARTS]:
                    for component in part_components(part, family):
                        reason = skipped.get(COMPONENTS[component])
                        if reason:
                            record["results"].append({"component": component, "family": family, "skipped": reason})
                            continue
                        for size in sizes if component in ("unet", "transformer") else sizes[:1]:
                            for name, rows in interleaved(workers, 1, "sgemm").items():
                                sgemm[name] += [r["gflops"] for r in rows]
                            bench_component(sides, component, family, size // 8, args.repeats, workdir, record, counter)
                            summarise(record, sgemm)
                            write(record, out)
                if "load" in parts and not skipped.get(denoiser(family)):
                    bench_load(workdir / f"{family}-{denoiser(family)}", args.repeats, record)
                    write(record, out)
    finally:
        for w in {*workers.values(), *([counter] if counter else [])}:
            w.close()
    summarise(record, sgemm)
    n = 8192 if args.device == "gpu" else 2048
    print(f"matrix product ({args.dtype}, {n}^3, medians over the run), GFLOP/s: {record['sgemm_gflops']}")
    scaling(record)
    write(record, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
