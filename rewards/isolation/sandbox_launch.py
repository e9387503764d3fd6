"""Launcher of the restricted sandbox tier: the no-namespace fallback.

Run as a script, never imported by the trainer: ``python3 -I -S sandbox_launch.py FD``
where FD holds a job written by ``rewards.isolation.sandbox`` (marshal format 4, which every Python
since 3.4 reads; json would add ~7 ms of imports to every run). Standard library only,
so the system interpreter can run it.

The launcher stays outside the sandbox, as a child subreaper (so orphans of the program
come back to it), and forks the program. The child, before ``execve``:
  1. drops to the job's unprivileged uid (when the launcher runs as root);
  2. sets rlimits: CPU, address space, processes, file size, open files, no core files;
  3. sets no-new-privs and enters a Landlock domain: read-only system paths, the scratch
     directory, and (ABI >= 6) no signals or abstract unix sockets leaving the domain;
  4. loads the seccomp filter (no sockets, no ptrace, no namespaces; sandbox_seccomp.py).
After the program exits, the launcher kills whatever it left behind: as root every
process of the job's uid at once (``kill(-1)`` as that uid, atomic against fork), then
every remaining descendant; it reports how the program ended on the status fd.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import signal
import struct
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_PR_SET_CHILD_SUBREAPER = 36
_SECCOMP_MODE_FILTER = 2

# Landlock (include/uapi/linux/landlock.h); syscall numbers are the same on every
# architecture that has them.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def landlock_abi() -> int:
    """Landlock ABI version of the running kernel, 0 when absent or disabled."""
    ret = _libc.syscall(
        _SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(ret), 0)


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2:
        rights |= 1 << 13  # REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def _enter_landlock(abi: int, readable: list[str], writable: list[str], create: bool) -> None:
    handled_fs = _fs_rights(abi)
    fields = [handled_fs]
    if abi >= 4:
        fields.append(_NET_BIND_TCP | _NET_CONNECT_TCP)
    if abi >= 6:
        fields.append(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL)
    attr = struct.pack(f"={len(fields)}Q", *fields)
    ruleset = _check(
        _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    read_rights = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    write_rights = read_rights | _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
    if create:
        write_rights |= _FS_MAKE_REG | _FS_MAKE_DIR | _FS_REMOVE_FILE | _FS_REMOVE_DIR
    rules = [(p, read_rights) for p in readable] + [(p, write_rights) for p in writable]
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        if not os.path.isdir(path):  # files take only file rights
            rights &= _FS_EXECUTE | _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE
        try:
            beneath = struct.pack("=Qi", rights & handled_fs, fd)  # packed struct
            _check(
                _libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                              ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), beneath, ctypes.c_uint32(0)),
                f"landlock_add_rule({path})",
            )
        finally:
            os.close(fd)
    _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
           "landlock_restrict_self")
    os.close(ruleset)


def _load_seccomp(bpf: bytes) -> None:
    program = ctypes.create_string_buffer(bpf, len(bpf))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(bpf) // 8, ctypes.addressof(program))
    _check(_libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
           "prctl(PR_SET_SECCOMP)")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _child(job: dict, bpf: bytes, error_fd: int) -> None:
    """In the forked child: confine this process, then exec the program."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # Python ignores the first two; exec keeps that
    os.setsid()
    if job["uid"] is not None:
        os.setgroups([])
        os.setresgid(job["gid"], job["gid"], job["gid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
    # After the uid change: changing credentials clears the parent-death signal.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != job["launcher_pid"]:
        os._exit(126)
    os.chdir(job["cwd"])
    for name, (soft, hard) in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if job["landlock_abi"] > 0:
        _enter_landlock(job["landlock_abi"], job["readable"], job["writable"], job["create_files"])
    _load_seccomp(bpf)
    os.closerange(3, error_fd)
    os.closerange(error_fd + 1, 1 << 16)
    os.execve(job["argv"][0], job["argv"], job["env"])


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.update(int(p) for p in fh.read().split())
        except OSError:
            continue
    return found


def _descendants(pid: int) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        frontier = set().union(*(_children(p) for p in frontier)) - found
        found |= frontier
    return found


def _sweep(job: dict) -> None:
    """Kill and reap everything the program left behind."""
    if job["uid"] is not None:
        pid = os.fork()
        if pid == 0:  # kill(-1) as the job's uid reaches exactly that uid's processes, atomically
            try:
                os.setresuid(job["uid"], job["uid"], job["uid"])
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    # Without a uid of its own (or should anything remain), walk our descendants: as a
    # subreaper, every orphan of the program is one. Stop them all until the set no
    # longer grows (a stopped process cannot fork), then kill them.
    me = os.getpid()
    while True:
        stopped: set[int] = set()
        while (found := _descendants(me)) - stopped:
            for pid in found - stopped:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            stopped |= found
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, 0 if stopped else os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
            stopped = set()  # reaped one; take the rest without blocking
        if not _descendants(me):
            return


def main() -> int:
    with os.fdopen(int(sys.argv[1]), "rb") as fh:
        job = marshal.loads(fh.read())
    with os.fdopen(job["seccomp_fd"], "rb") as fh:
        bpf = fh.read()
    status_fd = job["status_fd"]
    job["launcher_pid"] = os.getpid()
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    # If the trainer dies (a reward pool killing a worker past its deadline, say), the
    # wall clock it enforced goes with it: stop the program then too.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != job["trainer_pid"]:
        return 0

    child_pid = 0

    def stop(signum: int, frame: object) -> None:  # the trainer's wall-clock deadline
        if child_pid:
            os.kill(child_pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    child_pid = os.fork()
    if child_pid == 0:
        os.close(error_r)
        try:
            _child(job, bpf, error_w)
        except BaseException as err:  # report why the program never started
            os.write(error_w, f"{type(err).__name__}: {err}".encode())
        os._exit(127)
    os.close(error_w)
    error = _read_all(error_r).decode(errors="replace")  # EOF at a successful exec
    os.close(error_r)
    _, wait_status, usage = os.wait4(child_pid, 0)
    _sweep(job)
    report = {
        "started": not error,
        "error": error,
        "exit_code": os.waitstatus_to_exitcode(wait_status),
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }
    os.write(status_fd, marshal.dumps(report, 4))
    return 0


if __name__ == "__main__":
    os._exit(main())  # skips interpreter teardown: a few ms per run
