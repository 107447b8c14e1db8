"""Codec encode with the 16 kept residual quantizers (shared.qwen.kept_codes) against upstream's 32 then a slice,
on the released-size codec architecture (random weights: the same arithmetic as the real one), side by side:

    python benchmarks/codec_quantizers.py --quick
    python benchmarks/codec_quantizers.py --clips 8 --seconds 10 --repeats 5 --json out/quantizers.json

Both variants encode the same padded batch, alternately, in one process with one torch thread (the arithmetic
then runs on the calling thread, so its CPU time, time.thread_time, is the work done; on a shared machine
wall time also counts other people's load). The median of the repeats is compared (the first call of each is a
warm-up and left out), and the codes are checked equal on every call. The quantizer stage is timed on its own
too: the encoder's convolutions and transformer are the same work in both variants.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import base_parser, machine_info, markdown_table, resolve_device, write_json  # noqa: E402
from shared.audio import SAMPLES_PER_FRAME, pad_to_frame  # noqa: E402
from shared.device import select_device, synchronize  # noqa: E402
from shared.qwen import kept_codes  # noqa: E402
from shared.synth import synth_utterance  # noqa: E402
from shared.tiny_codec import build_codec  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--clips", type=int, default=8, help="clips in the batch")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each variant (after one warm-up each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU times count the calling thread only)")
    p.add_argument("--codec-size", choices=("tiny", "full"), default="full")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.seconds, args.repeats = 4, 5.0, 3
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = select_device(resolve_device(args.device)["kind"])
    model = build_codec(args.codec_size).to(device.torch_device)
    clips = [pad_to_frame(synth_utterance(args.seconds, seed=i).astype(np.float32)) for i in range(args.clips)]
    values = torch.from_numpy(np.stack(clips)).to(device.torch_device)
    audio_seconds = values.shape[0] * values.shape[1] / 24_000
    kept = model.encoder_valid_num_quantizers
    # The quantizer is called through encode(), not forward(): time the split quantizer's encode method.
    quantizer = model.encoder.quantizer
    stage: list[tuple[float, float]] = []
    encode = quantizer.encode

    def timed_encode(*a, **k):
        synchronize(device)
        start = (time.perf_counter(), time.thread_time())
        out = encode(*a, **k)
        synchronize(device)
        stage.append((time.perf_counter() - start[0], time.thread_time() - start[1]))
        return out

    quantizer.encode = timed_encode

    def upstream():  # what Qwen3TTSTokenizer.encode does: every quantizer, then the first 16 codebooks
        return model.encoder.encode(input_values=values.unsqueeze(1), return_dict=True).audio_codes[:, :kept]

    def ours():
        return kept_codes(model, values)

    variants = {"32 quantizers, sliced (upstream)": upstream, "16 quantizers (kept_codes)": ours}
    # name -> list of (wall s, cpu s) of the whole call and of the quantizer stage
    whole: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    quant: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    reference = None
    print(f"{args.codec_size} codec on {device.describe()}, {args.threads} thread(s); batch {args.clips} x "
          f"{args.seconds:g} s ({values.shape[1] // SAMPLES_PER_FRAME} frames), {args.repeats} timed calls each",
          flush=True)
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            for name, run in variants.items():  # alternated, so background load hits both alike
                stage.clear()
                synchronize(device)
                start = (time.perf_counter(), time.thread_time())
                codes = run()
                synchronize(device)
                elapsed = (time.perf_counter() - start[0], time.thread_time() - start[1])
                reference = codes if reference is None else reference
                if not torch.equal(codes, reference):
                    raise SystemExit(f"{name}: codes differ from the upstream variant's")
                if repeat:  # the first round is the warm-up
                    whole[name].append(elapsed)
                    quant[name].append(tuple(map(sum, zip(*stage))))

    def median(samples, i):
        return statistics.median(sample[i] for sample in samples)

    rows = []
    for name in variants:
        rows.append([name, f"{median(whole[name], 1):.3f}", f"{median(quant[name], 1):.3f}",
                     f"{median(whole[name], 0):.3f}", f"{median(quant[name], 0):.3f}",
                     f"{audio_seconds / median(whole[name], 1):.1f}"])
    print(markdown_table(["variant", "encode CPU s", "quantizer CPU s", "encode wall s", "quantizer wall s",
                          "audio-s per CPU-s"], rows))
    up, ours_ = variants
    ratios = {f"{what} {clock}": median(samples[up], i) / median(samples[ours_], i)
              for what, samples in (("encode", whole), ("quantizer", quant)) for i, clock in enumerate(("wall", "CPU"))}
    share = median(quant[up], 1) / median(whole[up], 1)
    print(f"speed-up, 16 vs 32 quantizers (medians, upstream / ours): whole encode x{ratios['encode CPU']:.3f} CPU "
          f"(x{ratios['encode wall']:.3f} wall); quantizer stage x{ratios['quantizer CPU']:.2f} CPU "
          f"(x{ratios['quantizer wall']:.2f} wall). The quantizers were {share:.1%} of the upstream encode's CPU time. "
          f"Codes identical on all {args.repeats + 1} calls of each.")
    write_json(args.json, {"machine": machine_info(resolve_device(device.kind)),
                           "args": {k: str(v) for k, v in vars(args).items()}, "audio_seconds": audio_seconds,
                           "wall_cpu_seconds": {"encode": whole, "quantizer": quant}, "speedups": ratios,
                           "quantizer_share_cpu": share})

if __name__ == "__main__":
    main()
