"""Growing a plan: a manifest that is the planned one with lines appended keeps every planned shard and gets
new shards for the new lines only.

The check is on the normalised manifest (what the shards index), not on the user's file: the new manifest is
normalised to a staging file, whose first `plan.covered.bytes` bytes must hash to `plan.covered.sha256`. That
also refuses a manifest moved elsewhere whose relative audio paths now resolve to other files, and an old
last line without a newline that an append ran into.

Commit order, each step atomic (os.replace), every state in between valid for the old and the new shards:
`_COMPLETE` removed (a follow-mode reader waits again), then the manifest copy (a superset: every old byte
range still holds the same lines), then plan.json. A crash in between leaves a plan that a rerun grows again.
"""
from __future__ import annotations

import hashlib
import os
import time
from itertools import zip_longest
from pathlib import Path

from services.encode.manifest import write_normalised
from services.encode.plan import (CoveredManifest, Growth, Plan, PlanInputs, PlanMismatch, cut_shards, hashing,
                           write_json_atomic)
from shared.schema import COMPLETE_MARKER, MANIFEST_FILE, PLAN_FILE

HOW_TO_CHANGE = ("To grow the corpus, append the new lines at the end of the manifest (only they are encoded); to "
                 "change or remove rows, pass --replan (the old results are moved aside and the new manifest is "
                 "encoded from scratch) or use a new --output")


def covered_manifest(output: Path, plan: Plan) -> CoveredManifest:
    """The record of what the plan covers; a plan written before the record existed is taken to cover its whole
    manifest copy (a plan was never grown before the record existed)."""
    if plan.covered is not None:
        return plan.covered
    copy = output / MANIFEST_FILE
    if not copy.is_file():
        raise PlanMismatch(f"{output / PLAN_FILE} records no hash of the manifest it covers and {copy} is missing, "
                           f"so the manifest cannot be checked to be the old one with lines appended (changed: "
                           f"manifest_sha256). Pass --replan to encode the new manifest from scratch, or use a new "
                           f"--output")
    h = hashlib.sha256()
    with open(copy, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return CoveredManifest(copy.stat().st_size, h.hexdigest())


def first_difference(old: Path, new: Path) -> str:
    """Where the new normalised manifest stops being the old one, for the refusal message."""
    if not old.is_file():
        return "its first lines differ from the planned manifest's"
    with open(old, "rb") as a, open(new, "rb") as b:
        for line, (x, y) in enumerate(zip_longest(a, b), start=1):
            if x is None:  # the old lines all match: the plan's record, not the manifest, disagrees
                break
            if y is None:
                return f"it has {line - 1} lines where the planned manifest has more (rows removed)"
            if x != y:
                return f"line {line} differs from the planned manifest's"
    return "its first lines differ from the planned manifest's"


def grow_plan(output: Path, plan: Plan, inputs: PlanInputs, source: Path, log=print) -> Plan:
    """The plan extended by the lines `source` appends to the planned manifest; PlanMismatch, with nothing
    written, if `source` is anything else. Only called when the manifest is the one input that changed."""
    if source.is_dir():
        raise PlanMismatch(f"{output} holds a plan for another manifest (changed: manifest_sha256), and {source} is "
                           "a directory: files added to it cannot be checked to leave the planned rows unchanged, so "
                           f"only a JSONL manifest can grow. {HOW_TO_CHANGE}")
    covered = covered_manifest(output, plan)
    staged = output / f".{MANIFEST_FILE}.grow-{os.getpid()}"
    try:
        write_normalised(source, staged, inputs.ref_audio)
        h = hashlib.sha256()
        with open(staged, "rb") as f:
            head = f.read(covered.bytes)
            h.update(head)
            if len(head) < covered.bytes or h.hexdigest() != covered.sha256:
                raise PlanMismatch(f"{output} holds a plan for another manifest (changed: manifest_sha256), and "
                                   f"{source} is not that manifest with lines appended: "
                                   f"{first_difference(output / MANIFEST_FILE, staged)}. {HOW_TO_CHANGE}")
            num_rows, added = cut_shards(hashing(f, h), inputs.shard_size, first_id=len(plan.shards),
                                         first_line=plan.num_rows, first_byte=covered.bytes)
        grown = Plan(inputs.config_hash(), inputs, num_rows, plan.shards + added, created=plan.created,
                     version=plan.version, runs=plan.runs,
                     covered=CoveredManifest(added[-1].byte_end if added else covered.bytes, h.hexdigest()),
                     growths=plan.growths + ([Growth(time.time(), plan.num_rows, len(plan.shards),
                                                     num_rows - plan.num_rows)] if added else []))
        if added:
            # Before any new shard can be published: a reader must never see _COMPLETE with shards missing.
            (output / COMPLETE_MARKER).unlink(missing_ok=True)
            os.replace(staged, output / MANIFEST_FILE)
        write_json_atomic(output / PLAN_FILE, grown.to_json())
    finally:
        staged.unlink(missing_ok=True)
    if added:
        ids = f"shard {added[0].id}" if len(added) == 1 else f"shards {added[0].id}-{added[-1].id}"
        log(f"the manifest grew by {num_rows - plan.num_rows} rows: {ids} added after the {len(plan.shards)} "
            "planned ones, which are kept")
    else:
        log("the manifest changed but its rows did not: plan updated, nothing new to encode")
    return grown
