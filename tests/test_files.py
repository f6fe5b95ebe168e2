"""flamingo_vlm.files: the atomic directory writer every saved directory goes through, and giving
back the resident pages of mapped weights a model no longer uses."""

import mmap
import os
import re
from pathlib import Path

import pytest
import torch

from flamingo_vlm.files import atomic_directory, atomic_file, byte_span, release_file_pages, remove_leftovers


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


def test_atomic_file_replaces_whole_with_plain_permissions(tmp_path):
    target = tmp_path / "sub" / "plot.png"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"one")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_bytes() == b"one" and target.stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_file(target, mode=0o777) as tmp:
        tmp.write_bytes(b"two")
    assert target.read_bytes() == b"two" and target.stat().st_mode & 0o777 == 0o777 & ~umask
    assert _hidden(target.parent) == []


def test_atomic_file_failure_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    for error in (OSError(28, "disk full"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_file(target) as tmp:
                tmp.write_text("half")
                raise error
    assert target.read_text() == "old" and _hidden(tmp_path) == []


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



def test_entries_the_new_directory_lacks_are_kept_where_asked(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
        (tmp / "stale_shard").write_text("old")
    (target / "notes.txt").write_text("mine")
    (target / "plots").mkdir()
    (target / "plots" / "a.png").write_text("png")
    with atomic_directory(target, keep_other=lambda name: name != "stale_shard") as tmp:
        (tmp / "weights").write_text("new")
        (tmp / "notes.txt").write_text("written by the save")  # the new directory's own file wins
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "plots", "weights"]
    assert (target / "weights").read_text() == "new" and (target / "notes.txt").read_text() == "written by the save"
    assert (target / "plots" / "a.png").read_text() == "png" and _hidden(tmp_path) == []


def test_an_entry_that_cannot_be_moved_stays_in_the_old_directory_and_a_link_stays_a_link(tmp_path, monkeypatch, caplog):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("old")
    (target / "notes.txt").write_text("mine")
    real_rename = type(target).rename

    def rename(self, dst):
        if self.name == "notes.txt":
            raise OSError(13, "Permission denied")
        return real_rename(self, dst)

    monkeypatch.setattr(type(target), "rename", rename)
    with caplog.at_level("WARNING", logger="flamingo_vlm.files"):
        with atomic_directory(target, keep_other=lambda name: True) as tmp:
            (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert (target / "weights").read_text() == "new"  # the write itself succeeded
    [old] = [p for p in tmp_path.iterdir() if p.name.startswith(".model.old-")]
    assert (old / "notes.txt").read_text() == "mine" and str(old) in caplog.text and "notes.txt" in caplog.text
    # a symbolic link at the target is replaced as a link: the directory it pointed to is untouched
    elsewhere = tmp_path / "run3"
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_text("{}")
    link = tmp_path / "latest"
    link.symlink_to(elsewhere)
    with atomic_directory(link, keep_other=lambda name: True) as tmp:
        (tmp / "weights").write_text("new")
    assert not link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["weights"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["tokenizer.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".latest")]

# -- release_file_pages: pages of a mapped weights file that only a replaced tensor used ----------------
def _resident(path) -> int:
    """Bytes of ``path``'s mappings resident in this process (0 where smaps is missing)."""
    total, mine = 0, False
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return 0
    for line in smaps.read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            mine = line.split()[-1] == str(Path(path).resolve())
        elif mine and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


linux_only = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")


def _mapped(tmp_path, n_bytes=4 << 20):
    path = tmp_path / "w.bin"
    data = torch.arange(n_bytes // 4, dtype=torch.float32)
    path.write_bytes(data.numpy().tobytes())
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and writable, as safetensors maps
    return path, mm, torch.frombuffer(mm, dtype=torch.float32), data


@linux_only
def test_released_pages_leave_resident_memory_and_read_back_the_same(tmp_path):
    path, mm, t, data = _mapped(tmp_path)
    assert t.sum() == data.sum()  # every page read in
    before = _resident(path)
    q = t.numel() // 4
    middle = torch.frombuffer(mm, dtype=torch.float32, offset=q * 4, count=q)  # a storage of its own
    # (the dropped part as its addresses: a caller need not keep a tensor alive to release it)
    released = release_file_pages([byte_span(t[: 3 * q])], live=[middle])  # the middle quarter stays in use
    assert released >= 2 * q * 4 - 3 * 4096
    assert before - _resident(path) >= released - 4096
    torch.testing.assert_close(t, data, rtol=0, atol=0)  # a later read gets the file's bytes back


@linux_only
def test_pages_of_a_live_tensors_storage_stay_also_through_a_strided_view(tmp_path):
    path, mm, t, data = _mapped(tmp_path)
    assert t.sum() == data.sum()
    before = _resident(path)
    assert release_file_pages([t[: t.numel() // 2]], live=[t[1::2]]) == 0  # the view reaches every page
    assert _resident(path) == before


@linux_only
def test_a_mapping_written_to_is_left_alone(tmp_path):
    path, mm, t, _ = _mapped(tmp_path)
    t[5] = -7.0  # a private copy of that page now exists; dropping it would lose the write
    assert release_file_pages([t]) == 0
    assert t[5] == -7.0
    assert release_file_pages([torch.ones(1 << 20)]) == 0  # anonymous memory: nothing to do


@linux_only
def test_resized_embeddings_do_not_stay_resident_from_the_lms_file(tmp_path):
    from safetensors.torch import load_file
    from tiny import tiny_lm, tiny_tokenizer, tiny_vision

    from flamingo_vlm import create_model_and_transforms

    tok = tiny_tokenizer()
    lm_dir, tok_dir = tmp_path / "lm", tmp_path / "tok"
    tiny_lm("llama", vocab_size=len(tok), hidden_size=256, num_attention_heads=4).save_pretrained(lm_dir)
    tok.save_pretrained(tok_dir)
    weights = lm_dir / "model.safetensors"
    model, _, tok = create_model_and_transforms(tiny_vision(), None, str(lm_dir), str(tok_dir))
    for p in model.parameters():  # read every live weight, as a forward does
        p.sum()
    resident = _resident(weights)
    saved = load_file(weights)  # (maps the file once more)
    old = saved["model.embed_tokens.weight"]  # its own, and the untied head of the same size
    assert resident <= weights.stat().st_size - 2 * old.nbytes + 4 * 4096
    lm = model.lang_encoder
    torch.testing.assert_close(lm.get_input_embeddings().weight[: old.shape[0]], old, rtol=0, atol=0)
    torch.testing.assert_close(lm.get_output_embeddings().weight[: old.shape[0]], saved["lm_head.weight"], rtol=0, atol=0)


@linux_only
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_matrices_do_not_stay_resident_from_the_lms_file(tmp_path, mode):
    from tiny import tiny_lm, tiny_tokenizer, tiny_vision

    from flamingo_vlm import create_model_and_transforms
    from flamingo_vlm.modeling.quantize import quantization_of

    tok = tiny_tokenizer()
    lm_dir, tok_dir = tmp_path / "lm", tmp_path / "tok"
    tiny_lm("llama", vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_attention_heads=4).save_pretrained(lm_dir)
    tok.save_pretrained(tok_dir)
    weights = (lm_dir / "model.safetensors").resolve()
    model, _, tok = create_model_and_transforms(tiny_vision(), None, str(lm_dir), str(tok_dir), quantize=mode)
    assert quantization_of(model) == mode
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-"))
             for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(weights))]
    tensors = [*model.parameters(), *model.buffers()]
    for t in tensors:
        t.float().sum()  # read every live weight, as a forward does
    in_file = [t for t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in spans)]
    assert in_file, "the test expects the LM's norms to stay views of its file"
    # (a read maps up to 16 pages around it that the page cache holds: the kernel's fault-around)
    limit = sum(t.nbytes for t in in_file) + 16 * 4096 * (len(in_file) + 1)
    assert _resident(weights) <= limit < weights.stat().st_size // 4


@linux_only
def test_quantizing_at_load_releases_each_layers_pages_as_it_goes(tmp_path, monkeypatch):
    """The replaced matrices' file pages are given back layer by layer, so a quantized load holds
    one layer's fp32 pages at a time, not the whole LM's (the built-in model with int8: 1.35 -> 0.93
    GB peak), and none are left at the end."""
    from tiny import tiny_lm, tiny_tokenizer, tiny_vision

    from flamingo_vlm import create_model_and_transforms
    from flamingo_vlm.modeling import quantize

    tok = tiny_tokenizer()
    lm_dir, tok_dir = tmp_path / "lm", tmp_path / "tok"
    tiny_lm("llama", vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_hidden_layers=6).save_pretrained(lm_dir)
    tok.save_pretrained(tok_dir)
    weights = (lm_dir / "model.safetensors").resolve()
    calls = []
    real = quantize.release_file_pages

    def spy(dropped, live=()):
        calls.append(len(dropped))
        return real(dropped, live=live)

    monkeypatch.setattr(quantize, "release_file_pages", spy)
    model, _, _ = create_model_and_transforms(tiny_vision(), None, str(lm_dir), str(tok_dir), quantize="int8")
    total = len([*model.parameters(), *model.buffers()])
    per_layer = calls[:-1]  # (the last call: everything replaced, the head included)
    assert len(per_layer) >= 6 and all(0 < n < total for n in per_layer)
    assert _resident(weights) < weights.stat().st_size // 4


def test_a_file_of_another_kind_given_as_weights_is_named_for_what_it_is(tmp_path):
    """`convert vit.json --vision-pretrained ...` said "it is truncated or corrupt" with torch's advice to
    load with weights_only=False; a Git LFS pointer saved as the weights' file read the same."""
    import torch
    from safetensors.torch import save_file

    from flamingo_vlm.files import WeightsFileError, load_weights_file

    (tmp_path / "vit.json").write_text('{"model_cfg": {"embed_dim": 512}}\n')
    with pytest.raises(WeightsFileError, match=r"vit\.json: it is not a torch \(\.pt, \.bin, \.pth\) or safetensors "
                                               r"weights file but text, beginning '\{\"model_cfg\"") as e:
        load_weights_file(tmp_path / "vit.json")
    assert e.value.path == tmp_path / "vit.json"
    (tmp_path / "lm.bin").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 5\n")
    with pytest.raises(WeightsFileError, match="truncated or corrupt; download or save it again; it holds text, "
                                               "beginning 'version https://git-lfs") as e:
        load_weights_file(tmp_path / "lm.bin")
    assert "weights_only" not in str(e.value)
    (tmp_path / "page.bin").write_bytes(b"<!DOCTYPE html>\r\n<html><body>Access denied</body></html>\r\n")
    with pytest.raises(WeightsFileError, match="it holds text, beginning '<!DOCTYPE html>'"):  # (CRLF lines)
        load_weights_file(tmp_path / "page.bin")
    save_file({"w": torch.ones(2)}, str(tmp_path / "named.bin"))  # safetensors under a torch file's name
    assert torch.equal(load_weights_file(tmp_path / "named.bin")["w"], torch.ones(2))
    torch.save({"w": torch.ones(3)}, tmp_path / "named.safetensors")  # and a torch file under a safetensors name
    assert torch.equal(load_weights_file(tmp_path / "named.safetensors")["w"], torch.ones(3))
    # a safetensors header whose length's low byte is 0x80, a pickle's first byte (1 file in 32)
    for n in range(1, 200):
        save_file({"a" * n: torch.ones(1)}, str(tmp_path / "h.safetensors"))
        if (tmp_path / "h.safetensors").read_bytes()[:1] == b"\x80":
            break
    assert (tmp_path / "h.safetensors").read_bytes()[:1] == b"\x80"
    assert torch.equal(load_weights_file(tmp_path / "h.safetensors")["a" * n], torch.ones(1))


def test_progress_bars_in_a_log_file_are_redrawn_once_a_minute(tmp_path):
    """tqdm redraws ten times a second; in a log file (nohup, Slurm, torchrun) every redraw stayed."""
    import io

    from flamingo_vlm.progress import LOG_INTERVAL_S, progress

    log = io.StringIO()
    bar = progress(range(3), file=log, mininterval=1.0)
    assert bar.mininterval == LOG_INTERVAL_S and bar.ascii
    list(bar)
    assert "3/3" in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress(range(3), file=Terminal(), mininterval=1.0)
    assert bar.mininterval == 1.0
    bar.close()
