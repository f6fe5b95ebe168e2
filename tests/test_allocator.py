"""The command line's allocator choice (flamingo_vlm.allocator): when it re-executes, with what."""

import os
import subprocess
import sys

import pytest

from flamingo_vlm import allocator
from flamingo_vlm.allocator import ENV, find_tcmalloc, reexec_with_allocator


class Exec(Exception):
    pass


def fake_execve(calls):
    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise Exec

    return execve


def test_preloads_found_library_once(monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: str(lib))
    monkeypatch.setattr(sys, "platform", "linux")
    calls = []
    with pytest.raises(Exec):
        reexec_with_allocator(environ={"KEEP": "1"}, execve=fake_execve(calls))
    path, argv, env = calls[0]
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == str(lib) and env["KEEP"] == "1"
    # the re-executed process (its environment as given) does not re-execute again
    reexec_with_allocator(environ=env, execve=fake_execve(calls))
    assert len(calls) == 1


@pytest.mark.parametrize("environ", [{ENV: "system"}, {ENV: " System "}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
                                     {"LD_PRELOAD": "/usr/lib/libasan.so.8"}])
def test_no_reexec_when_asked_not_to_or_already_preloaded(monkeypatch, environ):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    calls = []
    reexec_with_allocator(environ=environ, execve=fake_execve(calls))
    assert calls == []


def test_no_reexec_without_a_library(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    calls = []
    reexec_with_allocator(environ={}, execve=fake_execve(calls))
    assert calls == []


@pytest.mark.parametrize("argv, entry, expected", [
    (["python", "/venv/bin/flamingo-vlm", "train"], "flamingo_vlm", True),
    (["python", "-m", "flamingo_vlm", "generate"], "flamingo_vlm", True),
    (["python", "-u", "-m", "flamingo_vlm.train", "--config", "x"], "flamingo_vlm.train", True),  # torchrun
    (["python", "-m", "pytest", "tests"], "flamingo_vlm.train", False),  # a test running __main__ in-process
    (["python", "-c", "import flamingo_vlm"], "flamingo_vlm", False),
    (["python", "script.py"], "flamingo_vlm", False),
    (["python", "script.py", "-m", "flamingo_vlm"], "flamingo_vlm", False),  # the script's own arguments
    (["python", "-X", "importtime", "-W", "ignore", "-m", "flamingo_vlm"], "flamingo_vlm", True),
])
def test_launched_as(argv, entry, expected):
    assert allocator.launched_as(entry, argv) is expected


def test_entry_points_do_not_reexec_a_foreign_process(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "pytest"])
    calls = []
    reexec_with_allocator("flamingo_vlm.train", environ={}, execve=fake_execve(calls))
    assert calls == []


def test_explicit_library_must_exist(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    missing = tmp_path / "nope.so"
    with pytest.raises(ValueError, match=f"{ENV}=.*nope.so.*no such file"):
        reexec_with_allocator(environ={ENV: str(missing)}, execve=fake_execve([]))


@pytest.mark.parametrize("module", ["flamingo_vlm", "flamingo_vlm.train", "flamingo_vlm.eval"])
def test_bad_allocator_is_a_one_line_cli_error(tmp_path, module):
    env = {**os.environ, ENV: str(tmp_path / "nope.so")}
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "nope.so" in proc.stderr and "Traceback" not in proc.stderr


def test_failed_exec_goes_on_with_the_system_allocator(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(sys, "platform", "linux")

    def execve(*_):
        raise OSError("no interpreter")

    reexec_with_allocator(environ={}, execve=execve)  # returns


def test_hint_respects_the_setting(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(ENV, "auto")
    assert allocator.preload_hint().startswith("LD_PRELOAD=/usr/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setenv(ENV, "system")
    assert allocator.preload_hint() == ""


@pytest.mark.skipif(sys.platform != "linux" or find_tcmalloc() is None, reason="tcmalloc not installed")
def test_reexecuted_process_runs_with_tcmalloc():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ENV)}
    code = ("import sys; from flamingo_vlm.allocator import reexec_with_allocator; reexec_with_allocator(); "
            "print('tcmalloc' in open('/proc/self/maps').read(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["True", "False"]  # loaded, and torch was not imported before the choice
    # the commands start through it, and still work; torch is not imported before the choice
    proc = subprocess.run([sys.executable, "-m", "flamingo_vlm", "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "generate" in proc.stdout
    for module in ("flamingo_vlm.train", "flamingo_vlm.eval"):
        code = (f"import sys, runpy; sys.argv = ['x', '--help']; import {module}; "
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        assert out.split() == ["False"], module  # importing the package (what -m does first) loads no torch
