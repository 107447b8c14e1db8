"""Packed attention: the dense-mask sdpa path against the varlen paths at the shipped pack_length, side by side.

    python benchmarks/packed_attention.py --json out/packed_attention.json    # 1.7B shapes, pack_length 4096
    python benchmarks/packed_attention.py --dry                               # tiny shapes, seconds (tests)

Rows of pack_length positions filled with utterances of a realistic length mix (1-20 s at 12.5 frames/s plus
5-60 text tokens), the last one's tail padding. Per implementation:
  attention only: transformers' own attention functions on q/k/v of the 1.7B talker's shapes (16 heads, 8 KV
    heads, head_dim 128): "sdpa-dense" gets the (B, 1, L, L) block-diagonal mask transformers builds from packed
    position ids; "flex" the tile-level block mask of training.model.document_mask; "flash" (CUDA, flash-attn
    installed) flash-attn's varlen kernel on the block boundaries;
  whole step: TalkerForTraining on a model of the 1.7B's widths with --layers talker layers (random weights),
    forward and backward of the talker + code-predictor loss; on the CPU (not --dry) the talker's layer stack
    forward only, since there the code predictor's ~3000 x 16 positions per row dominate and take minutes.
On the CPU, torch 2.9.1's inductor compiles flex attention's forward but not its backward (and flex without
compile is an unfused reference that materializes every score), so flex is timed forward-only there and the
backward columns stay empty. Seconds are medians of --repeats after --warmup calls.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/X.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import base_parser, machine_info, markdown_table, ratio, resolve_device, write_json  # noqa: E402
from shared.device import flash_attn_installed  # noqa: E402
from training.model.document_mask import computed_fraction, document_ids, packed_causal_block_mask  # noqa: E402

SHAPES = {"1.7b": dict(heads=16, kv_heads=8, head_dim=128), "dry": dict(heads=4, kv_heads=2, head_dim=64)}


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--dry", action="store_true", help="tiny shapes and the tiny model: a check that it runs")
    p.add_argument("--pack-length", type=int, default=4096, help="data.pack_length (the shipped value)")
    p.add_argument("--rows", type=int, default=1, help="packed rows per batch")
    p.add_argument("--layers", type=int, default=1, help="talker layers of the whole-step model (28 = 1.7B)")
    p.add_argument("--dtype", default="", help="bfloat16 or float32 (default: bfloat16 on an accelerator)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-step", action="store_true", help="attention only")
    args = p.parse_args(argv)
    if args.dry:
        args.pack_length, args.layers, args.repeats, args.warmup = 512, 1, 1, 1
    return args


def row_blocks(pack_length: int, rows: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """(text tokens, frames) of the utterances of each row; a row's leftover is its padding tail."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        row, used = [], 0
        while True:
            frames = int(np.clip(rng.lognormal(np.log(5.0), 0.6), 1.0, 20.0) * 12.5)
            text = int(rng.integers(5, 60))
            positions = frames + text + 11  # role, prefix, speaker, bos/eos slots (training.model.layout)
            if used + positions > pack_length:
                break
            row.append((text, frames))
            used += positions
        out.append(row)
    return out


def timed(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def attention_functions(device: str, cu_seq_lens: torch.Tensor, rows: int, length: int, groups: int) -> dict:
    """name -> (attention(q, k, v) -> out, computed share of the tile pairs)."""
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def module(training: bool):
        return SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=training)

    docs = document_ids(cu_seq_lens.to(device), rows, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    dense = (causal & (docs[:, :, None] == docs[:, None, :])).unsqueeze(1)
    block_mask = packed_causal_block_mask(cu_seq_lens, rows, length, device)
    out = {
        "sdpa-dense": (lambda q, k, v, train: sdpa_attention_forward(module(train), q, k, v, dense)[0], 1.0),
        "flex": (lambda q, k, v, train: flex_attention_forward(module(train), q, k, v, block_mask)[0],
                 computed_fraction(block_mask)),
    }
    if device == "cuda" and flash_attn_installed():
        from flash_attn import flash_attn_varlen_func
        cu, longest = cu_seq_lens.to(device), int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())

        def flash(q, k, v, train):
            flat = [t.transpose(1, 2).reshape(rows * length, t.shape[1], t.shape[3]) for t in (q, k, v)]
            return flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=True)
        out["flash"] = (flash, None)
    return out


def backward_runs(name: str, device: str) -> bool:
    return device != "cpu" or name != "flex"


def attention_only(args, device: str, dtype: torch.dtype, cu: torch.Tensor) -> dict:
    shape = SHAPES["dry" if args.dry else "1.7b"]
    torch.manual_seed(0)
    q = torch.randn(args.rows, shape["heads"], args.pack_length, shape["head_dim"], device=device, dtype=dtype)
    k, v = (torch.randn(args.rows, shape["kv_heads"], args.pack_length, shape["head_dim"], device=device,
                        dtype=dtype) for _ in range(2))
    results = {}
    for name, (attend, share) in attention_functions(device, cu, args.rows, args.pack_length,
                                                       shape["heads"] // shape["kv_heads"]).items():
        def forward():
            with torch.no_grad():
                attend(q, k, v, False)

        def forward_backward():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            attend(*leaves, True).float().sum().backward()
        results[name] = {"computed_tile_share": share,
                         "forward_s": timed(forward, device, args.warmup, args.repeats),
                         "forward_backward_s": timed(forward_backward, device, args.warmup, args.repeats)
                         if backward_runs(name, device) else None}
        print("attention", name, results[name], flush=True)
    return results


def whole_step(args, device: str, dtype: torch.dtype, rows: list) -> dict:
    from benchmarks.model_1p7b import config_1p7b
    from shared.qwen import Qwen3TTSForConditionalGeneration, set_talker_attention
    from shared.tiny_model import tiny_config
    from training.model.layout import SpecialIds, build_sample, collate
    from training.model.talker import TalkerForTraining

    config = tiny_config() if args.dry else config_1p7b(args.layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3TTSForConditionalGeneration(config).to(device, dtype)
    ids = SpecialIds.from_config(model.config)
    rng = np.random.default_rng(0)
    samples = [[build_sample([151644, 358, 198], list(rng.integers(300, 400, size=n)),
                             rng.integers(0, 2048, size=(t, 16)), ids) for n, t in row] for row in rows]
    speakers = torch.randn(sum(map(len, samples)), model.config.talker_config.hidden_size, dtype=dtype)
    batch = collate(samples, speakers, ids.tts_pad)
    batch = batch.to(device)  # rows right-padded to the longest, as training collates them
    trainer = TalkerForTraining(model.talker)
    # On the CPU the whole step is dominated by the code predictor (16 positions per frame, ~3000 frames per row),
    # which no attention choice touches: time the talker's layer stack there, forward only.
    talker_only = device == "cpu" and not args.dry
    results = {}
    names = ["sdpa"] + ["flex_attention"] + (["flash_attention_2"] if device == "cuda" and flash_attn_installed()
                                             else [])
    for name in names:
        set_talker_attention(model, name)
        label = {"sdpa": "sdpa-dense", "flex_attention": "flex", "flash_attention_2": "flash"}[name]

        def forward():
            with torch.no_grad():
                trainer.eval().hidden_states(batch) if talker_only else trainer.eval()(batch)

        def step():
            trainer.zero_grad(set_to_none=True)
            out = trainer.train()(batch)
            (out.talker_loss_sum + out.sub_loss_sum).backward()
        results[label] = {"forward_s": timed(forward, device, args.warmup, args.repeats),
                          "forward_scope": "talker layers" if talker_only else "talker + code predictor + losses",
                          "step_s": timed(step, device, args.warmup, args.repeats)
                          if backward_runs(label, device) and not talker_only else None,
                          "positions": int(batch.text_ids.numel()), "frames": batch.shape.frames}
        print("step", label, results[label], flush=True)
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    device_info = resolve_device(args.device)
    device = device_info["kind"]
    if device == "npu":
        raise SystemExit("packed_attention.py: flex_attention has no NPU kernel; the NPU's varlen path is "
                         "flash_attention_2 (npu_fusion_attention). Fix: --device cuda or --device cpu")
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    if args.dry and device == "cpu":
        # The tiny model's head_dim 16 makes torch 2.9.1's compiled CPU flex kernel corrupt the heap with more than
        # one thread (head_dim 64 and 128 run); dry timings mean nothing anyway.
        torch.set_num_threads(1)
    rows = row_blocks(args.pack_length, args.rows)
    lengths = [[t + f + 11 for t, f in row] for row in rows]
    blocks = [n for row in lengths for n in row + ([args.pack_length - sum(row)] if sum(row) < args.pack_length
                                                  else [])]
    cu = torch.tensor([0, *np.cumsum(blocks)], dtype=torch.int32)
    result = {"machine": machine_info(device_info), "args": {k: str(v) for k, v in vars(args).items()},
              "utterances_per_row": [len(r) for r in rows], "dtype": str(dtype),
              "attention": attention_only(args, device, dtype, cu)}
    if not args.skip_step:
        result["step"] = whole_step(args, device, dtype, rows)
    print(report(result))
    write_json(args.json, result)
    return result


def report(result: dict) -> str:
    att, step = result["attention"], result.get("step", {})
    lines = [markdown_table(["attention only", "tiles computed", "forward s", "fwd+bwd s"],
                            [[n, r["computed_tile_share"], r["forward_s"], r["forward_backward_s"]]
                             for n, r in att.items()])]
    if step:
        lines.append(markdown_table(["whole step", "forward s", "fwd+bwd s"],
                                    [[n, r["forward_s"], r["step_s"]] for n, r in step.items()]))
    for name in [n for n in att if n != "sdpa-dense"]:
        lines.append(f"sdpa-dense/{name} attention forward: "
                     f"{ratio(att['sdpa-dense']['forward_s'], att[name]['forward_s']) or 0:.2f}x; "
                     f"whole forward: {ratio(step.get('sdpa-dense', {}).get('forward_s'), step.get(name, {}).get('forward_s')) or 0:.2f}x")
    return "\n\n".join(lines)


if __name__ == "__main__":
    main()
