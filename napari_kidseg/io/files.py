"""File helpers shared by every writer: atomic replacement, never a silent overwrite."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import KidsegError

# the temporary name keeps the real suffix (ITK picks the format from it): these are the ones
# with more than one dot or that a writer looks at
_KEPT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".json", ".safetensors", ".csv", ".png", ".pt")


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise KidsegError("already exists; not overwriting it (use --overwrite to replace it)", path)
    if not path.parent.exists():
        raise KidsegError("folder does not exist", path.parent)
    if not os.access(path.parent, os.W_OK):
        raise KidsegError("folder is not writable", path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary path beside ``path`` that is renamed onto it only if the block succeeds.

    The temporary name keeps the real suffix because ITK picks the format from it.
    """
    path = Path(path)
    _check_target(path, overwrite)
    suffix = next(
        (s for s in _KEPT_SUFFIXES if path.name.lower().endswith(s)),
        path.suffix,
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers recreate the file): give it the usual permissions
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KidsegError(f"could not write ({exc.strerror or exc})", path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_files(path: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder beside ``path`` in which a writer makes ``path.name`` and the files
    it names (an .mhd header and its data file); they are moved beside ``path`` only if the block
    succeeds, the named file last, so the header never points at a temporary name."""
    import shutil

    path = Path(path)
    _check_target(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp / path.name
        made = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # the named file last
        for f in made:
            if f.name != path.name and (path.parent / f.name).exists() and not overwrite:
                raise KidsegError("already exists; not overwriting it (use --overwrite)", path.parent / f.name)
        umask = os.umask(0)
        os.umask(umask)
        for f in made:
            os.chmod(f, 0o666 & ~umask)
            os.replace(f, path.parent / f.name)
    except OSError as exc:
        raise KidsegError(f"could not write ({exc.strerror or exc})", path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(path: str | os.PathLike) -> int:
    """Remove the temporary files :func:`atomic_path` left beside ``path`` when its process was
    killed mid-write (a Dask worker, a drafting process); how many. Only call it when no one is
    writing ``path`` any more."""
    path = Path(path)
    removed = 0
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
