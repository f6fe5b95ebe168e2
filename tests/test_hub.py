"""Offline, loads that would need the Hub use the local cache at once instead of retrying (~30 s)."""

import socket

import pytest

from flamingo_vlm import hub, load_pretrained


@pytest.fixture(autouse=True)
def fresh_answer(monkeypatch):
    for name in hub._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.forget()
    yield
    hub.forget()


def _no_dns(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def test_a_host_that_does_not_resolve_means_the_cache_only(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    assert hub.hub_unreachable() and hub.local_files_only(False)
    hub.forget()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a proxy resolves names itself
    assert not hub.hub_unreachable() and not hub.local_files_only(False) and hub.local_files_only(True)


def test_a_resolving_host_leaves_downloads_on(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("1.2.3.4", 443))])
    assert not hub.hub_unreachable() and not hub.local_files_only(False)


def test_an_offline_release_load_asks_the_cache_only(monkeypatch, tmp_path):
    import flamingo_vlm.pretrained as pretrained

    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    seen = {}

    def fake_release(release, *, cache_dir=None, local_files_only=False, revision=None):
        seen["local_files_only"] = local_files_only
        raise OSError("not in the cache")

    monkeypatch.setattr(pretrained, "load_openflamingo_release", fake_release)
    with pytest.raises(OSError, match="not in the cache"):
        load_pretrained("openflamingo/OpenFlamingo-3B-vitl-mpt1b", cache_dir=tmp_path)
    assert seen == {"local_files_only": True}


def test_loads_that_need_no_hub_ask_no_dns(monkeypatch, tmp_path):
    """The built-in model, and a model saved from it (its backbones referenced as built-ins): no lookup."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("a DNS lookup for a local load"))
    model, ip, tok = load_pretrained("smol-synthetic")
    model.save_pretrained(tmp_path / "tuned", tokenizer=tok, image_processor=ip)
    load_pretrained(tmp_path / "tuned")
    from tiny import tiny_flamingo

    tiny, tip, ttok = tiny_flamingo()  # embedded backbones
    tiny.save_pretrained(tmp_path / "tiny", tokenizer=ttok, image_processor=tip)
    load_pretrained(tmp_path / "tiny")


def test_an_offline_hub_id_asks_the_cache_only(monkeypatch, tmp_path):
    import flamingo_vlm.pretrained as pretrained

    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    seen = {}
    real = pretrained.resolve_directory

    def spy(name, *, cache_dir=None, local_files_only=False, revision=None):
        seen["local_files_only"] = local_files_only
        return real(name, cache_dir=cache_dir, local_files_only=local_files_only, revision=revision)

    monkeypatch.setattr(pretrained, "resolve_directory", spy)
    with pytest.raises(OSError, match="someone/no-such-flamingo") as e:
        load_pretrained("someone/no-such-flamingo", cache_dir=tmp_path)
    assert seen == {"local_files_only": True}
    # advice a command line can follow (it had passed on huggingface_hub's "pass 'local_files_only=False'")
    assert f"not in the local Hugging Face cache ({tmp_path})" in str(e.value) and "local_files_only" not in str(e.value)
    assert "give that directory instead, or set HF_HOME" in str(e.value)


def test_open_clip_weights_honour_local_files_only(monkeypatch, tmp_path):
    import huggingface_hub

    from flamingo_vlm.factory import build_vision_encoder

    calls = []

    def fake_download(repo_id, filename, *, cache_dir=None, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(OSError, match="timm/vit_large_patch14_clip_224.openai") as e:
        build_vision_encoder("ViT-L-14", "openai", cache_dir=tmp_path, use_local_files=True)
    assert calls == [True]
    assert "not in the local Hugging Face cache" in str(e.value) and "in place of 'openai'" in str(e.value)
    # online, the same exception type follows a failed request: its own text stays
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("1.2.3.4", 443))])
    with pytest.raises(OSError, match="LocalEntryNotFoundError: not cached"):
        build_vision_encoder("ViT-L-14", "openai", cache_dir=tmp_path, use_local_files=False)


def test_a_cached_hub_lm_loads_without_asking_the_hub(monkeypatch, tmp_path):
    """transformers' AutoModelForCausalLM looks for a PEFT adapter (adapter_config.json) without the
    load's local_files_only and cache_dir: where the Hub does not resolve, every load of a Hub LM, cached
    or not, spent ~25 s in retries before it went on (a cached model in `cache_dir`: the adapter was
    looked for in the default cache). Every file transformers asks for now asks the given cache only."""
    import transformers.utils.hub as hf_utils_hub

    from flamingo_vlm.lm_loading import load_causal_lm
    from tiny import tiny_lm

    commit = "3" * 40
    repo = tmp_path / "cache" / "models--org--tiny-lm"
    tiny_lm().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    asked = []
    real = hf_utils_hub.hf_hub_download

    def spy(repo_id, filename, *args, **kwargs):
        asked.append((filename, kwargs.get("local_files_only"), str(kwargs.get("cache_dir"))))
        return real(repo_id, filename, *args, **kwargs)

    monkeypatch.setattr(hf_utils_hub, "hf_hub_download", spy)
    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    lm = load_causal_lm("org/tiny-lm", cache_dir=tmp_path / "cache", local_files_only=True)
    assert lm.config.hidden_size == 32
    assert asked and all(local and cache == str(tmp_path / "cache") for _, local, cache in asked), asked


def test_a_local_path_with_a_typo_is_said_to_be_missing_here_not_only_on_the_hub(tmp_path, monkeypatch):
    """`runs/nothere` is also a valid Hub repo id: it was looked up on the Hub, and the error said only that
    the Hub could not give it (train's suggested `hf download runs/nothere`; convert's --lm pasted
    transformers' "We couldn't connect to 'https://huggingface.co'")."""
    from flamingo_vlm.lm_loading import load_causal_lm
    from flamingo_vlm.pretrained import resolve_directory

    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"there is no runs/nothere here \(runs/ holds: tiny\); as a Hub "
                                                r"repo id it could not be fetched either"):
        resolve_directory("runs/nothere", local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"language model 'runs/nolm': there is no runs/nolm here \(runs/ "
                                                r"holds: tiny\)"):
        load_causal_lm("runs/nolm", local_files_only=True)
    with pytest.raises(OSError, match=r"nolm") as e:  # (a Hub id: the Hub's own words, whole)
        load_causal_lm("nolm", local_files_only=True)
    assert "there is no" not in str(e.value)


def test_an_offline_vision_encoder_with_hub_weights_asks_the_cache_only(monkeypatch, tmp_path):
    """evaluate --rices --rices-vision-pretrained openai built its encoder without the offline check:
    ~30 s of Hub retries before the error."""
    import huggingface_hub

    from flamingo_vlm.factory import build_vision_encoder

    monkeypatch.setattr(socket, "getaddrinfo", _no_dns)
    asked = []

    def spy(repo_id, filename, *args, local_files_only=False, **kwargs):
        asked.append(local_files_only)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(OSError, match="could not get"):
        build_vision_encoder("ViT-B-32", "openai", cache_dir=tmp_path)
    assert asked and all(asked), asked
