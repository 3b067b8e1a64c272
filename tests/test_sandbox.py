"""The code sandbox under attack: planted escape attempts, each of which must fail to escape and be
scored as a failure, and the sandbox's own guarantees (no host files, no network, no other
processes, limits, a verdict the code cannot forge).

Every attack is a HumanEval/0 completion scored by the real task: the attack runs when the module
loads and again inside the function, which then returns a wrong answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from riverllm.eval import sandbox
from riverllm.eval.sandbox import SandboxLimits, SandboxUnavailable, check_function, run_python
from riverllm.eval.tasks import HumanEval

FAST = SandboxLimits(timeout_s=3, cpu_s=3)

pytestmark = pytest.mark.skipif(isinstance(sandbox._isolation(), str),
                                reason=f"no OS sandbox on this machine: {sandbox._isolation()}")


@pytest.fixture(scope="module")
def sample():
    return {s.id: s for s in HumanEval().samples(None, 0, progress=False)}["HumanEval/0"]


@pytest.fixture
def host(tmp_path):
    """Host files an attack goes for: one to create, one to keep, a secret to read."""
    (tmp_path / "keep.txt").write_text("keep me")
    (tmp_path / "secret.txt").write_text("host-secret-7f3a")
    return tmp_path


def completion(attack: str) -> str:
    """A base-model completion of HumanEval/0 that attacks at import and at every call, then
    answers wrongly (always True)."""
    body = textwrap.indent(textwrap.dedent(attack).strip(), "        ")
    return (f"    return True\n\n\ndef _attack():\n    try:\n{body}\n    except BaseException:\n        pass\n\n\n"
            "_attack()\n_original = has_close_elements\n\n\n"
            "def has_close_elements(numbers, threshold):\n    _attack()\n    return True\n")


def write_attacks(target: Path, keep: Path) -> dict[str, str]:
    t, k, d = str(target), str(keep), str(target.parent)
    prefix_target = str(Path(sys.prefix) / "riverllm-sandbox-pwned")
    return {
        "open w": f"open({t!r}, 'w').write('x')",
        "open a": f"open({t!r}, 'a').write('x')",
        "open x": f"open({t!r}, 'x').write('x')",
        "open r+ on a host file": f"f = open({k!r}, 'r+'); f.write('pwned')",
        "relative path up": "open('../../../../' + " + repr(t.lstrip('/')) + ", 'w').write('x')",
        "bytes path": f"open({t.encode()!r}, 'wb').write(b'x')",
        "os.open": f"import os\nfd = os.open({t!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        "os.open with dir_fd": f"import os\ndfd = os.open({d!r}, os.O_RDONLY)\n"
                               f"os.write(os.open('outside.txt', os.O_WRONLY | os.O_CREAT, dir_fd=dfd), b'x')",
        "posix.open (below os)": f"import posix\nposix.write(posix.open({t!r}, 0o101), b'x')",
        "_io.FileIO": f"import _io\n_io.FileIO({t!r}, 'w').write(b'x')",
        "io.open_code-free FileIO by fd": f"import io, os\nio.FileIO(os.open({t!r}, os.O_CREAT | os.O_WRONLY), 'w').write(b'x')",
        "pathlib": f"import pathlib\npathlib.Path({t!r}).write_text('x')",
        "pathlib touch": f"import pathlib\npathlib.Path({t!r}).touch()",
        "truncate keep": f"import os\nos.truncate({k!r}, 0)",
        "remove keep": f"import os\nos.remove({k!r})",
        "rename keep": f"import os\nos.rename({k!r}, {t!r})",
        "replace keep": f"import os\nos.replace({k!r}, {t!r})",
        "chmod keep": f"import os\nos.chmod({k!r}, 0o777)",
        "utime keep": f"import os\nos.utime({k!r}, (0, 0))",
        "symlink": f"import os\nos.symlink('/etc/passwd', {t!r})",
        "hard link": f"import os\nos.link({k!r}, {t!r})",
        "mkdir": f"import os\nos.mkdir({t!r})",
        "shutil.copy": f"import shutil\nshutil.copy('/usr/bin/env', {t!r})",
        "shutil.rmtree": f"import shutil\nshutil.rmtree({d!r})",
        "os.system": f"import os\nos.system('touch {t}; echo pwned > {k}')",
        "subprocess": f"import subprocess\nsubprocess.run(['sh', '-c', 'touch {t}'])",
        "posix_spawn": f"import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'touch {t}'], {{}})",
        "fork then write": f"import os\nif os.fork() == 0:\n    open({t!r}, 'w').write('x')\n    os._exit(0)",
        "ctypes libc open": f"import ctypes\nlibc = ctypes.CDLL(None)\nlibc.open({t.encode()!r}, 0o101, 0o644)",
        "into the python installation": f"open({prefix_target!r}, 'w').write('x')",
        "into /usr": "open('/usr/riverllm-sandbox-pwned', 'w').write('x')",
        "remount / read-write": "import os\nos.system('mount -o remount,rw / && touch /pwned')",
        "remount /usr read-write": "import os\nos.system('mount -o remount,rw,bind /usr')",
        "new user namespace, then mount": "import os\nos.system('unshare --user --map-root-user --mount "
                                          "sh -c \"mount -o remount,rw,bind /usr && touch /usr/pwned\"')",
        "chroot escape": "import ctypes, os\nos.mkdir('/work/d')\nlibc = ctypes.CDLL(None)\nlibc.chroot(b'/work/d')\n"
                         "os.chdir('../../../..')\nlibc.chroot(b'.')\n"
                         f"open({t!r}, 'w').write('x')",
        "/proc/1/root": f"open('/proc/1/root' + {t!r}, 'w').write('x')",
        "/proc/self/root": f"open('/proc/self/root' + {t!r}, 'w').write('x')",
    }


def test_writes_through_every_route_stay_inside_and_score_zero(sample, host):
    task = HumanEval(FAST)
    target = host / "outside.txt"
    keep_mtime = (host / "keep.txt").stat().st_mtime_ns
    for name, attack in write_attacks(target, host / "keep.txt").items():
        score, details = task.score(sample, completion(attack), chat=False)
        assert score == 0.0 and details["status"] == "failed", (name, details)
        assert sorted(p.name for p in host.iterdir()) == ["keep.txt", "secret.txt"], name
        assert (host / "keep.txt").read_text() == "keep me", name
        assert (host / "keep.txt").stat().st_mode & 0o777 == 0o644, name
        assert (host / "keep.txt").stat().st_mtime_ns == keep_mtime, name
    assert not (Path(sys.prefix) / "riverllm-sandbox-pwned").exists()
    assert not Path("/usr/riverllm-sandbox-pwned").exists() and not Path("/usr/pwned").exists()


def probe(code: str, expected: str, limits: SandboxLimits = FAST):
    """Run `code` (the body of `probe()`) in the sandbox; the parent's test asserts that it
    returns `expected`, the safe outcome. Returns the result: passed means the sandbox held."""
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    return check_function(f"def probe():\n{body}\n", "probe",
                          f"def check(candidate):\n    assert candidate() == {expected}\n", limits)


def test_the_host_is_invisible(host, monkeypatch):
    monkeypatch.setenv("RIVERLLM_TEST_SECRET", "env-secret-91c2")
    # Reading the host's files and the parent's environment: every place that could hold them.
    leak = probe(f"""
        import os
        found = []
        for path in [{str(host / 'secret.txt')!r}, '/proc/1/environ', '/proc/self/environ', '/etc/shadow',
                     '/proc/1/cmdline', '/proc/self/cmdline']:
            try:
                found.append(open(path, 'rb').read().decode(errors='replace'))
            except OSError:
                pass
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                for name in ('environ', 'cmdline'):
                    try:
                        found.append(open(f'/proc/{{pid}}/{{name}}', 'rb').read().decode(errors='replace'))
                    except OSError:
                        pass
        text = ' '.join(found)
        return 'host-secret-7f3a' in text or 'env-secret-91c2' in text or 'RIVERLLM' in text
    """, "False")
    assert leak.passed, leak.detail


def test_the_root_holds_only_the_system_and_python_directories():
    allowed = {"bin", "dev", "lib", "lib64", "proc", "sbin", "usr", "work"}
    allowed |= {directory.split("/")[1] for directory in sandbox._python_dirs()}
    result = probe(f"import os\nreturn sorted(set(os.listdir('/')) - {allowed!r})", "[]")
    assert result.passed, result.detail


def test_no_other_process_is_visible_and_none_can_be_traced():
    alone = probe("import os\nreturn sorted(int(p) for p in os.listdir('/proc') if p.isdigit())", "[1]")
    assert alone.passed, alone.detail
    traced = probe("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        attached = [pid for pid in range(0, 200) if libc.ptrace(16, pid, 0, 0) == 0]  # PTRACE_ATTACH
        return attached
    """, "[]")
    assert traced.passed, traced.detail
    signalled = probe("""
        import os
        killed = []
        for pid in range(2, 100000, 97):
            try:
                os.kill(pid, 0)
                killed.append(pid)
            except OSError:
                pass
        return killed
    """, "[]")
    assert signalled.passed, signalled.detail


def test_no_network_not_even_to_the_hosts_loopback():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept() -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                accepted.append(server.accept())
            except socket.timeout:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    result = probe(f"""
        import socket
        reached = []
        for address in [('127.0.0.1', {port}), ('1.1.1.1', 80)]:
            try:
                socket.create_connection(address, timeout=1).close()
                reached.append(address[0])
            except OSError:
                pass
        return reached
    """, "[]")
    thread.join()
    server.close()
    assert result.passed, result.detail
    assert not accepted


def test_a_pass_cannot_be_forged(sample):
    """No secret exists to read, and nothing the code does to its own process makes a pass: the
    verdict is the parent's, on the values the function returns."""
    task = HumanEval(FAST)
    forgeries = {
        "exit 0 at import": "import os\nos._exit(0)",
        "exit 0 at the call": "import sys\nsys.exit(0)",
        "always-equal object": "class Yes:\n    def __eq__(self, other):\n        return True\n"
                               "globals()['has_close_elements'] = lambda *a: Yes()",
        "bool subclass": "class B(int):\n    def __eq__(self, other):\n        return True\n"
                         "globals()['has_close_elements'] = lambda *a: B(1)",
        "excepthook exits 0": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)",
        "print a pass marker": "print('passed'); print('\\n' * 3 + 'OK')",
        "answers written ahead on every fd": "import os, json\nfor fd in range(3, 64):\n"
                                              "    try:\n        os.write(fd, b'[\"value\", true]\\n' * 50)\n"
                                              "    except OSError:\n        pass",
        "garbage answers": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\x00' * 100000)\n"
                           "    except OSError:\n        pass",
        "undo the function's name": "globals().pop('has_close_elements', None)",
    }
    for name, attack in forgeries.items():
        score, details = task.score(sample, completion(attack), chat=False)
        assert score == 0.0, (name, details)


def test_resource_attacks_are_stopped_in_time_and_leave_nothing(sample):
    task = HumanEval(FAST)
    leftovers_before = set(Path(tempfile.gettempdir()).glob("riverllm-sandbox-*"))
    attacks = {
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "process bomb": "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '1000'])",
        "sleep past the timeout": "import time\ntime.sleep(10000)",
        "daemon outliving the program": "import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', "
                                        "['sleep', '1001'])",
        "infinite loop": "while True:\n    pass",
        "100 GB allocation": "block = bytearray(100 * 2**30)",
        "huge output": "while True:\n    print('x' * 100000)",
        "fill the work dir": "f = open('/work/fill', 'wb')\nwhile True:\n    f.write(b'x' * 2**20)",
        "huge answer": "globals()['has_close_elements'] = lambda *a: 'x' * (64 << 20)",
    }
    for name, attack in attacks.items():
        started = time.monotonic()
        score, details = task.score(sample, completion(attack), chat=False)
        assert score == 0.0 and details["status"] in ("failed", "timeout"), (name, details)
        assert time.monotonic() - started < FAST.timeout_s + 3, f"{name} was not stopped in time"
    assert set(Path(tempfile.gettempdir()).glob("riverllm-sandbox-*")) == leftovers_before
    time.sleep(0.2)
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 1000" not in running and "sleep 1001" not in running
    # A correct completion afterwards still passes.
    correct = sample.data["canonical_solution"]
    assert task.score(sample, correct, chat=False) == (1.0, {"status": "passed", "error": ""})


def test_the_reason_for_a_failure_is_kept():
    assert run_python("while True:\n    pass\n", FAST).status == "timeout"
    assert run_python("x = bytearray(100 * 2**30)\n", FAST).detail == "MemoryError"
    assert "Read-only file system" in run_python("open('/usr/x', 'w')\n", FAST).detail
    assert run_python("import os\nwhile True:\n    os.fork()\n", FAST).detail.startswith("BlockingIOError")
    assert run_python("assert 1 == 2\n", FAST).detail == "AssertionError"
    assert run_python("import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'ok')\n"
                      "open('inside.txt', 'w').write('ok')\n", FAST).passed
    assert check_function("def f(x):\n    return x[5]\n", "f", "def check(c):\n    c([])\n", FAST).detail == \
        "IndexError: list index out of range"


def test_without_isolation_code_is_refused_unless_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "_isolation", lambda: "unshare: unshare failed: Operation not permitted")
    with pytest.raises(SandboxUnavailable, match="unsafe_exec") as error:
        run_python("print(1)\n", FAST)
    assert "\n" not in str(error.value) and "Operation not permitted" in str(error.value)
    with pytest.raises(SandboxUnavailable):
        check_function("def f():\n    return 1\n", "f", "def check(c):\n    assert c() == 1\n", FAST)
    unsafe = check_function("def f():\n    return 1\n", "f", "def check(c):\n    assert c() == 1\n", FAST,
                            unsafe_exec=True)
    assert unsafe.passed, unsafe.detail


def test_eval_refuses_humaneval_before_loading_a_model(tmp_path):
    """The CLI says so in one line, exit code 2, with no model loaded (PATH without util-linux)."""
    env = {**os.environ, "PATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "from riverllm.cli import main; main()", "eval", "--tasks",
                           "humaneval", "--model", "no-such-model", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1 and "--unsafe-exec" in proc.stderr and "no-such-model" not in proc.stderr
