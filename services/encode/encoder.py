"""EncoderActor: one per accelerator; loads the codec once and turns a planned shard into a published
Parquet file. Bad input becomes an error row; only a failure of the encoder itself fails the shard."""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.encode.batching import Prefetcher, form_batches, probe_duration
from services.encode.manifest import ENTRY_ERROR, LINE_ERROR, parse_entries
from services.encode.plan import ShardSpec
from shared.shard_writer import ShardWriter
from shared.audio import SAMPLES_PER_FRAME, AudioError, AudioLimits, Clip, load_audio
from shared.device import RAY_RESOURCE, VISIBLE_DEVICES_VAR, apply_codec_numerics, placed_device
from shared.schema import MANIFEST_FILE, WORKERS_DIR, ShardRow, ShardStats
from shared.store import open_store

HEARTBEAT_SECONDS = 2.0
MAX_TEXT_CHARACTERS = 2000  # ~2 minutes of fast speech: more than any clip under the 60 s limit can say
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # tab and newlines are allowed
RATE_WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class EncoderOptions:
    codec: str
    output: str
    max_batch_seconds: float = 240.0  # padded audio seconds per codec call (on an accelerator)
    cpu_max_batch_seconds: float = 10.0  # the cap on CPU (see batch_seconds_for)
    max_batch_items: int = 64
    decode_threads: int = 0  # 0: this node's cores shared among the encoders placed on it
    # The accelerator kind the driver placed the actor on ("npu", "cuda" or "cpu"): the actor uses exactly that
    # device and fails when it is missing, so a card Ray reserved for it never sits idle behind a CPU encoder.
    placement: str = "cpu"
    prefetch_batches: int = 2
    exact_tail: bool = False
    min_seconds: float = 0.1
    max_seconds: float = 60.0
    torch_threads: int = 0  # 0: leave torch's default
    allow_reduced_precision: bool = False  # encode on an Ascend chip whose fp32 reads fp16 inputs (910A, 310P)


def _error_row(index: int, entry: dict, message: str) -> ShardRow:
    return ShardRow.from_entry(index, {k: v for k, v in entry.items() if k not in (LINE_ERROR, ENTRY_ERROR)},
                               error=message)


def check_entry(entry: dict) -> str | None:
    """Reasons a manifest entry cannot be encoded before any audio is read."""
    if LINE_ERROR in entry:
        return f"bad_line: {entry[LINE_ERROR]}"
    if ENTRY_ERROR in entry:
        return str(entry[ENTRY_ERROR])
    audio = entry.get("audio")
    if not isinstance(audio, str) or not audio:
        return "no_audio: the entry has no 'audio' path; add one"
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        return f"empty_text: {audio} has no transcript text; add 'text' to its manifest line"
    if len(text) > MAX_TEXT_CHARACTERS:
        return (f"text_too_long: {audio} has {len(text)} characters of text (at most {MAX_TEXT_CHARACTERS}); "
                "check the transcript belongs to this clip, or split both")
    control = CONTROL_CHARACTERS.search(text)
    if control:
        return (f"bad_text: {audio}'s text holds a control character (U+{ord(control.group()):04X} at "
                f"{control.start()}); remove it from the transcript")
    ref = entry.get("ref_audio")
    if ref is not None and (not isinstance(ref, str) or not os.path.isfile(ref)):
        return f"missing_ref_audio: reference {ref} does not exist; fix 'ref_audio' in the manifest"
    return None


def default_decode_threads(placement: str) -> int:
    """An accelerator encoder needs many cores decoding for it (notes §9): give each encoder its share
    of this node's cores. A CPU encoder needs the cores itself, so it keeps two decode threads."""
    if placement == "cpu":
        return 2
    accelerators = 1
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        accelerators = int(node["Resources"].get(RAY_RESOURCE[placement], 1)) or 1
    except Exception:
        pass  # outside Ray: assume one accelerator on this machine
    return max(2, (os.cpu_count() or 2) // accelerators)


def batch_seconds_for(options: EncoderOptions, device_kind: str) -> float:
    """The padded-seconds budget of one codec call on this device.

    On a CPU, batching buys nothing (one thread per encoder does the same arithmetic either way) while big
    padded activations cost page faults and cache misses: with the released-size codec, 10 s per call encodes
    about twice the audio per CPU-second of 240 s and needs a third of the memory (docs/benchmarks.md,
    benchmarks/codec_budget_sweep.py). Accelerators keep the budget they are given.
    """
    if device_kind == "cpu":
        return min(options.max_batch_seconds, options.cpu_max_batch_seconds)
    return options.max_batch_seconds


def use_huge_pages_for_host_tensors() -> None:
    """Ask torch's CPU allocator for 2 MB pages (THP_MEM_ALLOC_ENABLE, read once, at the process's first
    tensor allocation: call this before anything imports qwen_tts).

    Every codec call maps its activations afresh; faulting them in 4 KB pages was ~40% of a CPU encoder's time,
    and huge pages halve that system time (docs/benchmarks.md). Host-side only; a value set by the user wins.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def warm_page_cache(codec_dir: str | Path) -> threading.Thread:
    """Read the codec's weight files on a thread while the encoder imports torch and qwen-tts (~5 s of a core),
    so that loading the codec afterwards finds them in the page cache. On a cold cache (a node's first job, or
    weights on network storage) the load otherwise reads ~650 MB only after the imports: 0.5 s against 0.1 s on
    this machine's local disk (docs/benchmarks.md §7). The thread only reads; a file it cannot read is left to
    the codec load, which reports it."""
    def read_all() -> None:
        for path in sorted(Path(codec_dir).glob("*.safetensors")):
            try:
                with open(path, "rb", buffering=0) as f:
                    while f.read(1 << 22):
                        pass
            except OSError:
                pass

    thread = threading.Thread(target=read_all, name="codec-page-cache", daemon=True)
    thread.start()
    return thread


def skip_scikit_learn_in_transformers() -> None:
    """Importing qwen_tts pulls in transformers' generation code, which imports scikit-learn (installed with
    librosa) only to tune assisted generation's draft threshold: ~1.3 s of an encoder's ~7 s start on a CPU
    (docs/benchmarks.md §7). The codec never generates, so tell transformers, in this process only, that
    scikit-learn is absent. Call it before anything imports qwen_tts."""
    import transformers.utils.import_utils as import_utils

    if hasattr(import_utils, "_sklearn_available"):
        import_utils._sklearn_available = False


class RateMeter:
    """Rows and audio seconds per second over a sliding window."""

    def __init__(self):
        self.samples: deque[tuple[float, int, float]] = deque()

    def add(self, rows: int, audio_seconds: float, now: float | None = None) -> None:
        self.samples.append((now or time.time(), rows, audio_seconds))

    def rates(self, now: float | None = None) -> tuple[float, float]:
        now = now or time.time()
        while self.samples and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()
        if not self.samples:
            return 0.0, 0.0
        span = max(now - self.samples[0][0], 1.0)
        return sum(s[1] for s in self.samples) / span, sum(s[2] for s in self.samples) / span


class ShardEncoder:
    """The work of one encoder, independent of Ray so it can be driven directly too."""

    def __init__(self, options: EncoderOptions, name: str = "encoder-0"):
        use_huge_pages_for_host_tensors()  # first: importing qwen_tts already allocates tensors
        warm_page_cache(options.codec)
        skip_scikit_learn_in_transformers()
        import torch

        from shared.qwen import encode_clips, load_codec

        self.options, self.name = options, name
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        self.device = placed_device(options.placement, f"{name} on {socket.gethostname()}")
        self.numerics = apply_codec_numerics(self.device, options.allow_reduced_precision)  # before the first kernel
        self.codec = load_codec(options.codec, self.device.torch_device)
        # One small encode now, so device context, kernel loading and allocator growth are start-up cost
        # and not charged to the first shard.
        encode_clips(self.codec, [np.zeros(4 * SAMPLES_PER_FRAME, dtype=np.float32)])
        self.batch_seconds = batch_seconds_for(options, self.device.kind)
        self.limits = AudioLimits(options.min_seconds, options.max_seconds)
        self.store = open_store(options.output)
        self.writer = ShardWriter(self.store)
        self.prefetcher = Prefetcher(options.decode_threads or default_decode_threads(options.placement),
                                     options.prefetch_batches)
        self.totals = {"rows": 0, "rows_error": 0, "audio_seconds": 0.0}
        self.meter = RateMeter()
        # On an accelerator the actor runs two shards at once (dispatch.shards_at_once): one decodes and
        # writes while the other holds the device. The codec is used by one of them at a time.
        self.active: set[int] = set()
        self._codec_lock = threading.Lock()
        self._count_lock = threading.Lock()

    @property
    def current_shard(self) -> int | None:
        return min(self.active, default=None)

    def _decode(self, entry: dict) -> Clip | AudioError:
        try:
            return load_audio(entry["audio"], self.limits)
        except AudioError as exc:
            return exc
        except Exception as exc:  # a decoder bug must cost one row, not the shard
            return AudioError(entry["audio"], "decode_failed", f"{type(exc).__name__}: {exc}")

    def encode_shard(self, spec: ShardSpec) -> ShardStats:
        with self._count_lock:
            self.active.add(spec.id)
        try:
            return self._encode_shard(spec)
        finally:
            with self._count_lock:
                self.active.discard(spec.id)

    def _encode_shard(self, spec: ShardSpec) -> ShardStats:
        from shared.qwen import encode_clips

        started = time.time()
        entries = parse_entries(self.store.read_range(MANIFEST_FILE, spec.byte_start, spec.byte_end))
        if len(entries) != spec.rows:
            raise RuntimeError(f"shard {spec.id}: manifest range holds {len(entries)} lines, plan says {spec.rows}; "
                               "manifest.jsonl changed after planning, re-run with --replan")
        rows, todo = [], []
        for offset, entry in enumerate(entries):
            problem = check_entry(entry)
            if problem:
                rows.append(_error_row(spec.start + offset, entry, problem))
            else:
                todo.append(offset)
        durations = self.prefetcher.map(lambda o: probe_duration(entries[o]["audio"]), todo)
        batches = form_batches(durations, self.batch_seconds, self.options.max_batch_items)
        for batch, futures in self.prefetcher.run(batches, lambda j: self._decode(entries[todo[j]])):
            good: list[tuple[int, Clip]] = []
            for j, future in zip(batch, futures):
                offset = todo[j]
                result = future.result()
                if isinstance(result, AudioError):
                    rows.append(_error_row(spec.start + offset, entries[offset], f"{result.reason}: {result}"))
                else:
                    good.append((offset, result))
            if not good:
                continue
            with self._codec_lock:
                codes = encode_clips(self.codec, [clip.samples for _, clip in good],
                                     exact_tail=self.options.exact_tail)
            audio_seconds = 0.0
            for (offset, clip), c in zip(good, codes):
                entry = entries[offset]
                rows.append(ShardRow.from_entry(spec.start + offset, entry, codes=c, duration=clip.duration,
                                                sample_rate=clip.source_sample_rate))
                audio_seconds += clip.duration
            with self._count_lock:
                self.meter.add(len(good), audio_seconds)
                self.totals["rows"] += len(good)
                self.totals["audio_seconds"] += audio_seconds
        errors = sum(1 for r in rows if not r.ok)
        with self._count_lock:
            self.totals["rows_error"] += errors
        stats = ShardStats(rows=len(rows), rows_ok=len(rows) - errors, rows_error=errors,
                           audio_seconds=sum(r.duration or 0.0 for r in rows if r.ok),
                           frames=sum(r.num_frames or 0 for r in rows), encode_seconds=time.time() - started,
                           worker=self.name)
        self.writer.publish(spec.id, rows, stats)
        return stats


class EncoderActor:
    """Ray actor wrapper: a ShardEncoder plus a heartbeat file for /status."""

    def __init__(self, options: EncoderOptions, name: str):
        self.encoder = ShardEncoder(options, name)
        self.started = time.time()
        self.heartbeat_name = f"{WORKERS_DIR}/{name}.json"
        self._stop = threading.Event()
        self._info: dict | None = None
        threading.Thread(target=self._beat, daemon=True, name="heartbeat").start()

    def info(self) -> dict:
        import ray

        dev = self.encoder.device
        visible = {var: os.environ.get(var) for var in VISIBLE_DEVICES_VAR.values() if os.environ.get(var) is not None}
        return {"name": self.encoder.name, "node": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "pid": os.getpid(), "device": dev.describe(), "visible_devices": visible,
                "numerics": asdict(self.encoder.numerics),
                "node_id": ray.get_runtime_context().get_node_id()}

    def encode_shard(self, spec: ShardSpec) -> ShardStats:
        try:
            return self.encoder.encode_shard(spec)
        finally:
            self._write_heartbeat()  # so the last shard's rows show even if the actor is stopped next

    def _write_heartbeat(self) -> None:
        try:
            self._info = self._info or self.info()
            rows_per_s, audio_per_s = self.encoder.meter.rates()
            self.encoder.store.write_json(self.heartbeat_name, {
                **self._info, "shard": self.encoder.current_shard, **self.encoder.totals,
                "rows_per_s": rows_per_s, "audio_seconds_per_s": audio_per_s,
                "started": self.started, "updated": time.time()})
        except Exception:
            pass  # status is best effort; the shard files are the truth

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._write_heartbeat()
            self._stop.wait(HEARTBEAT_SECONDS)
