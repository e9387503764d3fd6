"""The seccomp filter every sandboxed program runs under, as classic BPF bytes.

Both sandbox tiers load the same filter: bubblewrap through ``--seccomp FD``, the
restricted tier's launcher through ``prctl(PR_SET_SECCOMP)``. It allows everything a
solution needs and refuses, with EPERM, what only an escape needs: sockets, ptrace and
cross-process memory access, new namespaces, mounts, kernel keyrings, BPF, io_uring
(whose operations bypass seccomp), module and reboot calls, and TTY input injection.
Syscalls of another ABI (i386 ``int 0x80``, x32) kill the process: libseccomp's
default bad-arch action.

Built with ``pyseccomp`` (ctypes over Debian's libseccomp2), once per process.
"""

from __future__ import annotations

import errno
import functools
import os

# Refused outright. Sockets: the restricted tier has no network namespace, and in the
# namespaces tier a socket can still reach a unix socket bound into the sandbox.
_DENIED = (
    "socket",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
    "name_to_handle_at",
    "open_by_handle_at",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "syslog",
    "acct",
    "quotactl",
    "ioperm",
    "iopl",
    "lookup_dcookie",
)

_CLONE_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x00000080,  # CLONE_NEWTIME
)
_TIOCSTI = 0x5412  # push a byte into a terminal's input queue
_TIOCLINUX = 0x541C


@functools.cache
def seccomp_filter_bpf() -> bytes:
    """The filter as BPF bytes (``struct sock_filter[]``). Raises if libseccomp is missing."""
    try:
        import pyseccomp as sc
    except ImportError as err:  # the fix is an install, say which
        raise RuntimeError(
            "the code sandbox needs pyseccomp and libseccomp2: "
            "pip install pyseccomp==0.1.2 and apt-get install libseccomp2"
        ) from err

    filt = sc.SyscallFilter(defaction=sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in _DENIED:
        filt.add_rule(deny, name)
    for flag in _CLONE_NAMESPACE_FLAGS:
        filt.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in a struct seccomp cannot read. ENOSYS makes glibc fall
    # back to clone(2), whose flags the rules above do check.
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for request in (_TIOCSTI, _TIOCLINUX):
        filt.add_rule(deny, "ioctl", sc.Arg(1, sc.EQ, request))

    fd = os.memfd_create("r1lab-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            filt.export_bpf(out)
        size = os.fstat(fd).st_size
        bpf = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if not bpf or len(bpf) % 8:
        raise RuntimeError(f"libseccomp exported a malformed filter ({len(bpf)} bytes)")
    return bpf
