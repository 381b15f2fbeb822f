"""Algorithm packages: check ``algorithm.toml``, pack a directory, unpack an archive.

A package is a directory with an ``algorithm.toml`` at its root (read with tomllib)::

    name = "hello"                   # required, ^[a-z0-9][a-z0-9_.-]{0,63}$
    version = "1.0.0"                # required; letters, digits and ._+- (semver fits)
    command = ["python", "main.py"]  # required, non-empty; paths relative to the package
    cpu = 0.1                        # declared cores, > 0 and <= 1024 (default 0.1)
    memory = 64                      # declared MiB, > 0 and <= 16 TiB (default 64)
    description = "..."              # optional
    args = ["name", "count"]         # optional: the allowed arg names (omit: any)

    [args_schema]                    # optional: a JSON-schema subset checked on deploy
    type = "object"
    required = ["name"]
    additionalProperties = false
    properties.name = {type = "string"}  # string|integer|number|boolean|array|object|null

    [restart]                        # optional
    policy = "on-failure"            # never | on-failure | always
    max_restarts = 5                 # 0 to 1000
    backoff = 0.5                    # seconds before the first restart, doubled each time: 0.1 to 3600
    backoff_max = 30.0               # cap on the delay, >= backoff, at most a day

    [logs]                           # optional: rotation of the algorithm's log on its node
    max_size = 10485760              # bytes it grows to before it is rotated (default DM_LOG_MAX_SIZE, 10 MiB)
    keep = 3                         # rotated copies kept, <log>.1 ... (default DM_LOG_KEEP, 3)

    [env]                            # optional, string -> string; DM_* is reserved
    GREETING = "hi"

    [disconnect]                     # optional: a node cut off from the control plane
    keep_for = 30                    # seconds it keeps this running cut off (default 0; "2h" too); the
                                     # control plane waits as long before it places it elsewhere

    [limits]                         # optional: what the node holds it to (see docs/operations.md)
    memory = 80                      # MiB (default: memory x DM_MEMORY_HEADROOM)
    cpu = 0.5                        # cores of cpu quota (default: cpu)
    cpu_hard_limit = true            # false: cpu shares only, it may use idle cores
    pids = 256                       # most processes at once (default DM_PIDS_LIMIT)

``command[0]`` is ``python``/``python3`` (the node runs its own interpreter), an
absolute path, or a file in the package; a script after ``python`` must be in the
package too. An archive is a deterministic gzip tar (sorted, mtime 0, owner 0, no
``__pycache__``/``.pyc``/``.git``) named by its sha256. Unpacking refuses absolute
paths, ``..``, links that escape, devices and fifos, and is atomic: a temp directory
beside ``dest`` is renamed into place, so a failed unpack leaves nothing behind.

Packing and unpacking alike hold an archive to :data:`MAX_MEMBERS` members, names of at
most :data:`MAX_NAME_PART` bytes a component and :data:`MAX_NAME` in all, and
:data:`MAX_DEPTH` directories deep; both stop at the first member past a bound, so a
hostile archive costs no more to refuse than one at the limit.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import tomllib
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dm.envconf import parse_duration
from dm.errors import BadPackage, InvalidArgs
from dm.models import RESTART_POLICIES, AlgorithmSpec, Demand, RestartPolicy

#: the file every package has at its root
SPEC_FILE = "algorithm.toml"
#: the largest archive pack() builds and unpack() accepts
MAX_ARCHIVE_BYTES = 64 * 1024 * 1024
#: the largest total of file sizes in an archive (a gzip bomb stops here)
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
#: the most members (files, directories, links) an archive may have
MAX_MEMBERS = 10_000
#: the longest component of a member's name, in UTF-8 bytes (what Linux file systems take)
MAX_NAME_PART = 255
#: the longest member name, in UTF-8 bytes
MAX_NAME = 1024
#: the most components in a member's name (a/b/c is 3)
MAX_DEPTH = 32
#: the largest declared demand: cores and MiB (16 TiB)
MAX_CPU = 1024
MAX_MEMORY = 16 * 1024 * 1024
#: restart bounds: a backoff under the minimum restarts a crashing algorithm in a busy loop
MAX_RESTARTS = 1000
MIN_BACKOFF = 0.1
MAX_BACKOFF = 3600.0
MAX_BACKOFF_CAP = 86400.0
#: bounds of ``[logs]``: the size a log is rotated at, and the rotated copies kept
MIN_LOG_SIZE = 4096
MAX_LOG_SIZE = 1 << 30
MAX_LOG_KEEP = 100
#: command[0] values the node resolves to its own interpreter
INTERPRETERS = ("python", "python3")

_SKIP_NAMES = ("__pycache__", ".git")
_SKIP_SUFFIXES = (".pyc", ".pyo")
_CORRUPT = (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error)
_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, (list, tuple)),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _match(pattern: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None


def _within(low: float, high: float, *, above: bool = False) -> Callable[[Any], bool]:
    """A number in [low, high] ((low, high] when ``above``), never a bool, NaN or infinity."""

    def check(v: Any) -> bool:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return number and (v > low if above else v >= low) and v <= high

    return check


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) and s for s in v)


def _env(v: Any) -> bool:
    name = _match(r"[A-Za-z_][A-Za-z0-9_]*")
    ok = isinstance(v, dict) and all(name(k) and not k.startswith("DM_") for k in v)
    return ok and all(isinstance(s, str) for s in v.values())


def _properties(v: Any) -> bool:
    keys = {"type", "title", "description", "default"}
    props = list(v.values()) if isinstance(v, dict) else [None]
    dicts = [p for p in props if isinstance(p, dict) and not set(p) - keys]
    return len(dicts) == len(props) and all(p.get("type", "null") in _JSON_TYPES for p in dicts)


#: the longest an algorithm may ask to keep running on a cut-off node (a week)
MAX_KEEP_FOR = 7 * 86400.0


def _duration_within(most: float) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        try:
            return not isinstance(v, bool) and 0 <= parse_duration(v) <= most
        except ValueError:
            return False

    return check


_TABLES = ("restart", "args_schema", "logs", "limits", "disconnect")
_TEXT = (lambda v: isinstance(v, str), "must be a string")
#: each field of algorithm.toml (tables dotted): its check and what it must be
_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_match(r"[a-z0-9][a-z0-9_.-]{0,63}"), "must be 1-64 of a-z 0-9 _ . -"),
    "version": (_match(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}"), 'must be like "1.0.0"'),
    "command": (lambda v: _strings(v) and bool(v), 'must be like ["python", "main.py"]'),
    "cpu": (_within(0, MAX_CPU, above=True), f"must be a number of cores > 0 and <= {MAX_CPU}"),
    "memory": (_within(0, MAX_MEMORY, above=True), f"must be a number of MiB > 0 and <= {MAX_MEMORY} (16 TiB)"),
    "description": _TEXT,
    "args": (_strings, 'must be a list of arg names like ["name", "count"]'),
    "env": (_env, "must map names (letters, digits, _; not DM_*) to strings"),
    "restart": (lambda v: isinstance(v, dict), "must be a table: [restart]"),
    "restart.policy": (lambda v: v in RESTART_POLICIES, "must be never, on-failure or always"),
    "restart.max_restarts": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_RESTARTS,
        f"must be a whole number from 0 to {MAX_RESTARTS}",
    ),
    "restart.backoff": (
        _within(MIN_BACKOFF, MAX_BACKOFF),
        f"must be a number of seconds from {MIN_BACKOFF:g} to {MAX_BACKOFF:g}",
    ),
    "restart.backoff_max": (
        _within(MIN_BACKOFF, MAX_BACKOFF_CAP),
        f"must be a number of seconds from {MIN_BACKOFF:g} to {MAX_BACKOFF_CAP:g} (a day)",
    ),
    "logs": (lambda v: isinstance(v, dict), "must be a table: [logs]"),
    "logs.max_size": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and MIN_LOG_SIZE <= v <= MAX_LOG_SIZE,
        f"must be a whole number of bytes from {MIN_LOG_SIZE} to {MAX_LOG_SIZE} (1 GiB)",
    ),
    "logs.keep": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LOG_KEEP,
        f"must be a whole number of rotated logs from 0 to {MAX_LOG_KEEP}",
    ),
    "disconnect": (lambda v: isinstance(v, dict), "must be a table: [disconnect]"),
    "disconnect.keep_for": (
        _duration_within(MAX_KEEP_FOR),
        f"must be seconds (or 30s, 5m, 2h) from 0 to {MAX_KEEP_FOR:g}",
    ),
    "limits": (lambda v: isinstance(v, dict), "must be a table: [limits]"),
    "limits.memory": (_within(0, MAX_MEMORY, above=True), f"must be a number of MiB > 0 and <= {MAX_MEMORY}"),
    "limits.cpu": (_within(0, MAX_CPU, above=True), f"must be a number of cores > 0 and <= {MAX_CPU}"),
    "limits.cpu_hard_limit": (lambda v: isinstance(v, bool), "must be true or false"),
    "limits.pids": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "must be a whole number > 0"),
    "args_schema": (lambda v: isinstance(v, dict), "must be a table: [args_schema]"),
    "args_schema.type": (lambda v: v == "object", 'must be "object" (args are an object)'),
    "args_schema.properties": (
        _properties,
        'must map arg names to tables like {type = "string"} (keys: type, title, description, default)',
    ),
    "args_schema.required": (_strings, "must be a list of arg names"),
    "args_schema.additionalProperties": (
        lambda v: isinstance(v, bool),
        "must be true or false",
    ),
    "args_schema.title": _TEXT,
    "args_schema.description": _TEXT,
    "args_schema.$schema": _TEXT,
}


def load_spec(directory: Path) -> AlgorithmSpec:
    """Read and check ``directory/algorithm.toml``; BadPackage says what to fix."""
    if not directory.is_dir():
        raise BadPackage(f"{directory} is not a directory: give an algorithm package")
    path = directory / SPEC_FILE
    if not path.is_file():
        raise BadPackage(f"{directory} has no {SPEC_FILE}: every algorithm package needs one (see README)")
    spec = _parse(path.read_bytes(), str(path))
    _check_files(spec, str(path), lambda rel: (directory / rel).exists())
    return spec


def pack(directory: Path) -> tuple[bytes, str]:
    """Check the package and build its archive: (gzip tar bytes, sha256 hex)."""
    load_spec(directory)
    root = directory.resolve()
    buf = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for count, path in enumerate(_walk(root), start=1):
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            problem = _bounds_problem(info.name, count)
            if problem:
                raise BadPackage(f"{directory}: {_short(info.name)!r} {problem} ({_BOUNDS_HINT})")
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            st = path.lstat()
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(root):
                    msg = f"the symlink {info.name!r} points outside the package; copy the file in instead"
                    raise BadPackage(f"{directory}: {msg}")
                info.type, info.mode = tarfile.SYMTYPE, 0o777
                info.linkname = os.path.relpath(target, path.parent)
                tar.addfile(info)
            elif stat.S_ISDIR(mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif stat.S_ISREG(mode):
                info.mode = 0o755 if mode & 0o111 else 0o644
                info.size = st.st_size
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                raise BadPackage(f"{directory}: remove {info.name!r}, a special file")
            if buf.tell() > MAX_ARCHIVE_BYTES:
                break
    data = buf.getvalue()
    if len(data) > MAX_ARCHIVE_BYTES:
        msg = "keep data sets out of the package and fetch them at run time"
        raise BadPackage(f"{directory}: the archive passes {MAX_ARCHIVE_BYTES >> 20} MiB; {msg}")
    return data, hashlib.sha256(data).hexdigest()


def read_spec_from_archive(data: bytes) -> AlgorithmSpec:
    """Read and check the ``algorithm.toml`` inside an archive, in memory."""
    source = f"{SPEC_FILE} in the archive"
    with _open(data) as tar:
        members = _members(tar)
        found = [m for name, m in members if name == SPEC_FILE and m.isreg()]
        if not found or found[-1].size > 1 << 20:
            raise BadPackage(f"the archive has no {SPEC_FILE} (or a huge one) at its root")
        try:
            raw = (tar.extractfile(found[-1]) or io.BytesIO()).read()
        except _CORRUPT as exc:
            raise BadPackage(f"{source} cannot be read: {exc}") from exc
    spec = _parse(raw, source)
    names = {name for name, _ in members}
    dirs = {posixpath.dirname(name) for name in names}
    _check_files(spec, source, lambda rel: rel in names or rel in dirs)
    return spec


def unpack(data: bytes, dest: Path, sha256: str | None = None) -> Path:
    """Verify and extract an archive to ``dest`` atomically (existing ``dest``: a hit)."""
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            msg = "the download is corrupt or the record is wrong; fetch it again"
            raise BadPackage(f"the archive's sha256 is {actual}, expected {sha256}: {msg}")
    if dest.exists():
        return dest
    with _open(data) as tar:
        plan = _check_members(_members(tar))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            tmp.chmod(0o755)
            _extract(tar, plan, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        tmp.rename(dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.is_dir():
            raise
        # another unpacker of the same archive won the race: use its copy
    return dest


def validate_args(spec: AlgorithmSpec, args: dict[str, Any]) -> None:
    """Raise InvalidArgs unless ``args`` fit the spec's ``args`` and ``args_schema``."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise InvalidArgs(f"args for {spec.name} must be an object with string keys")
    try:
        json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgs(f"args for {spec.name} must be JSON: {exc}") from exc
    problems = []
    unknown = sorted(set(args) - set(spec.args or ()))
    if spec.args is not None and unknown:
        allowed = ", ".join(spec.args) or "none"
        problems.append(f"unknown arg(s) {', '.join(unknown)} (allowed: {allowed})")
    schema = spec.args_schema or {}
    props: dict[str, Any] = schema.get("properties") or {}
    for key in schema.get("required") or []:
        if key not in args:
            problems.append(f"missing required arg {key!r}")
    for key, value in args.items():
        kind = (props.get(key) or {}).get("type")
        if key not in props and schema.get("additionalProperties", True) is False:
            allowed = ", ".join(sorted(props)) or "none"
            problems.append(f"unknown arg {key!r} (allowed: {allowed})")
        elif kind in _JSON_TYPES and not _JSON_TYPES[kind](value):
            problems.append(f"arg {key!r} must be of type {kind}, got {value!r}")
    if problems:
        raise InvalidArgs(f"invalid args for {spec.name}: " + "; ".join(problems))


def _parse(raw: bytes, source: str) -> AlgorithmSpec:
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadPackage(f"{source}: not valid TOML: {exc}") from exc
    for key in ("name", "version", "command"):
        if key not in doc:
            raise BadPackage(f"{source}: {key!r} is required; add it (see README)")
    tables = [("", doc)] + [(f"{k}.", v) for k, v in doc.items() if k in _TABLES]
    for prefix, table in tables:
        for key, value in table.items():
            check, what = _FIELDS.get(prefix + key, (None, ""))
            if check is None:
                known = [f for f in _FIELDS if f.startswith(prefix) and "." not in f[len(prefix) :]]
                raise BadPackage(
                    f"{source}: unknown field '{prefix}{key}'; the known ones there are {', '.join(known)}"
                )
            if not check(value):
                raise BadPackage(f"{source}: '{prefix}{key}' {what}, got {value!r}")
    restart = doc.get("restart", {})
    policy = RestartPolicy.from_dict(restart)
    if "backoff_max" not in restart:
        policy = RestartPolicy.from_dict({**restart, "backoff_max": max(30.0, policy.backoff)})
    if policy.backoff_max < policy.backoff:
        raise BadPackage(f"{source}: 'restart.backoff_max' must be >= 'restart.backoff'")
    args = doc.get("args")
    return AlgorithmSpec(
        name=doc["name"],
        version=doc["version"],
        command=tuple(doc["command"]),
        demand=Demand.from_dict(doc),
        restart=policy,
        env=dict(doc.get("env", {})),
        args=tuple(dict.fromkeys(args)) if args is not None else None,
        args_schema=doc.get("args_schema"),
        description=doc.get("description", ""),
        limits=dict(doc.get("limits", {})),
        keep_for=parse_duration((doc.get("disconnect") or {}).get("keep_for", 0)),
    )


def _check_files(spec: AlgorithmSpec, source: str, exists: Callable[[str], bool]) -> None:
    command = spec.command
    if command[0] not in INTERPRETERS:
        paths = command[:1]
    elif len(command) > 1 and not command[1].startswith("-"):
        paths = command[1:2]  # the script python runs
    else:
        paths = ()
    for path in paths:
        rel = posixpath.normpath(path)
        if not posixpath.isabs(path) and (_escapes("", path) or not exists(rel)):
            msg = "add it or fix the path (relative to the package)"
            raise BadPackage(f"{source}: 'command' runs {path!r}, which is not in the package; {msg}")


def _walk(directory: Path) -> Iterator[Path]:
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name in _SKIP_NAMES or entry.name.endswith(_SKIP_SUFFIXES):
            continue
        yield Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path))


_BOUNDS_HINT = (
    f"a package may hold at most {MAX_MEMBERS:,} files and directories, {MAX_DEPTH} levels deep, with names "
    f"of at most {MAX_NAME_PART} bytes a component and {MAX_NAME} in all; keep data sets out of it"
)


def _bounds_problem(name: str, count: int) -> str | None:
    """What is wrong with member number ``count`` named ``name`` (normalized), if anything."""
    if count > MAX_MEMBERS:
        return f"is member number {count:,}, past the limit of {MAX_MEMBERS:,}"
    parts = name.split("/")
    if len(parts) > MAX_DEPTH:
        return f"is {len(parts)} levels deep, past the limit of {MAX_DEPTH}"
    longest = max(len(part.encode("utf-8", "surrogateescape")) for part in parts)
    if longest > MAX_NAME_PART:
        return f"has a name component of {longest} bytes, past the limit of {MAX_NAME_PART}"
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME:
        return f"has a name of {size} bytes, past the limit of {MAX_NAME}"
    return None


def _short(name: str, keep: int = 60) -> str:
    """A name cut for a message: a 4,000-character path says nothing more than its start."""
    return name if len(name) <= keep else f"{name[:keep]}... ({len(name)} characters)"


def _open(data: bytes) -> tarfile.TarFile:
    if len(data) > MAX_ARCHIVE_BYTES:
        raise BadPackage(f"the archive passes {MAX_ARCHIVE_BYTES >> 20} MiB")
    try:
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except _CORRUPT as exc:
        raise BadPackage(f"not a gzip tar archive: {exc}") from exc


def _members(tar: tarfile.TarFile) -> list[tuple[str, tarfile.TarInfo]]:
    """Each member with its normalized name ('./a//b' -> 'a/b'), read one at a time so that
    an archive past a bound is refused at its first member past it, not after reading all."""
    members: list[tuple[str, tarfile.TarInfo]] = []
    try:
        while (m := tar.next()) is not None:
            name = "/".join(p for p in m.name.split("/") if p not in ("", "."))
            problem = _bounds_problem(name or m.name, len(members) + 1)
            if problem:
                raise BadPackage(f"archive member {_short(m.name)!r} {problem}: refused ({_BOUNDS_HINT})")
            members.append((name, m))
    except _CORRUPT as exc:
        raise BadPackage(f"the archive is truncated or corrupt: {exc}") from exc
    return members


def _check_members(
    members: list[tuple[str, tarfile.TarInfo]],
) -> list[tuple[str, tarfile.TarInfo]]:
    """The members to extract, in order; BadPackage names the first unsafe one."""
    seen: dict[str, tarfile.TarInfo] = {}
    links = {name for name, m in members if m.issym()}
    for name, m in members:
        problem = _member_problem(name, m, seen, links)
        if problem:
            raise BadPackage(f"archive member {_short(m.name)!r} {problem}: refused as unsafe")
        seen[name] = m
    if sum(m.size for m in seen.values() if m.isreg()) > MAX_UNPACKED_BYTES:
        raise BadPackage(f"the archive unpacks to over {MAX_UNPACKED_BYTES >> 20} MiB")
    return [(name, m) for name, m in members if name]


def _member_problem(name: str, m: tarfile.TarInfo, seen: dict[str, tarfile.TarInfo], links: set[str]) -> str | None:
    parts = name.split("/")
    if m.name.startswith("/") or ".." in m.name.split("/"):
        return "has an absolute path or a '..' component"
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        return "is a device, fifo or other special file"
    if not name and not m.isdir():
        return "has an empty name"
    if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
        return "lies under a symlink"
    if m.issym() and _escapes(posixpath.dirname(name), m.linkname):
        return f"is a symlink to {m.linkname!r}, outside the package"
    target = seen.get(posixpath.normpath(m.linkname)) if m.islnk() else None
    if m.islnk() and (_escapes("", m.linkname) or not (target and target.isreg())):
        return f"is a hard link to {m.linkname!r}, not an earlier file of the package"
    if name in seen and not (m.isdir() and seen[name].isdir()):
        return "appears twice"
    return None


def _escapes(base: str, link: str) -> bool:
    rel = posixpath.normpath(posixpath.join(base, link))
    return posixpath.isabs(link) or rel == ".." or rel.startswith("../")


def _extract(tar: tarfile.TarFile, plan: list[tuple[str, tarfile.TarInfo]], root: Path) -> None:
    symlinks: list[tuple[Path, tarfile.TarInfo]] = []
    for name, m in plan:
        path = root / name
        try:
            if m.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if m.issym():
                symlinks.append((path, m))  # made last: nothing is written through one
            elif m.islnk():
                os.link(root / posixpath.normpath(m.linkname), path)
            else:
                with path.open("xb") as out:
                    shutil.copyfileobj(tar.extractfile(m) or io.BytesIO(), out)
                path.chmod(0o755 if m.mode & 0o111 else 0o644)
        except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
            raise BadPackage(f"archive member {m.name!r} cannot be extracted: {exc}") from exc
        except _CORRUPT as exc:
            raise BadPackage(f"archive member {m.name!r} is corrupt: {exc}") from exc
    for path, m in symlinks:
        path.symlink_to(m.linkname)
    real_root = Path(os.path.realpath(root))
    for path, m in symlinks:  # once all exist, so chains of links resolve too
        if not Path(os.path.realpath(path)).is_relative_to(real_root):
            msg = f"is a symlink to {m.linkname!r}, outside the package: refused as unsafe"
            raise BadPackage(f"archive member {m.name!r} {msg}")
