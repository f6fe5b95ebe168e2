"""The few-shot prefix cache: reused keys/values and image latents give the uncached outputs (greedy,
beams, scores; batches with left padding), the key covers tokens, images and dtype, memory stays
under its byte bound, and the server and evaluation paths use it."""

import copy
import json
import threading

import pytest
import torch

from flamingo_vlm import FlamingoProcessor
from flamingo_vlm.modeling import kernels
from flamingo_vlm.prefix_cache import PrefixCache, image_hash
from tiny import random_images, tiny_flamingo

DEMOS = ("<image>a red car.<|endofchunk|><image>two small dogs on the left.<|endofchunk|>"
         "<image>a big blue cat in the image.<|endofchunk|>")
KW = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module", params=["llama", "mpt"])
def setup(request):
    model, ip, tok = tiny_flamingo(request.param, every=1, seed=3)
    return model, tok, FlamingoProcessor(tok, ip), random_images(6, seed=1)


def _both(model, cache, batch, **kw):
    args = (batch["vision_x"], batch["input_ids"], batch["attention_mask"])
    return model.generate(*args, **kw), cache.generate(model, *args, **kw)


def test_shared_demos_are_reused_with_identical_outputs_batches_and_beams(setup):
    model, tok, proc, imgs = setup
    cache = PrefixCache(10**8, block_size=4)
    a = (DEMOS + "<image>the", imgs[:4])
    b = (DEMOS + "<image>a photo of two", imgs[:3] + [imgs[4]])
    for samples in ([a], [b], [a, b], [b, a]):
        batch = proc(samples)
        plain, cached = _both(model, cache, batch, **KW)
        assert cached.tolist() == plain.tolist()
        plain, cached = _both(model, cache, batch, num_beams=3, **KW)
        assert cached.tolist() == plain.tolist()
    s = cache.snapshot()
    n_demo = len(tok(DEMOS).input_ids)
    assert s["hits"] >= 6 and s["reused_tokens"] >= 6 * (n_demo - 4)  # every row after the first reused the demos
    assert s["images_reused"] > 0 and s["bypassed"] == 0


def test_scores_through_the_cache_match(setup):
    model, tok, proc, imgs = setup
    cache = PrefixCache(10**8, block_size=4)
    cands = [tok(" red car").input_ids, tok(" dog").input_ids]
    for samples in ([(DEMOS + "<image>the", imgs[:4])], [(DEMOS + "<image>the", imgs[:4]), (DEMOS + "<image>a", imgs[:3] + [imgs[5]])]):
        batch = proc(samples)
        args = (batch["vision_x"], batch["input_ids"], cands, batch["attention_mask"])
        torch.testing.assert_close(cache.score(model, *args), model.score(*args), atol=1e-5, rtol=0)
    assert cache.snapshot()["hits"] >= 2


def test_kept_generated_tokens_let_a_continuation_run_only_its_last_tokens(setup):
    """``keep_generated``: the rows it names have their generated tokens' keys/values stored as a
    prompt's would be, so continuing from prompt + generated reuses all but the last (< one block)
    and gives what one uninterrupted call gives; rows it does not name store their prompt only."""
    model, tok, proc, imgs = setup
    cache = PrefixCache(10**8, block_size=4)
    samples = [(DEMOS + "<image>the", imgs[:4]), ("<image>a photo of", imgs[4:5])]
    batch = proc(samples)
    n = batch["input_ids"].shape[1]
    whole = model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], max_new_tokens=16,
                           min_new_tokens=16, do_sample=False)
    first = cache.generate(model, batch["vision_x"], batch["input_ids"], batch["attention_mask"], max_new_tokens=9,
                           min_new_tokens=9, do_sample=False, keep_generated=lambda: [True, False])
    assert first.tolist() == whole[:, : n + 9].tolist()
    rows = [batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist() for b in range(2)]
    again = [rows[b] + first[b, n:].tolist() for b in range(2)]
    keys = [[image_hash(batch["vision_x"][b, t]) for t in range(len(images))] for b, (_, images) in enumerate(samples)]
    held = [cache.cached_tokens(model, ids, k) for ids, k in zip(again, keys)]
    assert held[0] == (len(again[0]) - 1) // 4 * 4  # prompt + generated, all but the last partial block
    assert held[1] == (len(rows[1]) - 1) // 4 * 4  # the prompt only
    cont = proc.tokenizer.pad({"input_ids": again}, padding="longest", padding_side="left", return_tensors="pt")
    rest = cache.generate(model, batch["vision_x"], cont["input_ids"], cont["attention_mask"], max_new_tokens=7,
                          min_new_tokens=7, do_sample=False)
    m = cont["input_ids"].shape[1]
    assert rest[:, m:].tolist() == whole[:, n + 9 :].tolist()
    before = cache.snapshot()["reused_tokens"]
    alone = cache.generate(model, batch["vision_x"][:1], torch.tensor([again[0]]), max_new_tokens=7, min_new_tokens=7,
                           do_sample=False)
    assert alone[0, len(again[0]):].tolist() == whole[0, n + 9 :].tolist()
    assert cache.snapshot()["reused_tokens"] - before == held[0]


def test_prefix_ending_mid_chunk_or_before_a_different_image(setup):
    """Prompts that agree up to the middle of a chunk, or in every token but one demo image: only
    what comes before the first difference is reused, and outputs stay the uncached ones."""
    model, tok, proc, imgs = setup
    cache = PrefixCache(10**8, block_size=3)
    first = (DEMOS + "<image>the", imgs[:4])
    proc_ids = lambda s: proc([s])["input_ids"][0].tolist()
    cache.generate(model, *(lambda bt: (bt["vision_x"], bt["input_ids"], bt["attention_mask"]))(proc([first])), **KW)
    mid_chunk = (DEMOS.replace("two small dogs on the left", "two small cats"), imgs[:3])
    other_image = (DEMOS + "<image>the", imgs[:2] + [imgs[5], imgs[3]])  # same tokens, demo 3's image differs
    for sample in (mid_chunk, other_image):
        before = cache.snapshot()["reused_tokens"]
        batch = proc([sample])
        plain, cached = _both(model, cache, batch, **KW)
        assert cached.tolist() == plain.tolist()
        reused = cache.snapshot()["reused_tokens"] - before
        ids, ref = proc_ids(sample), proc_ids(first)
        agree = next(i for i, (x, y) in enumerate(zip(ids, ref)) if x != y) if sample is mid_chunk else \
            [i for i, t in enumerate(ids) if t == model.media_token_id][2]  # the differing image's token
        assert 0 < reused <= agree


def test_key_has_the_model_dtype_and_memory_stays_bounded(setup, monkeypatch):
    model, tok, proc, imgs = setup
    batch = proc([(DEMOS + "<image>the", imgs[:4])])
    cache = PrefixCache(10**8, block_size=4)
    cache.generate(model, batch["vision_x"], batch["input_ids"], batch["attention_mask"], **KW)
    full = cache.snapshot()["bytes"]
    half = copy.deepcopy(model).to(torch.bfloat16)
    hits = cache.snapshot()["hits"]
    # torch's bf16 GEMM for the prefill (where bf16 is emulated the fp32 route sums in another order than
    # the decode kernel that computes the few uncached tokens: equal to bf16 rounding, checked below)
    monkeypatch.setitem(kernels._MEMO, "bf16_gemm", False)
    plain, cached = _both(half, cache, batch, **KW)
    assert cached.tolist() == plain.tolist() and cache.snapshot()["hits"] == hits  # nothing fp32 was reused
    monkeypatch.setitem(kernels._MEMO, "bf16_gemm", True)
    args = (batch["vision_x"], batch["input_ids"], [[5, 6], [7], [8, 9, 10]], batch["attention_mask"])
    want, got = half.score(*args), cache.score(half, *args)
    assert cache.snapshot()["hits"] > hits  # the bf16 entries were reused
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05)
    # quantized in place after the cache was used with it: the full-precision keys/values are not reused
    from flamingo_vlm.modeling.quantize import quantize_model

    q = copy.deepcopy(model).eval()
    cache.generate(q, batch["vision_x"], batch["input_ids"], batch["attention_mask"], **KW)
    hits = cache.snapshot()["hits"]
    quantize_model(q, "int8")
    plain, cached = _both(q, cache, batch, **KW)
    assert cached.tolist() == plain.tolist() and cache.snapshot()["hits"] == hits
    small = PrefixCache(full // 3, block_size=4)
    for seed in range(3):
        other = proc([(DEMOS + "<image>the", random_images(4, seed=10 + seed))])
        small.generate(model, other["vision_x"], other["input_ids"], other["attention_mask"], **KW)
        assert 0 < small.bytes <= small.max_bytes
    assert small.snapshot()["evictions"] > 0
    off = PrefixCache(0)
    off.generate(model, batch["vision_x"], batch["input_ids"], batch["attention_mask"], **KW)
    assert off.snapshot()["bypassed"] == 1 and off.bytes == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        PrefixCache(-1)


def test_server_engine_reuses_demos_and_reports_hits():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from flamingo_vlm.serve.app import ServeConfig, create_app
    from flamingo_vlm.serve.engine import Engine
    from flamingo_vlm.serve.jobs import GenerationJob, JobDone, Prompt, ChoiceFinished

    model, ip, tok = tiny_flamingo("llama", every=1, seed=5)
    imgs = [ip(im).unsqueeze(0) for im in random_images(5, seed=2)]
    keys = [f"img{i}" for i in range(5)]
    prompts = [(DEMOS + "<image>the", [0, 1, 2, 3]), (DEMOS + "<image>a photo", [0, 1, 2, 4])]

    def run(engine, text, which):
        done, out = threading.Event(), []
        job = GenerationJob(prompts=[Prompt(engine.encode(text), [imgs[i] for i in which], max_tokens=6,
                                            image_keys=[keys[i] for i in which])], temperature=0,
                            sink=lambda e: (out.append(e), isinstance(e, JobDone) and done.set()))
        engine.submit(job)
        assert done.wait(60)
        return [e.text for e in out if isinstance(e, ChoiceFinished)]

    results = {}
    for mb in (0, 64):
        engine = Engine(model, ip, tok, max_batch_size=4, batch_wait_ms=0, prefix_cache_mb=mb).start()
        try:
            results[mb] = [run(engine, t, w) for t, w in prompts + prompts]
            if mb:
                s = engine.stats.snapshot()["prefix_cache"]
                assert s["hits"] == 3 and s["reused_tokens"] > 0
                metrics = TestClient(create_app(engine, ServeConfig())).get("/metrics").text
                assert "flamingo_prefix_cache_hits_total 3" in metrics
            else:
                assert engine.stats.snapshot()["prefix_cache"] is None
        finally:
            engine.stop()
    assert results[64] == results[0]


def test_evaluation_with_a_shared_demo_set_gives_the_same_predictions(tmp_path):
    pytest.importorskip("pycocoevalcap")
    from flamingo_vlm.eval import EvalConfig, Evaluator
    from flamingo_vlm.synthetic import SceneGenerator, write_synthetic_benchmark

    gen = SceneGenerator(seed=0, shapes=("circle", "square", "star"), colors=("red", "blue"), n_held_out=1)
    write_synthetic_benchmark(tmp_path / "data", generator=gen, tasks=("coco", "imagenet"), n_train=6, n_val=1,
                              n_test=4, n_class_train_per_class=1, n_class_val_per_class=1, image_size=32)
    model, ip, tok = tiny_flamingo("llama", max_position_embeddings=512)
    units = {}
    for mb in (0, 16):
        cfg = EvalConfig(tasks=["coco", "imagenet"], data_root=str(tmp_path / "data"), out_dir=str(tmp_path / f"out{mb}"),
                         shots=[2], trials=1, num_samples=4, batch_size=2, demo_selection="shared",
                         caption_tokenizer="python", progress=False, prefix_cache_mb=mb)
        ev = Evaluator(model, ip, tok, cfg)
        ev.run()
        units[mb] = [json.loads((tmp_path / f"out{mb}" / t / "shots2_seed42.json").read_text())["predictions"]
                     for t in ("coco", "imagenet")]
        if mb:
            assert ev.prefix_cache.snapshot()["hits"] > 0
    assert units[16] == units[0]
    demos = {tuple(r["demos"]) for r in units[0][0]}
    assert len(demos) == 1  # one shared demo set for every query
