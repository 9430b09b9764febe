"""Report files are written without harming what is at the path (gradverify/outputs.py)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from gradverify.outputs import OutputError, check_target, write_output


def _device(tmp_path: Path, name: str, minor: int) -> Path:
    """A character device node of our own (1:3 is null, 1:7 is full), so a bug replaces a
    copy in a temporary folder, not the machine's /dev."""
    path = tmp_path / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root (this suite runs as root in CI)")
    return path


def test_new_and_regular_files_are_written_whole_and_keep_their_mode(tmp_path: Path) -> None:
    fresh = tmp_path / "reports" / "deep" / "out.json"
    write_output(fresh, "{}\n")
    assert fresh.read_text() == "{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600
    existing = tmp_path / "kept.xml"
    existing.write_text("old")
    os.chmod(existing, 0o640)
    inode = existing.stat().st_ino
    write_output(existing, "new")
    assert existing.read_text() == "new" and stat.S_IMODE(existing.stat().st_mode) == 0o640
    assert existing.stat().st_ino != inode  # replaced by a rename: never half written
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "kept.xml", "out.json", "reports"]


def test_a_symlink_is_followed_and_stays_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "real" / "report.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    chain = tmp_path / "chain.json"
    chain.symlink_to(link)
    write_output(chain, "new")
    assert link.is_symlink() and chain.is_symlink()
    assert target.read_text() == "new" and not target.is_symlink()
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made.json")
    write_output(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "made.json").read_text() == "made"


def test_a_fifo_is_written_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_output(fifo, "through the pipe")
    reader.join(timeout=30)
    assert received == ["through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_devices_are_written_in_place(tmp_path: Path, no_replace_onto_devices: None) -> None:
    null = _device(tmp_path, "null", 3)
    write_output(null, "discarded")
    assert stat.S_ISCHR(os.stat(null).st_mode)
    write_output(Path("/dev/null"), "discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    full = _device(tmp_path, "full", 7)
    with pytest.raises(OSError) as info:
        write_output(full, "x" * 100_000)
    assert info.value.strerror == "No space left on device"
    assert stat.S_ISCHR(os.stat(full).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "null"]  # no temp file left behind


def test_stdout_and_stderr_names_write_to_our_own_streams(capsys: pytest.CaptureFixture[str],
                                                          no_replace_onto_devices: None) -> None:
    for name in ("/dev/stdout", "-", "/dev/fd/1"):
        write_output(Path(name), f"{name}\n")
    write_output(Path("/dev/stderr"), "to stderr\n")
    out, err = capsys.readouterr()
    assert out == "/dev/stdout\n-\n/dev/fd/1\n" and err == "to stderr\n"
    assert os.path.islink("/dev/stdout") or not os.path.exists("/dev/stdout")


def test_targets_that_can_never_be_written_are_refused_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for bad, reason in ((tmp_path, "it is a folder"), (tmp_path / "file" / "out.json", "Not a directory"),
                        (tmp_path / ("n" * 300), "File name too long")):
        with pytest.raises(OutputError) as info:
            check_target(bad)
        assert reason in str(info.value.strerror), info.value
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputError, match="Too many levels of symbolic links"):
        check_target(loop)
    for fine in (tmp_path / "new" / "deeper" / "x.json", tmp_path / "file", Path("/dev/null"), Path("-")):
        check_target(fine)
