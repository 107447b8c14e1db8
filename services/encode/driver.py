"""`python -m services.encode`: plan a manifest into shards and encode them with Ray actors.

Under `ray job submit` it joins that cluster; run by hand with no RAY_ADDRESS it starts a private
local Ray. Re-running with the same arguments finishes only the shards that are missing.
"""
from __future__ import annotations

import _thread
import argparse
import importlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.encode.index_keeper import IndexKeeper
from services.encode.lease import DEFAULT_LEASE_SECONDS, single_driver_guard
from services.encode.lock import OutputLocked
from services.encode.manifest import ManifestError
from services.encode.preflight import InputProblem, check_inputs
from services.status.progress import DRIVER_FILE
from shared.shard_writer import FIX_FOR_ERRNO, OutputWriteError, ShardWriter, is_own_file, write_failure
from shared.device import DEVICE_CHOICES  # without torch: the driver never imports it
from shared.schema import COMPLETE_MARKER, PLAN_FILE, SUMMARY_FILE, published_shards
from shared.storage import local_path
from shared.store import is_s3_uri, open_store


def output_location(text: str) -> str:
    """--output: a path every node mounts, a file:// URI, or an s3:// URI (any S3-compatible store)."""
    if is_s3_uri(text):
        return text
    path = local_path(text)
    if path is None:
        raise argparse.ArgumentTypeError(
            f"{text}: the output must be a path every node mounts, a file:// URI or an s3:// URI (the plan and the "
            "driver's lease need conditional writes); for GCS use its S3-compatible endpoint with an s3:// URI")
    return str(path.resolve())


def export_destination(text: str) -> str | Path:
    return text if is_s3_uri(text) else Path(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.encode", description=__doc__)
    p.add_argument("--manifest", required=True, type=Path, help="raw JSONL (audio, text, ref_audio) or a directory "
                   "of audio files with same-stem .txt transcripts")
    p.add_argument("--codec", required=True, type=Path, help="Qwen3-TTS-Tokenizer-12Hz directory")
    p.add_argument("--output", required=True, type=output_location, help="output directory: a path every node "
                   "mounts, a file:// URI, or s3://bucket/prefix")
    p.add_argument("--shard-size", type=int, default=256, help="manifest rows per shard")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--num-encoders", type=int, default=0, help="0: one per accelerator in the cluster (1 on CPU)")
    p.add_argument("--cpus-per-encoder", type=float, default=1.0, help="Ray CPUs reserved by each encoder actor")
    p.add_argument("--decode-threads", type=int, default=0, help="decode/resample threads per encoder "
                   "(0: the node's cores shared among its encoders)")
    p.add_argument("--max-batch-seconds", type=float, default=240.0, help="padded audio seconds per codec call")
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--allow-reduced-codec-precision", action="store_true",
                   help="encode on Ascend chips before 910B1 (910A, 310P), whose fp32 reads fp16 inputs "
                        "(recorded in plan.json); refused without it")
    p.add_argument("--exact-tail", action="store_true", help="reproduce upstream's one-at-a-time codes for the "
                   "last partial frame too (slower; see docs/preparing-data.md)")
    p.add_argument("--min-seconds", type=float, default=0.1)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--ref-audio", default=None, help="reference wav for entries that have none")
    p.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_SECONDS, help="on s3://: the driver's "
                   "lease lasts this long unless renewed; a killed driver's output can be resumed after it")
    p.add_argument("--replan", action="store_true", help="inputs changed: move old results aside and start over "
                   "(a manifest with lines appended needs none: only the new lines are encoded)")
    p.add_argument("--status-host", default="127.0.0.1")
    p.add_argument("--status-port", type=int, default=8000, help="serve GET /status while running; -1 disables")
    p.add_argument("--status-token-file", default=None, help="require this bearer token on /status")
    p.add_argument("--export-jsonl", type=export_destination, default=None, help="also write upstream "
                   "train_with_codes.jsonl (a path or an s3:// URI)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--progress-seconds", type=float, default=10.0)
    p.add_argument("--max-retries", type=int, default=2, help="tries of a shard that raised, after the first, "
                   "before it is reported failed")
    p.add_argument("--ray-dashboard", action="store_true", help="start Ray's dashboard with the private local "
                   "Ray (off by default: it costs seconds of start-up)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def connect_ray(address: str | None, dashboard: bool = False) -> subprocess.Popen | None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a private local Ray and its reaper
    (services/encode/reaper.py), which is returned: closing its stdin, or this process's death, sends it reaping."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
        return None
    reaper = subprocess.Popen([sys.executable, "-m", "services.encode.reaper", str(os.getpid())], stdin=subprocess.PIPE,
                              process_group=0)
    # "local" starts a private cluster instead of joining whatever runs on this machine.
    ray.init(address="local", logging_level="WARNING", log_to_driver=True, include_dashboard=dashboard)
    return reaper


def stop_autoscaler_monitor() -> None:
    """ray.shutdown() stops a private cluster's daemons one after another, giving each up to 1 s to exit on
    SIGTERM. Ray 2.60's autoscaler monitor always takes that whole second (1.0 s of shutdown's 1.45 s, measured
    here); a private one-node cluster has nothing for it to scale or save, so it is killed first. The names are
    Ray's internals: if they change, shutdown just takes its second again."""
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", None), []):
        info.process.kill()
        info.process.wait(timeout=5)


class PlanInBackground:
    """prepare_plan on a thread, so that hashing the codec and normalising the manifest overlap Ray's start.
    (Ray itself is started on the main thread: its daemons die with the thread that started them.)"""

    def __init__(self, driver: "Driver"):
        self.plan, self.error = None, None
        self.started = time.time()
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(driver,), name="plan", daemon=True)
        self._thread.start()

    def _run(self, driver: "Driver") -> None:
        from services.encode.plan import PlanMismatch

        try:
            try:
                self.plan = self._prepare(driver, driver.args.replan)
            except PlanMismatch:
                # A plan nothing was published under (its job stopped at start-up, e.g. on a codec that would not
                # load) holds nothing to keep: the corrected command replans instead of asking for --replan.
                if published_shards(driver.store):
                    raise
                driver.log("the plan there is for other inputs and has no published shard: replanning")
                self.plan = self._prepare(driver, True)
        except BaseException as exc:  # re-raised on the main thread by result()
            self.error = exc
        self.seconds = time.time() - self.started

    @staticmethod
    def _prepare(driver: "Driver", replan: bool):
        from services.encode.plan import prepare_plan

        args = driver.args
        return prepare_plan(driver.store, args.manifest, args.codec, args.shard_size, exact_tail=args.exact_tail,
                            min_seconds=args.min_seconds, max_seconds=args.max_seconds, ref_audio=args.ref_audio,
                            replan=replan, log=driver.log)

    def result(self):
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.plan


class Driver:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.store = open_store(args.output)
        self.output = self.store.location()  # for messages and the status server
        self.started = time.time()
        self.pool = None  # the EncoderPool once Ray is up
        self.kind = "cpu"  # the accelerator kind encoders are placed on, once Ray is up
        self.ray_up = False
        self.reaper: subprocess.Popen | None = None
        self.encode_seconds = 0.0  # time spent with encoders running, for the throughput line
        self.run_rows, self.run_audio_seconds = 0, 0.0  # what this run (not earlier ones) encoded

    @property
    def failed(self) -> dict[int, str]:
        return self.pool.failed if self.pool is not None else {}

    def log(self, message: str) -> None:
        print(f"[encode {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def heartbeat(self, state: str, message: str = "") -> None:
        """driver.json: read by /status. Failures, retries and lost encoders are live: the pool asks for a
        heartbeat as soon as one happens."""
        pool = self.pool
        self.store.write_json(DRIVER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(), "state": state, "started": self.started,
            "updated": time.time(), "num_encoders": len(pool.encoders) if pool else 0,
            "failed_shards": {str(k): v for k, v in self.failed.items()},
            "shard_retries": pool.retries if pool else 0, "encoders_lost": pool.losses if pool else 0,
            "message": message})

    def start_status(self):
        if self.args.status_port < 0:
            return None
        from services.status.server import is_loopback, start_status_server, token_from

        token = token_from(self.args.status_token_file)
        if token is None and not is_loopback(self.args.status_host):
            self.log(f"warning: /status on {self.args.status_host} without a token: anyone who can reach it "
                     "sees the job's paths and progress; pass --status-token-file")
        try:
            server = start_status_server(self.store, self.args.status_host, self.args.status_port, token)
        except OSError as exc:
            self.log(f"status server not started ({exc}); the job goes on. Serve it with "
                     f"`python -m services.status --output {self.output} --port P`")
            return None
        self.log(f"status: {server.url}/status")
        return server

    def since_start(self) -> str:
        return f"{time.time() - self.started:.1f} s"

    def run(self) -> int:
        """Plan (on a thread) while Ray and the encoders start, unless the job is already complete."""
        # On a fresh output the actors start with Ray. A resubmit's plan may turn out to be for other inputs
        # (refused) or be moved aside (--replan): its actors wait for the plan. (Read before the plan is written.)
        fresh = not self.store.exists(PLAN_FILE)
        planning = PlanInBackground(self)
        try:
            if not self.store.exists(COMPLETE_MARKER):
                # The encoder pool's imports (pyarrow, soundfile, Ray's actor API) load on a thread while Ray
                # starts on this one.
                threading.Thread(target=importlib.import_module, args=("services.encode.dispatch",), daemon=True).start()
                self.start_encoders(spawn=fresh)
            plan = planning.result()
            self.log(f"planned in {planning.seconds:.1f} s")
            return self.finish(plan)
        finally:
            self.stop_encoders()

    def start_encoders(self, spawn: bool) -> None:
        from services.encode.dispatch import EncoderPool, cluster_kind
        from services.encode.encoder import EncoderOptions

        args = self.args
        self.reaper = connect_ray(args.address, args.ray_dashboard)
        self.ray_up = True
        kind = self.kind = cluster_kind(args.device, self.log)
        self.log(f"Ray ready after {self.since_start()}")
        options = EncoderOptions(
            codec=str(args.codec.resolve()), output=args.output,
            max_batch_seconds=args.max_batch_seconds, max_batch_items=args.max_batch_items,
            decode_threads=args.decode_threads, placement=kind, exact_tail=args.exact_tail,
            min_seconds=args.min_seconds, max_seconds=args.max_seconds,
            torch_threads=max(1, int(args.cpus_per_encoder)) if kind == "cpu" else 0,
            allow_reduced_precision=args.allow_reduced_codec_precision)
        self.pool = EncoderPool(options, kind, args.num_encoders or None, args.cpus_per_encoder,
                                max_retries=args.max_retries, log=self.log)
        if spawn:
            self.pool.scale()

    def stop_encoders(self) -> None:
        if self.ray_up:
            import ray

            if self.pool is not None:
                self.pool.shutdown()
            if self.reaper is not None:  # ours: a private cluster
                stop_autoscaler_monitor()
            ray.shutdown()
            self.ray_up = False
        if self.reaper is not None:
            self.reaper.stdin.close()  # the reaper ends whatever of the private Ray is left, then exits
            self.reaper.wait(timeout=30)
            self.reaper = None

    def finish(self, plan) -> int:
        from services.encode.finalize import export_jsonl, write_summary
        from services.status.progress import collect_progress, format_progress_line

        args = self.args
        writer = ShardWriter(self.store)
        self.index = IndexKeeper(self.output, self.log)
        removed = writer.remove_temporaries()  # safe: we hold the lock and no encoder of ours has work yet
        if removed:
            self.log(f"removed {len(removed)} temporary files left by encoders that were killed mid-shard")
        done = published_shards(self.store)
        pending = [s for s in plan.shards if s.id not in done]
        self.log(f"plan: {plan.num_rows} rows in {len(plan.shards)} shards; {len(done)} already published, "
                 f"{len(pending)} to encode")
        if not pending:  # a rerun of a finished job: keep the summary's time, it is the job's
            self.stop_encoders()
            previous = self.store.read_json(SUMMARY_FILE) or {}
            self.index.reconcile()
            summary = write_summary(self.store, plan, previous.get("elapsed_seconds") or time.time() - self.started)
            self.heartbeat("finished" if summary["complete"] else "failed")
            self.log(f"nothing to encode: all {len(plan.shards)} shards were already published")
        else:
            status = self.start_status()
            try:
                writer.check_writable()  # fail now, not after the encoders have taken shards
                self.encode(plan, pending)
                writer.remove_temporaries()  # of encoders killed mid-shard this run; ours are stopped now
            finally:
                if status is not None:
                    status.stop()
            self.index.reconcile()
            summary = write_summary(self.store, plan, time.time() - self.started)
            self.heartbeat("finished" if summary["complete"] else "failed", message="" if summary["complete"] else
                           f"{len(self.failed)} shards failed; re-run the same command to retry them")
            self.log(format_progress_line(collect_progress(self.store)))
            if self.encode_seconds:
                self.log(f"throughput this run: {len(pending)} shards in {self.encode_seconds:.1f} s "
                         f"({self.run_rows / self.encode_seconds:.1f} rows/s, "
                         f"{self.run_audio_seconds / self.encode_seconds:.1f} audio-s/s), encoding only: "
                         "from the first encoder ready, start-up excluded")
        self.log(f"summary: {summary['rows_ok']} rows ok, {summary['rows_error']} errors "
                 f"{summary['errors_by_reason']}, {summary['audio_hours']:.4f} h audio; "
                 f"{'complete' if summary['complete'] else 'INCOMPLETE'} -> {self.output}")
        if args.export_jsonl and summary["complete"]:
            for line in export_jsonl(self.store, args.export_jsonl).describe(args.export_jsonl):
                self.log(line)
        return 0 if summary["complete"] else 1

    def encode(self, plan, pending) -> None:
        from services.status.progress import collect_progress, format_progress_line
        from services.encode.plan import amend_encode_run, record_encode_run
        from shared.device import CodecNumerics, codec_numerics

        if not self.ray_up:
            self.start_encoders(spawn=True)
        record_encode_run(self.store, plan, codec_numerics(self.kind), self.log)  # plan.json: which hardware
        pool = self.pool
        pool.on_started = lambda info: amend_encode_run(self.store, plan, CodecNumerics(**info["numerics"]),
                                                        f"{info['name']} on {info['hostname']}", self.log)
        pool.scale()
        self.heartbeat("running")

        def on_done(spec, stats):
            self.index.published(spec.id)
            self.run_rows += stats.rows_ok
            self.run_audio_seconds += stats.audio_seconds
            self.heartbeat("running")

        def on_tick():
            self.index.save()
            self.heartbeat("running")
            self.log(format_progress_line(collect_progress(self.store)))

        try:
            begun = time.time()
            pool.run(pending, on_done, on_tick, self.args.progress_seconds)
            # Throughput counts from the first encoder ready: actor start and codec load are a fixed cost.
            ready = pool.first_started_at or begun
            self.encode_seconds = time.time() - ready
            self.log(f"first encoder ready {ready - self.started:.1f} s after the driver started "
                     f"(imports, Ray, actor, device, codec load)")
        except BaseException as exc:
            self.heartbeat("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", message=str(exc))
            raise
        finally:
            try:
                self.index.save()  # what was published, also when the job stops on an error
            except OSError as exc:  # the storage's own error, if it failed, is the one to report
                self.log(f"shard index not saved: {exc}")
            self.stop_encoders()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_inputs(args)  # before Ray starts and before anything is written
    except InputProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = open_store(args.output)

    def log(message: str) -> None:
        print(f"[encode {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def lease_lost(message: str) -> None:
        log(message)
        _thread.interrupt_main()  # the driver stops its encoders and exits; the new holder finishes the job

    guard = single_driver_guard(store, args.lease_seconds, log=log, on_lost=lease_lost)
    try:
        guard.acquire()
        return Driver(args).run()
    except OutputLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if getattr(guard, "lost", None) is None:
            raise
        print(f"error: {guard.lost}", file=sys.stderr)
        return 3
    except (ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from services.encode.dispatch import EncoderStartError
        from services.encode.plan import PlanMismatch

        if not isinstance(exc, (PlanMismatch, EncoderStartError)):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The driver's own files (lock, plan, manifest copy, driver.json, summary) fail like the shards do.
        if not isinstance(exc, OutputWriteError):
            if not (is_own_file(exc.filename, store) and exc.errno in FIX_FOR_ERRNO):
                raise
            exc = write_failure(str(exc.filename).rsplit("/", 1)[0], exc)
        print(f"error: {exc}", file=sys.stderr)
        return 4
    finally:
        guard.release()
