"""Small file-system helpers shared by everything that writes results people load later."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


STAGING_MARK, BACKUP_MARK = "staging", "old"  # .<name>.staging-<pid>-<random>, .<name>.old-<pid>
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # Linux renameat2(2)
# Modes before the umask, as open() and mkdir() use: what is written is as readable as any file the user makes
# (0644 / 0755 under umask 022), not private like tempfile's 0600 / 0700.
FILE_MODE, DIRECTORY_MODE = 0o666, 0o777
STAGING_NAME_BYTES, STAGING_NAME_ATTEMPTS = 4, 100


def _staging_sibling(target: Path, create: Callable[[Path], object]) -> Path:
    """A new hidden name next to `target` (same file system: the final rename moves no data), made by `create`.

    The name carries this process's id, so that `recover_directory` can remove what a killed writer left.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(STAGING_NAME_ATTEMPTS):
        candidate = target.with_name(
            f".{target.name}.{STAGING_MARK}-{os.getpid()}-{secrets.token_hex(STAGING_NAME_BYTES)}"
        )
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free staging name next to {target}", str(target.parent))


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))


def staging_directory(target: Path) -> Path:
    """A fresh directory next to `target` to write into (see `replace_directory`), with the umask's usual mode."""
    return _staging_sibling(Path(target), lambda path: os.mkdir(path, DIRECTORY_MODE))


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it, else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _give_usual_mode(path: Path, umask: int) -> None:
    """The mode the umask gives a new file or folder (an executable keeps its x bits): writers such as
    transformers' save_pretrained leave some files private (model.safetensors 0600)."""
    executable = path.is_dir() or path.stat().st_mode & stat.S_IXUSR
    os.chmod(path, (DIRECTORY_MODE if executable else FILE_MODE) & ~umask)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename is durable once its directory is), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _finish_tree(root: Path) -> None:
    """Every file and folder under `root` with its usual mode, and on the disk."""
    umask = _umask()
    for folder, _, files in os.walk(root):
        for path in [Path(folder) / name for name in files if not (Path(folder) / name).is_symlink()]:
            _give_usual_mode(path, umask)
            _fsync(path)
        _give_usual_mode(Path(folder), umask)
        _fsync(Path(folder))


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a file system without exchange
        return False
    raise OSError(error, os.strerror(error), str(second))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_directory(target: Path) -> list[str]:
    """Repair what a killed write left next to `target` (a directory or a file); returns what was done (logged).

    A missing target with a backup beside it gets the backup back (a kill between the fallback's two renames of
    `replace_directory`); backups next to a present target and staging files and folders of processes that no
    longer run are removed.
    """
    target = Path(target)
    done = []
    if not target.parent.is_dir():
        return done
    backups = sorted(target.parent.glob(f".{target.name}.{BACKUP_MARK}-*"), key=lambda p: p.stat().st_mtime)
    if backups and not target.exists():
        os.replace(backups.pop(), target)
        done.append(f"restored {target} from the backup an interrupted export left")
    for backup in backups:
        shutil.rmtree(backup, ignore_errors=True)
        done.append(f"removed the stale backup {backup}")
    for staging in target.parent.glob(f".{target.name}.{STAGING_MARK}-*"):
        pid = staging.name.split(f".{STAGING_MARK}-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            _remove(staging)
            done.append(f"removed the unfinished {staging} a killed write left")
    for line in done:
        logger.warning("%s", line)
    return done


def replace_directory(staging: Path, target: Path) -> None:
    """Move a finished `staging` directory to `target`: at every moment `target` is the whole old or new one.

    The staging tree gets the modes the umask gives and is flushed to the disk first (a crash after the swap
    cannot leave empty files). An existing target is swapped with the staging folder in one atomic exchange,
    then the old one is removed. Where the system cannot exchange, the old target is renamed aside first and
    removed last; a kill between those two renames is repaired by `recover_directory`, which every write and
    `load_pruned` call first.
    """
    _finish_tree(staging)
    recover_directory(target)
    if not target.exists():
        os.replace(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old directory
    else:
        backup = target.with_name(f".{target.name}.{BACKUP_MARK}-{os.getpid()}")
        os.replace(target, backup)
        os.replace(staging, target)
        shutil.rmtree(backup, ignore_errors=True)
    _fsync(target.parent)


def write_directory_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """`write(staging)` into a folder next to `target`, then `replace_directory`; a failed write leaves nothing."""
    target = Path(target)
    staging = staging_directory(target)
    try:
        write(staging)
        replace_directory(staging, target)
    finally:
        if staging.exists():  # the write failed (the swap leaves nothing there)
            shutil.rmtree(staging, ignore_errors=True)
    return target


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(staging)` to a hidden file next to `path`, flushed to the disk, then renamed onto `path`.

    At every moment -- a full disk, a kill, a power cut -- `path` is the whole old file or the whole new one: the
    bytes are never copied onto it (as a move from another file system, e.g. $TMPDIR, would). A failed write
    removes its staging file (its error gets a note saying `path` is unchanged); one a killed process left is
    removed by the next write. The file gets the mode the umask gives new files.
    """
    path = Path(path)
    recover_directory(path)
    staging = _staging_sibling(path, _create_file)
    try:
        write(staging)
        _give_usual_mode(staging, _umask())
        _fsync(staging)
        os.replace(staging, path)
    except BaseException as error:
        staging.unlink(missing_ok=True)
        if isinstance(error, Exception):
            error.add_note(f"{path} was left as it was: the new file was written beside it and removed")
        raise
    _fsync(path.parent)
    return path


def write_bytes_atomically(path: Path, data: bytes | memoryview) -> Path:
    """`data` as the new content of `path` (`write_atomically`). A full disk raises OSError ENOSPC, where torch's
    own writer reports it as "unexpected pos N vs M"."""

    def write(staging: Path) -> None:
        descriptor = os.open(staging, os.O_WRONLY | os.O_TRUNC)
        try:
            remaining = memoryview(data)
            while remaining:
                remaining = remaining[os.write(descriptor, remaining) :]
        finally:
            os.close(descriptor)

    return write_atomically(path, write)


def torch_save_atomically(path: Path, obj) -> Path:
    """`torch.save(obj)` as the new content of `path`, serialised in memory first (as Lightning's save does) so
    that a full disk is an OSError, not torch's "unexpected pos N vs M"."""
    import io

    import torch

    serialized = io.BytesIO()
    torch.save(obj, serialized)
    return write_bytes_atomically(path, serialized.getbuffer())


# ------------------------------------------------------------------------------------------ checkpoints
class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that holds Python objects beyond tensors and plain data: loading it could run code."""

    def __init__(self, path: str | os.PathLike, detail: str):
        self.path = str(path)
        super().__init__(
            f"refused to load the checkpoint {self.path}: it holds Python objects that unpickling would run "
            f"({detail.strip().splitlines()[-1] if detail.strip() else 'unknown object'}). nuwa-train loads "
            f"checkpoints weights-only (tensors, numbers, strings, containers and its own settings classes); a file "
            f"written by nuwa-train never needs more. Do not load it unless you made it yourself."
        )

    @classmethod
    def from_unpickling(cls, path: str | os.PathLike, error: Exception) -> UnsafeCheckpointError:
        """From torch's weights-only refusal, keeping the line that names the refused global, not its advice."""
        lines = [line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        return cls(path, lines[0] if lines else str(error))


def load_checkpoint_file(path: str | os.PathLike, map_location="cpu", allowed: tuple = ()) -> dict:
    """`torch.load(path, weights_only=True)`; a file that needs more is refused with `UnsafeCheckpointError`.

    `allowed`: extra plain-data classes (e.g. an enum) the file may hold besides torch's and nuwa-train's own.
    """
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError.from_unpickling(path, error) from None


TENSOR_TREE_KEY = "nuwa_train.tree"  # safetensors metadata entry holding the JSON skeleton


def _flatten(value, path: str, tensors: dict):
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _flatten(item, f"{path}/{key}", tensors) for key, item in value.items()}
        return {"__items__": [[key, _flatten(item, f"{path}/{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"{path or '/'}: {type(value).__name__} cannot be stored in a tensor tree "
        f"(tensors, dicts, lists and JSON scalars only)"
    )


def _unflatten(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__items__"}:
            return {key: _unflatten(item, tensors) for key, item in value["__items__"]}
        return {key: _unflatten(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_unflatten(item, tensors) for item in value]
    return value


def save_tensor_tree(path: Path, tree: dict) -> Path:
    """A nested dict of tensors and plain data as ONE safetensors file (the skeleton as JSON metadata), atomically.

    No pickle: reading it back can never run code, unlike a `torch.save` file. Tuples come back as lists.
    """
    import json

    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = _flatten(tree, "", tensors)
    seen, stored = set(), {}
    for key, tensor in tensors.items():  # safetensors refuses tensors that share memory (e.g. tied weights)
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        stored[key] = tensor
    return write_atomically(
        Path(path), lambda staging: save_file(stored, str(staging), metadata={TENSOR_TREE_KEY: json.dumps(skeleton)})
    )


def load_tensor_tree(path: Path) -> dict:
    """The tree `save_tensor_tree` wrote."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if TENSOR_TREE_KEY not in metadata:
            raise ValueError(
                f"{path} is a safetensors file without nuwa-train's {TENSOR_TREE_KEY!r} metadata; it "
                f"was not written by save_tensor_tree"
            )
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return _unflatten(json.loads(metadata[TENSOR_TREE_KEY]), tensors)
