"""Where a run's outputs go (``run.storage``) and how its inputs reach every node.

``run.storage`` is a local path or a URI that ``pyarrow.fs.FileSystem.from_uri`` opens
(``file://``, ``s3://``, ``gs://``, ...), as Ray Train's ``storage_path`` is. A run writes
everything under ``<storage>/<run.name>``:

- the driver writes its small files (config, metrics, results, samples) through
  ``RunStorage``: directly for a path; for a URI into a local mirror, each file uploaded
  whole after it changes;
- actors never write relative to their working directory. For a path they write to the
  absolute path (a shared filesystem on a cluster); for a URI they write to a node-local
  staging directory and an ``Upload`` (a picklable callable the learner calls on its own
  node) copies the bytes to storage. ``Download`` stages a checkpoint down the same way.

Before any actor starts, ``prepare`` makes every input path absolute against the driver's
working directory, stages model URIs once per node (``MODEL_CACHE``, the same absolute path
on every node), reads data URIs on the driver, and asks every alive node whether it can
read the model paths and a marker the driver wrote into storage (``check_nodes``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.stages import StageError

log = logging.getLogger(__name__)

STAGING = Path(tempfile.gettempdir()) / "r1lab-staging"
MODEL_CACHE = Path(tempfile.gettempdir()) / "r1lab-models"
PROBE_DEADLINE_S = 60.0
COMPLETE = ".r1lab-complete"  # written last into a staged model: a half download is never used
SHARED_FIX = ("use a path every node mounts (e.g. the PVC in deploy/pvc.yaml, mounted at /data) "
              "or an object-store URI (s3://..., gs://...)")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class StorageError(StageError):
    """A storage location or input path is wrong for this cluster; the message says the fix."""


# -- locations --------------------------------------------------------------------------------


def is_uri(location: str | Path) -> bool:
    return _URI.match(str(location)) is not None


def absolute(location: str | Path, cwd: Path | None = None) -> str:
    """A URI as given; a local path made absolute against ``cwd`` (the driver's)."""
    text = str(location)
    if is_uri(text):
        return text
    path = Path(text).expanduser()
    return os.path.normpath(path if path.is_absolute() else (cwd or Path.cwd()) / path)


def join(location: str, *parts: str) -> str:
    if is_uri(location):
        return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(location, *parts))


def _key(location: str) -> str:
    return hashlib.sha1(location.encode()).hexdigest()[:16]


def _fs(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad URI
        raise StorageError(f"cannot open {uri}: {err}; give a URI pyarrow.fs understands "
                           "(file:///abs/path, s3://bucket/prefix, gs://bucket/prefix)") from None


def filesystem(location: str):
    """``(pyarrow FileSystem, path)`` for a URI or a local path."""
    if is_uri(location):
        return _fs(location)
    from pyarrow import fs

    return fs.LocalFileSystem(), location


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    from pyarrow import fs

    filesystem, path = _fs(location)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def copy_dir(source: str, destination: str) -> None:
    """Copy the contents of directory ``source`` into ``destination`` (either may be a URI)."""
    from pyarrow import fs

    src_fs, src = _fs(source) if is_uri(source) else (fs.LocalFileSystem(), source)
    dst_fs, dst = _fs(destination) if is_uri(destination) else (fs.LocalFileSystem(), destination)
    dst_fs.create_dir(dst, recursive=True)
    fs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def move(source: str, destination: str) -> None:
    """Rename a folder or file (on a store without renames: copy, then delete)."""
    if not is_uri(source):
        os.replace(source, destination)
        return
    filesystem_, src = _fs(source)
    try:
        filesystem_.move(src, _fs(destination)[1])
    except (OSError, NotImplementedError):
        copy_dir(source, destination)
        filesystem_.delete_dir(src)


def copy_file(source: str, destination: str) -> None:
    from pyarrow import fs

    src_fs, src = _fs(source) if is_uri(source) else (fs.LocalFileSystem(), source)
    dst_fs, dst = _fs(destination) if is_uri(destination) else (fs.LocalFileSystem(), destination)
    dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
    fs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def staging_dir(*parts: str) -> Path:
    """A node-local absolute directory for bytes on their way to or from storage."""
    return STAGING.joinpath(*parts)


# -- what actors are handed -------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """Called on the node that wrote ``local``: copies it into ``remote``, then frees the
    node's disk. Picklable, so a learner rank gets it as an argument and imports nothing."""

    local: str
    remote: str

    def __call__(self) -> None:
        copy_dir(self.local, self.remote)
        shutil.rmtree(self.local, ignore_errors=True)


@dataclass(frozen=True)
class Download:
    """Called on the node that will read ``local``: copies ``remote`` there first."""

    remote: str
    local: str

    def __call__(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)
        copy_dir(self.remote, self.local)


# -- the run's storage ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStorage:
    """``<run.storage>/<run.name>``: ``root`` is its absolute path or URI; ``local`` the
    directory the driver writes its files to (``root`` itself, or a mirror for a URI)."""

    root: str
    local: Path

    @classmethod
    def of(cls, storage: str, name: str, cwd: Path | None = None) -> RunStorage:
        root = join(absolute(storage, cwd), name)
        return cls(root, staging_dir(_key(root), "driver") if is_uri(root) else Path(root))

    @property
    def is_uri(self) -> bool:
        return is_uri(self.root)

    def location(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _publish(self, name: str) -> None:
        if self.is_uri:
            copy_file(str(self.local / name), self.location(name))

    def write_text(self, name: str, text: str) -> Path:
        """Write ``name`` whole (atomically: a reader never sees half of it)."""
        return self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``name`` whole (atomically: a reader never sees half of it)."""
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        self._publish(name)
        return path

    def append(self, name: str, text: str) -> None:
        """Add ``text`` to the end of ``name``; a write that fails (a full disk) is undone,
        so the file keeps its earlier complete rows."""
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode()
        with path.open("ab", buffering=0) as f:  # unbuffered: a failed write is undone before any flush
            size = f.seek(0, os.SEEK_END)
            try:
                done = 0
                while done < len(data):
                    done += f.write(data[done:])
            except OSError:
                f.truncate(size)
                raise
        self._publish(name)

    def remove(self, name: str) -> None:
        """Delete ``name`` (a file or folder) from storage, and the driver's copy; no error
        when it is absent."""
        from pyarrow import fs

        local = self.local / name
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)
        if self.is_uri:
            filesystem_, path = _fs(self.location(name))
            kind = filesystem_.get_file_info(path).type
            if kind == fs.FileType.Directory:
                filesystem_.delete_dir(path)
            elif kind == fs.FileType.File:
                filesystem_.delete_file(path)

    def replace_dir(self, source: str, name: str) -> None:
        """Make the complete folder ``source`` the folder ``name``: an earlier ``name`` is
        renamed away first and deleted only once ``source`` took its place."""
        old = f"{name}.old-{uuid.uuid4().hex[:8]}"
        had = self.exists(name)
        if had:
            move(self.location(name), self.location(old))
        move(self.location(source), self.location(name))
        if had:
            self.remove(old)

    def pull(self, name: str) -> Path:
        """The driver's copy of ``name``, fetched from a URI if storage holds it."""
        path = self.local / name
        if self.is_uri:
            if exists(self.location(name)):
                copy_file(self.location(name), str(path))
            else:
                path.unlink(missing_ok=True)  # an earlier run's mirror is not this storage's content
        return path

    def read_text(self, name: str) -> str | None:
        path = self.pull(name)
        return path.read_text() if path.exists() else None

    def read_bytes(self, name: str) -> bytes | None:
        path = self.pull(name)
        return path.read_bytes() if path.exists() else None

    def exists(self, name: str) -> bool:
        return exists(self.location(name))

    def put_dir(self, local_dir: Path, name: str) -> None:
        """Copy the contents of ``local_dir`` on the driver into ``name`` in storage."""
        copy_dir(str(local_dir), self.location(name))

    def get_dir(self, name: str, local_dir: Path) -> Path:
        copy_dir(self.location(name), str(local_dir))
        return local_dir

    def save_pretrained(self, obj: Any, name: str) -> None:
        """``obj.save_pretrained`` (a tokenizer) into ``name`` in storage, from the driver."""
        if not self.is_uri:
            obj.save_pretrained(self.location(name))
            return
        with tempfile.TemporaryDirectory() as tmp:
            obj.save_pretrained(tmp)
            self.put_dir(Path(tmp), name)

    def writer(self, name: str, *, rank: int = 0) -> tuple[str, Upload | None]:
        """Where an actor writes ``name`` (an absolute path on its node) and what it calls
        after writing (None: it wrote to storage itself)."""
        if not self.is_uri:
            return self.location(name), None
        local = staging_dir(_key(self.root), f"rank-{rank}-{uuid.uuid4().hex[:8]}", name)
        return str(local), Upload(str(local), self.location(name))

    def reader(self, name: str, *, rank: int = 0) -> tuple[str, Download | None]:
        """Where an actor reads ``name`` from and what it calls first (None: read it in place)."""
        if not self.is_uri:
            return self.location(name), None
        local = staging_dir(_key(self.root), f"rank-{rank}-{uuid.uuid4().hex[:8]}", name)
        return str(local), Download(self.location(name), str(local))


def for_run(run) -> RunStorage:
    """The storage of ``run`` (a ``RunConfig``), resolved on this (the driver's) machine."""
    check_location(run.storage)
    return RunStorage.of(run.storage, run.name)


# -- inside a Ray job -------------------------------------------------------------------------


def job_working_dir() -> str | None:
    """The working directory Ray copied for this job, if this process runs in one."""
    cwd = os.getcwd()
    if "/runtime_resources/working_dir_files/" in cwd + "/":
        return cwd
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job:
        try:
            env = json.loads(job).get("runtime_env") or {}
        except ValueError:
            env = {}
        if env.get("working_dir"):
            return cwd
    return None


def check_location(storage: str) -> None:
    """Refuse a relative ``run.storage`` inside a Ray job's copy of its working directory."""
    if is_uri(storage) or Path(storage).expanduser().is_absolute():
        return
    where = job_working_dir()
    if where is not None:
        raise StorageError(
            f"run.storage={storage} is relative, and this runs as a Ray job in Ray's copy of its "
            f"working directory ({where}), which Ray deletes with the session: give an absolute path "
            f"every node mounts or a URI ({SHARED_FIX}); on a single machine, run.storage=$PWD/runs")


# -- inputs -----------------------------------------------------------------------------------


def looks_like_hub_id(value: str) -> bool:
    """"org/name" that names no local path: a Hugging Face hub id, left as given."""
    return (not is_uri(value) and value.count("/") == 1 and not value.startswith((".", "/", "~"))
            and not Path(value).exists())


def resolve_input(value: str, *, model: bool = False) -> str:
    """A path made absolute against the driver's working directory; a URI (and for a model,
    a hub id) as given."""
    if is_uri(value) or (model and looks_like_hub_id(value)):
        return value
    return absolute(value)


def _fingerprint(uri: str) -> str:
    """Names, sizes and modification times under ``uri``: new content, a new cache entry."""
    from pyarrow import fs

    filesystem, path = _fs(uri)
    infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True, allow_not_found=True))
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == fs.FileType.File)
    return _key(uri + json.dumps(listing))


def model_cache_path(uri: str) -> str:
    """Where a model URI's current content is staged: the same absolute path on every node."""
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return str(MODEL_CACHE / _fingerprint(uri) / name)


def stage_model(uri: str, local: str) -> str:
    """Download model ``uri`` into ``local`` (this node's cache) once: a file lock makes
    concurrent callers on one node wait for the first. Returns ``local``."""
    target = Path(local)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / COMPLETE).exists():
            tmp = target.with_name(target.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            copy_dir(uri, str(tmp))
            shutil.rmtree(target, ignore_errors=True)
            tmp.replace(target)
            (target / COMPLETE).touch()
    return local


def stage_data(uri: str) -> str:
    """Read a data URI on the driver: a file is downloaded whole, a folder copied."""
    from pyarrow import fs

    filesystem, path = _fs(uri)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise StorageError(f"data {uri} does not exist")
    local = staging_dir("data", _key(uri), uri.rstrip("/").rsplit("/", 1)[-1])
    if info.type == fs.FileType.Directory:
        shutil.rmtree(local, ignore_errors=True)
        copy_dir(uri, str(local))
    else:
        copy_file(uri, str(local))
    return str(local)


# -- every node can read what it will read ----------------------------------------------------


@dataclass(frozen=True)
class NodeProbe:
    """What one node found: ``missing`` the paths it cannot read; ``error`` set when it did
    not answer."""

    node_id: str
    ip: str
    missing: tuple[str, ...] = ()
    error: str | None = None


def _probe(paths: Sequence[str]) -> NodeProbe:
    import ray

    ctx = ray.get_runtime_context()
    return NodeProbe(ctx.get_node_id(), ray.util.get_node_ip_address(),
                     tuple(p for p in paths if not exists(p)))


def probe_nodes(paths: Sequence[str], deadline_s: float = PROBE_DEADLINE_S) -> list[NodeProbe]:
    """One tiny task pinned to each alive node: which of ``paths`` it cannot read."""
    import ray

    from orchestrator import placement

    nodes = [n for n in ray.nodes() if n["Alive"]]
    task = ray.remote(max_retries=0)(_probe)
    refs = [task.options(**placement.on_node_options(n["NodeID"])).remote(list(paths)) for n in nodes]
    ray.wait(refs, num_returns=len(refs), timeout=deadline_s)
    out = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            out.append(ray.get(ref, timeout=0))
        except Exception as err:  # noqa: BLE001 - a node that cannot answer is reported, not fatal here
            ray.cancel(ref, force=True)
            out.append(NodeProbe(node["NodeID"], node["NodeManagerAddress"],
                                 error=f"did not answer within {deadline_s:.0f} s ({type(err).__name__})"))
    return out


def check_nodes(probes: Sequence[NodeProbe], *, marker: str, storage_root: str, inputs: dict[str, str]) -> None:
    """Refuse a run a node cannot serve: a model path it cannot read (``inputs``: path ->
    the setting that named it), or a storage marker it cannot see (node-local storage)."""
    lines = []
    for p in probes:
        who = f"node {p.node_id} ({p.ip})"
        if p.error is not None:
            lines.append(f"  {who} {p.error}")
            continue
        for path in p.missing:
            if path == marker:
                lines.append(f"  {who} cannot see run.storage {storage_root} (it wrote {marker} "
                             "from the driver): the storage is local to the driver's machine")
            else:
                lines.append(f"  {who} cannot read {inputs.get(path, 'input')} {path}")
    if lines:
        raise StorageError("these nodes cannot serve this run:\n" + "\n".join(lines)
                           + f"\nfix: {SHARED_FIX}; every node must read the inputs and write run.storage")


def check_cluster(run: RunStorage, model_inputs: dict[str, str]) -> None:
    """Ask every alive node (Ray must be connected) whether it reads the model paths
    (``model_inputs``: local path -> setting) and sees a marker written into storage."""
    name = f".r1lab-storage-check-{uuid.uuid4().hex[:12]}"
    run.write_text(name, "written by the driver; every node must see it\n")
    marker = run.location(name)
    try:
        probes = probe_nodes([*model_inputs, marker])
    finally:
        _remove(run, name)
    check_nodes(probes, marker=marker, storage_root=run.root, inputs=model_inputs)


def _remove(run: RunStorage, name: str) -> None:
    (run.local / name).unlink(missing_ok=True)
    if not any(run.local.iterdir()):
        run.local.rmdir()  # the check made the folder: no run directory before pre-flight passed
    if run.is_uri:
        filesystem, path = _fs(run.location(name))
        try:
            filesystem.delete_file(path)
        except OSError:
            pass


def stage_models_on_nodes(uris: Sequence[tuple[str, str]]) -> None:
    """Stage each model URI into the same local cache path on every alive node (the driver
    staged its own copy in ``prepare``)."""
    import ray

    from orchestrator import placement

    if not uris:
        return
    task = ray.remote(max_retries=0)(stage_model)
    refs = [task.options(**placement.on_node_options(n["NodeID"])).remote(uri, local)
            for n in ray.nodes() if n["Alive"] for uri, local in uris]
    ray.get(refs)


# -- the driver, before any actor starts ------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """``config``: every input path absolute, URIs as given (what config.yaml records);
    ``local``: the same with model and data URIs replaced by their staged local copies
    (what the stage runs on); ``run``: its storage."""

    config: Any
    local: Any
    run: RunStorage
    model_uris: tuple[tuple[str, str], ...] = ()  # (URI, its cache path on every node)
    model_paths: dict[str, str] = field(default_factory=dict)  # local model path -> its setting

    def write_config(self) -> None:
        import yaml

        self.run.write_text("config.yaml", yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))

    def check_cluster(self) -> None:
        """With Ray connected: stage model URIs on every node, then check that every node
        reads the model paths and sees storage. One node is the driver's own machine
        (a driver joins through a local raylet): nothing to check."""
        import ray

        if sum(1 for n in ray.nodes() if n["Alive"]) <= 1:
            return
        stage_models_on_nodes(self.model_uris)
        check_cluster(self.run, self.model_paths)


def _locations(node: Any, parts: Sequence[str]) -> list[tuple[Any, Any]]:
    """(container, index) of every value the dotted ``parts`` name in a config dump;
    ``*`` is every element of a list. Unset (None) values are skipped."""
    head, rest = parts[0], parts[1:]
    if head == "*":
        keys: Sequence[Any] = range(len(node)) if isinstance(node, list) else []
    else:
        keys = [head] if isinstance(node, dict) and node.get(head) is not None else []
    if not rest:
        return [(node, k) for k in keys]
    return [hit for k in keys for hit in _locations(node[k], rest)]


def _values(node: Any, key: str) -> list[tuple[Any, Any]]:
    """Like ``_locations``, where a value that is a list (``extra_train_paths``) counts element-wise."""
    out = []
    for container, index in _locations(node, key.split(".")):
        value = container[index]
        out += [(value, i) for i in range(len(value))] if isinstance(value, list) else [(container, index)]
    return out


def prepare(cfg: Any, *, models: Sequence[str] = (), data: Sequence[str] = ()) -> Prepared:
    """Resolve ``cfg``'s inputs on the driver, before Ray: ``models`` and ``data`` are the
    dotted settings that name model and data paths (``rewards.reward_models.*.path``).
    A model URI is checked and staged here (the driver reads its tokenizer); a data URI is
    downloaded here (only the driver reads data)."""
    run = for_run(cfg.run)
    raw = cfg.model_dump(mode="json")
    raw["run"]["storage"] = absolute(cfg.run.storage)
    for key in (*models, *data):
        for container, index in _values(raw, key):
            container[index] = resolve_input(str(container[index]), model=key in models)
    config = type(cfg).model_validate(raw)
    model_uris, model_paths = [], {}
    for key in models:
        for container, index in _values(raw, key):
            value = container[index]
            if is_uri(value):
                if not exists(value):
                    raise StorageError(f"{key} {value} does not exist")
                container[index] = stage_model(value, model_cache_path(value))
                model_uris.append((value, container[index]))
            if not looks_like_hub_id(container[index]):
                model_paths[container[index]] = key
    for key in data:
        for container, index in _values(raw, key):
            if is_uri(container[index]):
                container[index] = stage_data(container[index])
    return Prepared(config, type(cfg).model_validate(raw), run, tuple(model_uris), model_paths)
