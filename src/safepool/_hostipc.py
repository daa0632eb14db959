"""Same-host shared state that survives SIGKILL: segments, a robust lock, registrations, futexes.

The building blocks of :class:`~safepool.HostBudget` (and of any later same-host table, such as a
``PoolManager`` fast path). Linux only; :func:`require_platform` names what is missing elsewhere.

* A :class:`Segment` is a file in ``/dev/shm`` mapped ``MAP_SHARED`` by every process that opens
  its name. Creation is serialised with ``flock``: whoever takes the lock and finds the file
  empty (its creator, or the next opener if the creator died half-way) lays it out; the header's
  magic number is written last, so a segment is either whole or re-initialised.
* The segment's **lock** is a process-shared, *robust*, error-checking ``pthread_mutex_t``
  (through ctypes). Taking it when it is free costs no system call. When its owner dies inside
  a critical section, the next ``lock()`` gets ``EOWNERDEAD``: it marks the mutex consistent and
  reports ``True`` so the caller repairs whatever the dead owner left half-written. A critical
  section of safepool is never left by a thread of a live process (Python threads only end by
  returning), so ``EOWNERDEAD`` means the owning *process* is dead or dying.
* A **registration** is a process's entry in the segment's registry, backed by an OFD
  (open-file-description) write lock on one byte of the segment's file (at ``REG_LOCK_BASE +
  index``, far past its end). The kernel drops that lock when the process dies (its last
  descriptor closes), so "is registration *r* alive?" is one ``F_OFD_GETLK``: exact, immune to
  pid reuse, and independent of pid namespaces. A forked child must close the descriptor it
  inherited (``Segment.forget()``), or the parent's lock lives as long as the child. The
  mapping is made through a second open file description (:func:`_map_shared`): a mapping
  holds the description it was made through, and were it the locking one, the lock would live
  as long as the mapping (in every forked child too), not as long as the descriptor.
* Waiting uses **futexes** on 32-bit words of the segment (``FUTEX_WAIT`` with a relative
  timeout, ``FUTEX_WAKE``); a wait interrupted by a signal runs the Python handlers at once.

Memory ordering: every store to the segment is a plain store made by CPython (``struct`` and
``mmap`` item assignment, one aligned machine store per 1-, 4- or 8-byte field); the lock orders
everything done under it. A multi-field record is made valid by a one-byte state store after its
fields, so a process killed half-way leaves either the old or the new record, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import platform
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from .errors import BudgetUnavailable

__all__ = [
    "REG_LOCK_BASE",
    "SHM_DIR",
    "Futex",
    "RobustMutex",
    "Segment",
    "has_live_registration",
    "require_platform",
]

SHM_DIR = "/dev/shm"
# Registration r is alive while some process holds an OFD write lock on this byte + r.
REG_LOCK_BASE = 1 << 40

_FUTEX_SYSCALL = {
    "x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98, "riscv64": 98,
    "ppc64le": 221, "ppc64": 221, "s390x": 238, "i386": 240, "i686": 240, "armv7l": 240,
}  # fmt: skip
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE_FLAG): the words are in MAP_SHARED
_FUTEX_TID_MASK = 0x3FFFFFFF
_SPINS = 3  # sched_yield() + trylock rounds before sleeping on a busy mutex
_MUTEX_SIZE = 64  # >= sizeof(pthread_mutex_t) on every Linux ABI (40 on x86-64, 48 on arm64)
_PTHREAD_PROCESS_SHARED, _PTHREAD_MUTEX_ROBUST, _PTHREAD_MUTEX_ERRORCHECK = 1, 1, 2
# struct flock on Linux 64-bit: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid.
_FLOCK = struct.Struct("hhqqi4x")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Libc:
    """The libc functions we call, bound once. ``fast`` ones keep the GIL (never block)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c") or None
        blocking = ctypes.CDLL(name, use_errno=True)  # releases the GIL around each call
        fast = ctypes.PyDLL(name, use_errno=True)  # keeps it: for calls that never block
        vp, ci = ctypes.c_void_p, ctypes.c_int
        self.trylock = self._fn(fast, "pthread_mutex_trylock", [vp])
        self.unlock = self._fn(fast, "pthread_mutex_unlock", [vp])
        self.lock = self._fn(blocking, "pthread_mutex_lock", [vp])
        self.consistent = self._fn(fast, "pthread_mutex_consistent", [vp])
        # The fast path's pair, as prototypes taking a prebuilt c_void_p (cheapest ctypes call).
        proto = ctypes.PYFUNCTYPE(ci, vp)
        self.fast_trylock = proto(("pthread_mutex_trylock", fast))
        self.fast_unlock = proto(("pthread_mutex_unlock", fast))
        self.mutex_init = self._fn(fast, "pthread_mutex_init", [vp, vp])
        self.attr_init = self._fn(fast, "pthread_mutexattr_init", [vp])
        self.attr_pshared = self._fn(fast, "pthread_mutexattr_setpshared", [vp, ci])
        self.attr_robust = self._fn(fast, "pthread_mutexattr_setrobust", [vp, ci])
        self.attr_type = self._fn(fast, "pthread_mutexattr_settype", [vp, ci])
        self.syscall_wait = self._fn(blocking, "syscall", None)
        self.syscall_wake = self._fn(fast, "syscall", None)
        self.check_signals = ctypes.pythonapi.PyErr_CheckSignals
        self.check_signals.restype = ctypes.c_int

    @staticmethod
    def _fn(lib: Any, name: str, argtypes: list[Any] | None) -> Any:
        fn = getattr(lib, name)
        if argtypes is not None:
            fn.argtypes = argtypes
        fn.restype = ctypes.c_int if name != "syscall" else ctypes.c_long
        return fn


_libc: _Libc | None = None
_platform_error: str | None = None


def require_platform() -> _Libc:
    """The bound libc, or :class:`BudgetUnavailable` naming what this platform lacks."""
    global _libc, _platform_error
    if _libc is not None:
        return _libc
    if _platform_error is None:
        _platform_error = _missing()
        if _platform_error is None:
            try:
                _libc = _Libc()
            except (OSError, AttributeError) as exc:  # pragma: no cover - non-glibc/musl libc
                _platform_error = f"robust process-shared mutexes in libc ({exc})"
    if _libc is None:
        raise BudgetUnavailable(
            f"HostBudget needs Linux kernel mechanisms that this platform ({sys.platform}, "
            f"{platform.machine()}) lacks: {_platform_error}. Use a budget engine that runs "
            "on a server instead (PostgreSQL or Redis)"
        )
    return _libc


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux futexes, robust mutexes and OFD locks (F_OFD_SETLK)"
    if platform.machine() not in _FUTEX_SYSCALL:
        return f"a known futex system call number for {platform.machine()}"
    if not hasattr(fcntl, "F_OFD_SETLK"):
        return "open-file-description locks (fcntl.F_OFD_SETLK, Linux 3.15+)"
    if not os.path.isdir(SHM_DIR):
        return f"POSIX shared memory ({SHM_DIR} is not there)"
    if not os.path.isdir("/proc/self/fd"):
        return "/proc/self/fd (to map a segment through a description apart from its locks)"
    return None


class RobustMutex:
    """The process-shared robust mutex at ``address`` (inside a mapped segment)."""

    __slots__ = ("_address", "_libc", "_word")

    def __init__(self, libc: _Libc, address: int) -> None:
        self._libc = libc
        self._address = address
        self._word = ctypes.c_uint32.from_address(address)  # robust futex: owner tid | flags

    def initialise(self) -> None:
        attr = ctypes.create_string_buffer(64)
        libc = self._libc
        for rc in (
            libc.attr_init(attr),
            libc.attr_pshared(attr, _PTHREAD_PROCESS_SHARED),
            libc.attr_robust(attr, _PTHREAD_MUTEX_ROBUST),
            libc.attr_type(attr, _PTHREAD_MUTEX_ERRORCHECK),
            libc.mutex_init(self._address, attr),
        ):
            if rc:
                raise BudgetUnavailable(f"cannot set up a robust mutex: {os.strerror(rc)}")

    def lock(self) -> bool:
        """Take the mutex; True if its previous owner died holding it (repair, then go on)."""
        trylock = self._libc.trylock
        rc = trylock(self._address)
        for _ in range(_SPINS):  # held for a microsecond or two: let its owner run, try again
            if rc != errno.EBUSY:
                break
            os.sched_yield()
            rc = trylock(self._address)
        if rc == errno.EBUSY:
            rc = self._libc.lock(self._address)  # blocks with the GIL released
        if rc == 0:
            return False
        if rc == errno.EOWNERDEAD:
            self.make_consistent()
            return True
        if rc == errno.EDEADLK:
            raise RuntimeError(
                "a HostBudget was used re-entrantly (from a signal handler that interrupted "
                "this thread inside the budget); do not use a budget in signal handlers"
            )
        raise BudgetUnavailable(f"the budget's lock is unusable: {os.strerror(rc)}")

    def make_consistent(self) -> None:
        """After EOWNERDEAD (we hold the mutex): mark it usable again, before repairing."""
        self._libc.consistent(self._address)

    def unlock(self) -> None:
        self._libc.unlock(self._address)

    def unlock_if_mine(self) -> None:
        """After an exception that may have come between lock() and unlock(): unlock if this
        thread holds the mutex (the robust futex word holds the owner's thread id)."""
        if self._word.value & _FUTEX_TID_MASK == threading.get_native_id():
            self._libc.unlock(self._address)


class Futex:
    """Wait on and wake 32-bit words of a shared mapping."""

    __slots__ = ("_libc", "_number", "_timespec")

    def __init__(self, libc: _Libc) -> None:
        self._libc = libc
        self._number = _FUTEX_SYSCALL[platform.machine()]
        self._timespec = threading.local()

    def wait(self, address: int, expected: int, timeout: float) -> None:
        """Sleep while the word at ``address`` is ``expected``, at most ``timeout`` seconds.

        Returns on a wake-up, a changed word, the timeout or a signal (whose Python handler
        runs here, and may raise). Spurious returns happen: callers re-check their condition.
        """
        ts = getattr(self._timespec, "value", None)
        if ts is None:
            ts = self._timespec.value = _Timespec()
        ts.tv_sec = int(timeout)
        ts.tv_nsec = int((timeout - int(timeout)) * 1e9)
        rc = self._libc.syscall_wait(
            self._number,
            ctypes.c_void_p(address),
            _FUTEX_WAIT,
            ctypes.c_uint32(expected),
            ctypes.byref(ts),
            None,
            0,
        )
        if rc == -1 and ctypes.get_errno() == errno.EINTR and self._libc.check_signals():
            raise RuntimeError("PyErr_CheckSignals failed without an exception")  # unreachable

    def wake(self, address: int, count: int = 1) -> None:
        self._libc.syscall_wake(
            self._number, ctypes.c_void_p(address), _FUTEX_WAKE, count, None, None, 0
        )


class Segment:
    """A named file in ``/dev/shm``, mapped shared, laid out once by whoever creates it.

    ``open()`` runs under an exclusive ``flock`` of the file. A file that is empty, or whose
    first bytes are not ``magic`` (its creator died half-way), is truncated, sized and handed to
    ``lay_out(segment)``, which must write ``magic`` last; any other file is handed to
    ``validate(segment)``, which raises to refuse it.
    """

    def __init__(self, path: str, fd: int, mm: mmap.mmap) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        self._anchor: Any = ctypes.c_char.from_buffer(mm)
        self.base = ctypes.addressof(self._anchor)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        mode: int,
        size: int,
        magic: bytes,
        lay_out: Callable[[Segment], None],
        validate: Callable[[Segment], None],
        create: bool = True,
    ) -> Segment:
        """Open (``create``: or create) the segment at ``path``; see the class docstring."""
        for _ in range(100):
            fd = _open_or_create(path, mode) if create else _open_existing(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(path, fd):
                    _close_quietly(fd)  # unlinked (maybe made again) meanwhile: start over
                    continue
                _check_access(path, fd)
                fresh = os.pread(fd, len(magic), 0) != magic
                if fresh and not create:
                    raise BudgetUnavailable(f"{path} is not a whole segment")
                if fresh:
                    os.ftruncate(fd, 0)  # a half-made segment is laid out again from zeros
                    os.ftruncate(fd, size)
                segment = cls._map(path, fd, fresh, lay_out, validate)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return segment
            except BaseException:
                _close_quietly(fd)
                raise
        raise BudgetUnavailable(f"{path} keeps being removed and made again; cannot open it")

    @classmethod
    def _map(
        cls,
        path: str,
        fd: int,
        fresh: bool,
        lay_out: Callable[[Segment], None],
        validate: Callable[[Segment], None],
    ) -> Segment:
        size = os.fstat(fd).st_size
        if size == 0:
            raise BudgetUnavailable(f"{path} is empty: not a safepool segment")
        segment = cls(path, fd, _map_shared(fd, size))
        try:
            if fresh:
                lay_out(segment)
            else:
                validate(segment)
        except BaseException:
            segment.fd = -1  # the caller closes the descriptor
            segment.close()
            raise
        return segment

    def forget(self) -> None:
        """In a forked child: drop this process's copy of the descriptor (the parent's OFD
        locks must not live on in the child) without touching the mapping the parent shares."""
        _close_quietly(self.fd)
        self.fd = -1

    def close(self) -> None:
        """Close the descriptor (dropping this process's registration locks). The mapping
        stays until the last reference to this object goes, so a thread still inside an
        operation never touches unmapped memory."""
        if self.fd >= 0:
            _close_quietly(self.fd)
            self.fd = -1

    def unlink(self) -> None:
        """Remove the name if it still names this segment (not a newer one of the same name)."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- registrations: OFD locks on one byte each ----------------------------------------

    def lock_registration(self, index: int) -> bool:
        """Take registration ``index``'s liveness lock; False if another OFD holds it."""
        request = _FLOCK.pack(fcntl.F_WRLCK, 0, REG_LOCK_BASE + index, 1, 0)
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, request)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def unlock_registration(self, index: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK,
                    _FLOCK.pack(fcntl.F_UNLCK, 0, REG_LOCK_BASE + index, 1, 0))  # fmt: skip

    def registration_alive(self, index: int) -> bool:
        """Whether another open file description holds registration ``index``'s lock (this
        process's own registration reads as not alive: callers know their own)."""
        probe = _FLOCK.pack(fcntl.F_WRLCK, 0, REG_LOCK_BASE + index, 1, 0)
        result = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, probe)
        return bool(_FLOCK.unpack(result)[0] != fcntl.F_UNLCK)


def has_live_registration(path: str, count: int) -> bool | None:
    """Whether any process holds one of the first ``count`` registration locks of the segment
    file at ``path`` (one F_OFD_GETLK over the whole range); None if it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        probe = _FLOCK.pack(fcntl.F_WRLCK, 0, REG_LOCK_BASE, count, 0)
        result = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        return bool(_FLOCK.unpack(result)[0] != fcntl.F_UNLCK)
    except OSError:
        return None
    finally:
        _close_quietly(fd)


def _open_or_create(path: str, mode: int) -> int:
    """Open ``path`` read-write, creating it with exactly ``mode`` if absent.

    Never ``O_CREAT`` on an existing file: in a sticky directory such as /dev/shm, with
    ``fs.protected_regular``, that fails for a file another user created.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue  # created meanwhile: open it
        try:
            os.fchmod(fd, mode)  # exactly mode, whatever the umask
        except BaseException:
            _close_quietly(fd)
            raise
        return fd
    raise BudgetUnavailable(f"{path} keeps appearing and disappearing; cannot open it")


def _open_existing(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise BudgetUnavailable(f"{path} is gone (its owner closed or removed it)") from None


def _same_file(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _check_access(path: str, fd: int) -> None:
    """Refuse a segment made by another user unless its mode lets us read and write it (the
    check the kernel makes, done here too so that it also applies to root)."""
    st = os.fstat(fd)
    uid = os.geteuid()
    if st.st_uid == uid:
        return
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        allowed = st.st_mode & 0o060 == 0o060
    else:
        allowed = st.st_mode & 0o006 == 0o006
    if not allowed:
        raise PermissionError(
            errno.EACCES,
            f"{path} belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:o}, which does "
            f"not let uid {uid} use it; its creator must pass mode=0o660 (same group) or "
            "mode=0o666 (everyone)",
        )


def _map_shared(fd: int, size: int) -> mmap.mmap:
    """Map the file open at ``fd`` through an open file description of its own.

    A mapping holds a reference to the description it was made through (the kernel's ``struct
    file``, and CPython's ``mmap`` a ``dup()`` of the descriptor too), and OFD locks go only
    when their description does. Mapped through ``fd``, the registration locks taken on ``fd``
    would stay held until the mapping is gone, and in every forked child that still maps it.
    """
    own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)  # a new description
    try:
        return mmap.mmap(own, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(own)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
