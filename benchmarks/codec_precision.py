"""Raw codec throughput in audio-seconds per second, fp32 against bf16 and torch.compile, with how many frames
keep the fp32 codes, side by side in one run on one device.

    python benchmarks/codec_precision.py --device cuda --json out/codec_precision.json   # full-size random codec
    python benchmarks/codec_precision.py --dry                                           # tiny codec, CPU, seconds

Clips are the generated corpus (benchmarks/inputs.py), resampled to 24 kHz, encoded with shared.qwen.encode_clips
in batches of --batch clips (the fp32 codec with reduced-precision modes off is what the encode job runs).
Variants: "fp32" (the job's numerics), "bf16" (the codec's weights and inputs in bfloat16), "fp32-compiled"
(the encoder under torch.compile). Agreement: the share of frames whose 16 codes all equal fp32's, and the share
whose first code (the semantic codebook) does. Seconds are medians of --repeats passes after one warm-up pass.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import inputs  # noqa: E402
from benchmarks.common import base_parser, machine_info, markdown_table, resolve_device, write_json  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--dry", action="store_true", help="tiny codec, 4 short clips, CPU: a check that it runs")
    p.add_argument("--codec-size", choices=("tiny", "full"), default="full")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="length of every clip")
    p.add_argument("--batch", type=int, default=16, help="clips per codec call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="fp32,bf16,fp32-compiled")
    args = p.parse_args(argv)
    if args.dry:
        args.codec_size, args.clips, args.seconds, args.batch, args.repeats = "tiny", 4, 1.0, 2, 1
    return args


def clips_24k(args) -> list[np.ndarray]:
    import json

    from shared.audio import load_audio

    manifest, _ = inputs.corpus(args.work_dir, args.clips, args.seconds, args.seconds)
    return [load_audio(json.loads(line)["audio"]).samples for line in manifest.read_text().splitlines()]


def variant_codec(path: Path, name: str, device):
    from shared.device import apply_codec_numerics
    from shared.qwen import load_codec

    apply_codec_numerics(device)
    codec = load_codec(path, device.torch_device, torch.bfloat16 if name == "bf16" else torch.float32)
    if name.endswith("compiled"):
        encoder = codec.model.encoder  # the job calls encoder.encode (shared.qwen.kept_codes), not its forward
        encoder.encode = torch.compile(encoder.encode, dynamic=True)
    return codec


def run_variant(codec, clips: list[np.ndarray], batch: int, repeats: int, device) -> tuple[float, list]:
    from shared.device import synchronize
    from shared.qwen import encode_clips

    def one_pass():
        out = []
        for start in range(0, len(clips), batch):
            out.extend(encode_clips(codec, clips[start:start + batch]))
        synchronize(device)
        return out
    codes = one_pass()  # warm-up (and compilation)
    seconds = []
    for _ in range(repeats):
        begun = time.perf_counter()
        codes = one_pass()
        seconds.append(time.perf_counter() - begun)
    return statistics.median(seconds), codes


def agreement(codes: list, reference: list) -> dict:
    same = sum(int((c == r).all(axis=1).sum()) for c, r in zip(codes, reference))
    first = sum(int((c[:, 0] == r[:, 0]).sum()) for c, r in zip(codes, reference))
    frames = sum(len(r) for r in reference)
    return {"frames_all_16_equal": same / frames, "frames_first_code_equal": first / frames, "frames": frames}


def main(argv=None) -> dict:
    from shared.device import placed_device

    args = parse_args(argv)
    info = resolve_device("cpu" if args.dry else args.device)
    device = placed_device(info["kind"], "codec_precision.py")
    path = inputs.codec(args.work_dir, args.codec_size)
    clips = clips_24k(args)
    audio_seconds = sum(len(c) for c in clips) / 24000
    results, reference = {}, None
    for name in args.variants.split(","):
        seconds, codes = run_variant(variant_codec(path, name, device), clips, args.batch, args.repeats, device)
        reference = reference if reference is not None else codes  # the first variant (fp32) is the reference
        results[name] = {"seconds": seconds, "audio_s_per_s": audio_seconds / seconds, **agreement(codes, reference)}
    result = {"machine": machine_info(info), "args": {k: str(v) for k, v in vars(args).items()},
              "audio_seconds": audio_seconds, "variants": results}
    print(markdown_table(["variant", "audio-s/s", "frames = fp32 (all 16)", "first code = fp32"],
                         [[n, r["audio_s_per_s"], r["frames_all_16_equal"], r["frames_first_code_equal"]]
                          for n, r in results.items()]))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
