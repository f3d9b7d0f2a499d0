"""Run one exercise of one submission in its own limited process, in a fresh directory.

The parent (the grader) never executes submission code and never unpickles anything the child
wrote: it reads one JSON-lines file of outputs (size-capped, regular file only, no symlinks) and
compares in its own process, with the checkers it imported before any submission ran.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import diffnotes

MAX_READ = 64 * 2 ** 20          # bytes of recorded outputs the grader reads from a child


@dataclass
class Limits:
    timeout_s: float = 60.0       # wall time per exercise process
    memory_mb: int = 4096         # address space (RLIMIT_AS) per process
    fsize_mb: int = 64            # largest file a submission may write
    user: str | None = "nobody"   # drop root to this user (only when the grader runs as root)


@dataclass
class Outcome:
    rows: list = field(default_factory=list)
    status: str = "ok"            # ok | timeout | exit <code> | killed by <signal> | error
    note: str = ""
    wall_s: float = 0.0
    log: str = ""                 # the tail of what the process printed (untrusted text)


class Snapshot:
    """The diffnotes package's files, read into memory once, before any submission runs, so
    that every sandbox gets an untouched copy whatever earlier submissions wrote."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or Path(diffnotes.__file__).parent)
        self.files = []
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                self.files.append((p.relative_to(self.root), p.read_bytes(), st.st_mtime_ns))

    def write(self, dest: Path) -> None:
        for rel, data, mtime in self.files:
            q = dest / rel
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(data)
            os.utime(q, ns=(mtime, mtime))     # keeps the shipped .pyc files valid


_USABLE: dict = {}


def _ids(user):
    """``(uid, gid)`` to run submissions as, or ``(None, None)``: only when grading as root, and
    only if that user can run this Python (a venv under /root, mode 700, cannot)."""
    if user is None or os.geteuid() != 0:
        return None, None
    if user not in _USABLE:
        import pwd
        try:
            pw = pwd.getpwnam(user)
            ok = subprocess.run([sys.executable, "-c", "import pkgutil, json, torch"],
                                user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], cwd="/",
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=120).returncode == 0
        except (KeyError, OSError, subprocess.SubprocessError):
            ok = False
        _USABLE[user] = (pw.pw_uid, pw.pw_gid) if ok else (None, None)
    return _USABLE[user]


def privilege_drop(user: str | None = "nobody") -> bool:
    """Whether submissions will run as ``user`` (so they cannot write the grader's files)."""
    return _ids(user)[0] is not None


def _read_untrusted(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_READ)
    finally:
        os.close(fd)


def _rows(data: bytes | None) -> list:
    rows = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def per_question_zip(src: Path, question: str, dest: Path) -> None:
    """A copy of otter's autograder zip whose only test is ``question``'s."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            if item.filename.startswith("tests/") and item.filename != f"tests/{question}.py":
                continue
            zout.writestr(item, zin.read(item.filename))


def run(spec: dict, snapshot: Snapshot, limits: Limits, notebook: dict | None = None,
        autograder_zip: Path | None = None) -> Outcome:
    """Run one exercise job (``spec``: engine, setup, borrow, cell, question, checker, function,
    cases, seed) and return the outputs it recorded."""
    jobdir = Path(tempfile.mkdtemp(prefix="diffnotes-grade-"))
    os.chmod(jobdir, 0o755)
    try:
        lib, work, out = jobdir / "lib", jobdir / "work", jobdir / "out"
        snapshot.write(lib / "diffnotes")
        for d in (work, work / "tmp", out):
            d.mkdir(parents=True, exist_ok=True)
        uid, gid = _ids(limits.user)
        full = {**spec, "memory_mb": limits.memory_mb, "fsize_mb": limits.fsize_mb,
                "cpu_s": int(limits.timeout_s) + 1}
        (jobdir / "job.json").write_text(json.dumps(full))
        if spec["engine"] == "otter":
            (work / "submission.ipynb").write_text(json.dumps(notebook))
            per_question_zip(autograder_zip, spec["question"], jobdir / "autograder.zip")
        if uid is not None:                         # the child may write only work/ and out/
            for d in (work, work / "tmp", out):
                os.chown(d, uid, gid)
            if spec["engine"] == "otter":
                os.chown(work / "submission.ipynb", uid, gid)
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               "HOME": str(work), "TMPDIR": str(work / "tmp"), "PYTHONPATH": str(lib),
               "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
               "MPLCONFIGDIR": str(work / "tmp"), "JUPYTER_RUNTIME_DIR": str(work / "tmp"),
               "IPYTHONDIR": str(work / "tmp"), "DIFFNOTES_STATIC": "1", "HF_HUB_OFFLINE": "1",
               "TQDM_DISABLE": "1", "DIFFNOTES_IN_SANDBOX": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "diffnotes.classroom._child", str(jobdir)],
                                cwd=str(work), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True,
                                **({"user": uid, "group": gid, "extra_groups": []}
                                   if uid is not None else {}))
        try:
            code = proc.wait(timeout=limits.timeout_s)
            status = "ok" if code == 0 else (f"killed by {signal.Signals(-code).name}"
                                             if code < 0 else f"exit {code}")
        except subprocess.TimeoutExpired:
            status = f"timeout ({limits.timeout_s:g} s)"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the child and anything it left running
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        wall = time.perf_counter() - t0
        rows = _rows(_read_untrusted(out / f"{spec['question']}.jsonl"))
        note = (_read_untrusted(out / "note.txt") or b"").decode("utf-8", "replace")[:1000]
        log = (_read_untrusted(out / "stdout.txt") or b"")[-4000:].decode("utf-8", "replace")
        return Outcome(rows, status, note.strip(), wall, log)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)
