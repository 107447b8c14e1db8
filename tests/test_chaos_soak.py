"""Chaos soak: a 512-row encode on its private local Ray with 2 CPU encoders, during which encoder actors are
SIGKILLed every few seconds (the first one the moment it is created, in its start-up) and the driver is SIGKILLed
once and resubmitted. Afterwards: every row exactly once with the codes of an undisturbed encode, and nothing
left running of the killed driver's private Ray. docs/faults.md records the figures this prints."""
import json
import os
import signal
import sys
import threading
import time

import numpy as np

from shared.schema import published_shards
from tests.conftest import assert_rows_match, encode_args, repeated_corpus, write_manifest
from tests.raycluster import Background, session_members, wait_for
from tests.test_encode_job import read_rows

# Clips of about a second (CYCLED_CLIPS): one encoder alone needs longer than a replacement's start-up for the
# 512 rows, so that kills at work (which wait for two encoders up) happen in both runs.
ROWS, SHARD_SIZE = 512, 8
SHARDS = ROWS // SHARD_SIZE
KILL_EVERY_SECONDS = 2.5
STARTING, WORKING = "ray::EncoderActor.__init__", "ray::EncoderActor"


def encoder_processes(session: int) -> dict[int, str]:
    """pid -> title of the encoder actors of the driver whose session is `session` (its private Ray's workers
    stay in it). Ray titles a worker after the task it runs: `ray::EncoderActor.__init__` while it starts."""
    found = {}
    for pid in session_members([session]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith(STARTING.split(".")[0]):
            found[pid] = title
    return found


class EncoderKiller(threading.Thread):
    """SIGKILLs each driver's first encoder the moment it starts, then one every KILL_EVERY_SECONDS, alternating
    between one in start-up and one at work. A kill waits for a shard to be published since the previous one
    and always leaves an encoder at work: the job must progress between kills."""

    def __init__(self, out):
        super().__init__(daemon=True)
        self.out = out
        self.session: int | None = None
        self.kills = {"starting": 0, "working": 0}
        self._first = True
        self._published_at_last_kill = 0
        self._done = threading.Event()

    def arm(self, session: int) -> None:
        """Watch the driver whose session is `session` (its pid, as Background starts it)."""
        self.session, self._first = session, True

    def run(self) -> None:
        last = 0.0
        while not self._done.wait(0.05):
            if self.session is None:
                continue
            actors = encoder_processes(self.session)
            starting = [pid for pid, title in actors.items() if title == STARTING]
            working = [pid for pid, title in actors.items() if title != STARTING]
            if self._first:
                victims = [(pid, "starting") for pid in starting]
            else:
                published = len(published_shards(self.out))
                if time.time() - last < KILL_EVERY_SECONDS or published <= self._published_at_last_kill:
                    continue
                want_starting = self.kills["starting"] <= self.kills["working"]
                victims = ([(pid, "starting") for pid in starting if working] if want_starting else
                           [(pid, "working") for pid in working if len(working) >= 2])
            if not victims:
                continue
            victim, kind = victims[0]
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills[kind] += 1
            self._first, last = False, time.time()
            self._published_at_last_kill = len(published_shards(self.out))

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def test_encoders_killed_from_start_up_on_and_the_driver_killed_once_lose_nothing(tiny_codec_dir, cycled_clips,
                                                                                   tmp_path):
    entries = repeated_corpus(cycled_clips[0], ROWS)
    manifest = write_manifest(tmp_path / "raw.jsonl", entries)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "services.encode", "--device", "cpu", "--num-encoders", "2",
               *encode_args(manifest, tiny_codec_dir, out, "--shard-size", str(SHARD_SIZE))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    killer = EncoderKiller(out)
    killer.start()
    began = time.time()
    try:
        with Background(command, env=env, log=tmp_path / "first.log") as first:
            killer.arm(first.pid)
            wait_for(lambda: len(published_shards(out)) >= SHARDS // 4 and killer.kills["working"] >= 1
                     or first.proc.poll() is not None, 300, "a quarter of the shards and an encoder killed at work")
            assert first.proc.poll() is None, f"the first driver ended early:\n{first.output[-4000:]}"
            os.kill(first.pid, signal.SIGKILL)
            first.proc.wait(timeout=30)
            # No process of its private Ray may outlive it (its reaper included): by session, as started.
            wait_for(lambda: not session_members([first.pid]), 30, "the killed driver's private Ray to be gone")
        published_at_driver_kill = len(published_shards(out))
        with Background(command, env=env, log=tmp_path / "second.log") as second:
            killer.arm(second.pid)
            assert second.wait(timeout=300) == 0, second.output[-4000:]
    finally:
        killer.stop()
    assert killer.kills["starting"] >= 2 and killer.kills["working"] >= 1, killer.kills
    assert "could not start" not in first.output + second.output
    lost = first.output.count(" lost (") + second.output.count(" lost (")
    assert lost >= sum(killer.kills.values()) - 2  # a kill racing a driver's own stop is not reported
    codes = cycled_clips[1]
    rows = read_rows(out)
    figures = {"rows_planned": ROWS, "rows_written": len(rows), "shards": SHARDS, "encoder_kills": killer.kills,
               "driver_kills": 1, "shards_published_at_driver_kill": published_at_driver_kill,
               "encoders_reported_lost": lost, "duplicates": len(rows) - len({r["index"] for r in rows}),
               "code_differences": sum(not np.array_equal(r["audio_codes"], codes[r["audio"]]) for r in rows),
               "seconds": round(time.time() - began, 1)}
    print("soak:", json.dumps(figures))
    assert figures["duplicates"] == 0 and figures["code_differences"] == 0, figures
    assert_rows_match(out, entries, codes)  # every manifest line once, in order, its id, no temporary left
