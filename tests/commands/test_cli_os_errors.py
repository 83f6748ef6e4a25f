"""An OSError the user fixes outside the program (a full disk, a quota, a permission, a read-only mount) ends a
command with one line naming it and what was left as it was; other OSErrors may be bugs and keep their traceback."""

import errno

import pytest

import nuwa_train.commands.export_data as export_data_command
from nuwa_train.cli import main
from nuwa_train.io import write_atomically

COMMAND = ["export-data", "out"]  # any command: its handler is replaced by one that raises
PREFIX = "nuwa-train export-data: error: "


def _handler_raising(monkeypatch, error_factory):
    def handler(args):
        raise error_factory()

    monkeypatch.setattr(export_data_command, "run", handler)


def test_a_full_disk_during_a_checkpoint_save_is_one_line_saying_the_target_is_unchanged(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old checkpoint")

    def save(args):
        def fill_disk(staging):
            raise OSError(errno.ENOSPC, "No space left on device")

        write_atomically(target, fill_disk)

    monkeypatch.setattr(export_data_command, "run", save)
    with pytest.raises(SystemExit) as exited:
        main(COMMAND)
    line = exited.value.code
    assert isinstance(line, str) and "\n" not in line  # a string code: Python prints it and exits with status 1
    assert (
        line == f"{PREFIX}[Errno {errno.ENOSPC}] No space left on device; {target} was left as it was: the new "
        f"file was written beside it and removed"
    )
    assert target.read_bytes() == b"old checkpoint" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    with pytest.raises(OSError) as raised:  # --debug: the exception itself, so its traceback
        main(["--debug", *COMMAND])
    assert raised.value.errno == errno.ENOSPC


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM])
def test_permission_quota_and_read_only_errors_name_the_file(tmp_path, monkeypatch, code):
    path = tmp_path / "runs" / "model.safetensors"
    _handler_raising(monkeypatch, lambda: OSError(code, "refused", str(path)))
    with pytest.raises(SystemExit) as exited:
        main(COMMAND)
    assert exited.value.code == f"{PREFIX}[Errno {code}] refused: '{path}'"
    with pytest.raises(OSError):
        main(["--debug", *COMMAND])


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EBADF, "Bad file descriptor"),
        OSError("no errno"),
        FileNotFoundError(errno.ENOENT, "No such file", "internal/table.json"),
    ],
)
def test_other_os_errors_keep_their_traceback(monkeypatch, error):
    _handler_raising(monkeypatch, lambda: error)
    with pytest.raises(OSError) as raised:  # possibly a bug: not hidden behind one line
        main(COMMAND)
    assert raised.value is error
