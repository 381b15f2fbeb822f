"""Containment: an algorithm is held to what it declares, runs under a uid of its own and
cannot reach the fleet; start failures end. Real processes on the embedded stack, and
unit tests of the cgroup v2 implementation against a fake cgroup tree."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from dm.embedded import stop_pid
from dm.errors import InvalidArgs
from dm.package import load_spec, pack
from dm.status import deployment_usage
from tests.system import System, alive, wait_for
from workers import watchdog
from workers.containment.base import CPU_START_GRACE

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (as CI runs): cgroups and user switching")
#: the uid range the containment tests switch users with (the suite's default is off)
UIDS = "200000-265535"
SECRET = "sekrit-pw-4711"

MEMHOG = """
import time
chunks = []
for _ in range(40):  # 400 MiB, touched page by page so it is resident
    chunk = bytearray(10 * 1024 * 1024)
    for i in range(0, len(chunk), 4096):
        chunk[i] = 1
    chunks.append(chunk)
    time.sleep(0.05)
print("allocated 400 MiB and was not stopped", flush=True)
time.sleep(60)
"""

SLEEPER = """
import time
time.sleep(600)
"""

CPUHOG = """
import os, time
for _ in range(2):
    if os.fork() == 0:
        while True:
            pass
while True:
    time.sleep(1)
"""

DOUBLE_FORK = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print("grandchild", os.getpid(), flush=True)
        time.sleep(600)
    os._exit(0)
time.sleep(600)
"""

PROBE = """
import json, os, sys
args = json.loads(os.environ["DM_ARGS"])
report = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd()}
with open("/proc/self/status") as f:
    report["no_new_privs"] = [l.split()[1] for l in f if l.startswith("NoNewPrivs")][0]

def attempt(what, fn):
    try:
        fn()
        report[what] = "allowed"
    except OSError as exc:
        report[what] = type(exc).__name__

def write_in(d):
    with open(os.path.join(d, "dm-probe-was-here"), "w") as f:
        f.write("x")

attempt("read_agent_environ", lambda: open(f"/proc/{os.getppid()}/environ", "rb").read())
attempt("write_package", lambda: write_in(os.environ["DM_PACKAGE_DIR"]))
attempt("write_cache", lambda: write_in(os.path.dirname(os.environ["DM_PACKAGE_DIR"])))
attempt("write_home", lambda: write_in(args["home"]))
attempt("list_home", lambda: os.listdir(args["home"]))
if args.get("other"):
    attempt("write_other_workdir", lambda: write_in(args["other"]))
attempt("write_own_workdir", lambda: write_in("."))
seen = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    if args["secret"][::-1].encode() in f.read():  # reversed in its own DM_ARGS
                        seen.append(f"{pid}/{name}")
            except OSError:
                pass
report["secret_seen_in"] = seen
report["env_names"] = sorted(os.environ)
print("REPORT " + json.dumps(report), flush=True)
import time
time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _drop_run_dirs(tmp_path: Path) -> Any:
    """Remove the work dirs and caches the nodes of a test made outside tmp_path (as root,
    with uids: /var/lib/dm/run/<hash of DM_HOME>), after its systems are stopped."""
    yield
    import hashlib
    import shutil

    from workers.containment.host import RUN_ROOT

    for i in range(4):
        key = hashlib.sha256(str((tmp_path / f"home{i}").resolve()).encode()).hexdigest()[:12]
        shutil.rmtree(RUN_ROOT / key, ignore_errors=True)


def algorithm(root: Path, name: str, code: str, *, cpu: float = 0.1, memory: int = 64, policy: str = "never",
              limits: str = "", extra: str = "") -> Path:  # fmt: skip
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "main.py").write_text(code)
    (d / "algorithm.toml").write_text(
        f'name = "{name}"\nversion = "1.0.0"\ncommand = ["python", "main.py"]\ncpu = {cpu}\nmemory = {memory}\n'
        f'{extra}\n[restart]\npolicy = "{policy}"\nmax_restarts = 1\nbackoff = 0.2\n{limits}'
    )
    return d


def log_of(system: System, dep_id: str) -> str:
    path = system.deployment(dep_id).get("log")
    return Path(path).read_text() if path and Path(path).exists() else ""


def line_of(system: System, dep_id: str, prefix: str, timeout: float = 30) -> str:
    def found() -> str:
        return next((ln for ln in log_of(system, dep_id).splitlines() if ln.startswith(prefix)), "")

    return str(wait_for(found, timeout, what=f"a line {prefix!r} in the log of {dep_id}"))


def reasons(system: System, dep_id: str) -> list[str]:
    return [f"{e['state']}: {e.get('reason', '')}" for e in system.ctl.registry.list_events(dep_id)]


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for tid in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                todo += [int(k) for k in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def node_row(system: System) -> dict[str, Any]:
    result = system.dm("nodes", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert rows, "no node listed"
    return dict(rows[0])


# -- real processes ---------------------------------------------------------------------


@ROOT_ONLY
@pytest.mark.slow
def test_a_memory_hog_is_killed_at_its_limit_and_the_node_and_its_other_algorithms_stay(make_system, tmp_path):
    # Given a node running a sleeper, and a hog declaring 64 MiB that allocates 400 MiB
    system = make_system(nodes=1)
    system.add_algorithm(algorithm(tmp_path, "sleeper", SLEEPER))
    system.add_algorithm(algorithm(tmp_path, "memhog", MEMHOG, memory=64))
    sleeper = system.wait_state(system.deploy("sleeper")["id"], "running")
    node = sleeper["node"]
    agent = system.node_pid(node)

    # When the hog runs
    hog = system.deploy("memhog")

    # Then it is killed at its limit (64 MiB x 1.25) and says so
    done = system.wait_state(hog["id"], "failed", "succeeded", timeout=60)
    assert done["state"] == "failed"
    assert "out of memory (limit 80 MiB)" in done["reason"]
    assert any("out of memory (limit 80 MiB)" in r for r in reasons(system, hog["id"]))
    assert "was not stopped" not in log_of(system, hog["id"])
    # and the node and its other algorithm are untouched
    assert alive(agent)
    assert system.ctl.registry.get_node(node)["state"] == "up"
    now = system.deployment(sleeper["id"])
    assert (now["state"], now["pid"]) == ("running", sleeper["pid"])
    assert alive(sleeper["pid"])
    # and the listing says how it is held
    assert node_row(system)["containment"].startswith("cgroup v")


@ROOT_ONLY
@pytest.mark.slow
def test_a_memory_hog_goes_through_its_restart_policy(make_system, tmp_path):
    system = make_system(nodes=1)
    system.add_algorithm(algorithm(tmp_path, "memhog", MEMHOG, memory=64, policy="on-failure"))

    hog = system.deploy("memhog")

    done = system.wait_state(hog["id"], "failed", timeout=90)
    events = reasons(system, hog["id"])
    assert any(r.startswith("restarting: out of memory (limit 80 MiB), restart 1/1") for r in events), events
    assert "out of memory (limit 80 MiB)" in done["reason"] and "gave up after 1 restarts" in done["reason"]


@ROOT_ONLY
@pytest.mark.slow
def test_a_cpu_hog_is_held_to_its_quota_and_without_a_hard_limit_may_use_more(make_system, tmp_path):
    system = make_system(nodes=1, node_cpus=2)
    system.add_algorithm(algorithm(tmp_path, "cpuhog", CPUHOG, cpu=0.25))
    soft = "[limits]\ncpu_hard_limit = false\n"
    system.add_algorithm(algorithm(tmp_path, "cpusoft", CPUHOG.replace("pass", "pass  # soft"), cpu=0.25,
                                   limits=soft))  # fmt: skip

    def used_over_5s(dep_id: str) -> float:
        running = system.wait_state(dep_id, "running")
        pid = running["pid"]
        wait_for(lambda: len(tree(pid)) >= 3, 10, what="the hog's two spinning processes")
        # the quota applies once the start's grace is over (an interpreter's start is not throttled)
        wait_for(lambda: time.time() > running["updated_at"] + CPU_START_GRACE + 0.2, 10, what="the grace to end")
        pids = tree(pid)
        before, t0 = cpu_seconds(pids), time.monotonic()
        time.sleep(5)  # the measuring window the acceptance names, not a wait for a condition
        return (cpu_seconds(pids) - before) / (time.monotonic() - t0)

    hard = system.deploy("cpuhog")
    used = used_over_5s(hard["id"])
    assert used <= 0.3, f"the hog declaring 0.25 cpu used {used:.2f} cores"
    # and its node publishes what it uses (its cgroup's counters)
    node = system.deployment(hard["id"])["node"]
    use = wait_for(lambda: deployment_usage(system.ctl, [node]).get(hard["id"]), 10, what="the hog's usage")
    assert 0.1 <= use["cpu"] <= 0.35 and use["memory"] > 0 and use["memory_limit"] == 80
    system.dm("stop", hard["id"])
    system.wait_state(hard["id"], "stopped")

    free = system.deploy("cpusoft")
    assert used_over_5s(free["id"]) > 0.3  # shares only: it may take idle cores


@ROOT_ONLY
@pytest.mark.slow
def test_an_algorithm_runs_as_its_own_uid_and_cannot_reach_the_agent_or_other_deployments(
    make_system, tmp_path, monkeypatch
):
    # Given an agent whose environment carries a password (in a setting and in a URL)
    monkeypatch.setenv("UPSTREAM_URL", f"redis://user:{SECRET}@127.0.0.1:1/0")
    system = make_system(nodes=1, uid_range=UIDS, probe_password=SECRET)
    system.add_algorithm(algorithm(tmp_path, "probe", PROBE))
    home = str(system.home)

    # When two probes run, the second trying the first's work dir
    first = system.deploy("probe", args={"home": home, "secret": SECRET[::-1]})
    a = json.loads(line_of(system, first["id"], "REPORT ")[len("REPORT ") :])
    second = system.deploy("probe", args={"home": home, "secret": SECRET[::-1], "other": a["cwd"]})
    b = json.loads(line_of(system, second["id"], "REPORT ")[len("REPORT ") :])

    # Then each runs under a uid of its own, no groups, no new privileges
    assert a["uid"] != 0 and b["uid"] != 0 and a["uid"] != b["uid"]
    assert (a["gid"], a["groups"], a["no_new_privs"]) == (a["uid"], [], "1")
    pid = system.deployment(first["id"])["pid"]
    assert os.stat(f"/proc/{pid}").st_uid == a["uid"]
    # its work dir is its own, 0700
    st = os.stat(a["cwd"])
    assert (st.st_uid, st.st_mode & 0o777) == (a["uid"], 0o700)
    assert b["write_own_workdir"] == "allowed"
    # and it cannot read the agent's environment, nor write the package, the cache, DM_HOME
    # or another deployment's work dir
    for key in ("read_agent_environ", "write_package", "write_cache", "write_home", "list_home"):
        assert b[key] == "PermissionError", (key, b[key])
    assert b["write_other_workdir"] == "PermissionError"
    # nor see the password anywhere, in its own environment or any process's
    assert b["secret_seen_in"] == []
    assert not [n for n in b["env_names"] if n.startswith(("DM_REDIS", "DM_MONGO", "CELERY_")) or n == "UPSTREAM_URL"]
    # and the node says whom its algorithms run as
    assert node_row(system)["run_as"] == "a uid per deployment (200000-265535)"


@ROOT_ONLY
@pytest.mark.slow
def test_a_setsid_double_fork_dies_when_its_deployment_is_stopped(make_system, tmp_path):
    system = make_system(nodes=1, uid_range=UIDS)
    system.add_algorithm(algorithm(tmp_path, "daemon", DOUBLE_FORK))
    dep = system.deploy("daemon")
    grandchild = int(line_of(system, dep["id"], "grandchild ").split()[1])
    main = system.wait_state(dep["id"], "running")["pid"]
    assert grandchild not in tree(main)  # it left the process tree and the session

    result = system.dm("stop", dep["id"])

    assert result.returncode == 0, result.stderr
    system.wait_state(dep["id"], "stopped")
    wait_for(lambda: not alive(grandchild), 10, what="the double-forked process to die")


@ROOT_ONLY
@pytest.mark.slow
def test_a_setsid_double_fork_dies_when_its_node_fences_itself(make_system, tmp_path):
    system = make_system(nodes=1, lease_ttl=3)
    system.add_algorithm(algorithm(tmp_path, "daemon", DOUBLE_FORK))
    dep = system.deploy("daemon")
    grandchild = int(line_of(system, dep["id"], "grandchild ").split()[1])
    node = system.deployment(dep["id"])["node"]
    agent = system.node_pid(node)

    # When the agent freezes, its watchdog fences the node: the double-forked process dies too
    os.kill(agent, signal.SIGSTOP)
    try:
        wait_for(lambda: not alive(grandchild), 10, what="the double-forked process to be fenced")
    finally:
        os.kill(agent, signal.SIGCONT)


@ROOT_ONLY
@pytest.mark.slow
def test_a_setsid_double_fork_dies_when_its_agent_is_killed(make_system, tmp_path):
    # Given a double-forked process of a deployment, and no beat: no fail-over starts a new
    # agent, whose start would sweep what the killed one left; its watchdog alone must kill it
    system = make_system(nodes=1, beat=False)
    system.add_algorithm(algorithm(tmp_path, "daemon", DOUBLE_FORK))
    # When an agent is killed outright, its watchdog takes the double-forked process along
    again = system.deploy("daemon")
    orphan = int(line_of(system, again["id"], "grandchild ").split()[1])
    agent = system.node_pid(system.wait_state(again["id"], "running")["node"])
    os.kill(agent, signal.SIGKILL)
    try:
        wait_for(lambda: not alive(orphan), 20, what="the double-forked process to die with its agent")
    finally:
        if alive(orphan):
            os.kill(orphan, signal.SIGKILL)  # stopped by its pid either way


@ROOT_ONLY
def test_a_new_agent_sweeps_the_cgroup_scope_of_one_killed_outright_before_it_is_reaped() -> None:
    # Given the cgroup scope of an agent killed with kill -9 and not yet reaped by its launcher
    # (a zombie), with a process its watchdog did not get to left in a group
    import subprocess

    from workers.containment import CgroupV1, Limits, Unavailable

    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    stat = Path(f"/proc/{zombie}/stat")
    wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", 10, what="the agent to be a zombie")
    leftover = subprocess.Popen(["sleep", "600"])
    mine = dead = None
    try:
        try:
            dead = CgroupV1.probe(f"node-sweep-{zombie}")
        except Unavailable as exc:
            pytest.skip(f"no writable cgroup v1 here: {exc}")
        group = dead.create("dep.1.0", Limits(64, 0.1, False, 64))
        for procs in group.join_files():
            Path(procs).write_text(str(leftover.pid))
        # When another agent starts on the host
        mine = CgroupV1.probe(f"node-sweep-{os.getpid()}")
        swept = mine.cleanup_stale()
        # Then the scope's process is killed and the scope removed
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert swept >= 1 and not any(d.exists() for d in dead.dirs.values())
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        os.waitpid(zombie, 0)
        for scope in (mine, dead):
            if scope is not None:
                with contextlib.suppress(Exception):
                    scope.cleanup_stale()  # the dead one's, when this failed
                scope.close()


@ROOT_ONLY
@pytest.mark.slow
def test_without_cgroups_the_rss_watchdog_kills_a_memory_hog_and_the_node_says_so(make_system, tmp_path):
    system = make_system(nodes=1, containment="none", uid_range=UIDS)
    system.add_algorithm(algorithm(tmp_path, "memhog", MEMHOG, memory=64))
    system.add_algorithm(algorithm(tmp_path, "daemon", DOUBLE_FORK))

    hog = system.deploy("memhog")

    done = system.wait_state(hog["id"], "failed", "succeeded", timeout=60)
    assert done["state"] == "failed"
    assert "out of memory (limit 80 MiB)" in done["reason"]
    assert "was not stopped" not in log_of(system, hog["id"])
    row = node_row(system)
    assert row["containment"] == "none (rss watchdog)"
    assert "none (rss watchdog)" in system.dm("nodes").stdout
    log = (system.home / "nodes" / f"node-{row['id']}.log").read_text()
    assert "falls back to prlimit and an rss watchdog" in log
    # with a uid of its own, a double-fork is still the deployment's
    dep = system.deploy("daemon")
    grandchild = int(line_of(system, dep["id"], "grandchild ").split()[1])
    system.dm("stop", dep["id"])
    system.wait_state(dep["id"], "stopped")
    wait_for(lambda: not alive(grandchild), 10, what="the double-forked process to die")


# -- start failures ---------------------------------------------------------------------


def _failed_with(system: System, dep_id: str, *needles: str) -> dict[str, Any]:
    done = system.wait_state(dep_id, "failed", "running", "succeeded", timeout=45)
    assert done["state"] == "failed", reasons(system, dep_id)
    events = reasons(system, dep_id)
    assert any(e.startswith("restarting: cannot") for e in events), events  # its policy's next step first
    for needle in needles:
        assert needle in done["reason"], done["reason"]
    assert "gave up after 1 restarts" in done["reason"]
    return done


@pytest.mark.slow
def test_each_kind_of_start_failure_ends_failed_with_its_cause(make_system, tmp_path):
    system = make_system(nodes=1)
    system.add_algorithm(algorithm(tmp_path, "plain", SLEEPER, policy="on-failure"))
    system.add_algorithm(algorithm(tmp_path, "nulenv", SLEEPER, policy="on-failure", extra='[env]\nX = "a\\u0000b"'))
    nulword = algorithm(tmp_path, "nulword", SLEEPER, policy="on-failure")
    text = (nulword / "algorithm.toml").read_text()
    (nulword / "algorithm.toml").write_text(text.replace('"main.py"]', '"main.py", "a\\u0000b"]'))
    system.add_algorithm(nulword)
    # an archive whose member name is longer than the file system allows
    longname = algorithm(tmp_path, "longname", SLEEPER, policy="on-failure")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(longname.iterdir()):
            tar.add(path, arcname=path.name)
        member = tarfile.TarInfo("d" * 300)
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    archive = buf.getvalue()
    import hashlib

    system.ctl.registry.add_algorithm(load_spec(longname), archive, hashlib.sha256(archive).hexdigest())
    assert pack(longname)  # the package itself is fine

    # args too large for the environment are refused at deploy time, with the limit
    with pytest.raises(InvalidArgs, match="DM_ARGS"):
        system.deploy("plain", args={"blob": "x" * 200_000})
    # an environment too large all the same (the algorithm's own env) fails at the start: E2BIG
    system.add_algorithm(
        algorithm(tmp_path, "bigenv", SLEEPER, policy="on-failure", extra=f'[env]\nX = "{"x" * 200_000}"')
    )
    too_big = system.deploy("bigenv")
    nul_env = system.deploy("nulenv")
    nul_word = system.deploy("nulword")
    long_name = system.deploy("longname")

    _failed_with(system, too_big["id"], "E2BIG")
    _failed_with(system, nul_env["id"], "NUL byte")
    _failed_with(system, nul_word["id"], "NUL byte")
    # a member name longer than a package may hold is a bad package: failed at once, nothing retried
    done = system.wait_state(long_name["id"], "failed", timeout=45)
    assert "cannot unpack the package" in done["reason"] and "255 bytes" in done["reason"], done["reason"]


# -- units ------------------------------------------------------------------------------


def _fake_v2(tmp_path: Path, procs: str = "") -> tuple[Path, Path, Path]:
    root = tmp_path / "cgroup"
    own = root / "agents" / "a1"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text(procs)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"41 31 0:38 / {root} rw,relatime - cgroup2 cgroup2 rw\n")
    cgroup_file = tmp_path / "cgroup_file"
    cgroup_file.write_text("0::/agents/a1\n")
    return own, mountinfo, cgroup_file


@pytest.mark.unit
def test_cgroup_v2_writes_the_limits_of_a_deployment(tmp_path):
    from workers.containment.base import Limits
    from workers.containment.cgroup_v2 import CgroupV2

    own, mountinfo, cgroup_file = _fake_v2(tmp_path, procs="4242\n")
    v2 = CgroupV2.probe("node-1-4242", mountinfo, cgroup_file, pid=4242)

    # the controllers are enabled for the node's groups
    assert "+memory" in (own / "cgroup.subtree_control").read_text()
    assert "+pids" in (own / "dm" / "node-1-4242" / "cgroup.subtree_control").read_text()

    limits = Limits.of(0.25, 64, {}, 1.25, 1024)
    group = v2.create("dep.1.0", limits)
    path = own / "dm" / "node-1-4242" / "dep.1.0"
    assert (path / "memory.max").read_text() == str(80 * 1024 * 1024)
    assert (path / "cpu.max").read_text() == "max 100000"  # while it starts
    group.hold_cpu()
    assert (path / "cpu.max").read_text() == "25000 100000"
    assert (path / "cpu.weight").read_text() == "100"  # never below an ordinary process
    assert (path / "pids.max").read_text() == "1024"
    assert group.join_files() == [str(path / "cgroup.procs")]
    assert limits.describe_oom() == "out of memory (limit 80 MiB)"

    soft = v2.create("dep.1.1", Limits.of(0.5, 64, {"cpu_hard_limit": False, "memory": 100, "pids": 7}, 1.25, 1024))
    soft_path = own / "dm" / "node-1-4242" / "dep.1.1"
    soft.hold_cpu()
    assert (soft_path / "cpu.max").read_text() == "max 100000"
    assert (soft_path / "memory.max").read_text() == str(100 * 1024 * 1024)
    assert (soft_path / "pids.max").read_text() == "7"
    assert not soft.oom_killed()

    # what the kernel reports, read back
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (path / "memory.current").write_text(f"{50 * 1024 * 1024}\n")
    (path / "memory.stat").write_text(f"anon 1\ninactive_file {10 * 1024 * 1024}\n")
    (path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (path / "cgroup.procs").write_text("")
    assert group.oom_killed()
    assert group.memory() == 40 * 1024 * 1024
    assert group.cpu_seconds() == 2.5
    assert group.pids() == []


@pytest.mark.unit
def test_cgroup_v2_is_unavailable_when_the_agent_shares_its_cgroup_or_controllers_are_missing(tmp_path):
    from workers.containment.base import Unavailable
    from workers.containment.cgroup_v2 import CgroupV2

    own, mountinfo, cgroup_file = _fake_v2(tmp_path, procs="4242\n777\n")
    (own / "cgroup.subtree_control").chmod(0o444)
    if os.geteuid() != 0:  # root writes a read-only file anyway: the refusal is the kernel's then
        with pytest.raises(Unavailable, match="other processes"):
            CgroupV2.probe("node-1-4242", mountinfo, cgroup_file, pid=4242)
    (own / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(Unavailable, match="memory, pids"):
        CgroupV2.probe("node-1-4242", mountinfo, cgroup_file, pid=4242)


@pytest.mark.unit
def test_cgroup_v1_finds_each_hierarchy_below_the_agents_own_cgroup(tmp_path):
    from workers.containment.base import Limits
    from workers.containment.cgroup_v1 import CgroupV1

    root = tmp_path / "fs"
    for name in ("memory", "cpu,cpuacct", "pids"):
        (root / name).mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"35 31 0:32 / {root}/memory rw - cgroup cgroup rw,memory\n"
        f"32 31 0:29 / {root}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        f"39 31 0:36 / {root}/pids rw - cgroup cgroup rw,pids\n"
    )
    cgroup_file = tmp_path / "cgroup_file"
    cgroup_file.write_text("8:pids:/\n4:memory:/sandbox/x\n2:cpu,cpuacct:/\n")

    v1 = CgroupV1.probe("node-3-99", mountinfo, cgroup_file)
    group = v1.create("dep.2.0", Limits(80, 0.25, True, 64))
    group.hold_cpu()

    mem = root / "memory" / "sandbox" / "x" / "dm-node-3-99" / "dep.2.0"
    cpu = root / "cpu,cpuacct" / "dm-node-3-99" / "dep.2.0"
    assert (mem / "memory.limit_in_bytes").read_text() == str(80 * 1024 * 1024)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "25000"
    assert (cpu / "cpu.shares").read_text() == "1024"  # never below an ordinary process
    pids = root / "pids" / "dm-node-3-99" / "dep.2.0"
    assert (pids / "pids.max").read_text() == "64"
    assert group.join_files() == [str(mem / "cgroup.procs"), str(cpu / "cgroup.procs"), str(pids / "cgroup.procs")]
    big = v1.create("dep.3.0", Limits(80, 2.5, True, 64))
    assert (cpu.parent / "cpu.shares").read_text() == str(1024 + 2560)  # the node weighs its groups
    big.remove()
    v1.removed(big)
    assert (cpu.parent / "cpu.shares").read_text() == "1024"


@pytest.mark.unit
def test_the_algorithm_environment_keeps_no_agent_setting_and_no_password():
    from workers.containment.spawn import algorithm_env
    from workers.containment.users import User

    agent = {"PATH": "/usr/bin", "DM_REDIS_URL": "redis://x", "CELERY_BROKER_URL": "redis://y",
             "UPSTREAM": f"postgres://me:{SECRET}@db/x", "PLAIN_URL": "http://example.org/a"}  # fmt: skip
    env = algorithm_env(agent, {"DM_ARGS": "{}"}, User(200001, 200001, True), Path("/w"))
    assert env == {"PATH": "/usr/bin", "PLAIN_URL": "http://example.org/a", "HOME": "/w", "USER": "200001",
                   "LOGNAME": "200001", "DM_ARGS": "{}"}  # fmt: skip


@pytest.mark.unit
def test_uids_are_held_one_per_deployment_and_a_bad_range_is_a_clear_error(tmp_path, monkeypatch):
    from dm.errors import ConfigError
    from workers.containment import users

    monkeypatch.setattr(users, "LOCK_DIRS", (tmp_path / "locks",))
    pool = users.Users("300000-300001", euid=0)
    other = users.Users("300000-300001", euid=0)  # another agent on the same host
    a = pool.acquire("dep-a")
    b = other.acquire("dep-b")
    assert a is not None and b is not None and a.uid != b.uid and a.own
    assert pool.acquire("dep-a") == a
    with pytest.raises(OSError, match="in use"):
        other.acquire("dep-c")
    pool.release("dep-a")
    assert other.acquire("dep-c") == a
    assert users.Users("off", euid=0).acquire("x") is None
    assert "not root" in users.Users(UIDS, euid=1000).describe()
    with pytest.raises(ConfigError, match="DM_UID_RANGE"):
        users.Users("0-10", euid=0)


@pytest.mark.unit
def test_the_mode_can_be_forced_and_a_wrong_word_is_a_clear_error():
    from dm.errors import ConfigError
    from workers.containment import Fallback, detect

    forced = detect("none", "node-9-1")
    assert isinstance(forced, Fallback) and forced.mode == "none (rss watchdog)"
    with pytest.raises(ConfigError, match="use cgroup, none"):
        detect("strict", "node-9-1")


@pytest.mark.unit
def test_one_named_user_for_every_deployment_is_shared_and_never_root():
    import pwd

    from dm.errors import ConfigError
    from workers.containment.users import Users

    nobody = pwd.getpwnam("nobody")
    users = Users(run_as="nobody", euid=0)
    user = users.acquire("dep-a")
    assert user is not None and (user.uid, user.gid, user.own) == (nobody.pw_uid, nobody.pw_gid, False)
    assert users.acquire("dep-b") == user
    assert users.describe() == f"user nobody (uid {nobody.pw_uid})"
    with pytest.raises(ConfigError, match="root"):
        Users(run_as="root", euid=0)
    with pytest.raises(ConfigError, match="not a user"):
        Users(run_as="no-such-user-here", euid=0)


def fence_dirs_listing(pid: int) -> list[Path]:
    """The watchdogs' private state directories on the tmpfs whose state lists ``pid``."""
    found = []
    for d in watchdog.TMPFS.glob(f"{watchdog.TMPFS_PREFIX}*"):
        try:
            if pid in json.loads((d / "fence").read_text())["pgids"]:
                found.append(d)
        except (OSError, ValueError, KeyError):
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.access(watchdog.TMPFS, os.W_OK), reason="needs a writable /dev/shm")
def test_a_stopped_node_leaves_no_fence_state_on_the_tmpfs(make_system, tmp_path):
    # Given a node running a sleeper, its watchdog's state (on the tmpfs) listing it
    system = make_system(nodes=1)
    system.add_algorithm(algorithm(tmp_path, "sleeper", SLEEPER))
    sleeper = system.wait_state(system.deploy("sleeper")["id"], "running")
    state = wait_for(lambda: fence_dirs_listing(sleeper["pid"]), 10, what="the fence state listing the sleeper")
    assert len(state) == 1 and (state[0].stat().st_mode & 0o777) == 0o700

    # When the node is stopped as `dm down` stops it (SIGTERM to its process group)
    stop_pid(system.node_pid(sleeper["node"]), 30)

    # Then its algorithm is gone, and the state directory with it
    assert not alive(sleeper["pid"])
    assert not state[0].exists()
