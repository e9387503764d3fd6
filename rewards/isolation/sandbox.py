"""Run untrusted, model-written programs locally, contained.

Model code under optimisation pressure loops, forks, allocates, writes, connects and
kills, by accident or by reward hacking (DeepSeek-R1 §2.2.2 grades code by running it).
Everything that executes such code goes through ``run_program``; nothing else in r1lab
may ``exec`` it. Measured facts behind each choice: ../shared/ENVIRONMENT.md,
"Sandboxing untrusted code"; tiers and the attack table: docs/sandbox.md.

Two tiers, strongest first:

``namespaces``  bubblewrap: every namespace unshared (no network), read-only /usr, a
                size-capped tmpfs as /tmp and working directory, the program passed in
                by file descriptor, ``--die-with-parent --new-session --as-pid-1``, the
                seccomp filter of sandbox_seccomp.py, rlimits set inside the sandbox.
                As root it first drops to an unprivileged uid (setpriv): RLIMIT_NPROC
                does nothing for uid 0, and a fork bomb would go unbounded.
``restricted``  no namespaces, for hosts that refuse them (e.g. a Kubernetes pod with
                the RuntimeDefault seccomp profile): rlimits, a per-slot unprivileged uid
                when root, no-new-privs, Landlock and the same seccomp filter, applied by
                sandbox_launch.py. Without Landlock ABI >= 6 (kernel 6.12) it cannot stop
                reading the trainer's files or signalling its processes; it warns.

Always: a wall-clock limit that kills the whole process tree, capped stdout/stderr
(read here, never ``capture_output``), no ``preexec_fn`` and no ``signal.alarm``.
``SandboxConfig.min_tier`` is the weakest tier accepted; when no tier at or above it
works, ``Sandbox()`` raises at start-up. Nothing ever runs unsandboxed.
"""

from __future__ import annotations

import collections
import enum
import fcntl
import functools
import hashlib
import json
import logging
import marshal
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rewards.isolation.sandbox_launch import landlock_abi
from rewards.isolation.sandbox_seccomp import seccomp_filter_bpf

log = logging.getLogger(__name__)

_LAUNCHER = Path(__file__).with_name("sandbox_launch.py")
_MiB = 1 << 20
_GiB = 1 << 30


class Tier(str, enum.Enum):
    """Isolation tiers; ``rank`` orders them, higher is stronger."""

    RESTRICTED = "restricted"
    NAMESPACES = "namespaces"

    @property
    def rank(self) -> int:
        return {Tier.RESTRICTED: 1, Tier.NAMESPACES: 2}[self]


class RunStatus(str, enum.Enum):
    OK = "ok"
    RUNTIME_ERROR = "runtime_error"
    COMPILE_ERROR = "compile_error"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    OUTPUT_LIMIT = "output_limit"
    SANDBOX_ERROR = "sandbox_error"


class SandboxUnavailable(RuntimeError):
    """No tier at or above ``min_tier`` works on this host."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. Defaults suit a competitive-programming test case."""

    cpu_s: float = 2.0  # RLIMIT_CPU, rounded up to whole seconds
    wall_s: float = 5.0  # kills the whole process tree
    memory_bytes: int = 1 * _GiB  # RLIMIT_AS (address space, not resident memory)
    processes: int = 32  # RLIMIT_NPROC; threads count
    file_bytes: int = 16 * _MiB  # RLIMIT_FSIZE, the largest file a run may write
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 8 * _MiB  # cap on captured stdout and on stderr, each
    scratch_bytes: int = 32 * _MiB  # size of the writable tmpfs (namespaces tier)
    stack_bytes: int = 256 * _MiB  # RLIMIT_STACK; deep recursion is common in solutions

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")
        if self.memory_bytes < 128 * _MiB:
            raise ValueError(
                f"Limits.memory_bytes={self.memory_bytes} leaves a Python interpreter too "
                "little address space to start; give at least 128 MiB"
            )


# g++ and its helpers: cc1plus alone maps ~1 GiB of address space on bits/stdc++.h.
COMPILE_LIMITS = Limits(
    cpu_s=20.0, wall_s=30.0, memory_bytes=4 * _GiB, processes=16,
    file_bytes=256 * _MiB, output_bytes=128 * _MiB, scratch_bytes=512 * _MiB,
)


@dataclass(frozen=True)
class RunResult:
    """How one run ended.

    ``exit_code`` is the program's exit status, ``-N`` when signal N killed it, None when
    it never ran (compile error, sandbox error). ``stdout``/``stderr`` are decoded
    UTF-8 with replacement and end where the cap cut them. ``detail`` is one short line
    saying why, for anything but ``ok``.
    """

    status: RunStatus
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.OK


class SandboxConfig(BaseModel):
    """Where and how untrusted programs run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_tier: Tier = Field(
        default=Tier.NAMESPACES,
        description="weakest tier accepted; start-up fails when none at or above it works",
    )
    tier: Tier | None = Field(
        default=None, description="use exactly this tier (tests, benchmarks); None = strongest that works"
    )
    python: str = Field(
        default="/usr/bin/python3",
        description="interpreter for Python programs; must lie under readonly_paths",
    )
    cxx: str | None = Field(default="g++", description="C++ compiler; None turns C++ off")
    cxx_flags: tuple[str, ...] = ("-std=c++17", "-O2", "-pipe")
    readonly_paths: tuple[str, ...] = Field(
        default=("/usr", "/etc/ld.so.cache", "/etc/alternatives"),
        description="host paths visible read-only to programs (missing ones are skipped)",
    )
    uid: int = Field(
        default=61000, ge=1000, lt=1 << 31,
        description="unprivileged uid programs run as when the trainer is root; the "
        "restricted tier uses uid+1 .. uid+uid_slots, one per concurrent run",
    )
    uid_slots: int = Field(default=256, ge=1, le=4096)
    state_dir: str | None = Field(
        default=None,
        description="slot locks and restricted-tier scratch dirs; None = $TMPDIR/r1lab-sandbox-<euid>",
    )


_LANGUAGES = ("python", "cpp")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _under(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in map(os.path.realpath, roots))


@dataclass
class _Raw:
    """What the spawn loop saw, before classification."""

    started: bool
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    cpu_s: float
    timed_out: bool
    overflow: str | None  # "stdout" or "stderr" when that stream passed its cap
    setup_error: str = ""


class Sandbox:
    """A configured, self-tested sandbox. Thread-safe; build one per process."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._is_root = os.geteuid() == 0
        self._state_dir = Path(
            self.config.state_dir or Path(tempfile.gettempdir()) / f"r1lab-sandbox-{os.geteuid()}"
        )
        self._landlock_abi = 0
        self._bwrap = None
        self._setpriv = None
        self._prlimit = None
        self._compiled: collections.OrderedDict[str, RunResult | bytes] = collections.OrderedDict()
        self._compiled_lock = threading.Lock()
        self._cxx = self._find_cxx()
        self._cxx_error: str | None = None
        self._cxx_checked = False
        self._cxx_check_lock = threading.Lock()
        self.tier, self.tier_failures = self._choose_tier()

    # ----------------------------------------------------------------- start-up

    def _choose_tier(self) -> tuple[Tier, dict[Tier, str]]:
        cfg = self.config
        if cfg.tier is not None and cfg.tier.rank < cfg.min_tier.rank:
            raise ValueError(
                f"sandbox tier {cfg.tier.value!r} is weaker than min_tier {cfg.min_tier.value!r}; "
                "raise tier or lower min_tier"
            )
        if not os.access(cfg.python, os.X_OK):
            raise ValueError(
                f"sandbox python {cfg.python!r} is not an executable; set SandboxConfig.python "
                "to a system interpreter (apt-get install python3 gives /usr/bin/python3)"
            )
        if not _under(cfg.python, cfg.readonly_paths):
            raise ValueError(
                f"sandbox python {cfg.python!r} (really {os.path.realpath(cfg.python)!r}) is not "
                f"under readonly_paths {list(cfg.readonly_paths)}; programs could not start. "
                "Use a system interpreter such as /usr/bin/python3 or add its prefix to readonly_paths"
            )
        candidates = [cfg.tier] if cfg.tier else sorted(Tier, key=lambda t: -t.rank)
        failures: dict[Tier, str] = {}
        for tier in candidates:
            if tier.rank < cfg.min_tier.rank:
                continue
            problem = self._probe(tier)
            if problem is None:
                if failures:
                    log.warning(
                        "code sandbox: using tier %r; stronger tiers failed: %s",
                        tier.value, "; ".join(f"{t.value}: {why}" for t, why in failures.items()),
                    )
                return tier, failures
            failures[tier] = problem
        fallback = (
            " Or accept the weaker fallback tier with min_tier: restricted."
            if Tier.RESTRICTED not in failures and cfg.tier is None else ""
        )
        raise SandboxUnavailable(
            f"no sandbox tier at or above min_tier={cfg.min_tier.value!r} works here: "
            + "; ".join(f"{t.value}: {why}" for t, why in failures.items()) + "." + fallback
        )

    def _probe(self, tier: Tier) -> str | None:
        """None if ``tier`` runs a program correctly here, else why not."""
        try:
            seccomp_filter_bpf()
        except RuntimeError as err:
            return str(err)
        if tier is Tier.NAMESPACES:
            self._bwrap = shutil.which("bwrap")
            self._prlimit = shutil.which("prlimit", path="/usr/bin:/bin")
            if self._bwrap is None:
                return "bwrap not found (apt-get install bubblewrap)"
            if self._prlimit is None or not _under(self._prlimit, self.config.readonly_paths):
                return "prlimit (util-linux) not found under the read-only paths"
            if self._is_root:
                self._setpriv = shutil.which("setpriv")
                if self._setpriv is None:
                    return "running as root needs setpriv (util-linux) to drop to an unprivileged uid"
        else:
            try:
                scratch = self._scratch_root()
            except OSError as err:
                return f"cannot create the scratch directory: {err}; set state_dir elsewhere"
            if self._is_root:
                owner = os.lstat(scratch)
                if owner.st_uid != 0 or owner.st_mode & 0o022 or stat.S_ISLNK(owner.st_mode):
                    return (f"{scratch} is not a directory only root can write; "
                            "remove it or set state_dir elsewhere")
                blocked = self._untraversable(scratch)
                if blocked:
                    return (f"the scratch directory's parent {blocked} is closed to the sandbox's "
                            f"uids; chmod o+x {blocked}, or set state_dir elsewhere")
            self._landlock_abi = landlock_abi()
            if self._landlock_abi < 6:
                log.warning(
                    "code sandbox (restricted tier): Landlock ABI %d < 6 (kernel < 6.12). Programs "
                    "can %s. Prefer the namespaces tier (bubblewrap), or a newer kernel",
                    self._landlock_abi,
                    "read and write any file the trainer's user can, and signal its processes"
                    if self._landlock_abi == 0 else "signal the trainer's processes",
                )
        result = self._run(tier, "print(sum(range(10)))\n", "python", b"", Limits(cpu_s=5, wall_s=20))
        if result.status is not RunStatus.OK or result.stdout != "45\n":
            hint = (" (are unprivileged user namespaces allowed? see sysctl user.max_user_namespaces "
                    "and kernel.apparmor_restrict_unprivileged_userns)" if tier is Tier.NAMESPACES else "")
            return (
                f"self-test gave status={result.status.value} exit={result.exit_code} "
                f"stdout={result.stdout[:80]!r} stderr={result.stderr[-300:]!r} {result.detail}{hint}"
            )
        return None

    @staticmethod
    def _untraversable(path: str) -> str | None:
        """The first directory above ``path`` that other users cannot enter, if any."""
        for parent in reversed(Path(path).parents):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return str(parent)
        return None

    def _find_cxx(self) -> str | None:
        if self.config.cxx is None:
            return None
        found = shutil.which(self.config.cxx)
        if found is None or not _under(found, self.config.readonly_paths):
            return None
        return found

    @property
    def languages(self) -> tuple[str, ...]:
        return ("python", "cpp") if self._cxx else ("python",)

    # ----------------------------------------------------------------- running

    def run(
        self, source: str, *, language: str = "python", stdin: str = "", limits: Limits | None = None
    ) -> RunResult:
        """Run ``source`` on ``stdin`` under ``limits``; see ``run_program``."""
        if language not in _LANGUAGES:
            raise ValueError(f"language must be one of {_LANGUAGES}, got {language!r}")
        limits = limits or Limits()
        if language == "cpp":
            binary = self._compile_cpp(source)
            if isinstance(binary, RunResult):
                return binary
            return self._run(self.tier, binary, "binary", stdin.encode(), limits)
        return self._run(self.tier, source, "python", stdin.encode(), limits)

    def _compile_cpp(self, source: str) -> bytes | RunResult:
        """The compiled program, or the RunResult saying why there is none (cached)."""
        if self._cxx is None:
            return _no_run(RunStatus.SANDBOX_ERROR, f"no C++ compiler: {self.config.cxx!r} is not on "
                           f"PATH under {list(self.config.readonly_paths)}")
        with self._cxx_check_lock:  # a broken toolchain must not read as wrong programs
            if not self._cxx_checked:
                probe = self._compile_uncached("int main() { return 0; }\n")
                self._cxx_error = None if isinstance(probe, bytes) else f"{probe.detail} {probe.stderr[-300:]}"
                self._cxx_checked = True
        if self._cxx_error is not None:
            return _no_run(RunStatus.SANDBOX_ERROR, f"C++ toolchain self-test failed: {self._cxx_error}")
        key = hashlib.sha256(source.encode()).hexdigest()
        with self._compiled_lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        outcome = self._compile_uncached(source)
        if isinstance(outcome, bytes) or outcome.status is RunStatus.COMPILE_ERROR:
            with self._compiled_lock:
                self._compiled[key] = outcome
                while len(self._compiled) > 64:
                    self._compiled.popitem(last=False)
        return outcome

    def _compile_uncached(self, source: str) -> bytes | RunResult:
        raw = self._runner(self.tier)(source, "cpp-compile", b"", COMPILE_LIMITS)
        if raw.started and not raw.timed_out and not raw.overflow and raw.exit_code == 0:
            return raw.stdout
        result = _classify(raw, "cpp-compile", COMPILE_LIMITS)
        if result.status is RunStatus.SANDBOX_ERROR:
            return result
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        first = errors[0][:200] if errors else result.detail
        return _no_run(RunStatus.COMPILE_ERROR, f"compilation failed: {first}",
                       stderr=result.stderr[-8000:], wall_s=result.wall_s, cpu_s=result.cpu_s)

    def _runner(self, tier: Tier) -> Callable[[str | bytes, str, bytes, Limits], _Raw]:
        return self._run_namespaces if tier is Tier.NAMESPACES else self._run_restricted

    def _run(self, tier: Tier, program: str | bytes, kind: str, stdin: bytes, limits: Limits) -> RunResult:
        return _classify(self._runner(tier)(program, kind, stdin, limits), kind, limits)

    def _command(self, kind: str, workdir: str) -> list[str]:
        if kind == "python":
            # Not -I/-E: the environment is ours, and PYTHONHASHSEED=0 in it makes set
            # order, and so the reward, deterministic. -s: no user site; -B: no .pyc.
            return [self.config.python, "-s", "-B", f"{workdir}/main.py"]
        if kind == "binary":
            return [f"{workdir}/main"]
        if kind == "cpp-compile":  # the binary comes back on stdout
            flags = " ".join(self.config.cxx_flags)
            return ["/bin/sh", "-c", f'"$0" {flags} -o main main.cpp && cat main', self._cxx]
        raise AssertionError(kind)

    def _env(self, workdir: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0",
        }

    def _rlimits(self, limits: Limits) -> dict[str, tuple[int, int]]:
        cpu = max(1, math.ceil(limits.cpu_s))
        stack = min(limits.stack_bytes, limits.memory_bytes)
        return {
            # soft == hard: SIGKILL at the limit (pid 1 of a namespace ignores SIGXCPU).
            "RLIMIT_CPU": (cpu, cpu),
            "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
            "RLIMIT_NPROC": (limits.processes, limits.processes),
            "RLIMIT_FSIZE": (limits.file_bytes, limits.file_bytes),
            "RLIMIT_NOFILE": (limits.open_files, limits.open_files),
            "RLIMIT_STACK": (stack, stack),
            "RLIMIT_CORE": (0, 0),  # a core file would go to the host's core handler
        }

    # namespaces tier -------------------------------------------------------

    def _run_namespaces(self, program: str | bytes, kind: str, stdin: bytes, limits: Limits) -> _Raw:
        workdir = "/tmp"
        data = program.encode() if isinstance(program, str) else program
        argv: list[str] = []
        if self._is_root:
            uid = str(self.config.uid)
            argv += [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        argv += [
            self._bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv",
        ]
        for path in self.config.readonly_paths:
            argv += ["--ro-bind-try", path, path]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = f"/{top}"
            if os.path.islink(host):  # merged /usr: keep the symlinks
                argv += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                argv += ["--ro-bind", host, host]
        fds: list[int] = []
        try:
            fds.append(program_fd := _memfd("program", data))
            fds.append(seccomp_fd := _memfd("seccomp", seccomp_filter_bpf()))
            fds.append(stdin_fd := _memfd("stdin", stdin))
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            fds.append(status_r)
            argv += [
                "--proc", "/proc", "--dev", "/dev",
                "--size", str(limits.scratch_bytes), "--tmpfs", workdir, "--chdir", workdir,
                "--perms", "0555", "--ro-bind-data", str(program_fd), f"{workdir}/{_FILE_NAMES[kind]}",
                # / and /dev are unsized tmpfs mounts: read-only, or filling them fills RAM.
                "--remount-ro", "/dev", "--remount-ro", "/",
                "--json-status-fd", str(status_w), "--seccomp", str(seccomp_fd),
            ]
            for key, value in self._env(workdir).items():
                argv += ["--setenv", key, value]
            # Rlimits are set inside the new user namespace, where RLIMIT_NPROC counts
            # this sandbox's processes only.
            argv += ["--", self._prlimit]
            for name, (soft, hard) in self._rlimits(limits).items():
                argv.append(f"--{_PRLIMIT_FLAG[name]}={soft}:{hard}")
            argv += ["--", *self._command(kind, workdir)]
            # bwrap's child dies with it (--die-with-parent), and with that child, pid 1
            # of the namespace, every process inside.
            spawned = _execute(argv, stdin_fd, (program_fd, seccomp_fd, status_w), status_r, status_w,
                               limits, lambda pid, pidfd: _killpg(pid))
        finally:
            for fd in fds:
                os.close(fd)
        statuses = []
        for line in spawned.status.decode(errors="replace").splitlines():
            try:
                statuses.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if not any("child-pid" in s for s in statuses) and not spawned.timed_out:
            return _Raw(False, None, spawned.stdout, spawned.stderr, spawned.wall_s, spawned.cpu_s,
                        False, None, setup_error=spawned.stderr.decode(errors="replace")[-500:])
        exit_codes = [s["exit-code"] for s in statuses if "exit-code" in s]
        code = exit_codes[-1] if exit_codes else spawned.exit_code
        if code > 128:  # bwrap reports death by signal N as 128+N
            code = -(code - 128)
        return _Raw(True, code, spawned.stdout, spawned.stderr, spawned.wall_s, spawned.cpu_s,
                    spawned.timed_out, spawned.overflow)

    # restricted tier -------------------------------------------------------

    def _run_restricted(self, program: str | bytes, kind: str, stdin: bytes, limits: Limits) -> _Raw:
        with self._slot() as slot:
            workdir = tempfile.mkdtemp(prefix="run-", dir=self._scratch_root())
            try:
                return self._run_restricted_in(program, kind, stdin, limits, slot, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

    def _run_restricted_in(self, program: str | bytes, kind: str, stdin: bytes, limits: Limits,
                           slot: int | None, workdir: str) -> _Raw:
        path = os.path.join(workdir, _FILE_NAMES[kind])
        with open(path, "wb") as fh:
            fh.write(program.encode() if isinstance(program, str) else program)
        os.chmod(path, 0o555)
        rlimits = self._rlimits(limits)
        uid = gid = None
        if slot is not None:
            uid = gid = self.config.uid + 1 + slot
            os.chown(workdir, uid, gid)
        else:
            # Same uid as the trainer: RLIMIT_NPROC counts all of that user's processes,
            # so allow those that exist now plus the run's own.
            nproc = limits.processes + _count_own_tasks()
            rlimits["RLIMIT_NPROC"] = (nproc, nproc)
        os.chmod(workdir, 0o700)
        fds: list[int] = []
        try:
            fds.append(seccomp_fd := _memfd("seccomp", seccomp_filter_bpf()))
            fds.append(stdin_fd := _memfd("stdin", stdin))
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
            fds.append(status_r)
            job = {
                "argv": self._command(kind, workdir),
                "env": self._env(workdir),
                "cwd": workdir,
                "uid": uid,
                "gid": gid,
                "rlimits": rlimits,
                "landlock_abi": self._landlock_abi,
                "readable": [*self.config.readonly_paths, "/dev/null", "/dev/zero", "/dev/urandom"],
                "writable": [workdir],
                # Only the compiler creates files. A program cannot, so it cannot fill
                # the disk (the scratch dir here is no size-capped tmpfs).
                "create_files": kind == "cpp-compile",
                "seccomp_fd": seccomp_fd,
                "status_fd": status_w,
                "trainer_pid": os.getpid(),
            }
            # marshal, not json: the launcher starts ~7 ms faster without importing json.
            fds.append(job_fd := _memfd("job", marshal.dumps(job, 4)))
            argv = [self.config.python, "-I", "-S", str(_LAUNCHER), str(job_fd)]
            spawned = _execute(argv, stdin_fd, (job_fd, seccomp_fd, status_w), status_r, status_w,
                               limits, functools.partial(_stop_launcher, uid=uid, setpriv=shutil.which("setpriv")))
        finally:
            for fd in fds:
                os.close(fd)
        try:
            report = marshal.loads(spawned.status) if spawned.status else None
        except (EOFError, ValueError, TypeError):
            report = None
        if not isinstance(report, dict):
            return _Raw(False, None, spawned.stdout, spawned.stderr, spawned.wall_s, spawned.cpu_s,
                        spawned.timed_out, spawned.overflow, setup_error="launcher ended without a report: "
                        + spawned.stderr.decode(errors="replace")[-500:])
        if not report["started"]:
            return _Raw(False, None, spawned.stdout, spawned.stderr, spawned.wall_s, spawned.cpu_s,
                        False, None, setup_error=report["error"])
        return _Raw(True, report["exit_code"], spawned.stdout, spawned.stderr, spawned.wall_s,
                    report["cpu_s"], spawned.timed_out, spawned.overflow)

    def _scratch_root(self) -> str:
        root = self._state_dir / "scratch"
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        return str(root)

    def _slot(self) -> _SlotLease:
        if not self._is_root:
            return _SlotLease(None, None)
        lock_dir = self._state_dir / "slots"
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        start = threading.get_ident() % self.config.uid_slots
        for _ in range(2000):
            for i in range(self.config.uid_slots):
                slot = (start + i) % self.config.uid_slots
                fd = os.open(lock_dir / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return _SlotLease(slot, fd)
            time.sleep(0.005)
        raise SandboxUnavailable(
            f"all {self.config.uid_slots} sandbox uid slots stayed busy for 10 s; raise uid_slots"
        )


_FILE_NAMES = {"python": "main.py", "binary": "main", "cpp-compile": "main.cpp"}
_PRLIMIT_FLAG = {
    "RLIMIT_CPU": "cpu", "RLIMIT_AS": "as", "RLIMIT_NPROC": "nproc", "RLIMIT_FSIZE": "fsize",
    "RLIMIT_NOFILE": "nofile", "RLIMIT_STACK": "stack", "RLIMIT_CORE": "core",
}


class _SlotLease:
    """A uid slot held through an flock; a crashed holder frees it automatically."""

    def __init__(self, slot: int | None, fd: int | None) -> None:
        self.slot, self._fd = slot, fd

    def __enter__(self) -> int | None:
        return self.slot

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _count_own_tasks() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                continue
    return count


def _no_run(status: RunStatus, detail: str, *, stderr: str = "", wall_s: float = 0.0,
            cpu_s: float = 0.0) -> RunResult:
    return RunResult(status, None, "", stderr, wall_s, cpu_s, detail)


def _stop_launcher(pid: int, pidfd: int, *, uid: int | None, setpriv: str | None) -> None:
    """Deadline in the restricted tier: the launcher kills the program and everything it
    left, then reports. Should it not manage within a second, SIGKILL it and, as root,
    everything of the run's uid."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _exited(pidfd, 1.0):
        return
    _killpg(pid)
    if uid is not None and setpriv is not None:
        subprocess.run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
                        "/bin/kill", "-KILL", "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False, timeout=5)


def _killpg(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class _Spawned:
    exit_code: int
    stdout: bytes
    stderr: bytes
    status: bytes  # what the sandbox wrote to the status pipe
    wall_s: float
    cpu_s: float
    timed_out: bool
    overflow: str | None


def _exited(pidfd: int, wait_s: float = 0.0) -> bool:
    return bool(select.select([pidfd], [], [], wait_s)[0])


def _read_until(deadline: float, exited_at: float | None, killed_at: float | None) -> float:
    """When to stop reading a run's pipes. After an exit or a kill, read on until every
    holder of the pipes is gone (so a run's processes are dead when it returns), but not
    forever."""
    if killed_at is not None:
        return killed_at + 2.0
    if exited_at is not None:
        return exited_at + 0.5
    return deadline


def _drain(fds: set[int], bufs: dict[int, bytearray], status_r: int, output_bytes: int) -> None:
    """Append what is already buffered in ``fds`` to ``bufs``, without blocking; output
    (all but ``status_r``) stops growing at ``output_bytes``."""
    for fd in fds:
        os.set_blocking(fd, False)
        try:
            while chunk := os.read(fd, 1 << 16):
                if fd == status_r or len(bufs[fd]) < output_bytes:
                    bufs[fd] += chunk
        except BlockingIOError:
            pass


def _execute(argv: list[str], stdin_fd: int, pass_fds: tuple[int, ...], status_r: int, status_w: int,
             limits: Limits, kill: Callable[[int, int], None]) -> _Spawned:
    """Spawn ``argv``; read stdout, stderr and the status pipe with caps; enforce the
    wall clock with ``kill(pid, pidfd)``; reap. Closes ``status_w``.

    The process is reaped here with wait4 (for its CPU time), never through Popen.
    """
    start = time.monotonic()
    deadline = start + limits.wall_s
    try:
        proc = subprocess.Popen(
            argv, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=pass_fds, close_fds=True, start_new_session=True, env={}, bufsize=0,
        )
    finally:
        os.close(status_w)  # the child holds it; EOF on status_r once the sandbox is gone
    pidfd = os.pidfd_open(proc.pid)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
    poller = select.poll()
    for fd in bufs:
        poller.register(fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    open_fds = set(bufs)
    exited_at: float | None = None
    killed_at: float | None = None
    timed_out = False
    overflow: str | None = None
    try:
        while open_fds:
            now = time.monotonic()
            if exited_at is None and killed_at is None and now >= deadline:
                timed_out = True
                killed_at = now
                kill(proc.pid, pidfd)
            wait_until = _read_until(deadline, exited_at, killed_at)
            if now >= wait_until:
                break
            for fd, _event in poller.poll(max(0.0, wait_until - now) * 1000):
                if fd == pidfd:
                    poller.unregister(pidfd)
                    exited_at = time.monotonic()
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                if fd != status_r and len(bufs[fd]) + len(chunk) > limits.output_bytes:
                    chunk = chunk[: limits.output_bytes - len(bufs[fd])]
                    if overflow is None and killed_at is None:
                        overflow = "stdout" if fd == out_fd else "stderr"
                        killed_at = time.monotonic()
                        kill(proc.pid, pidfd)
                bufs[fd] += chunk
    finally:
        # Every way out of the loop leaves no process behind.
        if exited_at is None and not _exited(pidfd):
            kill(proc.pid, pidfd)
        _, wait_status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
        wall = min(exited_at or time.monotonic(), killed_at or math.inf) - start
        _drain(open_fds, bufs, status_r, limits.output_bytes)
        os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    return _Spawned(
        exit_code=proc.returncode,
        stdout=bytes(bufs[out_fd][: limits.output_bytes]),
        stderr=bytes(bufs[err_fd][: limits.output_bytes]),
        status=bytes(bufs[status_r]),
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        timed_out=timed_out,
        overflow=overflow,
    )


def _is_python_syntax_error(stderr: str) -> bool:
    # A compile-time SyntaxError prints no traceback header; one raised at run time
    # (by exec, say) does.
    lines = [line for line in stderr.splitlines() if line.strip()]
    return (
        bool(lines)
        and "Traceback (most recent call last):" not in stderr
        and lines[-1].startswith(("SyntaxError:", "IndentationError:", "TabError:"))
    )


_MEMORY_MARKERS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


def _classify(raw: _Raw, kind: str, limits: Limits) -> RunResult:
    stdout = raw.stdout.decode("utf-8", errors="replace")
    stderr = raw.stderr.decode("utf-8", errors="replace")

    def result(status: RunStatus, detail: str = "") -> RunResult:
        code = raw.exit_code if raw.started else None
        return RunResult(status, code, stdout, stderr, round(raw.wall_s, 4), round(raw.cpu_s, 4), detail)

    if not raw.started:
        return result(RunStatus.SANDBOX_ERROR, f"the sandbox did not start the program: {raw.setup_error}")
    if raw.overflow:
        return result(RunStatus.OUTPUT_LIMIT, f"{raw.overflow} passed the {limits.output_bytes}-byte cap")
    if raw.timed_out:
        return result(RunStatus.TIMEOUT, f"killed at the wall-clock limit of {limits.wall_s:g} s")
    code = raw.exit_code
    if code == 0:
        return result(RunStatus.OK)
    cpu_limit = max(1, math.ceil(limits.cpu_s))
    if code in (-signal.SIGKILL, -signal.SIGXCPU) and raw.cpu_s >= cpu_limit - 0.05:
        return result(RunStatus.TIMEOUT, f"killed at the CPU limit of {cpu_limit} s")
    if any(marker in stderr[-4000:] for marker in _MEMORY_MARKERS):
        return result(RunStatus.MEMORY, f"out of memory under the {limits.memory_bytes}-byte address-space limit")
    if kind == "python" and code == 1 and _is_python_syntax_error(stderr):
        return result(RunStatus.COMPILE_ERROR, stderr.strip().splitlines()[-1][:200])
    if code is not None and code < 0:
        return result(RunStatus.RUNTIME_ERROR, f"killed by {signal.Signals(-code).name}")
    return result(RunStatus.RUNTIME_ERROR, f"exit code {code}")


# ------------------------------------------------------------------- public entry

_default: Sandbox | None = None
_default_lock = threading.Lock()


def configure(config: SandboxConfig | None = None) -> Sandbox:
    """Build and self-test this process's sandbox (start-up: fails loudly here).

    Idempotent for one config; a second, different config raises, since every program
    of a process must run under the same rules.
    """
    global _default
    config = config or SandboxConfig()
    with _default_lock:
        if _default is None:
            _default = Sandbox(config)
        elif _default.config != config:
            raise ValueError(
                f"the code sandbox of this process is already configured as {_default.config!r}; "
                f"cannot reconfigure it as {config!r}. Use one sandbox config per process"
            )
        return _default


def run_program(
    source: str, *, language: str = "python", stdin: str = "", limits: Limits | None = None
) -> RunResult:
    """Run an untrusted program in this process's sandbox (``configure`` first, or the
    default config is used) and say how it ended. ``language``: "python" or "cpp"."""
    sandbox = _default or configure()
    return sandbox.run(source, language=language, stdin=stdin, limits=limits)
