"""Running model-written code: each program in its own throw-away operating-system sandbox.

HumanEval scores a completion by running it against the problem's tests, so we execute code that
a model wrote. Nothing that guards it lives inside the interpreter that runs it (code can undo
anything done there); the walls are the kernel's:

* **Namespaces** (util-linux `unshare`): new mount, PID, network, IPC and UTS namespaces, plus a
  user namespace when we are not root. The program sees a fresh /proc with only its own
  processes, has no network (only a loopback device that is down), and everything it starts dies
  with it.
* **A new root** (`pivot_root`): an empty read-only tmpfs holding read-only bind mounts of /usr,
  /bin, /lib, /lib64, /sbin and the Python installation, /dev/null, /dev/zero, /dev/random and
  /dev/urandom, the fresh /proc, and one writable tmpfs, /work (64 MiB), its cwd, HOME and TMPDIR.
  The host's other files (/root, /home, /etc, /tmp, the evaluation's own files) do not exist there.
* **No privileges** (`setpriv`): as root, the program runs as user nobody (65534); otherwise as
  the invoking user. Either way with no capabilities (bounding set emptied) and no_new_privs, so
  it can neither remount anything writable nor gain privileges from a setuid file.
* **Resource limits** (`prlimit`): CPU seconds, address space, size of any written file (stdout
  and stderr included), open files, processes, no core dumps; and a wall-clock timeout after which
  the whole namespace is killed.

**The verdict comes from the parent.** `check_function` never runs the tests in the sandbox: the
sandboxed process loads the model's code and answers calls to its function over a pair of pipes,
one plain value per call (see `sandbox_child.py`); the tests run here, in the parent, with a
stand-in for the function that makes those calls. So no secret exists that the code could read or
print, and an early `exit(0)`, a patched `sys.excepthook` or an object whose `__eq__` is always
true cannot pass: only the values the function returns count. (The tests are the data set's own
code, trusted like ours.)

Where the kernel refuses namespaces, or util-linux is missing, running untrusted code is refused
(`SandboxUnavailable`) unless the caller passes `unsafe_exec=True`: the program then runs with
the resource limits only, in a temporary directory, able to do anything the user can.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from riverllm.errors import RiverError
from riverllm.eval import sandbox_child

NOBODY = 65534
CHILD_SOURCE = Path(sandbox_child.__file__).read_text(encoding="utf-8")  # run with python -c


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, sandbox and interpreter start-up included
    cpu_s: int = 10
    memory_bytes: int = 2 << 30  # address space
    file_size_bytes: int = 16 << 20  # any one file written, stdout and stderr included
    work_dir_bytes: int = 64 << 20  # the writable tmpfs, all files together
    processes: int = 32
    open_files: int = 64
    answer_bytes: int = 16 << 20  # one value the function sends back


@dataclass
class ExecutionResult:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str  # why it failed: the error, or the limit that stopped it
    seconds: float


class SandboxUnavailable(RiverError):
    pass


# Runs as (namespace) root in the new mount namespace, then execs the rest of its arguments
# (setpriv ... prlimit ... python ...) inside the new root. Arguments: the run directory (its
# `root` is the mount point, its `program.py` the code), the work tmpfs size, the host
# directories to bind read-only, "--", the command.
SETUP = r'''
set -eu
run="$1"; work_bytes="$2"; shift 2
R="$run/root"
mount -t tmpfs -o size=1m,mode=755 sandbox-root "$R"
for d in /usr /bin /lib /lib64 /sbin; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$R$d"
  elif [ -d "$d" ]; then mkdir -p "$R$d"; mount --bind -o ro,nosuid,nodev "$d" "$R$d"; fi
done
while [ "$1" != "--" ]; do
  if [ ! -e "$R$1" ]; then mkdir -p "$R$1"; mount --bind -o ro,nosuid,nodev "$1" "$R$1"; fi
  shift
done
shift
mkdir "$R/dev"
for n in null zero random urandom; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
mkdir "$R/proc"; mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mkdir "$R/work"; mount -t tmpfs -o "size=$work_bytes,mode=1777,nosuid,nodev" sandbox-work "$R/work"
cp "$run/program.py" "$R/work/program.py"; chmod 0644 "$R/work/program.py"
mkdir "$R/.old"; cd "$R"; pivot_root . .old; umount -l /.old; rmdir /.old
mount -o remount,bind,ro /
cd /work
exec "$@"
'''

_NAMESPACES = ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
               "--propagation", "private"]
_NO_PRIVILEGES = ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]


@dataclass(frozen=True)
class _Isolation:
    namespaces: list[str]  # the unshare command
    drop: list[str]  # the setpriv command
    uid: int  # the host user the program runs as (RLIMIT_NPROC counts that user's processes)


def _python_dirs() -> list[str]:
    """Host directories the sandboxed interpreter needs, beyond /usr: its installation (and a
    virtual environment's), read-only at the same paths."""
    dirs = {sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent.parent)}
    return sorted(d for d in dirs if not d.startswith("/usr/"))


def _candidates() -> list[_Isolation]:
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if unshare is None or setpriv is None:
        return []
    user_namespace = _Isolation([unshare, "--user", "--map-root-user", *_NAMESPACES[1:]],
                                [setpriv, *_NO_PRIVILEGES], os.getuid())
    if os.geteuid() != 0:
        return [user_namespace]
    # Root makes the namespaces without a user namespace, so that the program can run as nobody
    # (in a user namespace that root maps to itself, the program would still own root's files).
    as_nobody = _Isolation([unshare, *_NAMESPACES[1:]], [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                                         "--clear-groups", *_NO_PRIVILEGES], NOBODY)
    return [as_nobody, user_namespace]


@functools.cache
def _isolation() -> _Isolation | str:
    """The first way of isolating that works here, tried on a real program; or why none does."""
    reason = "util-linux's unshare and setpriv are not installed"
    for isolation in _candidates():
        result = _run(isolation, "import os\nassert os.listdir('/work') == ['program.py']\n",
                      ["program.py"], SandboxLimits(timeout_s=20), ())
        process, out_dir = result
        try:
            returncode = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            returncode = -1
        finally:
            _stop(process)
        if returncode == 0:
            shutil.rmtree(out_dir, ignore_errors=True)
            return isolation
        reason = _tail(out_dir / "stderr").strip().splitlines()[-1:] or [f"exit status {returncode}"]
        reason = reason[0][:200]
        shutil.rmtree(out_dir, ignore_errors=True)
    return reason


def ensure_sandbox(unsafe_exec: bool = False) -> None:
    """Raise SandboxUnavailable unless model-written code can be run isolated (or the caller
    accepts running it without isolation). Cheap after the first call: call it before slow work."""
    found = _isolation()
    if isinstance(found, str) and not unsafe_exec:
        raise SandboxUnavailable(
            f"cannot isolate model-written code on this machine ({found}); HumanEval runs it, so it needs "
            "Linux user/mount/PID/network namespaces (util-linux unshare), or an explicit unsafe_exec=True "
            "(riverllm eval --unsafe-exec), only on a machine you can throw away")


def _process_count(uid: int) -> int:
    """Processes `uid` runs now. RLIMIT_NPROC caps a user's processes in all, not one program's,
    so the program's cap is this count plus its own allowance."""
    count = 0
    for entry in os.scandir("/proc"):
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            pass
    return count


def _prlimit(limits: SandboxLimits, uid: int) -> list[str]:
    return ["prlimit", f"--cpu={limits.cpu_s}", f"--as={limits.memory_bytes}", f"--fsize={limits.file_size_bytes}",
            f"--nofile={limits.open_files}", f"--nproc={limits.processes + _process_count(uid)}", "--core=0", "--"]


def _run(isolation: _Isolation | None, program: str, python_args: list[str], limits: SandboxLimits,
         pass_fds: tuple[int, ...]) -> tuple[subprocess.Popen, Path]:
    """Start `python -I -S -B *python_args` on `program` (as /work/program.py, its cwd); no isolation
    but the limits when `isolation` is None. Returns the process and the run directory, whose
    `stdout` and `stderr` files get the program's output."""
    run = Path(tempfile.mkdtemp(prefix="riverllm-sandbox-"))
    (run / "program.py").write_text(program, encoding="utf-8")
    python = [sys.executable, "-I", "-S", "-B", *python_args]
    if isolation is not None:
        (run / "root").mkdir()
        home = "/work"
        command = [*isolation.namespaces, "sh", "-c", SETUP, "riverllm-sandbox", str(run), str(limits.work_dir_bytes),
                   *_python_dirs(), "--", *isolation.drop, *_prlimit(limits, isolation.uid), *python]
        cwd = run
    else:
        home = str(run / "work")
        (run / "work").mkdir()
        shutil.move(run / "program.py", run / "work" / "program.py")
        command = [*_prlimit(limits, os.getuid()), *python]
        cwd = run / "work"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
    with (run / "stdout").open("wb") as stdout, (run / "stderr").open("wb") as stderr:
        # No preexec_fn: subprocess can then spawn without forking this (possibly threaded,
        # transformers-importing) process's Python state.
        process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                   stderr=stderr, start_new_session=True, pass_fds=pass_fds)
    return process, run


def _stop(process: subprocess.Popen) -> None:
    """Kill the program and all it started: its process group, and (through unshare's
    --kill-child) the PID namespace, whose processes all die with its first one."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    process.wait()


def _start(program: str, python_args: list[str], limits: SandboxLimits, unsafe_exec: bool,
           pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen, Path]:
    ensure_sandbox(unsafe_exec)
    found = _isolation()
    return _run(found if isinstance(found, _Isolation) else None, program, python_args, limits, pass_fds)


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with path.open("rb") as file:
            file.seek(max(0, path.stat().st_size - size))
            return file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


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
    # The error is a traceback's last unindented line. Not simply the last line: processes the
    # program forked may still be writing their own tracebacks into the same stderr.
    errors = [line for line in lines if not line[0].isspace() and not line.startswith("Traceback")]
    return (errors or lines)[-1][:300] if lines else f"exit status {returncode}"


def run_python(program: str, limits: SandboxLimits = SandboxLimits(), unsafe_exec: bool = False) -> ExecutionResult:
    """Run `program` (Python source) in the sandbox; passed when it exited with status 0. The
    status is the program's own word: to score code against tests, use `check_function`."""
    started = time.perf_counter()
    process, run = _start(program, ["program.py"], limits, unsafe_exec)
    try:
        try:
            returncode = process.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            return ExecutionResult(False, "timeout", f"timed out after {limits.timeout_s:g} s",
                                   time.perf_counter() - started)
        finally:
            _stop(process)
        seconds = time.perf_counter() - started
        if returncode == 0:
            return ExecutionResult(True, "passed", "", seconds)
        return ExecutionResult(False, "failed", _failure_detail(returncode, _tail(run / "stderr"), limits), seconds)
    finally:
        shutil.rmtree(run, ignore_errors=True)


# --- tests in the parent, the function in the sandbox ----------------------------------------


class _TimedOut(BaseException):
    """Not an Exception: a test's own `except Exception` must not swallow the timeout."""


class _FunctionGone(Exception):
    """The sandboxed process ended (or broke the protocol) while a test needed its function."""


class FunctionRaised(Exception):
    """The sandboxed function raised; carries its exception's name and message."""


class _RemoteFunction:
    """Stands in for the model's function in the parent's tests: each call goes to the sandbox as
    plain data and comes back as plain data (`sandbox_child.encode`/`decode`), by a deadline."""

    def __init__(self, requests: int, answers: int, deadline: float, limits: SandboxLimits):
        self.requests, self.answers, self.deadline, self.limits = requests, answers, deadline, limits
        self.buffer = b""
        os.set_blocking(requests, False)

    def _wait(self, fd: int, for_writing: bool) -> None:
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            raise _TimedOut
        readable, writable, _ = select.select([] if for_writing else [fd], [fd] if for_writing else [], [], remaining)
        if not readable and not writable:
            raise _TimedOut

    def __call__(self, *args, **kwargs):
        message = json.dumps(sandbox_child.encode((args, kwargs))).encode() + b"\n"
        while message:
            self._wait(self.requests, for_writing=True)
            try:
                message = message[os.write(self.requests, message):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise _FunctionGone from None
        while b"\n" not in self.buffer:
            if len(self.buffer) > self.limits.answer_bytes:
                raise _FunctionGone(f"the function returned more than {self.limits.answer_bytes} bytes")
            self._wait(self.answers, for_writing=False)
            chunk = os.read(self.answers, 1 << 16)
            if not chunk:
                raise _FunctionGone
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
            if answer[0] == "raise":
                raise FunctionRaised(f"{str(answer[1])[:100]}: {str(answer[2])[:300]}")
            if answer[0] != "value" or len(answer) != 2:
                raise ValueError("not an answer")
            return sandbox_child.decode(answer[1])
        except (ValueError, TypeError, IndexError, KeyError, RecursionError) as error:
            raise _FunctionGone(f"the function's answer could not be read ({type(error).__name__})") from None


def check_function(program: str, entry: str, tests: str, limits: SandboxLimits = SandboxLimits(),
                   unsafe_exec: bool = False) -> ExecutionResult:
    """Run `program` (the model's code) in the sandbox and `tests` (trusted code defining
    `check(candidate)`) here, with `candidate` calling the program's function `entry`. Passed when
    `check` returns; a timeout covers the sandbox's start, the program's loading and every call."""
    ensure_sandbox(unsafe_exec)
    started = time.perf_counter()
    deadline = started + limits.timeout_s
    request_read, request_write = os.pipe()
    answer_read, answer_write = os.pipe()
    try:
        process, run = _start(program, ["-c", CHILD_SOURCE, entry, str(request_read),
                                        str(answer_write)], limits, unsafe_exec, (request_read, answer_write))
    except BaseException:
        os.close(request_write)
        os.close(answer_read)
        raise
    finally:
        os.close(request_read)  # the child has its own copies: the parent's would hide its end
        os.close(answer_write)
    try:
        namespace: dict = {"__name__": "__check__"}
        try:
            exec(compile(tests, "tests.py", "exec"), namespace)
            # Tests may also call the function by its name (HumanEval/33 does), as in the original
            # harness, where the program and its tests share one module.
            namespace[entry] = candidate = _RemoteFunction(request_write, answer_read, deadline, limits)
            namespace["check"](candidate)
            return ExecutionResult(True, "passed", "", time.perf_counter() - started)
        except _TimedOut:
            return ExecutionResult(False, "timeout", f"timed out after {limits.timeout_s:g} s",
                                   time.perf_counter() - started)
        except _FunctionGone as error:
            # The program ended (an error while loading, a limit, an exit) or spoke out of turn.
            try:
                returncode = process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                returncode = None
            if str(error):
                detail = str(error)
            elif returncode is None:
                detail = "the program closed its answer pipe"
            elif returncode == 0:
                detail = "the program exited before its tests finished"
            else:
                detail = _failure_detail(returncode, _tail(run / "stderr"), limits)
            return ExecutionResult(False, "failed", detail, time.perf_counter() - started)
        except FunctionRaised as error:  # the function's own exception, as the sandbox reported it
            return ExecutionResult(False, "failed", str(error), time.perf_counter() - started)
        except Exception as error:  # a failed test: AssertionError, or an error in the test itself
            detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            return ExecutionResult(False, "failed", detail[:300], time.perf_counter() - started)
    finally:
        os.close(request_write)
        os.close(answer_read)
        _stop(process)
        shutil.rmtree(run, ignore_errors=True)
