"""A long-lived program in the run sandbox: ``python -I -m stepwell.sandbox.confine JOB``.

eKuiper plugin processes are programs of their own (the plugin's interpreter and
main file), started and restarted by the host, not forks of the fork-server.
This launcher, started in their place, builds the same sandbox a run gets
(``isolate.prepare_view`` and ``isolate.confine``: mount and IPC namespaces, the
read-only view in which only the paths the program needs reappear, rlimits, the
sandbox user in a user namespace of its own, no capabilities, seccomp) in a PID
namespace of the program's own, and then executes the program as its PID 1, with
the launcher's pipes and session; the launcher waits outside as the host's handle
on it (killing the launcher kills the program and whatever it started). What
differs from a run: its ``/tmp`` is the host folder ``tmp_folder`` (the SDK's
sockets live there, the host listening on the same files), with the top-level
``/tmp`` entries named in ``keep`` (an app or environment under ``/tmp``) inside
it; it keeps the network; and it has no time limit (the host times its calls).

It may also write to the host folders ``write_paths`` (a file sink's output
folder, say). ``JOB`` is JSON: ``{"argv", "cwd", "env", "tmp_folder", "keep",
"read_paths", "write_paths", "hide_paths"}``. Isolation the kernel refuses is
reported on stderr, which the host logs, and the program runs with what is
available.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from stepwell.sandbox import linux
from stepwell.sandbox.forkserver import (
    base_read_paths,
    enter_pid_namespace,
    private_folders,
    sandbox_identity,
)
from stepwell.sandbox.isolate import ChildPlan, confine, cover, prepare_view, traversable_ancestors
from stepwell.sandbox.policy import DEFAULT_PROCESSES, SANDBOX_TMP, SandboxSpec


def plan_for(job: dict[str, Any]) -> ChildPlan:
    """The sandbox of ``job``: as a run's, with its own read and hidden folders."""
    spec = SandboxSpec(cwd=job["cwd"], env=dict(job["env"]),
                       read_paths=[job["tmp_folder"], *job["read_paths"], *job["write_paths"]],
                       processes=DEFAULT_PROCESSES)  # fmt: skip
    uid, gid = sandbox_identity(own_user_namespace=False)
    base = base_read_paths()
    return ChildPlan(spec, job["tmp_folder"], uid, gid, base, pidns=False,
                     private_paths=private_folders(),
                     base_traversable=traversable_ancestors(base, uid, gid))  # fmt: skip


def _bind_writable(source: str, target: str) -> None:
    """Mount ``source`` on ``target`` (a mount of its own, so that only it changes)
    and make it writable."""
    linux.mount(source, target, None, linux.MS_BIND | linux.MS_REC)
    linux.mount_setattr(target, linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV,
                        attr_clr=linux.MOUNT_ATTR_RDONLY)  # fmt: skip


def _tmp_is_the_folder(folder: str, keep: list[str]) -> None:
    """Make the view's ``/tmp`` the host folder ``folder`` (seen in the view at its
    own path under ``/tmp``), writable, with the ``keep`` entries of the view's
    ``/tmp`` mounted inside it first."""
    for name in keep:
        linux.mount(os.path.join(SANDBOX_TMP, name), os.path.join(folder, name), None,
                    linux.MS_BIND | linux.MS_REC)  # fmt: skip
    _bind_writable(folder, SANDBOX_TMP)


def _hide(folders: list[str], shown: list[str]) -> None:
    """Cover each of ``folders`` with an empty read-only file system in memory, in
    which only the folders of ``shown`` inside it appear (a plugin's own folder in
    the app's .stepwell, which also holds the store, its secrets and token)."""
    cover(dict.fromkeys(folders, "size=4k,mode=0755"), keep=shown)
    for folder in folders:
        linux.mount_setattr(folder, linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID)


def _own_pid_namespace(plan: ChildPlan) -> bool:
    """Go on as PID 1 of a PID namespace of the program's own (see
    ``enter_pid_namespace``): its /proc then shows only its processes (not the
    host's command lines), and they all end with it. False, with a note, if the
    kernel refuses."""
    try:
        enter_pid_namespace(user_namespace=os.geteuid() != 0)
    except OSError as exc:
        plan.notes.append(f"[stepwell] sandbox: PID namespace unavailable "
                          f"({linux.errno_name(exc)}); host processes may be visible")  # fmt: skip
        return False
    plan.pidns = True
    return True


def main(argv: list[str] | None = None) -> None:
    job = json.loads((sys.argv[1:] if argv is None else argv)[0])
    plan = plan_for(job)  # (before our own user namespace, if any: it reads who may enter where)
    pidns = _own_pid_namespace(plan)
    try:
        view = prepare_view(plan)
        if view.tmp_inside == SANDBOX_TMP:  # (else no mount namespace: the host's /tmp)
            _tmp_is_the_folder(job["tmp_folder"], list(job["keep"]))
            for path in job["write_paths"]:
                _bind_writable(path, path)
            _hide(list(job["hide_paths"]), list(job["read_paths"]))
        notes = confine(plan, view)
    except Exception as exc:  # never run the program in a half-built sandbox
        print(f"[stepwell] sandbox: could not be set up for {job['argv'][-2]}: {exc} "
              "(STEPWELL_SANDBOX=none starts plugin processes without it)", file=sys.stderr)
        raise SystemExit(70) from None
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    # it dies with the launcher outside its PID namespace (the host's handle on it),
    # not, as a run's worker, with the fork-server; without that namespace its parent
    # is a thread of the host, which may end long before the program should
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL if pidns else 0)
    os.execve(job["argv"][0], job["argv"], dict(os.environ))


if __name__ == "__main__":
    main()
