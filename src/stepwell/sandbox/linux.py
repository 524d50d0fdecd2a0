"""Thin ctypes bindings for the Linux calls the sandbox needs.

Python 3.11 has no ``os.unshare``/``os.setns`` and nothing for mounts,
capabilities or seccomp, so these wrap libc (and raw ``syscall(2)`` for the
newer mount API: ``open_tree``, ``move_mount``, ``mount_setattr``). Every
wrapper raises ``OSError`` with the real errno on failure, so callers can say
precisely which isolation the kernel refused and why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import socket
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
for _name in ("unshare", "setns", "mount", "prctl", "capset"):
    getattr(_libc, _name)  # resolve now (in the fork-server), not in every worker

# -- namespaces (clone flags) -----------------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
    | CLONE_NEWCGROUP
)

# -- mount(2) flags -----------------------------------------------------------------------
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# -- new mount API ----------------------------------------------------------------------
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# -- prctl(2) -------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

_MACHINE = platform.machine()
#: syscall numbers of the new mount API, identical on x86_64 and aarch64 (asm-generic)
_SYS = {
    "x86_64": {"open_tree": 428, "move_mount": 429, "mount_setattr": 442},
    "aarch64": {"open_tree": 428, "move_mount": 429, "mount_setattr": 442},
}.get(_MACHINE, {})


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def errno_name(exc: OSError) -> str:
    """``EPERM``-style name of an OSError's errno (or the message if it has none)."""
    if exc.errno is None:
        return str(exc)
    return errno.errorcode.get(exc.errno, str(exc.errno))


def unshare(flags: int) -> None:
    """Move the caller into new namespaces (``unshare(2)``)."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


#: libc called the way CPython calls its own C API: the GIL stays held throughout
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.fork.restype = ctypes.c_int
_pylibc.fork.argtypes = []


def fork_without_python_hooks() -> int:
    """``fork(2)`` straight from libc: what ``os.fork`` does minus CPython's own
    steps around it (taking the import lock, re-initialising thread states and
    locks in the child, running the ``os.register_at_fork`` hooks). libc's own
    ``pthread_atfork`` handlers still run. Only for a process that has one thread
    and no Python signal handlers; see ``ForkServer.fork_process``."""
    return _check(_pylibc.fork(), "fork")


def setns(fd: int, nstype: int) -> None:
    """Re-associate the caller with the namespace open as ``fd`` (``setns(2)``)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """``mount(2)``; ``None`` arguments become NULL."""
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {target}",
    )


def mounts() -> list[tuple[str, str]]:
    """This mount namespace's mounts as (mount point, file system type), in the
    order of ``/proc/self/mountinfo`` (parents before what is mounted on them)."""
    found = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            found.append((_OCTAL_ESCAPE.sub(_unescape, fields[4]), fstype))
    return found


#: How mountinfo writes a space, tab, newline or backslash in a path (``\040``).
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 8))


#: System V IPC object kinds: their ``/proc/sysvipc`` file and their ``*ctl`` call.
_SYSV_IPC = {"shm": "shmctl", "sem": "semctl", "msg": "msgctl"}
_IPC_RMID = 0


def sysv_ipc_objects() -> set[tuple[str, int]]:
    """The System V IPC objects (kind, id) of this process's IPC namespace."""
    found = set()
    for kind in _SYSV_IPC:
        with open(f"/proc/sysvipc/{kind}") as table:
            next(table)  # (the column names)
            found.update((kind, int(line.split()[1])) for line in table)
    return found


def remove_sysv_ipc(kind: str, ident: int) -> None:
    """Remove System V IPC object ``ident`` of ``kind`` (``shm``, ``sem``, ``msg``)."""
    if kind == "sem":
        _check(_libc.semctl(ident, 0, _IPC_RMID), f"semctl {ident}")
    else:
        _check(getattr(_libc, _SYSV_IPC[kind])(ident, _IPC_RMID, None), f"{kind}ctl {ident}")


def mq_unlink(name: str) -> None:
    """Remove POSIX message queue ``name`` (as listed in an ``mqueue`` mount)."""
    _check(_libc.mq_unlink(("/" + name).encode()), f"mq_unlink {name}")


def proc_stat(pid: int | str) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first, then
    the parent's pid...): the name may hold spaces and parentheses of its own.
    Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()


def _syscall(name: str, *args: object) -> int:
    number = _SYS.get(name)
    if number is None:
        raise OSError(errno.ENOSYS, f"{name}: not supported on {_MACHINE}")
    return _check(_libc.syscall(ctypes.c_long(number), *args), name)


def open_tree(path: str, flags: int) -> int:
    """A detached copy of the mount tree at ``path`` (``open_tree(2)``); returns an fd."""
    return _syscall(
        "open_tree", ctypes.c_int(AT_FDCWD), path.encode(), ctypes.c_uint(flags | OPEN_TREE_CLOEXEC)
    )


def move_mount_fd(fd: int, target: str) -> None:
    """Attach the detached tree ``fd`` at ``target`` (``move_mount(2)``)."""
    _syscall(
        "move_mount", ctypes.c_int(fd), b"", ctypes.c_int(AT_FDCWD), target.encode(),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
    )  # fmt: skip


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(path: str, attr_set: int, attr_clr: int = 0, recursive: bool = False) -> None:
    """Change mount flags of ``path`` (and every mount below it when ``recursive``)."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _syscall(
        "mount_setattr", ctypes.c_int(AT_FDCWD), path.encode(),
        ctypes.c_uint(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )  # fmt: skip


_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if result == -1:  # (the message is made only then: workers call this a lot)
        _check(result, f"prctl({option})")
    return result


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 40


_CAP_LAST = _cap_last_cap()


PR_SET_SECUREBITS = 28
#: root gains nothing on execve, setuid keeps nothing, no ambient raise; all locked
SECUREBITS_LOCKED_DOWN = 0xEF


def drop_capabilities(bounding_set: bool = True) -> None:
    """Empty the effective, permitted, inheritable and ambient sets, and lock the
    securebits so that nothing (execve as root, setuid) can bring any back.
    ``bounding_set`` also empties the bounding set (one prctl per capability;
    belt and braces once the securebits are locked and no_new_privs is set)."""
    prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN)
    if bounding_set:
        for cap in range(_CAP_LAST + 1):
            try:
                prctl(PR_CAPBSET_DROP, cap)
            except OSError:
                break
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


# -- seccomp ---------------------------------------------------------------------------
#: Syscalls a sandboxed step never needs and that widen the kernel surface or reach
#: other processes: debugging other processes, mounts and namespaces, kernel keyrings,
#: BPF and perf, module loading, io_uring (which bypasses seccomp), handle-based opens.
_DENIED_X86_64 = {
    "ptrace": 101, "syslog": 103, "pivot_root": 155, "chroot": 161, "acct": 163,
    "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
    "init_module": 175, "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "setns": 308, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "finit_module": 313, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "pidfd_getfd": 438, "mount_setattr": 442,
}  # fmt: skip
_X86_64_CLONE, _X86_64_CLONE3, _X86_64_SOCKET = 56, 435, 41
_AUDIT_ARCH_X86_64 = 0xC000003E
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_KILL_PROCESS = 0x80000000


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_supported() -> bool:
    return _MACHINE == "x86_64"


def _seccomp_program(unix_sockets: bool = True) -> bytes:
    """A classic-BPF filter: deny the calls above with EPERM, namespace-creating
    ``clone`` flags with EPERM, ``clone3`` with ENOSYS (libc falls back to
    ``clone``, whose flags can be checked), and kill on a foreign architecture.
    Without ``unix_sockets``, ``socket(AF_UNIX, ...)`` fails with EAFNOSUPPORT: a
    step without network then cannot reach the host's services through their
    Unix sockets either (``socketpair``, which reaches no one, still works)."""
    insns: list[tuple[int, int | str, int | str, int]] = []
    labels: dict[str, int] = {}

    def op(code: int, jt: int | str, jf: int | str, k: int) -> None:
        insns.append((code, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(insns)

    op(_BPF_LD_W_ABS, 0, 0, 4)  # seccomp_data.arch
    op(_BPF_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64)
    op(_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS)
    op(_BPF_LD_W_ABS, 0, 0, 0)  # seccomp_data.nr
    op(_BPF_JGE_K, "eperm", 0, 0x40000000)  # x32 ABI: refuse outright
    for number in sorted(_DENIED_X86_64.values()):
        op(_BPF_JEQ_K, "eperm", 0, number)
    op(_BPF_JEQ_K, "clone", 0, _X86_64_CLONE)
    op(_BPF_JEQ_K, "enosys", 0, _X86_64_CLONE3)
    if not unix_sockets:
        op(_BPF_JEQ_K, "socket", 0, _X86_64_SOCKET)
    op(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)
    label("eperm")
    op(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM)
    label("enosys")
    op(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.ENOSYS)
    label("clone")
    op(_BPF_LD_W_ABS, 0, 0, 16)  # low 32 bits of args[0]: the clone flags
    op(_BPF_JSET_K, 0, 1, NAMESPACE_FLAGS)
    op(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM)
    op(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)
    if not unix_sockets:
        label("socket")
        op(_BPF_LD_W_ABS, 0, 0, 16)  # low 32 bits of args[0]: the address family
        op(_BPF_JEQ_K, 0, 1, socket.AF_UNIX)
        op(_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT)
        op(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW)

    def offset(at: int, target: int | str) -> int:  # (forward only, from the next one)
        return target if isinstance(target, int) else labels[target] - (at + 1)

    return b"".join(struct.pack("=HBBI", code, offset(at, jt), offset(at, jf), k)
                    for at, (code, jt, jf, k) in enumerate(insns))  # fmt: skip


def install_seccomp(unix_sockets: bool = True) -> None:
    """Install the filter (needs no_new_privs or CAP_SYS_ADMIN). x86_64 only."""
    if not seccomp_supported():
        raise OSError(errno.ENOSYS, f"no seccomp filter for {_MACHINE}")
    program = _SECCOMP_FPROG if unix_sockets else _SECCOMP_FPROG_NO_UNIX
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(program[0]))


def _compiled(program: bytes) -> tuple[_SockFprog, ctypes.Array[ctypes.c_char]]:
    """A filter as ``prctl`` takes it (with the buffer it points into, kept alive)."""
    buffer = ctypes.create_string_buffer(program, len(program) or 1)
    return _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p)), buffer


#: Built once (in the fork-server) rather than in every worker.
_SECCOMP_FPROG = _compiled(_seccomp_program() if seccomp_supported() else b"")
_SECCOMP_FPROG_NO_UNIX = _compiled(_seccomp_program(unix_sockets=False) if seccomp_supported() else b"")


def warm_up() -> None:
    """Touch the ctypes paths of a worker's set-up once in the fork-server, so their
    first-use cost is not paid again by every worker."""
    prctl(3)  # PR_GET_DUMPABLE
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    ctypes.byref(header), ctypes.byref(data), ctypes.byref(_MountAttr(0, 0, 0, 0))
    ctypes.addressof(_SECCOMP_FPROG[0]), ctypes.addressof(_SECCOMP_FPROG_NO_UNIX[0])
