"""Output folders: the up-front "writable + enough free space" check, and a lock so one run owns a folder.

An unwritable folder or a full disk fails at start, not hours into a run. `RunLock` makes a second process started on
the same folder refuse with a message naming the owner; the lock is an OS file lock (fcntl.flock), so the kernel drops
it when the owning process dies in any way (kill -9 included): a crashed run never leaves a folder stuck.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time

MIN_FREE_BYTES = 100 * 2**20  # refuse to start with less than 100 MiB free, whatever the run writes
LOCK_NAME = ".lock"


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0, what: str = "output folder") -> None:
    """Create `path` if needed, prove it writable with a probe file, and require max(need_bytes, 100 MiB) free on
    its filesystem. Raises OSError naming the folder, the problem and what to do."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"{what} {path!r} is not writable ({type(e).__name__}: {e.strerror or e}); "
                      f"choose a folder that can be created and written") from e
    need, free = max(int(need_bytes), MIN_FREE_BYTES), shutil.disk_usage(path).free
    if free < need:
        raise OSError(f"{what} {path!r}: only {free / 2**20:.1f} MiB free on its filesystem, at least "
                      f"{need / 2**20:.1f} MiB needed; free some space or choose another folder")


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


class RunLock:
    """Exclusive lock on `<folder>/.lock` for the lifetime of a run (use as a context manager).

    Only one process per run takes it (the launcher's rank 0; `enabled=False` on the other ranks). The file holds the
    owner's pid / host / start time for the refusal message; its presence alone means nothing (the flock does)."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder", enabled: bool = True):
        self.path = os.path.join(os.fspath(folder), LOCK_NAME)
        self.what, self.enabled, self._fd = what, enabled, None

    def acquire(self) -> "RunLock":
        if not self.enabled or self._fd is not None:
            return self
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                owner = {}
            os.close(fd)
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}") if owner \
                else "another process"
            raise FolderLockedError(
                f"{self.what} {os.path.dirname(self.path)!r} is in use by a running job ({who}); wait for it to end "
                f"or choose another folder. (The lock is released automatically when that process exits, even after "
                f"a crash.)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(),
                  0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
