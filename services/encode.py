"""`python -m services.encode`: plan a manifest into shards and encode them with Ray actors.

Under `ray job submit` it joins that cluster; run by hand with no RAY_ADDRESS it starts a private
local Ray. Re-running with the same arguments finishes only the shards that are missing.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from services.encoder import EncoderOptions
from services.lock import OutputLock, OutputLocked
from services.manifest import ManifestError
from services.plan import PlanMismatch, prepare_plan, record_encode_run, write_json_atomic
from services.writer import FIX_FOR_ERRNO, OutputWriteError, ShardWriter, write_failure
from shared.device import DEVICE_CHOICES, codec_numerics
from shared.schema import published_shards
from shared.storage import local_path


def output_directory(text: str) -> Path:
    """--output: the lock, plan, manifest and heartbeats need a POSIX filesystem that every node mounts."""
    path = local_path(text)
    if path is None:
        raise argparse.ArgumentTypeError(
            f"{text}: the output directory must be a path every node mounts (or a file:// URI); the lock, plan and "
            "heartbeats need a shared POSIX filesystem. Mount the bucket (e.g. s3fs, gcsfuse) and pass that path")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.encode", description=__doc__)
    p.add_argument("--manifest", required=True, type=Path, help="raw JSONL (audio, text, ref_audio) or a directory "
                   "of audio files with same-stem .txt transcripts")
    p.add_argument("--codec", required=True, type=Path, help="Qwen3-TTS-Tokenizer-12Hz directory")
    p.add_argument("--output", required=True, type=output_directory, help="output directory: a path every node "
                   "mounts, or a file:// URI")
    p.add_argument("--shard-size", type=int, default=256, help="manifest rows per shard")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--num-encoders", type=int, default=0, help="0: one per accelerator in the cluster (1 on CPU)")
    p.add_argument("--cpus-per-encoder", type=float, default=1.0, help="Ray CPUs reserved by each encoder actor")
    p.add_argument("--decode-threads", type=int, default=0, help="decode/resample threads per encoder "
                   "(0: the node's cores shared among its encoders)")
    p.add_argument("--max-batch-seconds", type=float, default=240.0, help="padded audio seconds per codec call")
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--exact-tail", action="store_true", help="reproduce upstream's one-at-a-time codes for the "
                   "last partial frame too (slower; see README)")
    p.add_argument("--min-seconds", type=float, default=0.1)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--ref-audio", default=None, help="reference wav for entries that have none")
    p.add_argument("--replan", action="store_true", help="inputs changed: move old results aside and start over")
    p.add_argument("--status-host", default="127.0.0.1")
    p.add_argument("--status-port", type=int, default=8000, help="serve GET /status while running; -1 disables")
    p.add_argument("--status-token-file", default=None, help="require this bearer token on /status")
    p.add_argument("--export-jsonl", type=Path, default=None, help="also write upstream train_with_codes.jsonl")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--progress-seconds", type=float, default=10.0)
    return p.parse_args(argv)


def connect_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    # "local" starts a private cluster instead of joining whatever runs on this machine.
    ray.init(address=address or "local", logging_level="WARNING", log_to_driver=True)


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.args, self.output = args, args.output.resolve()
        self.started = time.time()
        self.failed: dict[int, str] = {}
        self.encode_seconds = 0.0  # time spent with encoders running, for the throughput line
        self.run_rows, self.run_audio_seconds = 0, 0.0  # what this run (not earlier ones) encoded

    def log(self, message: str) -> None:
        print(f"[encode {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def heartbeat(self, state: str, encoders: int = 0, message: str = "") -> None:
        write_json_atomic(self.output / "driver.json", {
            "pid": os.getpid(), "host": socket.gethostname(), "state": state, "started": self.started,
            "updated": time.time(), "num_encoders": encoders, "failed_shards": {str(k): v for k, v in self.failed.items()},
            "message": message})

    def start_status(self):
        if self.args.status_port < 0:
            return None
        from services.status import is_loopback, start_status_server, token_from

        token = token_from(self.args.status_token_file)
        if token is None and not is_loopback(self.args.status_host):
            self.log(f"warning: /status on {self.args.status_host} without a token: anyone who can reach it "
                     "sees the job's paths and progress; pass --status-token-file")
        try:
            server = start_status_server(self.output, self.args.status_host, self.args.status_port, token)
        except OSError as exc:
            self.log(f"status server not started ({exc}); the job goes on. Serve it with "
                     f"`python -m services.status --output {self.output} --port P`")
            return None
        self.log(f"status: {server.url}/status")
        return server

    def run(self) -> int:
        from services.finalize import export_jsonl, write_summary
        from services.progress import collect_progress, format_progress_line

        args = self.args
        plan = prepare_plan(self.output, args.manifest, args.codec, args.shard_size, exact_tail=args.exact_tail,
                            min_seconds=args.min_seconds, max_seconds=args.max_seconds, ref_audio=args.ref_audio,
                            replan=args.replan, log=self.log)
        self.plan = plan
        writer = ShardWriter(self.output)
        removed = writer.remove_temporaries()  # safe: we hold the lock and no encoder of ours runs yet
        if removed:
            self.log(f"removed {len(removed)} temporary files left by encoders that were killed mid-shard")
        done = published_shards(self.output)
        pending = [s for s in plan.shards if s.id not in done]
        self.log(f"plan: {plan.num_rows} rows in {len(plan.shards)} shards; {len(done)} already published, "
                 f"{len(pending)} to encode")
        status = self.start_status()
        try:
            if pending:
                writer.check_writable()  # fail now, not after the encoders have started
                self.encode(pending)
                writer.remove_temporaries()  # of encoders killed mid-shard this run; ours are stopped now
            summary = write_summary(self.output, plan, time.time() - self.started)
            self.heartbeat("finished" if summary["complete"] else "failed", message="" if summary["complete"] else
                           f"{len(self.failed)} shards failed; re-run the same command to retry them")
            self.log(format_progress_line(collect_progress(self.output)))
            if self.encode_seconds:
                self.log(f"throughput this run: {len(pending)} shards in {self.encode_seconds:.1f} s "
                         f"({self.run_rows / self.encode_seconds:.1f} rows/s, "
                         f"{self.run_audio_seconds / self.encode_seconds:.1f} audio-s/s)")
            self.log(f"summary: {summary['rows_ok']} rows ok, {summary['rows_error']} errors "
                     f"{summary['errors_by_reason']}, {summary['audio_hours']:.4f} h audio; "
                     f"{'complete' if summary['complete'] else 'INCOMPLETE'} -> {self.output}")
            if args.export_jsonl and summary["complete"]:
                self.log(f"exported {export_jsonl(self.output, args.export_jsonl)} rows to {args.export_jsonl}")
            return 0 if summary["complete"] else 1
        finally:
            if status is not None:
                status.stop()

    def encode(self, pending) -> None:
        import ray

        from services.dispatch import EncoderPool, cluster_kind
        from services.progress import collect_progress, format_progress_line

        args = self.args
        connect_ray(args.address)
        kind = cluster_kind(args.device)
        record_encode_run(self.output, self.plan, codec_numerics(kind), self.log)  # plan.json: which hardware
        fixed = args.num_encoders or None
        options = EncoderOptions(
            codec=str(args.codec.resolve()), output=str(self.output),
            max_batch_seconds=args.max_batch_seconds, max_batch_items=args.max_batch_items,
            decode_threads=args.decode_threads, placement=kind, exact_tail=args.exact_tail,
            min_seconds=args.min_seconds, max_seconds=args.max_seconds,
            torch_threads=max(1, int(args.cpus_per_encoder)) if kind == "cpu" else 0)
        pool = EncoderPool(options, kind, fixed, args.cpus_per_encoder, log=self.log)
        pool.scale()
        self.heartbeat("running", len(pool.encoders))

        def beat(*_):
            self.heartbeat("running", len(pool.encoders))

        def on_done(spec, stats):
            self.run_rows += stats.rows_ok
            self.run_audio_seconds += stats.audio_seconds
            beat()

        def on_tick():
            beat()
            self.log(format_progress_line(collect_progress(self.output)))

        try:
            begun = time.time()
            self.failed = pool.run(pending, on_done, on_tick, args.progress_seconds)
            # Throughput counts from the first encoder ready: actor start and codec load are a fixed cost.
            ready = pool.first_started_at or begun
            self.encode_seconds = time.time() - ready
            self.log(f"encoders took {ready - begun:.1f} s to start (actor, device, codec load)")
        except BaseException as exc:
            self.heartbeat("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", message=str(exc))
            raise
        finally:
            pool.shutdown()
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lock = OutputLock(args.output.resolve())
    try:
        lock.acquire()
        return Driver(args).run()
    except OutputLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (PlanMismatch, ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The driver's own files (lock, plan, manifest copy, driver.json, summary) fail like the shards do.
        own_file = exc.filename and Path(exc.filename).resolve().is_relative_to(args.output.resolve())
        if not isinstance(exc, OutputWriteError):
            if not (own_file and exc.errno in FIX_FOR_ERRNO):
                raise
            exc = write_failure(Path(exc.filename).parent, exc)
        print(f"error: {exc}", file=sys.stderr)
        return 4
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
