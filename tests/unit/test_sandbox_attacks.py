"""Attacks a model-written program may make, by accident or reward hacking, and proof that
each sandbox tier contains them (issue 4 item 5; table in docs/sandbox.md).

Every host-side target is made reachable without the sandbox: the secret is world-
readable, the directory to write into is world-writable, the unix socket accepts anyone.
So when an attack fails, the sandbox stopped it, not file permissions.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rewards.isolation.sandbox import Limits, RunResult, RunStatus, Sandbox, SandboxConfig, SandboxUnavailable, Tier
from tests.unit.sandboxed import sandboxed_programs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", params=[Tier.NAMESPACES, Tier.RESTRICTED], ids=lambda t: t.value)
def sandbox(request: pytest.FixtureRequest) -> Sandbox:
    try:
        return Sandbox(SandboxConfig(tier=request.param, min_tier=Tier.RESTRICTED))
    except SandboxUnavailable as err:
        pytest.skip(f"tier {request.param.value} cannot run on this host: {err}")


@dataclass
class Host:
    """Targets outside the sandbox, and what reached them."""

    token: str  # the secret's content
    tag: str  # names files the program tries to write
    open_dir: Path  # world-writable
    secret: Path  # world-readable, holds the token
    unix_path: Path
    abstract_name: str
    tcp_port: int
    udp_port: int
    victims: list[subprocess.Popen]
    received: list[bytes] = field(default_factory=list)

    def values(self) -> dict[str, object]:
        return {
            "tag": self.tag, "open_dir": str(self.open_dir), "secret": str(self.secret),
            "unix_path": str(self.unix_path), "abstract": self.abstract_name,
            "tcp_port": self.tcp_port, "udp_port": self.udp_port,
            "victims": [v.pid for v in self.victims], "trainer_pid": os.getpid(),
        }

    def victims_alive(self) -> bool:
        return all(v.poll() is None for v in self.victims)


def _serve(sock: socket.socket, sink: list[bytes], stop: threading.Event) -> None:
    sock.settimeout(0.1)
    while not stop.is_set():
        try:
            if sock.type == socket.SOCK_DGRAM:
                sink.append(sock.recv(4096))
                continue
            conn, _ = sock.accept()
        except (TimeoutError, OSError):
            continue
        sink.append(b"connected")
        conn.close()


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    token = secrets.token_hex(16)
    open_dir = Path(tempfile.mkdtemp(prefix="r1lab-attack-"))
    open_dir.chmod(0o777)
    secret = open_dir / "secret.txt"
    secret.write_text(token)
    secret.chmod(0o644)
    unix_path = open_dir / "trainer.sock"
    abstract = f"r1lab-attack-{token[:8]}"
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix_path.chmod(0o777)
    unix.listen()
    abstract_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_sock.bind("\0" + abstract)
    abstract_sock.listen()
    victims = [subprocess.Popen(["sleep", "600"])]
    if os.geteuid() == 0:  # a process of an ordinary user, too
        victims.append(subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "600"]))
    h = Host(token, secrets.token_hex(8), open_dir, secret, unix_path, abstract, tcp.getsockname()[1], udp.getsockname()[1], victims)
    stop = threading.Event()
    threads = [threading.Thread(target=_serve, args=(s, h.received, stop), daemon=True)
               for s in (tcp, udp, unix, abstract_sock)]
    for t in threads:
        t.start()
    yield h
    stop.set()
    for t in threads:
        t.join()
    for s in (tcp, udp, unix, abstract_sock):
        s.close()
    for v in victims:
        v.kill()
        v.wait()
    shutil.rmtree(open_dir, ignore_errors=True)


def _sandboxed_processes() -> list[str]:
    """Host processes still running a sandboxed program, as "pid: argv"."""
    return [f"{pid}: {argv}" for pid, argv in sandboxed_programs().items()]


@dataclass(frozen=True)
class Attack:
    name: str
    source: str  # string.Template over Host.values()
    check: Callable[[RunResult, Host], None]
    limits: Limits = Limits(cpu_s=2, wall_s=4)


def _refused(result: RunResult, host: Host) -> None:
    """The program ran but everything it tried was refused: it printed no 'LEAK'."""
    assert result.status in (RunStatus.OK, RunStatus.RUNTIME_ERROR), result
    assert "LEAK" not in result.stdout, result.stdout
    assert host.token not in result.stdout + result.stderr


def _no_connection(result: RunResult, host: Host) -> None:
    _refused(result, host)
    time.sleep(0.3)  # let the listener threads see anything in flight
    assert host.received == [], host.received


def _status(*allowed: RunStatus, max_wall_s: float) -> Callable[[RunResult, Host], None]:
    def check(result: RunResult, host: Host) -> None:
        assert result.status in allowed, result
        assert result.wall_s < max_wall_s, result
    return check


def _nothing_written(result: RunResult, host: Host) -> None:
    _refused(result, host)
    leftovers = [p for p in host.open_dir.iterdir() if p.name not in ("secret.txt", "trainer.sock")]
    assert leftovers == []
    for path in (f"/tmp/pwned-{host.tag}", f"/dev/shm/pwned-{host.tag}", f"/var/tmp/pwned-{host.tag}"):
        assert not os.path.exists(path), path


def _bounded_writes(limit: int) -> Callable[[RunResult, Host], None]:
    def check(result: RunResult, host: Host) -> None:
        assert result.status in (RunStatus.OK, RunStatus.RUNTIME_ERROR, RunStatus.TIMEOUT), result
        written = int(result.stdout.split()[-1])
        assert written <= limit, f"wrote {written} bytes"
    return check


def _victims_alive(result: RunResult, host: Host) -> None:
    assert result.status in (RunStatus.OK, RunStatus.RUNTIME_ERROR), result
    time.sleep(0.1)
    assert host.victims_alive()


def _forks_bounded(result: RunResult, host: Host) -> None:
    _status(RunStatus.OK, max_wall_s=4)(result, host)
    assert int(result.stdout) < 32, result.stdout


def _no_daemon(result: RunResult, host: Host) -> None:
    _status(RunStatus.OK, max_wall_s=2)(result, host)  # the daemon does not hold the pipes
    time.sleep(0.2)
    assert _sandboxed_processes() == []


def _output_capped(result: RunResult, host: Host) -> None:
    _status(RunStatus.OUTPUT_LIMIT, max_wall_s=3)(result, host)
    assert len(result.stdout) <= Limits().output_bytes


def _refused_or_killed(result: RunResult, host: Host) -> None:
    """Refused, or killed by seccomp's bad-architecture action (SIGSYS)."""
    if result.status is RunStatus.RUNTIME_ERROR and result.exit_code == -signal.SIGSYS:
        return
    _refused(result, host)


ATTACKS = [
    Attack("cpu_loop", "while True:\n    pass\n",
           _status(RunStatus.TIMEOUT, max_wall_s=3.5), Limits(cpu_s=1, wall_s=10)),
    Attack("sleep_forever", "import time\ntime.sleep(10**6)\n",
           _status(RunStatus.TIMEOUT, max_wall_s=2.5), Limits(cpu_s=1, wall_s=1)),
    Attack("alloc_10gb", "b = bytearray(10 * 2**30)\nb[-1] = 1\nprint('LEAK allocated')\n",
           _status(RunStatus.MEMORY, max_wall_s=3)),
    Attack("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
           _status(RunStatus.TIMEOUT, RunStatus.RUNTIME_ERROR, max_wall_s=5),
           Limits(cpu_s=2, wall_s=2, processes=32)),
    Attack("fork_count", (
        "import os, time\nn = 0\nwhile n < 10000:\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
        "        os._exit(0)\n    n += 1\nprint(n)\n"),
        _forks_bounded,
        Limits(cpu_s=2, wall_s=4, processes=32)),
    Attack("file_1gb", (
        "n = 0\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(1024):\n"
        "            f.write(b'x' * 2**20)\n            n += 2**20\n            f.flush()\n"
        "except Exception as e:\n    print(type(e).__name__)\nprint(n)\n"),
        _bounded_writes(Limits().file_bytes)),
    Attack("disk_fill", (
        "n = 0\ntry:\n    for i in range(10**6):\n        with open(f'f{i}', 'wb') as f:\n"
        "            for _ in range(8):\n                f.write(b'x' * 2**20)\n                n += 2**20\n"
        "except Exception as e:\n    print(type(e).__name__)\nprint(n)\n"),
        _bounded_writes(Limits().scratch_bytes)),
    Attack("tcp_connect", (
        "import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', $tcp_port), timeout=1)\n"
        "    s.sendall(b'pwned')\n    print('LEAK tcp')\nexcept OSError as e:\n    print(e)\n"),
        _no_connection),
    Attack("udp_send", (
        "import socket\ntry:\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    s.sendto(b'pwned', ('127.0.0.1', $udp_port))\n    print('LEAK udp')\nexcept OSError as e:\n    print(e)\n"),
        _no_connection),
    Attack("unix_socket", (
        "import socket\nfor addr in ['$unix_path', '\\0$abstract']:\n    try:\n"
        "        s = socket.socket(socket.AF_UNIX)\n        s.connect(addr)\n        print('LEAK', addr)\n"
        "    except OSError as e:\n        print(e)\n"),
        _no_connection),
    Attack("read_secret", (
        "for path in ['$secret', '/proc/$trainer_pid/environ', '/proc/$trainer_pid/cmdline', '/etc/shadow']:\n"
        "    try:\n        print('LEAK', path, open(path, 'rb').read()[:100])\n"
        "    except OSError as e:\n        print(e)\n"),
        _refused),
    Attack("write_outside", (
        "import os\nfor path in ['$open_dir/pwned', '/tmp/pwned-$tag', '/dev/shm/pwned-$tag',\n"
        "             '/var/tmp/pwned-$tag', '/pwned', '/usr/pwned']:\n    try:\n"
        "        open(path, 'w').write('x')\n        print('wrote', path)\n    except OSError as e:\n"
        "        print(e)\n"),
        _nothing_written),
    Attack("kill_parent", (
        "import os, signal\nfor pid in [os.getppid(), $trainer_pid, *$victims]:\n    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n        print('sent', pid)\n    except OSError as e:\n"
        "        print(e)\n"),
        _victims_alive),
    Attack("kill_all", "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('survived')\n", _victims_alive),
    Attack("daemon", (
        "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        "        time.sleep(60)\n    os._exit(0)\nprint('parent done')\n"),
        _no_daemon),
    Attack("output_flood", "import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)\n",
           _output_capped),
    Attack("raw_syscalls", (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "calls = {'socket': (41, 2, 1, 0), 'ptrace_traceme': (101, 0, 0, 0, 0),\n"
        "         'unshare_user': (272, 0x10000000), 'unshare_net': (272, 0x40000000),\n"
        "         'mount': (165, 0, 0, 0, 0, 0), 'bpf': (321, 0, 0, 0), 'keyctl': (250, 0, 0, 0),\n"
        "         'io_uring_setup': (425, 8, 0), 'clone_newuser': (56, 0x10000000 | 17, 0, 0, 0, 0)}\n"
        "for name, args in calls.items():\n    ret = libc.syscall(*[ctypes.c_long(a) for a in args])\n"
        "    if ret == 0:\n        os._exit(0) if name == 'clone_newuser' else None\n"
        "    print(name, ret, ctypes.get_errno())\n    if ret >= 0:\n        print('LEAK', name)\n"),
        _refused),
    Attack("x32_syscall", (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "ret = libc.syscall(ctypes.c_long(0x40000000 | 41), 2, 1, 0)\nprint('ret', ret)\n"
        "if ret >= 0:\n    print('LEAK x32 socket')\n"),
        _refused_or_killed),
]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers in the attacks are x86_64's")
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_is_contained(sandbox: Sandbox, host: Host, attack: Attack) -> None:
    host.received.clear()
    source = string.Template(attack.source).substitute(host.values())
    result = sandbox.run(source, limits=attack.limits)
    attack.check(result, host)
    assert host.victims_alive(), "a process outside the sandbox was killed"
    assert _sandboxed_processes() == [], "the run left processes behind"


# The checks above must be able to fail: run the harmless attacks with no sandbox at all
# and see each check catch the leak (the others would harm the host).
_HARMLESS = ("tcp_connect", "udp_send", "unix_socket", "read_secret", "write_outside")


@pytest.mark.parametrize("name", _HARMLESS)
def test_checks_catch_an_unsandboxed_run(host: Host, name: str) -> None:
    attack = next(a for a in ATTACKS if a.name == name)
    host.received.clear()
    source = string.Template(attack.source).substitute(host.values())
    source = source.replace(", '/pwned', '/usr/pwned'", "")  # never litter the host's / and /usr
    assert "/usr/pwned" not in source
    with tempfile.TemporaryDirectory() as cwd:
        plain = subprocess.run(["python3", "-c", source], capture_output=True, text=True, timeout=10, cwd=cwd)
    result = RunResult(RunStatus.OK if plain.returncode == 0 else RunStatus.RUNTIME_ERROR,
                       plain.returncode, plain.stdout, plain.stderr, 0.0, 0.0)
    try:
        with pytest.raises(AssertionError):
            attack.check(result, host)
    finally:
        for leftover in (f"/tmp/pwned-{host.tag}", f"/var/tmp/pwned-{host.tag}", f"/dev/shm/pwned-{host.tag}",
                         str(host.open_dir / "pwned")):
            if os.path.exists(leftover):
                os.remove(leftover)
