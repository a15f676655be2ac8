"""The sandbox is the only door through which model-written code runs: it must fail bad programs and
harm nothing. Each case takes ~0.1 s except the timeout one (~1 s). The hostile corpus is in
test_sandbox_hostile.py; this file covers the ordinary behaviour and the missing-isolation path."""

import os
import time

import pytest

from evaluation import sandbox
from utils_eval import REPO_DIR, run_sandboxed, sandbox_execute


def test_correct_program_passes_and_assert_failure_fails():
    assert run_sandboxed("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')\n")
    assert not run_sandboxed("assert 1 + 1 == 3\n")
    assert not run_sandboxed("def f(:\n")  # syntax error


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "raise SystemExit(0)\n",
    "exit()\n",
    "import os\nos._exit(0)\n",
])
def test_early_exit_with_status_zero_fails(program):
    result = sandbox_execute(program)
    assert result.returncode == 0  # the process did exit 0 ...
    assert not result.passed  # ... but never reached the end of the candidate


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    start = time.time()
    result = sandbox_execute("while True:\n    pass\n", timeout_s=1.0)
    assert result.timed_out and not result.passed
    assert time.time() - start < 3.0


@pytest.mark.parametrize("program", [
    "x = bytearray(10**10)\n",
    "x = []\nwhile True:\n    x.append('y' * 100000)\n",
])
def test_memory_bombs_fail(program):
    result = sandbox_execute(program, memory_mb=256)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr


def test_os_system_cannot_touch_files(tmp_path):
    target = tmp_path / "pwned_system"
    assert run_sandboxed(f"import os\nassert os.system('touch {target}') != 0\n")  # no process can start
    assert not run_sandboxed(f"import subprocess\nsubprocess.run(['touch', '{target}'])\n")
    assert not target.exists()


def test_writing_outside_the_sandbox_directory_fails(tmp_path):
    target = tmp_path / "pwned_write"
    for program in [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import io\nio.open({str(target)!r}, 'a').write('x')\n",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"open('../../' + {target.name!r}, 'w')\n",  # the sandbox's root is read-only
    ]:
        assert not run_sandboxed(program), program  # the host's /tmp is not even visible
    assert not target.exists()


def test_deleting_files_outside_the_sandbox_fails(tmp_path):
    victim = tmp_path / "keep_me.txt"
    victim.write_text("data")
    assert not run_sandboxed(f"import os\nos.remove({str(victim)!r})\n")
    assert not run_sandboxed(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n")
    assert not run_sandboxed(f"import os\nos.rename({str(victim)!r}, 'stolen.txt')\n")
    assert victim.read_text() == "data"


def test_files_inside_the_sandbox_directory_are_allowed():
    program = ("import os, tempfile\nopen('a.txt', 'w').write('hi')\nos.makedirs('d/e')\n"
               "with tempfile.NamedTemporaryFile(dir='.') as f:\n    f.write(b'x')\n"
               "os.remove('a.txt')\n")
    assert run_sandboxed(program)


def test_repository_is_not_visible_but_installed_packages_import():
    source = os.path.join(REPO_DIR, "utils_eval.py")
    assert os.path.exists(source)
    assert run_sandboxed(f"import os\nassert not os.path.exists({source!r})\n")  # not even its name
    assert not run_sandboxed(f"open({source!r}).read()\n")
    assert not run_sandboxed(f"import os\nos.read(os.open({source!r}, os.O_RDONLY), 10)\n")
    assert run_sandboxed("import numpy\nassert numpy.arange(3).sum() == 3\n")
    assert run_sandboxed("import sympy\nassert sympy.factorint(12) == {2: 2, 3: 1}\n", timeout_s=30)  # needs ctypes


def test_fork_fails(tmp_path):
    target = tmp_path / "pwned_fork"
    program = f"import os\nif os.fork() == 0:\n    open({str(target)!r}, 'w')\n"
    assert not run_sandboxed(program)
    assert not run_sandboxed("import multiprocessing\np = multiprocessing.Process(target=print)\np.start()\n")
    assert not target.exists()


def test_network_is_its_own_namespace():
    import socket
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:  # a host listener on loopback is not reachable: the sandbox's loopback is another one
        assert not run_sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
        assert not run_sandboxed("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n")
        assert run_sandboxed("import socket\nassert socket.if_nameindex() == [(1, 'lo')]\n")
    finally:
        server.close()


def test_child_sees_a_scrubbed_environment(monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "token")
    assert run_sandboxed("import os\nassert 'SANDBOX_TEST_SECRET' not in os.environ\n"
                         "assert os.getcwd() != " + repr(os.getcwd()) + "\n")


def test_output_is_captured_and_truncated():
    result = sandbox_execute("print('x' * 100000)\n")
    assert result.passed and result.stdout.startswith("xxx") and len(result.stdout) <= 4000


def test_processes_in_the_sandbox_see_only_their_own_pid_namespace():
    assert run_sandboxed("import os\nassert os.getpid() == 2\nassert sorted(p for p in os.listdir('/proc') "
                         "if p.isdigit()) == ['1', '2']\n")


def test_seccomp_filter_is_well_formed():
    for machine in ("x86_64", "aarch64"):
        prog = sandbox.seccomp_filter(machine)
        assert len(prog) % 8 == 0 and 10 < len(prog) // 8 < 256
    with pytest.raises(sandbox.SandboxUnavailable, match="no seccomp filter"):
        sandbox.seccomp_filter("sparc")


def test_missing_isolation_stops_with_a_clear_error_unless_explicitly_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_binary", lambda: None)
    monkeypatch.setattr(sandbox, "_probe_result", None)
    monkeypatch.setattr(sandbox, "_allow_unconfined", False)
    with pytest.raises(sandbox.SandboxUnavailable, match="allow_unconfined_code"):
        run_sandboxed("print('hi')\n")
    with pytest.raises(sandbox.SandboxUnavailable, match="no bubblewrap binary"):
        sandbox.run_check("def f():\n    return 1\n", "assert candidate('f')() == 1\n")
    sandbox.allow_unconfined(True)
    with pytest.warns(RuntimeWarning, match="WITHOUT kernel confinement"):
        assert run_sandboxed("print('hi')\n")
    with pytest.warns(RuntimeWarning):
        assert sandbox.run_check("def f():\n    return 1\n", "assert candidate('f')() == 1\n").passed


def test_stage_metrics_stop_before_generating_when_code_cannot_run_confined(monkeypatch, tmp_path):
    from configs.base_config import make_config
    from evaluation import stage

    monkeypatch.setattr(sandbox, "bwrap_binary", lambda: None)
    monkeypatch.setattr(sandbox, "_probe_result", None)
    monkeypatch.setattr(stage, "generate", lambda *a, **k: pytest.fail("generated before the sandbox check"))
    cfg = make_config(log_dir=str(tmp_path))
    bench = {"T3_code": [{"id": "c", "kind": "codeio", "instruction": "x", "reference_code": "", "inputs": []}]}
    with pytest.raises(sandbox.SandboxUnavailable, match="--allow_unconfined_code true"):
        stage.run_stage_metrics(None, None, cfg, "seq_lora", 1, "T3_code", 0, "cpu", bench)
    sandbox.allow_unconfined(False)
