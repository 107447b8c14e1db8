"""The two in-process encode flows encode_bench.py measures, each run as its own child process:

    python -m benchmarks.encode_flows reference ...   (a) upstream: batches of N paths through
                                                       Qwen3TTSTokenizer.encode, JSONL written at the end
    python -m benchmarks.encode_flows ceiling ...     (c) the raw codec on pre-decoded 24 kHz clips in
                                                       length-sorted, duration-budget batches; no I/O timed

Each prints progress lines and one BENCH_RESULT JSON line (benchmarks.common.emit_result). The timed phase
starts after the codec is loaded and has encoded one short clip (first-call costs: CUDA context and kernel
loading, allocator growth, librosa's first resample), as the encode job's encoders load and warm up before
its "throughput this run" clock starts.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from benchmarks.common import emit_result


def _setup(args):
    import torch

    from shared.device import select_device
    from shared.qwen import load_codec

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    started = time.perf_counter()
    codec = load_codec(args.codec, device.torch_device)
    return device, codec, time.perf_counter() - started


def _entries(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def _device_peak(device) -> int | None:
    from shared.device import peak_memory_bytes

    return None if device.kind == "cpu" else peak_memory_bytes(device)


class _Clock:
    """Wall and CPU (user, system) seconds of this process over the timed phase. System time is mostly page
    faults on freshly mapped activations, which is what the batch budget and huge pages change."""

    def __init__(self):
        self.wall, self.usage, self.waited = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), _runqueue_wait()

    def result(self, **fields) -> dict:
        now = resource.getrusage(resource.RUSAGE_SELF)
        return {**fields, "encode_seconds": time.perf_counter() - self.wall,
                "user_seconds": now.ru_utime - self.usage.ru_utime, "system_seconds": now.ru_stime - self.usage.ru_stime,
                "runqueue_wait_seconds": _runqueue_wait() - self.waited}


def _runqueue_wait() -> float:
    """Seconds the main thread (where a 1-thread torch computes) was runnable but waiting for a core: the
    share of wall time other people's processes took (Linux schedstat; 0 where unavailable)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _progress(rows: int, audio_seconds: float, started: float) -> None:
    # The parent keeps the last of these if the flow is stopped (e.g. for memory) before its result line.
    print(f"progress rows={rows} audio_seconds={audio_seconds:.3f} elapsed={time.perf_counter() - started:.3f}",
          flush=True)


def reference(args) -> None:
    """Upstream's data preparation: sequential batches of paths (librosa load + resample inside encode, each
    batch padded to its longest clip), codes collected as lists, one JSONL written at the end."""
    from services.encode.batching import probe_duration
    from shared.qwen import reference_encode

    entries = _entries(args.manifest)
    durations = [probe_duration(e["audio"]) for e in entries]  # headers only, for the audio-seconds count
    device, codec, load_s = _setup(args)
    reference_encode(codec, [entries[0]["audio"]])  # warm-up, untimed
    clock = _Clock()
    rows, audio = 0, 0.0
    for first in range(0, len(entries), args.batch):
        batch = entries[first:first + args.batch]
        for entry, codes in zip(batch, reference_encode(codec, [e["audio"] for e in batch])):
            entry["audio_codes"] = codes.tolist()  # frames x 16, the upstream train_with_codes.jsonl format
        rows += len(batch)
        audio += sum(durations[first:first + args.batch])
        _progress(rows, audio, clock.wall)
    with open(args.output, "w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    emit_result(clock.result(rows=rows, audio_seconds=audio, load_seconds=load_s,
                             device_peak_bytes=_device_peak(device), batch=args.batch))


def ceiling(args) -> None:
    """What the codec alone sustains on this device: every clip decoded and resampled before the clock
    starts, then encode_clips over the encode job's batches (pass the budget the encoder uses on this device)
    sorted by length over the whole corpus, with the encoder's allocator setting."""
    from services.encode.encoder import use_huge_pages_for_host_tensors

    use_huge_pages_for_host_tensors()  # as the encoder does (this flow is our codec path minus the I/O), first
    from services.encode.batching import form_batches
    from shared.audio import SAMPLES_PER_FRAME, AudioLimits, load_audio
    from shared.device import synchronize
    from shared.qwen import encode_clips

    limits = AudioLimits(max_seconds=float("inf"))
    clips = [load_audio(e["audio"], limits) for e in _entries(args.manifest)]
    batches = form_batches([c.duration for c in clips], args.max_batch_seconds, args.max_batch_items)
    device, codec, load_s = _setup(args)
    encode_clips(codec, [clips[0].samples[:4 * SAMPLES_PER_FRAME]])  # warm-up, untimed
    synchronize(device)
    clock = _Clock()
    rows, audio = 0, 0.0
    for batch in batches:
        encode_clips(codec, [clips[i].samples for i in batch])
        rows += len(batch)
        audio += sum(clips[i].duration for i in batch)
        _progress(rows, audio, clock.wall)
    synchronize(device)
    emit_result(clock.result(rows=rows, audio_seconds=audio, load_seconds=load_s,
                             device_peak_bytes=_device_peak(device), batches=len(batches)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("flow", choices=("reference", "ceiling"))
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--codec", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=32, help="reference: paths per Qwen3TTSTokenizer.encode call")
    p.add_argument("--output", type=Path, help="reference: the JSONL to write")
    p.add_argument("--max-batch-seconds", type=float, default=240.0, help="ceiling: padded seconds per call")
    p.add_argument("--max-batch-items", type=int, default=64)
    args = p.parse_args(argv)
    (reference if args.flow == "reference" else ceiling)(args)


if __name__ == "__main__":
    main()
