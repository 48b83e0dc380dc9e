"""The pipeline machinery: stages made of shards, cache keys, resume, and a plain sequential runner.

A :class:`Stage` declares its upstream stages, the config sections its results depend on, how it splits
into :class:`Shard` s and the function that computes one shard and returns the files it wrote.
:func:`run_shard` wraps that function with the resume logic: a shard whose record exists, was computed
under the same key and whose files still hash as recorded is skipped; otherwise its record is removed,
the shard is computed, every output is re-read and checked (sha256, Parquet row count), and only then the
shard record is written. :func:`finalize_stage` joins the shard records into the stage manifest.

The cache key of a shard is :func:`shard_key`: the stage's config sections, the run seed, the shard, the
content hashes of its input stage manifests, the stage's code (:meth:`Stage.code`: the modules defining its
functions and everything they import, :mod:`ddpipe.codehash`), and for the dataset stage the data's
fingerprint. The Prefect tasks use the very same key. Outputs shared across runs (:func:`shared_outputs`)
have keys of their own, :func:`shared_key`, whose code part is derived the same way.

:func:`drive` is the one loop over a run's stages and shards. :func:`ddpipe.runner.run_pipeline` drives it
with plain function calls; the ``distill`` flow drives it with the same calls as Prefect tasks.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable

from pydantic import BaseModel

from ddpipe import locks, progress
from ddpipe.codehash import code_hash, shared_key  # noqa: F401 - shared_key: where the stages take it from
from ddpipe.config import RunConfig
from ddpipe.errors import StoreError, ValidationError
from ddpipe.manifests import (
    ShardResult, StageManifest, files_of, parse_record, plan_table, record_path, records_table, shard_result,
    stage_path, write_stage_manifest,
)
from ddpipe.store import FileRecord, Store, sha256_bytes


class Shard(BaseModel):
    """One unit of work of a stage. ``id`` is unique within the stage and names its record file."""

    id: str
    classes: tuple[int, ...] = ()
    set: str | None = None
    regime: str | None = None
    seed: int | None = None
    teacher: int | None = None  # index into RunConfig.teacher_models
    ipc: tuple[int, int] | None = None  # ipc indices [start, stop)
    images: tuple[int, int] | None = None  # training-image positions [start, stop)
    student: int | None = None  # index into ddpipe.evaluate.student_models (0: evaluation.model)


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    sections: tuple[str, ...]  # config sections the results depend on (the run seed always counts)
    plan: Callable[["Context", int], list[Shard]]  # (context, number of classes) -> shards
    run: Callable[["Context", Shard, dict[str, StageManifest]], list[FileRecord]]
    fingerprint: Callable[["Context"], str] | None = None  # extra key input (e.g. the data's content hash)
    doc: str = ""

    def code(self) -> str:
        """The code part of the stage's key: the modules defining its functions and everything they import."""
        return code_hash(*(f for f in (self.run, self.plan, self.fingerprint) if f is not None))


def grown(size: int, total: int, max_shards: int) -> int:
    """``size`` items per shard, grown so that ``total`` items make at most ``max_shards`` shards."""
    return max(size, -(-total // max_shards))


def class_groups(ctx: "Context", num_classes: int) -> list[Shard]:
    """Consecutive classes, ``orchestration.classes_per_shard`` per shard (more when there would be more than
    ``orchestration.max_shards_per_stage`` shards)."""
    orch = ctx.cfg.orchestration
    size = grown(orch.classes_per_shard, num_classes, orch.max_shards_per_stage)
    return [
        Shard(id=f"classes-{s:05d}-{min(s + size, num_classes) - 1:05d}", classes=tuple(range(s, min(s + size, num_classes))))
        for s in range(0, num_classes, size)
    ]


def single_shard(name: str):
    """A stage plan of one shard named ``name``."""
    return lambda ctx, num_classes: [Shard(id=name)]


def run_store(cfg: RunConfig) -> Store:
    """The store of the run folder ``<store.uri>/<name>-<hash>``."""
    return Store(cfg.store.uri, cfg.store.storage_options).child(cfg.run_name)


def shared_outputs(cfg: RunConfig, kind: str, key: str, compute: Callable[[], dict[str, bytes]]) -> dict[str, bytes]:
    """Outputs shared by every run in the same store (trained teachers, statistic moments), by file name.

    They live in ``<store.uri>/shared/<kind>/<key>/``, ``key`` a hash of everything they depend on. When
    that folder's ``index.json`` exists and every file it lists still hashes as listed, the files are
    returned; otherwise ``compute()`` makes them and they are written there (files first, the index last,
    so an interrupted write is recomputed, never half-used). The caller still writes them into its run folder.
    """
    shared = Store(cfg.store.uri, cfg.store.storage_options).child(f"shared/{kind}/{key}")
    found = _shared_files(shared)
    if found is not None:
        return found
    # Computed under the folder's lock: a concurrent run of another config that needs the same output waits
    # here, then finds it written.
    with locks.held(shared, ".lock", f"shared output {shared.uri}", wait=True, ttl=cfg.store.lock_ttl_s):
        found = _shared_files(shared)
        if found is not None:
            return found
        out = compute()
        for name, data in out.items():
            shared.write_bytes(name, data)
        index = json.dumps({n: sha256_bytes(d) for n, d in out.items()}, sort_keys=True).encode()
        shared.write_bytes("index.json", index)
    return out


def _shared_files(shared: Store) -> dict[str, bytes] | None:
    """The files ``shared/<kind>/<key>/index.json`` lists, when it exists and each still hashes as listed."""
    if not shared.exists("index.json"):
        return None
    index = shared.read_json("index.json")
    found = {name: _read(shared, name) for name in index}
    if all(data is not None and sha256_bytes(data) == index[name] for name, data in found.items()):
        return found
    return None


RUN_LOCK = "run.lock"


def run_lock(cfg: RunConfig):
    """Hold the run folder for a run (``with run_lock(cfg): ...``): a second run of the same config on the same
    store is refused with one line (:mod:`ddpipe.locks`)."""
    store = run_store(cfg)
    return locks.held(store, RUN_LOCK, f"run folder {store.uri}", wait=False, ttl=cfg.store.lock_ttl_s)


@dataclass
class Context:
    """What a shard needs at run time: the config, the run folder, the data, the device.

    Loaded things are memoised per context (thread-safe), so shards run in one process share them.
    """

    cfg: RunConfig
    _cache: dict = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def cached(self, key: str, make: Callable):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    @property
    def store(self) -> Store:
        return self.cached("store", lambda: run_store(self.cfg))

    @property
    def source(self):
        from ddpipe.dataindex import open_source

        return self.cached("source", lambda: open_source(self.cfg))

    @property
    def device(self):
        from ddpipe.train import apply_threads, resolve_device

        def make():
            apply_threads(self.cfg.runtime)
            return resolve_device(self.cfg.runtime.device)

        return self.cached("device", make)


_contexts: dict[str, Context] = {}
_contexts_lock = threading.Lock()


def context_for(cfg: RunConfig) -> Context:
    """One Context per config and process, so shards run in one process share loaded data."""
    key = cfg.model_dump_json()
    with _contexts_lock:
        if key not in _contexts:
            _contexts[key] = Context(cfg)
        return _contexts[key]


def shard_key(ctx: Context, stage: Stage, shard: Shard, inputs: dict[str, StageManifest]) -> str:
    cfg = ctx.cfg
    payload = {
        "stage": stage.name,
        "shard": shard.model_dump(mode="json"),
        "seed": cfg.seed,
        "config": json.loads(cfg.section_json(*stage.sections)),
        "inputs": {name: inputs[name].sha256 for name in sorted(stage.inputs)},
        "code": stage.code(),
        "fingerprint": stage.fingerprint(ctx) if stage.fingerprint else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read(store: Store, rel: str) -> bytes | None:
    return store.read_bytes(rel) if store.exists(rel) else None


def _valid(store: Store, table, key: str) -> bool:
    if table is None or table.num_rows == 0 or set(table["key"].to_pylist()) != {key}:
        return False
    return all(store.verify(f) for f in files_of(table))


def run_shard(ctx: Context, stage: Stage, shard: Shard, inputs: dict[str, StageManifest]) -> ShardResult:
    """Compute one shard, or reuse its outputs if they are complete and valid for the same key."""
    store = ctx.store
    key = shard_key(ctx, stage, shard, inputs)
    rel = record_path(stage.name, shard.id)
    data = _read(store, rel)
    table = parse_record(data) if data is not None else None
    if _valid(store, table, key):
        record = FileRecord(path=rel, sha256=sha256_bytes(data), bytes=len(data))
        return shard_result(stage.name, shard.id, key, record, table, reused=True)
    # Whatever was there no longer counts as done.
    store.remove(rel)
    store.remove(stage_path(stage.name))
    files = stage.run(ctx, shard, inputs)
    if not files:
        raise ValidationError(f"stage {stage.name} shard {shard.id} wrote no files")
    for f in files:
        if not store.verify(f):
            raise ValidationError(f"output {store.url(f.path)} of stage {stage.name} failed validation")
    table = records_table(stage.name, shard.id, key, files)
    locks.check(store, RUN_LOCK)
    record = store.write_table(rel, table)
    return shard_result(stage.name, shard.id, key, record, table, reused=False)


def finalize_stage(ctx: Context, stage: Stage, shards: list[Shard], results: list[ShardResult]) -> StageManifest:
    """Check every planned shard is done and its files are present, then write the stage manifest."""
    store = ctx.store
    done = {r.shard: r for r in results}
    missing = [s.id for s in shards if s.id not in done]
    if missing:
        raise ValidationError(f"stage {stage.name}: shard {missing[0]} is not done")
    records = []
    for s in shards:
        data = _read(store, done[s.id].record)
        if data is None or sha256_bytes(data) != done[s.id].sha256:
            raise ValidationError(f"stage {stage.name}: record of shard {s.id} is missing or changed")
        records.append(parse_record(data))
    files = [f for table in records for f in files_of(table)]
    sizes = store.sizes_of([f.path for f in files])
    for f in files:
        if sizes.get(f.path) != f.bytes:
            raise ValidationError(f"stage {stage.name}: output {store.url(f.path)} is missing or changed")
    locks.check(store, RUN_LOCK)
    return write_stage_manifest(store, stage.name, records)


def make_plan(ctx: Context, stages: list[Stage], num_classes: int) -> dict[str, list[Shard]]:
    """Split every stage into shards; written to manifests/plan.parquet (what ``status`` counts against)."""
    plan = {s.name: s.plan(ctx, num_classes) for s in stages}
    rows = [(stage, s.id, s.classes) for stage, shards in plan.items() for s in shards]
    ctx.store.write_table("manifests/plan.parquet", plan_table(rows), if_changed=True)
    return plan


def flow_task_runs(plan: dict[str, list[Shard]]) -> int:
    """Task runs one ``distill`` flow run makes for ``plan``: a task per shard, a finalize task per stage, and
    the prepare, plan and report tasks (flows/distill.py)."""
    return sum(len(shards) + 1 for shards in plan.values()) + 3


def prepare(ctx: Context) -> str:
    """Check the store is writable, remove temporary files that a killed run left, write the resolved config, and
    return the run folder's token (called with the run lock held).

    The token is a random id written once into ``run.json`` when the folder is created. Orchestrator
    caches add it to their keys, so deleting a run folder also invalidates everything cached for it.
    """
    ctx.store.check_writable()
    ctx.store.remove_temporaries()
    ctx.store.write_bytes("config.yaml", ctx.cfg.to_yaml().encode(), if_changed=True)
    if ctx.store.exists("run.json"):
        info = ctx.store.read_json("run.json")
        if not isinstance(info, dict) or not isinstance(info.get("token"), str):
            raise StoreError(f"{ctx.store.url('run.json')} holds no run token; it was overwritten")
        return info["token"]
    token = uuid.uuid4().hex
    ctx.store.write_bytes("run.json", json.dumps({"run": ctx.cfg.run_name, "token": token}).encode())
    return token


@dataclass
class Driver:
    """How :func:`drive` executes a run's stages: the plain runner (:mod:`ddpipe.runner`) calls this module's
    functions in order; the ``distill`` flow (``flows/distill.py``) makes them Prefect tasks.

    ``shards(stage, shards, inputs)`` yields each shard's :class:`ShardResult` as it finishes (in any order),
    ``finalize(stage, shards, results)`` writes the stage manifest, and ``plan(dataset_manifest)`` splits every
    stage into shards once the dataset stage knows the classes.
    """

    shards: Callable[[Stage, list[Shard], dict[str, StageManifest]], Iterable[ShardResult]]
    finalize: Callable[[Stage, list[Shard], list[ShardResult]], StageManifest]
    plan: Callable[[StageManifest], dict[str, list[Shard]]]


def drive(ctx: Context, stages: list[Stage], driver: Driver,
          until: str | None = None) -> tuple[dict[str, StageManifest], dict[str, float]]:
    """Run (or resume) ``stages`` in order, up to and including ``until`` (default: all of them), shard by shard;
    returns each stage's manifest and seconds. Progress events go to :mod:`ddpipe.progress`."""
    if until is not None:
        stages = stages[:[s.name for s in stages].index(until) + 1]
    manifests: dict[str, StageManifest] = {}
    timings: dict[str, float] = {}
    plan = {stages[0].name: stages[0].plan(ctx, 0)}
    for stage in stages:
        start = time.perf_counter()
        shards = plan[stage.name]
        progress.emit("stage_started", stage.name, len(shards))
        done = {}
        for result in driver.shards(stage, shards, {name: manifests[name] for name in stage.inputs}):
            done[result.shard] = result
            progress.emit("shard_finished", stage.name, result.shard, result.reused)
        manifests[stage.name] = driver.finalize(stage, shards, [done[s.id] for s in shards if s.id in done])
        progress.emit("stage_finished", stage.name)
        if stage is stages[0]:  # the dataset stage knows the classes: now every stage can be planned
            plan = driver.plan(manifests[stage.name])
        timings[stage.name] = time.perf_counter() - start
    return manifests, timings


def status(store: Store) -> list[dict]:
    """Per stage of a run folder: planned shards, done shards, and whether the stage manifest exists."""
    if not store.exists("manifests/plan.parquet"):
        raise ValidationError(f"{store.uri} has no manifests/plan.parquet (not a ddpipe run folder, or not started)")
    plan = store.read_table("manifests/plan.parquet").to_pylist()
    stages: dict[str, list[str]] = {}
    for row in plan:
        stages.setdefault(row["stage"], []).append(row["shard"])
    out = []
    for stage, shards in stages.items():
        present = {name.removesuffix(".parquet") for name in store.list(f"manifests/{stage}")}
        out.append({
            "stage": stage,
            "done": sum(1 for s in shards if s in present),
            "total": len(shards),
            "complete": store.exists(stage_path(stage)),
        })
    return out
