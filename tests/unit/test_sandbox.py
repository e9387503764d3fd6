"""rewards.isolation.sandbox: how runs end, what programs see, start-up checks. Attacks live in
test_sandbox_attacks.py."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rewards.isolation import sandbox as sb
from rewards.isolation.sandbox import (
    Limits,
    RunStatus,
    Sandbox,
    SandboxConfig,
    SandboxUnavailable,
    Tier,
    configure,
    run_program,
)
from tests.unit.sandboxed import sandboxed_programs

pytestmark = pytest.mark.unit

HAS_CXX = shutil.which("g++") is not None


@pytest.fixture(scope="module", params=[Tier.NAMESPACES, Tier.RESTRICTED], ids=lambda t: t.value)
def sandbox(request: pytest.FixtureRequest) -> Sandbox:
    try:
        return Sandbox(SandboxConfig(tier=request.param, min_tier=Tier.RESTRICTED))
    except SandboxUnavailable as err:
        pytest.skip(f"tier {request.param.value} cannot run on this host: {err}")


# ------------------------------------------------------------------ how runs end

ENDINGS = [
    # name, program, stdin, limits, status, exit code, stdout
    ("echo", "print(input()[::-1])", "abc\n", Limits(), RunStatus.OK, 0, "cba\n"),
    ("exit_code", "import sys\nsys.exit(3)", "", Limits(), RunStatus.RUNTIME_ERROR, 3, ""),
    ("exception", "raise ValueError('no')", "", Limits(), RunStatus.RUNTIME_ERROR, 1, ""),
    ("segfault", "import ctypes\nctypes.string_at(0)", "", Limits(), RunStatus.RUNTIME_ERROR, -11, ""),
    ("syntax_error", "def f(:\n  pass", "", Limits(), RunStatus.COMPILE_ERROR, 1, ""),
    ("indentation_error", "if True:\nprint(1)", "", Limits(), RunStatus.COMPILE_ERROR, 1, ""),
    ("runtime_syntax_error_is_runtime", "exec('x = (')", "", Limits(), RunStatus.RUNTIME_ERROR, 1, ""),
    ("cpu_limit", "while True: pass", "", Limits(cpu_s=1, wall_s=10), RunStatus.TIMEOUT, -9, ""),
    ("wall_limit", "import time\ntime.sleep(60)", "", Limits(wall_s=1), RunStatus.TIMEOUT, -9, ""),
    ("memory", "x = bytearray(4 * 2**30)", "", Limits(), RunStatus.MEMORY, 1, ""),
    ("stderr_flood", "import sys\nwhile True: sys.stderr.write('e' * 65536)", "", Limits(output_bytes=2**20),
     RunStatus.OUTPUT_LIMIT, -9, ""),
    ("empty_stdin_eof", "input()", "", Limits(), RunStatus.RUNTIME_ERROR, 1, ""),
]


@pytest.mark.parametrize("program,stdin,limits,status,code,stdout", [e[1:] for e in ENDINGS], ids=[e[0] for e in ENDINGS])
def test_how_runs_end(sandbox: Sandbox, program: str, stdin: str, limits: Limits, status: RunStatus,
                      code: int, stdout: str) -> None:
    result = sandbox.run(program, stdin=stdin, limits=limits)
    assert (result.status, result.exit_code, result.stdout) == (status, code, stdout), result
    assert result.wall_s < limits.wall_s + 3
    if status is not RunStatus.OK:
        assert result.detail


def test_timeouts_respect_their_limits(sandbox: Sandbox) -> None:
    result = sandbox.run("while True: pass", limits=Limits(cpu_s=1, wall_s=10))
    assert result.cpu_s >= 0.9 and result.wall_s < 5
    result = sandbox.run("import time\ntime.sleep(60)", limits=Limits(wall_s=0.5))
    assert 0.5 <= result.wall_s < 2.5 and result.cpu_s < 0.5


def test_large_stdin_and_unicode(sandbox: Sandbox) -> None:
    data = "é" * 300_000 + "\n"
    result = sandbox.run("import sys\ns = sys.stdin.read()\nprint(len(s), s[:3])", stdin=data)
    assert result.stdout == f"{len(data)} ééé\n"


def test_set_order_is_deterministic(sandbox: Sandbox) -> None:
    program = "print(list({'apple', 'banana', 'cherry', 'durian', 'elder'}))"
    assert len({sandbox.run(program).stdout for _ in range(3)}) == 1


def test_program_sees_a_clean_process(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R1LAB_TRAINER_SECRET", "hunter2")
    program = (
        "import os\n"
        "def is_open(fd):\n"
        "    try:\n        os.fstat(fd)\n        return True\n    except OSError:\n        return False\n"
        "print(sorted(os.environ))\n"
        "print([fd for fd in range(3, 1024) if is_open(fd)])\n"
        "print(os.getuid() != 0)\n"
    )
    result = sandbox.run(program)
    env, fds, unprivileged = result.stdout.splitlines()
    assert "R1LAB_TRAINER_SECRET" not in env
    names = set(eval(env))
    assert {"HOME", "LANG", "LC_ALL", "PATH", "PYTHONHASHSEED", "TMPDIR"} <= names
    assert names <= {"HOME", "LANG", "LC_ALL", "PATH", "PYTHONHASHSEED", "TMPDIR", "PWD"}
    assert fds == "[]", "file descriptors leaked into the sandbox"
    assert unprivileged == "True"


def test_concurrent_runs(sandbox: Sandbox) -> None:
    results: dict[int, str] = {}

    def one(i: int) -> None:
        results[i] = sandbox.run(f"print({i} * {i})").stdout

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"{i * i}\n" for i in range(8)}


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="r1lab-state-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


def test_restricted_tier_cleans_its_scratch(state_dir: Path) -> None:
    try:
        box = Sandbox(SandboxConfig(tier=Tier.RESTRICTED, min_tier=Tier.RESTRICTED, state_dir=str(state_dir)))
    except SandboxUnavailable as err:
        pytest.skip(str(err))
    box.run("print(1)")
    box.run("open('x', 'w')")
    assert list((state_dir / "scratch").iterdir()) == []


def test_closed_state_dir_is_a_start_up_error(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the scratch directory to other uids")
    tmp_path.chmod(0o700)
    with pytest.raises(SandboxUnavailable, match="chmod o\\+x"):
        Sandbox(SandboxConfig(tier=Tier.RESTRICTED, min_tier=Tier.RESTRICTED, state_dir=str(tmp_path / "s")))


@pytest.mark.skipif(not HAS_CXX, reason="g++ is not installed")
def test_cpp(sandbox: Sandbox) -> None:
    program = '#include <iostream>\nint main() { long a, b; std::cin >> a >> b; std::cout << a + b << "\\n"; }\n'
    assert sandbox.run(program, language="cpp", stdin="2 40").stdout == "42\n"
    assert sandbox.run(program, language="cpp", stdin="1 1").stdout == "2\n"  # compiled once, cached
    broken = sandbox.run("int main() { return x; }", language="cpp")
    assert broken.status is RunStatus.COMPILE_ERROR and broken.exit_code is None
    assert "error" in broken.detail and "x" in broken.stderr
    crash = sandbox.run("int main() { int *p = nullptr; return *p; }", language="cpp")
    assert crash.status is RunStatus.RUNTIME_ERROR and crash.exit_code == -11
    spin = sandbox.run("int main() { volatile long i = 0; for (;;) ++i; }", language="cpp",
                       limits=Limits(cpu_s=1, wall_s=5))
    assert spin.status is RunStatus.TIMEOUT


def test_unknown_language_raises(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="language must be one of"):
        sandbox.run("x", language="rust")


# ------------------------------------------------------------------ limits and start-up


@pytest.mark.parametrize("field", ["cpu_s", "wall_s", "memory_bytes", "processes", "output_bytes"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: 0})


def test_limits_too_little_memory_says_how_much() -> None:
    with pytest.raises(ValueError, match="at least 128 MiB"):
        Limits(memory_bytes=1 << 20)


def test_tier_below_min_tier_raises() -> None:
    with pytest.raises(ValueError, match="weaker than min_tier"):
        Sandbox(SandboxConfig(tier=Tier.RESTRICTED, min_tier=Tier.NAMESPACES))


def test_interpreter_outside_the_sandbox_raises() -> None:
    with pytest.raises(ValueError, match="not an executable"):
        Sandbox(SandboxConfig(python="/opt/elsewhere/python3"))
    with pytest.raises(ValueError, match="readonly_paths"):
        Sandbox(SandboxConfig(python=sys.executable, readonly_paths=("/nonexistent",)))


def _without_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(sb.shutil, "which", lambda name, **kw: None if name == "bwrap" else real_which(name, **kw))


def test_missing_bubblewrap_fails_loudly_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_bwrap(monkeypatch)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        Sandbox(SandboxConfig())  # min_tier defaults to namespaces: no silent fallback


def test_weaker_tier_is_used_only_when_allowed_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _without_bwrap(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="rewards.isolation.sandbox"):
        box = Sandbox(SandboxConfig(min_tier=Tier.RESTRICTED))
    assert box.tier is Tier.RESTRICTED
    assert "bwrap not found" in caplog.text
    assert box.run("print(7)").stdout == "7\n"


def test_configure_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sb, "_default", None)
    first = configure(SandboxConfig())
    assert configure(SandboxConfig()) is first
    assert run_program("print(2 + 2)").stdout == "4\n"
    with pytest.raises(ValueError, match="already configured"):
        configure(SandboxConfig(min_tier=Tier.RESTRICTED))


def test_runs_as_unprivileged_uid_when_root(sandbox: Sandbox) -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful when the trainer runs as root")
    assert sandbox.run("import os\nprint(os.getuid(), os.getgid(), os.getgroups())").stdout.split()[0] != "0"


def _sandboxed_pids() -> list[int]:
    return list(sandboxed_programs())


def test_program_dies_with_the_trainer(sandbox: Sandbox) -> None:
    """A reward pool may SIGKILL a worker past its deadline; the program must not outlive it."""
    import subprocess
    import time

    repo = Path(__file__).resolve().parents[2]
    trainer = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, %r)\n"
        "from rewards.isolation.sandbox import Sandbox, SandboxConfig, Limits\n"
        "box = Sandbox(SandboxConfig(tier=%r, min_tier='restricted'))\n"
        "box.run('import time\\ntime.sleep(120)', limits=Limits(wall_s=120))\n"
    ) % (str(repo), sandbox.tier.value)])
    try:
        deadline = time.monotonic() + 20
        while not _sandboxed_pids():
            assert time.monotonic() < deadline, "the sandboxed program never started"
            time.sleep(0.05)
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 5
    while _sandboxed_pids():
        assert time.monotonic() < deadline, f"programs outlived their trainer: {_sandboxed_pids()}"
        time.sleep(0.05)
