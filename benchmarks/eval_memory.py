"""Memory of an eval's samples at the 1.7B shape, rank 0 beside rank 1: the old weight path ("before": the full
model state gathered in fp32 to rank 0's host, loaded into an inference model kept on rank 0's device) beside
this checkout's ("after": training.eval.inference_copy, parameter by parameter into a host copy in the compute
dtype, on the device only while it generates), in one run.

    python benchmarks/eval_memory.py --layers 1,3 --json eval_memory.json
    python benchmarks/eval_memory.py --quick      # 1 layer only (no extrapolation)

Each flow is a real 2-rank torchrun (gloo, CPU) that loads the 1.7B-shaped model (true widths, `--layers` talker
layers; benchmarks/model_1p7b.py) as training does, shards it with FSDP2 (compute dtype bf16), then runs the
eval's weight path and a short generation (`--frames` codec frames). The anonymous RSS of each rank (RssAnon:
tensors and heap) is sampled every 2 ms: peak extra = the highest during the eval less the value just before
it; kept = the value after the eval less that baseline. Figures at 28 layers are extrapolated linearly from
two layer counts.

On CPU the "device" is the host, so device memory cannot be measured here (no GPU was available): the table
gives, instead, the bytes of the inference model that the flow keeps on the training device between evals,
counted from its tensors (before: the whole bf16 model stays there; after: none).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

from benchmarks import inputs  # noqa: E402
from benchmarks.common import (base_parser, child_env, gib, markdown_table, python,  # noqa: E402
                               run_measured, write_json)

FLOWS = ("before", "after")
RESULT = "EVAL_MEMORY "


def anonymous_rss() -> int:
    """Anonymous resident memory (RssAnon): tensors and heap. File-backed pages (libraries, page cache) are left
    out: the kernel drops and refaults them as other processes on the machine need memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class RssPeak(threading.Thread):
    """The highest RSS of this process while running, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, anonymous_rss(), threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, anonymous_rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, anonymous_rss())


def _settled_rss() -> int:
    """RSS once freed heap memory is handed back: the model load frees gigabytes that glibc may keep, and an
    allocation reusing them would not show in RSS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return anonymous_rss()


def _tensor_bytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def _inference_modules(tts) -> list:
    codec = tts.model.speech_tokenizer
    return [tts.model] + ([codec.model] if codec is not None else [])


def worker(flow: str, model_dir: str, frames: int) -> None:
    """One rank of a flow (under torchrun): train-shaped FSDP2 module, then the eval's weight path and samples."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from shared.qwen import load_inference_model, load_tts_model
    from training.config import FsdpConfig
    from training.eval.inference_copy import InferenceCopy
    from training.model.talker import TalkerForTraining
    from training.model.parallelize import parallelize

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = load_tts_model(model_dir, "cpu", torch.float32, "sdpa")  # as training loads it
    module = TalkerForTraining(model.talker)
    del model
    parallelize(module, FsdpConfig(param_dtype="bfloat16"), init_device_mesh("cpu", (dist.get_world_size(),)))
    dist.barrier()
    baseline = _settled_rss()
    sampler = RssPeak()
    sampler.start()
    device = torch.device("cpu")
    if flow == "before":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        tts = None
        if rank == 0:
            tts = load_inference_model(model_dir, device, torch.bfloat16, "sdpa")  # kept on the device
            tts.model.load_state_dict(state, strict=False)
        del state
        resident_on_device = _tensor_bytes(_inference_modules(tts)) if tts is not None else 0
        if tts is not None:
            _generate(tts, frames)
    else:
        copy = InferenceCopy(model_dir, device, torch.bfloat16, "sdpa")
        tts = copy.refresh(module)
        if tts is not None:
            with copy.on_device():
                _generate(tts, frames)
        # Every tensor of the copy is back on the host: nothing of it stays on the training device.
        resident_on_device = sum(_tensor_bytes([m]) for m in (_inference_modules(tts) if tts else [])
                                 if next(m.parameters()).device.type != "cpu")
    dist.barrier()
    peak = sampler.stop()
    after = _settled_rss()
    print(RESULT + json.dumps(dict(flow=flow, rank=rank, baseline=baseline, peak_extra=peak - baseline,
                                   resident=after - baseline, device_resident=resident_on_device,
                                   copy_bytes=_tensor_bytes(_inference_modules(tts)) if tts is not None else 0)),
          flush=True)
    dist.destroy_process_group()


def _generate(tts, frames: int) -> None:
    import torch

    torch.manual_seed(0)
    xvector = torch.randn(tts.model.config.speaker_encoder_config.enc_dim)
    prompt = dict(ref_code=[None], ref_spk_embedding=[xvector], x_vector_only_mode=[True], icl_mode=[False])
    tts.generate_voice_clone(text="hello world", language="Auto", voice_clone_prompt=prompt,
                             non_streaming_mode=True, max_new_tokens=frames)


def run_flow(flow: str, model_dir: Path, frames: int, timeout: float) -> dict[int, dict]:
    port = str(29600 + os.getpid() % 300)
    command = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(Path(__file__).resolve()), "--worker", flow, "--model", str(model_dir), "--frames", str(frames)]
    run = run_measured(command, env=child_env(1), timeout=timeout)
    ranks = {}
    for line in run.stdout.splitlines():
        if line.startswith(RESULT):
            record = json.loads(line[len(RESULT):])
            ranks[record["rank"]] = record
    if sorted(ranks) != [0, 1]:
        raise RuntimeError(f"{flow} at {model_dir.name} gave no result:\n{run.tail()}")
    return ranks


def extrapolate(by_layers: dict[int, float], target: int = 28) -> float | None:
    if len(by_layers) < 2:
        return None
    (l1, v1), (l2, v2) = sorted(by_layers.items())[:2]
    return v1 + (v2 - v1) / (l2 - l1) * (target - l1)


def main(argv=None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--layers", default="1,3", help="talker layer counts measured (two give the 28-layer figure)")
    p.add_argument("--frames", type=int, default=4, help="codec frames generated per flow")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--worker", choices=FLOWS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.frames)
    layer_counts = [1] if args.quick else [int(n) for n in args.layers.split(",")]
    results = {}
    for layers in layer_counts:
        model_dir = inputs.model_1p7b(args.work_dir, layers)
        for flow in FLOWS:
            print(f"[{flow}, {layers} talker layers]", flush=True)
            results[(flow, layers)] = run_flow(flow, model_dir, args.frames, args.timeout)
    keys = [("peak_extra", "peak extra host memory"), ("resident", "host memory kept after the eval"),
            ("device_resident", "kept on the device between evals (counted)")]
    rows = []
    for layers in layer_counts:
        for key, label in keys:
            rows.append([f"{layers} layers", label] + [gib(results[(f, layers)][r][key]) for f in FLOWS for r in (0, 1)])
    if len(layer_counts) >= 2:
        for key, label in keys:
            rows.append(["28 layers (extrapolated)", label] +
                        [gib(extrapolate({n: results[(f, n)][r][key] for n in layer_counts})) for f in FLOWS
                         for r in (0, 1)])
    print(markdown_table(["shape", "GiB", "before rank 0", "before rank 1", "after rank 0", "after rank 1"], rows))
    copies = {n: results[("after", n)][0]["copy_bytes"] for n in layer_counts}
    print(f"inference copy (bf16 talker + speaker encoder + codec): "
          + ", ".join(f"{gib(b):.2f} GiB at {n} layers" for n, b in copies.items())
          + (f", {gib(extrapolate(copies)):.2f} GiB at 28 (extrapolated)" if len(copies) >= 2 else ""))
    write_json(args.json, {f"{flow}-{layers}": ranks for (flow, layers), ranks in results.items()})


if __name__ == "__main__":
    main()
