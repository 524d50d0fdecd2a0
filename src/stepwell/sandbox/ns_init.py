"""The program that is PID 1 of each run's PID namespace.

It has nothing to do but exist (the namespace ends when it does) and end when
the fork-server does: it reads from its standard input, a pipe only the
fork-server can write to, so it blocks until that pipe reports end-of-file.

``cat`` behaves so, but as a dynamically linked program each start maps and
relocates the C library: about 0.5 ms of CPU per run, a tenth of a warm step.
On x86_64 the fork-server runs the 25 bytes of machine code below
instead (``read(0, buf, 1); exit(0)`` as a static ELF file of 145 bytes, kept
in a sealed memfd); elsewhere, or where the kernel will not run it, ``cat``.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import signal
import struct
import time

#: read(0, rsp - 16, 1); exit(0)
_X86_64_CODE = bytes([
    0x31, 0xFF,                     # xor edi, edi         fd 0
    0x48, 0x8D, 0x74, 0x24, 0xF0,   # lea rsi, [rsp - 16]  a byte below the stack top
    0xBA, 0x01, 0x00, 0x00, 0x00,   # mov edx, 1
    0x31, 0xC0,                     # xor eax, eax         SYS_read
    0x0F, 0x05,                     # syscall              (blocks until end-of-file)
    0xB8, 0x3C, 0x00, 0x00, 0x00,   # mov eax, 60          SYS_exit
    0x31, 0xFF,                     # xor edi, edi         status 0
    0x0F, 0x05,                     # syscall
])  # fmt: skip
_LOAD_ADDRESS = 0x400000
_ELF_HEADER, _PROGRAM_HEADER = 64, 56


def static_elf(code: bytes, machine: int = 0x3E) -> bytes:
    """A 64-bit little-endian executable: one read+execute segment holding the
    headers and ``code``, which is the entry point."""
    entry = _LOAD_ADDRESS + _ELF_HEADER + _PROGRAM_HEADER
    size = _ELF_HEADER + _PROGRAM_HEADER + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, LE, version 1, SysV
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2, machine, 1, entry,        # ET_EXEC, machine, version, entry point
        _ELF_HEADER, 0, 0,           # program headers right after, no sections, flags
        _ELF_HEADER, _PROGRAM_HEADER, 1, 0, 0, 0,
    )  # fmt: skip
    segment = struct.pack(
        "<IIQQQQQQ",
        1, 5, 0,                     # PT_LOAD, readable + executable, from offset 0
        _LOAD_ADDRESS, _LOAD_ADDRESS, size, size, 0x1000,
    )  # fmt: skip
    return header + segment + code


class InitProgram:
    """What the fork-server executes as a namespace's init (``path``, or None if
    neither program is available). Call ``close`` when done."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.path: str | None = self._static_program() or _cat()

    def _static_program(self) -> str | None:
        if platform.machine() not in ("x86_64", "AMD64") or not hasattr(os, "memfd_create"):
            return None
        try:
            fd = os.memfd_create("stepwell-init", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            return None
        try:
            os.write(fd, static_elf(_X86_64_CODE))
            seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            path = f"/proc/self/fd/{fd}"
            if _runs(path):
                self._fd = fd
                return path
        except OSError:
            pass
        os.close(fd)
        return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _cat() -> str | None:
    return shutil.which("cat") or ("/bin/cat" if os.path.exists("/bin/cat") else None)


def _runs(path: str) -> bool:
    """Whether ``path`` starts, reads end-of-file from its input and exits 0 (a
    kernel may refuse to execute memfds: ``vm.memfd_noexec``)."""
    read, write = os.pipe()
    try:
        pid = os.posix_spawn(path, ["stepwell-init"], {}, file_actions=[(os.POSIX_SPAWN_DUP2, read, 0)])
    except OSError:
        return False
    finally:
        os.close(read)
        os.close(write)  # its end-of-file: it should exit at once
    deadline = time.monotonic() + 5
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.001)
    return os.waitstatus_to_exitcode(ended[1]) == 0
