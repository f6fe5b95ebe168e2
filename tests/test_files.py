"""flamingo_vlm.files: the atomic directory writer every saved directory goes through."""

import os

import pytest

from flamingo_vlm.files import atomic_directory, remove_leftovers


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_success_replaces_and_gives_plain_permissions(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not (tmp / "old.txt").exists()
        (tmp / "weights").write_text("new")
        os.chmod(tmp / "weights", 0o600)  # as safetensors writes its files
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "weights").stat().st_mode & 0o777 == 0o666 & ~umask
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp would have made it 0700
    assert _hidden(tmp_path) == []


def test_failure_leaves_the_old_directory_and_nothing_else(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
            raise OSError(28, "disk full")
    assert (target / "a").read_text() == "1" and _hidden(tmp_path) == []


def test_a_failed_swap_puts_the_old_one_back(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    real_rename = type(target).rename

    def rename(self, dst):
        if self.name.startswith(".ckpt.tmp-"):
            raise OSError(5, "I/O error")
        return real_rename(self, dst)

    monkeypatch.setattr(type(target), "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
    monkeypatch.undo()
    assert (target / "a").read_text() == "1" and _hidden(tmp_path) == []


def test_keep_existing_and_leftovers(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("first")
    with atomic_directory(target, replace=False) as tmp:  # a concurrent writer's copy already there
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "first" and _hidden(tmp_path) == []
    (tmp_path / ".step_00000003.tmp-abc").mkdir()
    (tmp_path / ".other.tmp-abc").mkdir()
    remove_leftovers(tmp_path, "step_*")
    assert _hidden(tmp_path) == [".other.tmp-abc"]
