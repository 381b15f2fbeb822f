"""dm.package: algorithm.toml checks, deterministic packing, safe unpacking, arg checks,
and the example algorithms run as the node runs them. No servers needed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dm import package
from dm.errors import BadPackage, InvalidArgs
from dm.models import AlgorithmSpec
from dm.package import load_spec, pack, read_spec_from_archive, unpack, validate_args

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "algorithms"
EXAMPLE_NAMES = ["hello", "burn", "fail", "service", "crash"]

MINIMAL = 'name = "x"\nversion = "1.0.0"\ncommand = ["python", "main.py"]\n'


def make_package(root: Path, toml: str = MINIMAL, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "algorithm.toml").write_text(toml)
    for name, text in (files if files is not None else {"main.py": "print('hi')\n"}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def make_tar(*members: tuple[str, bytes | str | None, bytes]) -> bytes:
    """An archive from (name, type, data-or-linkname) triples; type None is a regular file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind is None:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.type = kind if isinstance(kind, bytes) else kind.encode()
                info.linkname = payload.decode()
                tar.addfile(info)
    return buf.getvalue()


OK_FILE = ("algorithm.toml", None, MINIMAL.encode())


# --- the examples -----------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_each_example_loads_packs_and_reads_back(name: str) -> None:
    spec = load_spec(EXAMPLES / name)
    assert spec.name == name
    assert spec.command == ("python", "main.py")
    data, sha = pack(EXAMPLES / name)
    assert sha == hashlib.sha256(data).hexdigest()
    assert read_spec_from_archive(data) == spec


def test_example_specs_declare_what_the_brief_says() -> None:
    hello, burn, fail, service, crash = (load_spec(EXAMPLES / n) for n in EXAMPLE_NAMES)
    assert (hello.demand.cpu, hello.demand.memory, hello.restart.policy, hello.args) == (
        0.05,
        32.0,
        "never",
        None,
    )
    assert (burn.demand.cpu, burn.restart.policy, burn.args) == (0.3, "on-failure", ("share", "seconds"))
    assert (fail.restart.max_restarts, fail.restart.backoff, fail.args) == (3, 0.2, ("code",))
    assert (service.demand.cpu, service.restart.policy) == (0.1, "always")
    assert service.args == ("interval", "ledger")
    assert (crash.restart.policy, crash.restart.max_restarts, crash.restart.backoff_max) == (
        "on-failure",
        3,
        1.0,
    )


# --- pack -------------------------------------------------------------------------


def test_pack_is_deterministic_and_skips_caches(tmp_path: Path) -> None:
    # Given the same package twice, the copy with other mtimes and junk caches
    first, _ = pack(EXAMPLES / "hello")
    copy = tmp_path / "hello"
    shutil.copytree(EXAMPLES / "hello", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"junk")
    (copy / "stale.pyc").write_bytes(b"junk")
    (copy / ".git").mkdir()
    (copy / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    os.utime(copy / "main.py", (1_000_000, 1_000_000))
    # When both are packed (twice)
    again, _ = pack(copy)
    # Then the archives are byte-identical
    assert again == first == pack(EXAMPLES / "hello")[0]
    with tarfile.open(fileobj=io.BytesIO(again)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["algorithm.toml", "main.py"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)


def test_pack_keeps_executable_bit_and_inner_symlinks(tmp_path: Path) -> None:
    pkg = make_package(
        tmp_path / "pkg",
        'name = "x"\nversion = "1"\ncommand = ["bin/run"]\n',
        {"bin/run": "#!/bin/sh\necho hi\n", "data/a.txt": "a"},
    )
    (pkg / "bin" / "run").chmod(0o755)
    (pkg / "link.txt").symlink_to("data/a.txt")
    data, sha = pack(pkg)
    dest = unpack(data, tmp_path / "cache" / sha, sha)
    assert os.access(dest / "bin" / "run", os.X_OK)
    assert os.readlink(dest / "link.txt") == "data/a.txt"
    assert (dest / "link.txt").read_text() == "a"


def test_pack_refuses_a_symlink_out_of_the_package(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    (tmp_path / "secret").write_text("s")
    (pkg / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(BadPackage, match="'leak' points outside the package"):
        pack(pkg)


def test_pack_refuses_a_fifo(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg")
    os.mkfifo(pkg / "pipe")
    with pytest.raises(BadPackage, match="'pipe'"):
        pack(pkg)


def test_pack_refuses_an_archive_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(package, "MAX_ARCHIVE_BYTES", 4096)
    pkg = make_package(tmp_path / "pkg", files={"main.py": "", "blob": os.urandom(20000).hex()})
    with pytest.raises(BadPackage, match="passes"):
        pack(pkg)


# --- unpack -----------------------------------------------------------------------


def test_unpack_round_trip_and_cache_hit(tmp_path: Path) -> None:
    data, sha = pack(EXAMPLES / "service")
    dest = tmp_path / "cache" / sha
    assert unpack(data, dest, sha) == dest
    assert (dest / "main.py").read_bytes() == (EXAMPLES / "service" / "main.py").read_bytes()
    assert load_spec(dest) == load_spec(EXAMPLES / "service")
    assert os.listdir(dest.parent) == [sha]  # no temp dir left beside it
    # a second unpack is a cache hit: the existing directory is returned untouched
    (dest / "marker").write_text("kept")
    assert unpack(data, dest, sha) == dest
    assert (dest / "marker").read_text() == "kept"


def test_unpack_refuses_a_sha256_mismatch(tmp_path: Path) -> None:
    data, sha = pack(EXAMPLES / "hello")
    dest = tmp_path / "cache" / "x"
    with pytest.raises(BadPackage, match="sha256"):
        unpack(data, dest, "0" * 64)
    with pytest.raises(BadPackage, match="sha256"):
        unpack(data + b"\0", dest, sha)
    assert not dest.exists()


@pytest.mark.parametrize(
    ("members", "named"),
    [
        ([OK_FILE, ("../evil", None, b"x")], "../evil"),
        ([OK_FILE, ("a/../../evil", None, b"x")], "a/../../evil"),
        ([OK_FILE, ("/abs/path", None, b"x")], "/abs/path"),
        ([OK_FILE, ("passwd", tarfile.SYMTYPE, b"/etc/passwd")], "passwd"),
        ([OK_FILE, ("a", tarfile.SYMTYPE, b"../../x")], "'a'"),
        ([OK_FILE, ("d/a", tarfile.SYMTYPE, b"../../x")], "d/a"),
        ([OK_FILE, ("hl", tarfile.LNKTYPE, b"../../etc/passwd")], "hl"),
        ([OK_FILE, ("hl", tarfile.LNKTYPE, b"/etc/passwd")], "hl"),
        ([OK_FILE, ("hl", tarfile.LNKTYPE, b"not-there")], "hl"),
        ([OK_FILE, ("pipe", tarfile.FIFOTYPE, b"")], "pipe"),
        ([OK_FILE, ("tty", tarfile.CHRTYPE, b"")], "tty"),
        ([OK_FILE, ("disk", tarfile.BLKTYPE, b"")], "disk"),
        # writing through a symlink that looks harmless on its own
        ([OK_FILE, ("sub", tarfile.SYMTYPE, b"."), ("sub/f", None, b"x")], "sub/f"),
        # a chain: s resolves to the root, so s/.. is the root's parent
        (
            [
                OK_FILE,
                ("d1/d2/d3/s", tarfile.SYMTYPE, b"../../.."),
                ("t", tarfile.SYMTYPE, b"d1/d2/d3/s/.."),
            ],
            "'t'",
        ),
        ([OK_FILE, OK_FILE], "algorithm.toml"),
    ],
)
def test_unpack_refuses_unsafe_members_and_leaves_nothing(
    tmp_path: Path, members: list[tuple[str, bytes | None, bytes]], named: str
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(BadPackage) as caught:
        unpack(make_tar(*members), cache / "pkg")
    assert named in str(caught.value)
    assert os.listdir(cache) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x").exists()


def many_members_tar(count: int) -> bytes:
    """A gzip tar of algorithm.toml and ``count`` empty files, built in memory from one
    header template (TarInfo.tobuf per member would take seconds for 200,000)."""
    toml = tarfile.TarInfo(OK_FILE[0])
    toml.size = len(OK_FILE[2])
    raw = bytearray(toml.tobuf(tarfile.USTAR_FORMAT) + OK_FILE[2].ljust(512, b"\0"))
    template = bytearray(tarfile.TarInfo("").tobuf(tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
    base = sum(template)
    for i in range(count):
        name = f"data/{i}".encode()
        block = bytearray(template)
        block[: len(name)] = name
        block[148:156] = b"%06o\0 " % (base + sum(name))
        raw += block
    return gzip.compress(bytes(raw + b"\0" * 1024), compresslevel=1, mtime=0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: many_members_tar(200_000), "is member number 10,001, past the limit of 10,000"),
        (lambda: make_tar(OK_FILE, ("x" * 300, None, b"")), "has a name component of 300 bytes, past the limit of 255"),
        (lambda: make_tar(OK_FILE, ("/".join(["d"] * 2000), None, b"")), "is 2000 levels deep, past the limit of 32"),
        (lambda: make_tar(OK_FILE, ("/".join(["d" * 200] * 6), None, b"")), "has a name of 1205 bytes"),
    ],
    ids=["200k-members", "300-char-name", "2000-deep", "long-path"],
)
def test_unpack_and_read_refuse_archives_past_the_bounds(tmp_path: Path, data: Any, message: str) -> None:
    archive = data()
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(BadPackage, match=message) as caught:
        unpack(archive, cache / "pkg")
    assert "keep data sets out of it" in str(caught.value)  # says what to do
    assert len(str(caught.value)) < 500  # a 4,000-character name is cut in the message
    assert os.listdir(cache) == []  # nothing stored, not even a temp dir
    with pytest.raises(BadPackage, match=message):
        read_spec_from_archive(archive)


def test_unpack_accepts_an_archive_at_the_bounds(tmp_path: Path) -> None:
    deep = "/".join(["d"] * (package.MAX_DEPTH - 1)) + "/" + "f" * 200
    data = make_tar(OK_FILE, ("main.py", None, b""), (deep, None, b"x"))
    assert (unpack(data, tmp_path / "pkg") / deep).read_bytes() == b"x"
    unpack(many_members_tar(package.MAX_MEMBERS - 1), tmp_path / "many")
    assert len(os.listdir(tmp_path / "many" / "data")) == package.MAX_MEMBERS - 1


@contextmanager
def _deep_dirs(root: Path, depth: int) -> Iterator[None]:
    """``depth`` nested directories ``a/a/...`` under ``root`` for the block, made and removed
    relative to open directories (the whole path passes PATH_MAX, and shutil.rmtree recurses
    past Python's limit on it)."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fds[-1])
            fds.append(os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        yield
    finally:
        os.close(fds.pop())
        while fds:
            os.rmdir("a", dir_fd=fds[-1])
            os.close(fds.pop())


def test_pack_refuses_a_package_past_the_bounds(tmp_path: Path) -> None:
    # Given packages past each bound on disk (a 300-byte name cannot exist on Linux file systems)
    many = make_package(tmp_path / "many")
    (many / "data").mkdir()
    for i in range(package.MAX_MEMBERS):
        (many / "data" / str(i)).touch()
    deep = make_package(tmp_path / "deep")
    long = make_package(tmp_path / "long")
    (long / "/".join(["d" * 200] * 6)).mkdir(parents=True)
    with _deep_dirs(deep, 2000):
        # Then each is refused, naming the bound (so nothing reaches the registry)
        for directory, message in [
            (many, "past the limit of 10,000"),
            (deep, "is 33 levels deep, past the limit of 32"),
            (long, "has a name of 1205 bytes, past the limit of 1024"),
        ]:
            with pytest.raises(BadPackage, match=message):
                pack(directory)


def test_unpack_accepts_safe_links(tmp_path: Path) -> None:
    data = make_tar(
        OK_FILE,
        ("./dir/file", None, b"data"),
        ("dir/up", tarfile.SYMTYPE, b"../algorithm.toml"),
        ("hard", tarfile.LNKTYPE, b"dir/file"),
    )
    dest = unpack(data, tmp_path / "pkg")
    assert (dest / "dir" / "up").read_text() == MINIMAL
    assert (dest / "hard").read_bytes() == b"data"


@pytest.mark.parametrize("data", [b"", b"not a tar", b"\x1f\x8b\x08\x00garbage"])
def test_unpack_and_read_refuse_garbage(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(BadPackage):
        unpack(data, tmp_path / "pkg")
    with pytest.raises(BadPackage):
        read_spec_from_archive(data)
    assert not (tmp_path / "pkg").exists()


def test_unpack_refuses_a_truncated_archive(tmp_path: Path) -> None:
    data, _ = pack(EXAMPLES / "burn")
    with pytest.raises(BadPackage):
        unpack(data[: len(data) // 2], tmp_path / "pkg")
    assert os.listdir(tmp_path) == []


def test_read_spec_from_archive_needs_the_toml_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(BadPackage, match=r"no algorithm\.toml"):
        read_spec_from_archive(make_tar(("main.py", None, b"")))
    with pytest.raises(BadPackage, match=r"'main\.py', which is not in the package"):
        read_spec_from_archive(make_tar(OK_FILE))
    assert read_spec_from_archive(make_tar(OK_FILE, ("main.py", None, b""))).name == "x"


# --- load_spec --------------------------------------------------------------------


def test_missing_algorithm_toml(tmp_path: Path) -> None:
    with pytest.raises(BadPackage, match=r"has no algorithm\.toml: every algorithm package needs one"):
        load_spec(tmp_path)
    with pytest.raises(BadPackage, match="not a directory"):
        load_spec(tmp_path / "nope")


def test_bad_toml_syntax(tmp_path: Path) -> None:
    pkg = make_package(tmp_path / "pkg", 'name = "x"\nversion = \n')
    with pytest.raises(BadPackage, match="not valid TOML") as caught:
        load_spec(pkg)
    assert str(pkg / "algorithm.toml") in str(caught.value)
    assert caught.value.__cause__ is not None


def test_full_spec_is_read(tmp_path: Path) -> None:
    toml = MINIMAL + (
        'cpu = 2\nmemory = 512.5\ndescription = "d"\n'
        '[args_schema]\ntype = "object"\nrequired = ["n"]\nadditionalProperties = false\n'
        'properties.n = {type = "integer", description = "how many"}\n'
        '[restart]\npolicy = "always"\nmax_restarts = 0\nbackoff = 1\nbackoff_max = 2\n'
        '[env]\nGREETING = "hi"\n'
    )
    spec = load_spec(make_package(tmp_path / "pkg", toml))
    assert (spec.demand.cpu, spec.demand.memory, spec.description) == (2.0, 512.5, "d")
    assert spec.restart.to_dict() == {"policy": "always", "max_restarts": 0, "backoff": 1.0, "backoff_max": 2.0}
    assert spec.env == {"GREETING": "hi"}
    assert spec.args is None and spec.args_schema is not None
    assert AlgorithmSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_defaults(tmp_path: Path) -> None:
    spec = load_spec(make_package(tmp_path / "pkg", MINIMAL + "[restart]\nbackoff = 60\n"))
    assert (spec.demand.cpu, spec.demand.memory) == (0.1, 64.0)
    assert (spec.restart.policy, spec.restart.max_restarts) == ("on-failure", 5)
    assert spec.restart.backoff_max == 60.0  # the default cap never undercuts backoff


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": '"Hello!"'}, "'name' must be 1-64 of a-z 0-9 _ . -, got 'Hello!'"),
        ({"name": '"x\\n"'}, "'name'"),
        ({"name": None}, "'name' is required"),
        ({"version": None}, "'version' is required"),
        ({"version": "1"}, "'version' must be like"),
        ({"command": "[]"}, "'command' must be like"),
        ({"command": '"python main.py"'}, "'command' must be like"),
        ({"command": '["python", 3]'}, "'command' must be like"),
        ({"command": '["run.sh"]'}, "'command' runs 'run.sh', which is not in the package"),
        ({"command": '["python", "nope.py"]'}, "'nope.py', which is not in the package"),
        ({"command": '["../main.py"]'}, "'../main.py', which is not in the package"),
        ({"cpu": "0"}, "'cpu' must be a number of cores > 0 and <= 1024, got 0"),
        ({"cpu": "-1.5"}, "'cpu' must be a number of cores > 0"),
        ({"cpu": '"abc"'}, "'cpu' must be a number of cores > 0 and <= 1024, got 'abc'"),
        ({"cpu": "true"}, "'cpu' must be a number of cores > 0 and <= 1024, got True"),
        ({"cpu": "1025"}, "'cpu' must be a number of cores > 0 and <= 1024, got 1025"),
        ({"memory": "1e12"}, "'memory' must be a number of MiB > 0 and <= 16777216 (16 TiB)"),
        ({"cpu": "nan"}, "'cpu' must be a number of cores > 0"),
        ({"memory": "0"}, "'memory' must be a number of MiB > 0"),
        ({"cpus": "1"}, "unknown field 'cpus'"),
        ({"args": '"name"'}, "'args' must be a list of arg names"),
        ({"restart": '{policy = "sometimes"}'}, "'restart.policy' must be never, on-failure or always"),
        ({"restart": "{max_restarts = -1}"}, "'restart.max_restarts' must be a whole number from 0 to 1000"),
        ({"restart": "{max_restarts = 1001}"}, "'restart.max_restarts' must be a whole number from 0 to 1000"),
        ({"restart": "{backoff = 0}"}, "'restart.backoff' must be a number of seconds from 0.1 to 3600"),
        ({"restart": "{backoff = 0.01}"}, "'restart.backoff' must be a number of seconds from 0.1 to 3600"),
        ({"restart": "{backoff_max = 1e9}"}, "'restart.backoff_max' must be a number of seconds from 0.1 to 86400"),
        ({"restart": "{backoff = 2, backoff_max = 1}"}, "'restart.backoff_max' must be >= 'restart.backoff'"),
        ({"restart": "{retries = 1}"}, "unknown field 'restart.retries'"),
        ({"restart": '"always"'}, "'restart' must be a table"),
        ({"env": "{A = 1}"}, "'env' must map names"),
        ({"env": '{DM_ARGS = "x"}'}, "'env' must map names"),
        ({"env": '{"A B" = "x"}'}, "'env' must map names"),
        ({"args_schema": '{type = "array"}'}, "'args_schema.type' must be \"object\""),
        ({"args_schema": '{properties = {n = {type = "int"}}}'}, "'args_schema.properties' must map arg names"),
        ({"args_schema": "{properties = {n = {minimum = 1}}}"}, "'args_schema.properties' must map arg names"),
        ({"args_schema": "{required = [1]}"}, "'args_schema.required' must be a list"),
        ({"args_schema": '{additionalProperties = "no"}'}, "'args_schema.additionalProperties'"),
    ],
)
def test_each_validation_error_names_file_and_field(
    tmp_path: Path, change: dict[str, str | None], message: str
) -> None:
    fields: dict[str, str | None] = {"name": '"x"', "version": '"1.0.0"', "command": '["python", "main.py"]'}
    fields.update(change)
    toml = "".join(f"{key} = {value}\n" for key, value in fields.items() if value is not None)
    pkg = make_package(tmp_path / "pkg", toml)
    with pytest.raises(BadPackage) as caught:
        load_spec(pkg)
    assert str(caught.value).startswith(f"{pkg / 'algorithm.toml'}: ")
    assert message in str(caught.value)
    with pytest.raises(BadPackage):
        pack(pkg)


# --- validate_args ----------------------------------------------------------------


def spec_with(**fields: Any) -> AlgorithmSpec:
    return AlgorithmSpec(name="algo", version="1", command=("python", "main.py"), **fields)


def test_validate_args_with_a_list() -> None:
    spec = spec_with(args=("share", "seconds"))
    validate_args(spec, {"share": 0.5})
    validate_args(spec, {})
    with pytest.raises(InvalidArgs, match=r"unknown arg\(s\) speed \(allowed: share, seconds\)"):
        validate_args(spec, {"share": 0.5, "speed": 1})
    with pytest.raises(InvalidArgs, match="allowed: none"):
        validate_args(spec_with(args=()), {"a": 1})
    validate_args(spec_with(), {"anything": [1, {"b": None}]})  # no list: any args


def test_validate_args_with_a_schema() -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "name": {"type": "string"}, "x": {"type": "number"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    spec = spec_with(args_schema=schema)
    validate_args(spec, {"n": 3, "name": "a", "x": 1})
    with pytest.raises(InvalidArgs, match="arg 'n' must be of type integer, got '3'"):
        validate_args(spec, {"n": "3"})
    with pytest.raises(InvalidArgs, match="must be of type integer, got True"):
        validate_args(spec, {"n": True})
    with pytest.raises(InvalidArgs, match="missing required arg 'n'"):
        validate_args(spec, {"name": "a"})
    with pytest.raises(InvalidArgs, match=r"unknown arg 'extra' \(allowed: n, name, x\)"):
        validate_args(spec, {"n": 1, "extra": 1})
    validate_args(spec_with(args_schema={**schema, "additionalProperties": True}), {"n": 1, "extra": 1})


def test_validate_args_from_a_toml_schema(tmp_path: Path) -> None:
    toml = MINIMAL + '[args_schema]\nrequired = ["who"]\nproperties.who = {type = "string"}\n'
    spec = load_spec(make_package(tmp_path / "pkg", toml))
    validate_args(spec, {"who": "me"})
    with pytest.raises(InvalidArgs, match="missing required arg 'who'"):
        validate_args(spec, {})


@pytest.mark.parametrize("args", [{"a": object()}, {"a": float("nan")}, {"a": {1, 2}}, ["a"], {1: "a"}])
def test_validate_args_must_be_a_json_object(args: Any) -> None:
    with pytest.raises(InvalidArgs):
        validate_args(spec_with(), args)


# --- the examples, run as the node runs them --------------------------------------


@pytest.fixture
def run_example(tmp_path: Path) -> Iterator[Any]:
    """Start an example like the node does; every process is killed by its pid at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, args: dict[str, Any]) -> subprocess.Popen[str]:
        workdir = tmp_path / f"work-{len(procs)}"
        workdir.mkdir()
        env = {
            **os.environ,
            "DM_ARGS": json.dumps(args),
            "DM_DEPLOYMENT_ID": "dep-1",
            "DM_GENERATION": "2",
            "DM_NODE_ID": "node-1",
            "DM_PACKAGE_DIR": str(EXAMPLES / name),
        }
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / name / "main.py")],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def test_hello_prints_its_args(run_example: Any) -> None:
    out, _ = run_example("hello", {"who": "world", "n": 2}).communicate(timeout=10)
    assert out == 'hello {"n": 2, "who": "world"}\n'


@pytest.mark.parametrize(("args", "code"), [({}, 1), ({"code": 7}, 7), ({"code": 0}, 0)])
def test_fail_exits_with_the_code(run_example: Any, args: dict[str, Any], code: int) -> None:
    proc = run_example("fail", args)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == code
    assert f"exiting with code {code}" in err


def test_crash_exits_3(run_example: Any) -> None:
    proc = run_example("crash", {"after": 0})
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 3 and "exiting 3" in out


def test_burn_runs_for_seconds_and_stops_on_sigterm(run_example: Any) -> None:
    timed = run_example("burn", {"share": 0.5, "seconds": 0.2})
    assert timed.wait(timeout=10) == 0
    endless = run_example("burn", {"share": 0.2})
    assert "burn: share=0.2" in (endless.stdout.readline() if endless.stdout else "")
    os.kill(endless.pid, signal.SIGTERM)
    assert endless.wait(timeout=10) == 0


def test_service_writes_start_and_stop_to_the_ledger(run_example: Any, tmp_path: Path) -> None:
    # Given a service with a ledger, ticking fast
    ledger = tmp_path / "ledger.txt"
    proc = run_example("service", {"interval": 0.05, "ledger": str(ledger)})
    deadline = time.monotonic() + 10
    while not (ledger.exists() and ledger.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    # When it gets SIGTERM
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    # Then the ledger holds one start and one stop line for this deployment and pid
    lines = [line.split() for line in ledger.read_text().splitlines()]
    assert [line[:4] for line in lines] == [
        ["start", "dep-1", "2", str(proc.pid)],
        ["stop", "dep-1", "2", str(proc.pid)],
    ]
    assert float(lines[0][4]) <= float(lines[1][4])
