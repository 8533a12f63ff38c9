"""Files written safely: atomic writes, JSON, checksums, output paths checked before any slow work, and the lock under
which one process builds a shared cache while the others wait for it.

Scripts and shared modules import this module; importing it does no work.
"""
import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import sys
import threading
import zlib

import errors


def warn(message):
    """One line on stderr, on a line of its own (a progress bar may be drawing on the current one)."""
    print(f"\nwarning: {message}", file=sys.stderr, flush=True)


def atomic_write(path, write_fn):
    """Write via a temporary file in the same folder (created if missing), fsync, then rename: readers see old or new,
    never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise errors.UserError(f"no space left on the device writing {path}; the previous version of it is "
                                   f"intact. Free some space, then continue with --resume")
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def read_json(path):
    """The JSON document at path; raises ValueError (with the reason) if it is missing, unreadable or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from None


def file_crc32(path, chunk=1 << 24):
    """CRC-32 of a file's bytes: ~5 GB/s from the page cache, so checking a whole pixel cache costs well under a
    second; it catches damage (truncation, flipped or overwritten bytes), not tampering."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def file_record(path):
    """What a cache's metadata records of one of its files, to be compared by check_file()."""
    return {"bytes": os.path.getsize(path), "crc32": file_crc32(path)}


def check_file(path, record):
    """None if the file matches its record (size, then checksum), else what is wrong with it."""
    name = os.path.basename(path)
    if not isinstance(record, dict) or not {"bytes", "crc32"} <= record.keys():
        return f"no checksum recorded for {name}"
    try:
        size = os.path.getsize(path)
        if size != record["bytes"]:
            return f"{name} has {size:,} bytes, {record['bytes']:,} were written"
        if file_crc32(path) != record["crc32"]:
            return f"{name} fails its checksum"
    except OSError as e:
        return f"{name}: {e.strerror}"
    return None


@contextlib.contextmanager
def build_lock(path):
    """Hold an exclusive lock on the file `path` (created if needed) while building a shared cache: a second process
    (another run of a sweep, another torchrun rank) waits here, then finds the cache built and uses it."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_output_dir(path, flag, given=None):
    """Fail in one line, before any work, if folder `path` cannot be created or written (a read-only mount, a path
    under a regular file, a file of that name). Creates nothing that stays: folders made for the probe are removed.
    given: the flag's value when it names a file in that folder (check_output_file)."""
    path = os.path.abspath(path)
    shown = f"{flag} {given or path}"
    made, parent = [], path
    while not os.path.exists(parent):  # the folders the probe will create, deepest last
        made.insert(0, parent)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        where = "" if parent == path and not given else f": {parent}"
        raise errors.UserError(f"{shown}{where} is a file, not a folder; choose another {flag}")
    try:
        for folder in list(made):
            try:
                os.mkdir(folder)
            except FileExistsError:  # another process made it meanwhile: not ours to remove
                made.remove(folder)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        failed = f": {e.filename}" if e.filename in made[:-1] else ""  # a parent folder could not be made
        raise errors.UserError(f"{shown}: cannot {'create' if made else 'write to'} {'its folder' if given else 'it'} "
                               f"({e.strerror}{failed}); choose a writable {flag}") from None
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def check_output_file(path, flag):
    """check_output_dir() for the folder a file will be written to, and refuse a folder of the file's name."""
    if os.path.isdir(path):
        raise errors.UserError(f"{flag} {path} is a folder; give a file path")
    check_output_dir(os.path.dirname(os.path.abspath(path)), flag, given=path)


def make_cache_dir(path, damage=None):
    """Create a cache folder, or fail in one line pointing at --cache-dir; damage: why an existing cache there has to
    be rebuilt (named in that line)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        if damage:
            raise errors.UserError(f"{damage}, and it cannot be rebuilt in place ({e.strerror}); point --cache-dir at "
                                   f"a writable folder to rebuild it there, or delete {path} as a user "
                                   f"who may") from None
        raise errors.UserError(f"cannot write the cache {path} ({e.strerror}); point --cache-dir at a writable folder "
                               f"(the data folder itself may stay read-only)") from None


@contextlib.contextmanager
def on_signal_exit(what, cleanup=(), advice="nothing half-built was kept, the next run builds it again"):
    """While building something slow (a cache): SIGINT/SIGTERM removes the half-written files in `cleanup` and exits
    with one line (`advice`: what was kept and what to do); the next run builds it again. Any other failure removes
    them too."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        raise errors.Interrupted(f"interrupted by {name} while {what}; {advice}", name)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except BaseException:
        for path in cleanup:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
