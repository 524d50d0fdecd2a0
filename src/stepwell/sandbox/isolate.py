"""Entering the sandbox: what a freshly forked worker does before it runs user code.

Runs in the child the fork-server just forked (already in a fresh PID
namespace when the kernel allowed one), as the fork-server's user, in this
order:

1. die with the fork-server, prefer this process to the OOM killer, new session,
   only the channel and stderr stay open;
2. new mount and IPC namespaces;
3. the filesystem: everything read-only, a private file system in memory at
   ``/tmp`` of the step's ``tmp`` size (also HOME and TMPDIR), a private
   ``/dev/shm``, a fresh ``/proc`` showing only the sandbox's processes, the
   store's folder hidden behind an empty tmpfs, and folders the sandbox user
   cannot traverse (``/root``) replaced by an empty tmpfs in which only the
   paths the step needs (the app, Python, its environment) reappear. Steps 2-3
   depend only on the app's folders (and the ``tmp`` size), so a spare worker
   does them (``prepare_view``) before its run arrives;
4. a new network namespace when the step has no network;
5. rlimits (memory, CPU time, open files, file size, no core files);
6. drop to an unprivileged user (when the fork-server is root), then a new user
   namespace mapping that user to uid 0 inside; then the process limit (counted
   per user namespace, so concurrent runs do not share it). A fork-server that
   is not root enters the user namespace first instead, to gain the rights for
   steps 2-4 there;
7. no capabilities, no new privileges, not dumpable, and a seccomp filter (which,
   for a step without network, also refuses Unix sockets: the host's services
   listen on some that anyone may connect to).

Every feature the kernel refuses is skipped and reported as a note; the worker
writes those notes into the run log (and strict mode refuses to run).
"""

from __future__ import annotations

import os
import resource
import signal
import stat
from dataclasses import dataclass, field

from stepwell.sandbox import linux
from stepwell.sandbox.policy import SANDBOX_TMP, SHM_SIZE, SandboxSpec, format_bytes

#: File descriptor the worker's channel is moved to.
CHANNEL_FD = 3
#: Whether this process, a worker once ``enter_sandbox`` returned, has an IPC
#: namespace of its own (only then are the IPC objects it sees its runs' alone).
own_ipc_namespace = False


@dataclass
class ChildPlan:
    """A run's sandbox as decided by the fork-server before it forks."""

    spec: SandboxSpec
    #: a private temp dir on the host: the run's /tmp only where the kernel refuses
    #: a mount namespace (else /tmp is a file system in memory of the run's own)
    tmpdir: str
    #: user and group to become before the user namespace (None: stay as we are)
    uid: int | None
    gid: int | None
    #: folders every worker must read: Python's prefix, sys.path, stepwell itself
    #: (resolved and checked once, when the fork-server started)
    base_read_paths: list[str]
    #: True when the child is PID 2 of a fresh PID namespace
    pidns: bool
    notes: list[str] = field(default_factory=list)
    #: folders shown empty but for the read paths inside them (``private_folders``)
    private_paths: list[str] = field(default_factory=list)
    #: True when ``detach_process`` already ran (in a spare worker)
    detached: bool = False
    #: whether ``uid`` may traverse each ancestor of ``base_read_paths`` (worked out
    #: once, by ``traversable_ancestors``; other folders are checked run by run)
    base_traversable: dict[str, bool] = field(default_factory=dict)


def _note_unavailable(plan: ChildPlan, what: str, exc: OSError | str, consequence: str) -> None:
    reason = exc if isinstance(exc, str) else linux.errno_name(exc)
    plan.notes.append(f"[stepwell] sandbox: {what} unavailable ({reason}); running {consequence}")


def _consequence(plan: ChildPlan, name: str) -> str:
    """What running without namespace ``name`` means (without a mount namespace,
    also that the run's /tmp is a host folder its `tmp` limit does not bound)."""
    consequence = _NAMESPACES[name][2]
    if name == "mount":
        consequence += (f"; its /tmp (TMPDIR) is a folder on the host's disk, where the `tmp` "
                        f"limit ({format_bytes(plan.spec.tmp)}) does not hold")  # fmt: skip
    return consequence


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def detach_process() -> None:
    """Tie the child's life to the fork-server, make it the OOM killer's first
    choice, give it its own session and default signal handling."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    try:
        _write("/proc/self/oom_score_adj", "1000")
    except OSError:
        pass
    os.setsid()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _prepare_process(plan: ChildPlan, channel_fd: int, stderr_fd: int) -> None:
    """Detach (unless a spare worker did already) and keep only the fds it needs."""
    if not plan.detached:
        detach_process()
    devnull = os.open(os.devnull, os.O_RDONLY)
    # move the channel out of the way before stdio is set up (it may be fd 0-2)
    channel = os.dup(channel_fd)
    os.dup2(devnull, 0)
    os.dup2(stderr_fd, 1)
    os.dup2(stderr_fd, 2)
    os.dup2(channel, CHANNEL_FD)
    os.set_inheritable(CHANNEL_FD, False)
    os.closerange(CHANNEL_FD + 1, 1 << 20)


_NAMESPACES = {
    "mount": (linux.CLONE_NEWNS, "mount namespace",
              "without a read-only filesystem view: only file permissions protect the host's files"),
    "ipc": (linux.CLONE_NEWIPC, "IPC namespace",
            "sharing System V IPC and POSIX message queues with the host"),
    "net": (linux.CLONE_NEWNET, "network namespace",
            "with the host's network although the step has `network: false`"),
}  # fmt: skip


def _unshare_namespaces(plan: ChildPlan, names: list[str]) -> set[str]:
    """New namespaces of ``names`` (keys of ``_NAMESPACES``); returns those obtained."""
    got: set[str] = set()
    todo = {}
    for name in names:
        flag, label, _ = _NAMESPACES[name]
        consequence = _consequence(plan, name)
        if name in plan.spec.skip:
            _note_unavailable(plan, label, "disabled by STEPWELL_SANDBOX_SKIP", consequence)
        else:
            todo[name] = flag
    flags = 0
    for flag in todo.values():
        flags |= flag
    if not flags:
        return got
    try:
        linux.unshare(flags)
        return set(todo)
    except OSError:
        pass
    for name, flag in todo.items():  # find out which one the kernel refuses
        try:
            linux.unshare(flag)
            got.add(name)
        except OSError as exc:
            _note_unavailable(plan, _NAMESPACES[name][1], exc, _consequence(plan, name))
    return got


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _traversable(path: str, uid: int, gid: int | None) -> bool:
    """Whether ``uid`` (in group ``gid``, if any) may enter folder ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def traversable_ancestors(paths: list[str], uid: int | None, gid: int | None) -> dict[str, bool]:
    """Whether ``uid`` may traverse each folder above (and at) ``paths``."""
    if uid is None:
        return {}
    return {a: _traversable(a, uid, gid) for path in paths for a in _ancestors(path)}


def _read_paths(plan: ChildPlan) -> list[str]:
    """Folders that must stay readable, outermost first, nested ones dropped."""
    paths = list(plan.base_read_paths)
    for raw in [plan.spec.app_root, *plan.spec.read_paths]:
        if raw and os.path.exists(raw):
            paths.append(os.path.realpath(raw))
    kept: list[str] = []
    for path in sorted(set(paths), key=len):
        if not any(_under(path, k) for k in kept):
            kept.append(path)
    return kept


def _setup_filesystem(plan: ChildPlan, pidns: bool, own_ipc: bool) -> None:
    spec = plan.spec
    covers: dict[str, str] = {}
    if os.path.isdir(SANDBOX_TMP):
        covers[SANDBOX_TMP] = "tmp"
    if os.path.isdir("/dev/shm"):
        covers["/dev/shm"] = "shm"
    read_paths = _read_paths(plan)
    for private in plan.private_paths:
        if private != "/" and os.path.isdir(private) and not any(_under(private, c) for c in covers):
            covers[private] = "shim"
    if plan.uid is not None:
        for path in read_paths:
            for ancestor in _ancestors(path):
                if any(_under(ancestor, c) for c in covers):
                    break
                known = plan.base_traversable.get(ancestor)
                if known is None:
                    known = _traversable(ancestor, plan.uid, plan.gid)
                if not known:
                    covers[ancestor] = "shim"
                    break
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    options = {"tmp": _tmp_options(plan), "shm": f"size={SHM_SIZE},mode=1777",
               "shim": "size=1m,mode=0755"}  # fmt: skip
    cover({target: options[kind] for target, kind in covers.items()}, keep=read_paths)
    hidden = list(spec.hide_paths)
    if spec.app_root:
        hidden.append(os.path.join(os.path.realpath(spec.app_root), ".stepwell"))
    for path in dict.fromkeys(hidden):  # (the host may name .stepwell too)
        if os.path.isdir(path):
            linux.mount("tmpfs", path, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=4k,mode=0755")
    proc_flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    if own_ipc:
        _cover_message_queues(proc_flags)
    try:
        linux.mount("proc", "/proc", "proc", proc_flags, "hidepid=invisible")
    except OSError:
        if pidns:
            linux.mount("proc", "/proc", "proc", proc_flags)
        else:
            plan.notes.append(
                "[stepwell] sandbox: private /proc unavailable; host processes are visible in /proc"
            )
    _make_read_only()


def cover(targets: dict[str, str], keep: list[str]) -> None:
    """Mount an empty tmpfs (with the given mount options) on each of ``targets``,
    in which the paths of ``keep`` that lie inside one reappear as they were."""
    clones = [(path, linux.open_tree(path, linux.OPEN_TREE_CLONE | linux.AT_RECURSIVE))
              for path in keep if any(_under(path, t) for t in targets)]  # fmt: skip
    for target in sorted(targets, key=len):
        linux.mount("tmpfs", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, targets[target])
    for path, fd in clones:
        os.makedirs(path, 0o755, exist_ok=True)
        linux.move_mount_fd(fd, path)
        os.close(fd)


def _cover_message_queues(flags: int) -> None:
    """Mount the run's own POSIX message queues over each ``mqueue`` mount of the
    host (such as ``/dev/mqueue``): the host's would show the host's queues, and
    open() on one of them reads its messages whatever the IPC namespace."""
    for target, fstype in linux.mounts():
        if fstype == "mqueue" and os.path.isdir(target):
            linux.mount("mqueue", target, "mqueue", flags)


def _tmp_options(plan: ChildPlan) -> str:
    """Mount options of the run's private /tmp: a file system in memory of the
    step's ``tmp`` size (one inode per 4 KiB of it, so a run cannot spend the
    kernel's memory on empty files either), owned by the user the step runs as."""
    size = max(plan.spec.tmp, 1024**2)
    uid = plan.uid if plan.uid is not None else os.geteuid()
    gid = plan.gid if plan.gid is not None else os.getegid()
    return f"size={size},nr_inodes={max(size // 4096, 1024)},mode=0700,uid={uid},gid={gid}"


def _make_read_only() -> None:
    """Every mount read-only and nosuid, except the private /tmp and /dev/shm, and
    /proc (the worker writes its own uid map there; what else is writable in it is
    guarded by ownership, and the sandbox user owns nothing of the host)."""
    writable = [p for p in (SANDBOX_TMP, "/dev/shm", "/proc") if os.path.isdir(p)]
    try:
        linux.mount_setattr("/", linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID, recursive=True)
        for path in writable:
            linux.mount_setattr(
                path,
                linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV | linux.MOUNT_ATTR_NOEXEC,
                attr_clr=linux.MOUNT_ATTR_RDONLY,
            )
        return
    except OSError as exc:
        if exc.errno != 38:  # ENOSYS: an older kernel; remount one by one below
            raise
    for target, _ in linux.mounts():
        if target in writable:
            continue
        flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID
        try:
            vfs = os.statvfs(target)
            if vfs.f_flag & os.ST_NODEV:
                flags |= linux.MS_NODEV
            if vfs.f_flag & os.ST_NOEXEC:
                flags |= linux.MS_NOEXEC
            linux.mount(None, target, None, flags)
        except OSError:
            continue
    for target in writable:
        linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID
                    | linux.MS_NODEV | linux.MS_NOEXEC)  # fmt: skip


def _virtual_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _set_limit(which: int, value: int) -> None:
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and value > hard:
        value = hard
    resource.setrlimit(which, (value, value))


def _apply_rlimits(plan: ChildPlan) -> None:
    spec = plan.spec
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_NOFILE, spec.open_files)
    _set_limit(resource.RLIMIT_FSIZE, spec.file_size)
    if spec.cpu is not None:
        seconds = max(1, int(spec.cpu + 0.999))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    if spec.memory is not None:
        # the worker's own baseline (Python, pyarrow, address space reserved but not
        # used) is not the step's: the limit is what the step may add to it
        _set_limit(resource.RLIMIT_AS, _virtual_size() + int(spec.memory))


def _enter_user_namespace(plan: ChildPlan) -> bool:
    """Become the unprivileged sandbox user, then uid 0 of a fresh user namespace."""
    if plan.uid is not None:
        os.setgroups([])
        os.setresgid(plan.gid, plan.gid, plan.gid)
        os.setresuid(plan.uid, plan.uid, plan.uid)
    # a non-dumpable process (the fork-server's flag, or the uid change) may not
    # write its own uid/gid maps
    linux.prctl(linux.PR_SET_DUMPABLE, 1)
    if "user" in plan.spec.skip:
        _note_unavailable(plan, "user namespace", "disabled by STEPWELL_SANDBOX_SKIP",
                          f"as uid {os.getuid()} without one")  # fmt: skip
        return False
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    try:
        linux.unshare(linux.CLONE_NEWUSER)
    except OSError as exc:
        _note_unavailable(plan, "user namespace", exc, f"as uid {outer_uid} without one")
        return False
    map_to_root(outer_uid, outer_gid)
    return True


def map_to_root(uid: int, gid: int) -> None:
    """In a user namespace just made: be its uid and gid 0, mapped to ``uid`` and
    ``gid`` outside (and to nothing else)."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def _harden(plan: ChildPlan) -> None:
    try:
        linux.drop_capabilities()
    except OSError as exc:
        _note_unavailable(plan, "dropping capabilities", exc, "with the capabilities it has")
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    if "seccomp" in plan.spec.skip:
        _note_unavailable(plan, "seccomp filter", "disabled by STEPWELL_SANDBOX_SKIP",
                          "without a system-call filter")  # fmt: skip
    else:
        try:
            linux.install_seccomp(unix_sockets=plan.spec.network)
        except OSError as exc:
            _note_unavailable(plan, "seccomp filter", exc, "without a system-call filter")
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    try:  # credential changes cleared it
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class PreparedView:
    """What ``prepare_view`` set up, ahead of the run in a spare worker."""

    #: True when the fork-server is root (the user namespace comes after the view)
    privileged: bool
    #: the private temp dir as the worker sees it
    tmp_inside: str
    #: notes on isolation features the kernel refused
    notes: list[str]
    #: True when the view has an IPC namespace of its own
    own_ipc: bool = False

    @staticmethod
    def key(spec: SandboxSpec) -> tuple:
        """What a view depends on: two specs with equal keys can share one. The
        folders' identities count too: a view shows the folder it was built from,
        so an app folder replaced since (same path, new directory) needs a new one."""
        folders = [spec.app_root, *spec.read_paths, *spec.hide_paths]
        return (*folders, "|", *spec.skip, "|", spec.tmp, *(_identity(f) for f in folders))


def _identity(path: str | None) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st else None


def prepare_view(plan: ChildPlan) -> PreparedView:
    """Steps 2-3 (and, for an unprivileged fork-server, the user namespace first):
    the mount and IPC namespaces and the filesystem view. They depend only on the
    folders in ``PreparedView.key``, not on the run, so a spare worker builds
    them before its run arrives, off the run's critical path."""
    privileged = os.geteuid() == 0
    if not privileged:
        _enter_user_namespace(plan)
    namespaces = _unshare_namespaces(plan, ["mount", "ipc"])
    tmp_inside = plan.tmpdir
    if "mount" in namespaces:
        try:
            _setup_filesystem(plan, plan.pidns, "ipc" in namespaces)
            tmp_inside = SANDBOX_TMP
        except OSError as exc:
            _note_unavailable(plan, "read-only filesystem", exc,
                              "with the host's filesystem (file permissions still apply)")  # fmt: skip
    return PreparedView(privileged, tmp_inside, list(plan.notes), "ipc" in namespaces)


def enter_sandbox(
    plan: ChildPlan, channel_fd: int, stderr_fd: int, view: PreparedView | None = None
) -> list[str]:
    """Isolate the calling (freshly forked) process as ``plan`` says; ``view`` is
    what this process prepared for it already (``prepare_view``), if anything.

    Returns the notes to write into the run log: one line per isolation feature
    that could not be had. Afterwards the channel is on fd ``CHANNEL_FD``."""
    _prepare_process(plan, channel_fd, stderr_fd)
    spec = plan.spec
    if not plan.pidns and "pid" in spec.skip and not any("PID namespace" in n for n in plan.notes):
        _note_unavailable(plan, "PID namespace", "disabled by STEPWELL_SANDBOX_SKIP",
                          "in the host's PID namespace (other processes may be visible)")  # fmt: skip
    if view is None:
        view = prepare_view(plan)
    else:
        plan.notes.extend(n for n in view.notes if n not in plan.notes)
    return confine(plan, view)


def confine(plan: ChildPlan, view: PreparedView) -> list[str]:
    """Steps 4-7, once the view is built (``prepare_view``): network, rlimits, the
    user namespace, the process limit, capabilities and seccomp; then the working
    folder and environment. Returns the notes (features the kernel refused)."""
    global own_ipc_namespace
    own_ipc_namespace = view.own_ipc
    spec = plan.spec
    if not spec.network:
        _unshare_namespaces(plan, ["net"])
    _apply_rlimits(plan)
    if view.privileged:
        _enter_user_namespace(plan)
    processes = spec.processes
    if processes is not None:
        _set_limit(resource.RLIMIT_NPROC, int(processes))
    _harden(plan)
    os.chdir(spec.cwd)
    _set_environment({**spec.env, "HOME": view.tmp_inside, "TMPDIR": view.tmp_inside})
    return plan.notes


def _set_environment(wanted: dict[str, str]) -> None:
    """Make the environment exactly ``wanted``, touching only what differs (the
    fork-server's few variables, such as PATH, are mostly kept)."""
    for key in [k for k in os.environ if k not in wanted]:
        del os.environ[key]
    for key, value in wanted.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
