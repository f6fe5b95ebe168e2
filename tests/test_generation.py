"""Generation, scoring, conditioning hygiene, masks, new-token training and the processor."""

import threading

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from flamingo_vlm import FlamingoProcessor
from tiny import random_images, tiny_flamingo


@pytest.fixture(scope="module")
def llama():
    return tiny_flamingo("llama", every=1, seed=0)


def make_batch(model, ip, tok, seed=0):
    imgs = random_images(3, seed=seed)
    return FlamingoProcessor(tok, ip)(
        [("<image>a red car.<|endofchunk|><image>a", imgs[:2]), ("<image>the dog is", imgs[2:])]
    )


def gen(model, batch, **kw):
    return model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], **kw)


class FailingStreamer(BaseStreamer):
    def __init__(self, after):
        self.calls, self.after = 0, after

    def put(self, value):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("client went away")

    def end(self):
        pass


def test_exception_inside_generate_leaves_model_clean(llama):
    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        text_only_before = model.lang_encoder(input_ids=ids).logits
    expected = gen(model, batch, max_new_tokens=6)
    with pytest.raises(RuntimeError, match="client went away"):
        model.generate(batch["vision_x"][:1], ids, streamer=FailingStreamer(after=3), max_new_tokens=6)
    assert model._slot.get() is None
    with torch.no_grad():
        torch.testing.assert_close(model.lang_encoder(input_ids=ids).logits, text_only_before)
    assert gen(model, batch, max_new_tokens=6).tolist() == expected.tolist()


def test_two_models_in_two_threads_do_not_interfere():
    models = [tiny_flamingo("llama", seed=s) for s in (1, 2)]
    batches = [make_batch(m, ip, tok, seed=i) for i, (m, ip, tok) in enumerate(models)]
    expected = [gen(m, b, max_new_tokens=8).tolist() for (m, _, _), b in zip(models, batches)]
    results, errors = [[], []], []

    def work(i):
        try:
            for _ in range(4):
                results[i].append(gen(models[i][0], batches[i], max_new_tokens=8).tolist())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == [expected[0]] * 4 and results[1] == [expected[1]] * 4


def test_sampling_return_sequences_keep_each_rows_images(llama):
    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    greedy = gen(model, batch, max_new_tokens=6)
    # top_k=1 sampling is greedy: each returned sequence must match its own row's greedy output.
    sampled = gen(model, batch, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3)
    assert sampled.shape[0] == 6
    assert sampled.tolist() == greedy.repeat_interleave(3, 0).tolist()
    free = gen(model, batch, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.5, num_return_sequences=2,
               repetition_penalty=1.3)
    assert free.shape[0] == 4


def test_image_and_pad_are_never_generated(llama):
    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    with torch.no_grad():  # make <image> the most likely token everywhere
        model.lang_encoder.lm_head.weight[model.media_token_id] *= 50
    try:
        out = gen(model, batch, max_new_tokens=8)[:, batch["input_ids"].shape[1]:]
        assert model.media_token_id not in out.tolist()[0] + out.tolist()[1]
        allowed = gen(model, batch, max_new_tokens=8, allow_image_tokens=True)[:, batch["input_ids"].shape[1]:]
        assert model.media_token_id in allowed.flatten().tolist()
    finally:
        with torch.no_grad():
            model.lang_encoder.lm_head.weight[model.media_token_id] /= 50


def test_suppression_samples_as_transformers_own_suppress_tokens(llama):
    """<image> and <PAD> are masked by our own processor (no isin over the vocabulary at every step),
    at the place in the processor chain where transformers' suppress_tokens step ran: the same sampled
    tokens for the same seed, also with a processor of the caller's and top-k."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    from flamingo_vlm.modeling import flamingo as flamingo_mod

    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    suppress = sorted({model.media_token_id, model.pad_token_id})
    kw = dict(max_new_tokens=8, do_sample=True, top_k=3, temperature=1.7,
              logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))

    torch.manual_seed(0)
    ours = gen(model, batch, **kw)
    real = flamingo_mod.SuppressTokens
    try:  # the same call with transformers' processor in place of ours
        flamingo_mod.SuppressTokens = _HFSuppress
        torch.manual_seed(0)
        theirs = gen(model, batch, **kw)
    finally:
        flamingo_mod.SuppressTokens = real
    assert torch.equal(ours, theirs)
    scores = torch.randn(2, model.lang_encoder.get_output_embeddings().weight.shape[0])
    masked = real(suppress)(None, scores)
    assert torch.isinf(masked[:, suppress]).all() and torch.equal(
        masked, _HFSuppress(suppress)(None, scores)) and not torch.isinf(scores).any()


@pytest.mark.parametrize("kw", [dict(min_new_tokens=5), dict(min_length=9), dict(min_new_tokens=5, min_length=30),
                                dict(min_new_tokens=4, num_beams=2), dict(min_new_tokens=5, do_sample=True, top_k=3)])
def test_min_lengths_are_kept_as_transformers_own_processors_keep_them(llama, monkeypatch, kw):
    """``min_new_tokens``/``min_length`` run as our processor (no isin over the vocabulary, no copy of the
    scores at every step): with eos the likeliest token everywhere, the same tokens as transformers' two
    processors give, for the same seed."""
    from flamingo_vlm.modeling import flamingo as flamingo_mod

    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    n = batch["input_ids"].shape[1]
    with torch.no_grad():  # make <|endofchunk|> the most likely token everywhere
        model.lang_encoder.lm_head.weight[model.eoc_token_id] *= 50
    from transformers.generation import logits_process

    theirs_ran = []
    def counted(real):
        def __call__(self, input_ids, scores):  # (the processor list reads the signature)
            theirs_ran.append(1)
            return real(self, input_ids, scores)
        return __call__

    for cls in (logits_process.MinLengthLogitsProcessor, logits_process.MinNewTokensLengthLogitsProcessor):
        monkeypatch.setattr(cls, "__call__", counted(cls.__call__))
    try:
        torch.manual_seed(0)
        ours = gen(model, batch, max_new_tokens=8, **kw)
        assert not theirs_ran
        monkeypatch.setattr(flamingo_mod, "_min_length", lambda kwargs, prompt, config: 0)  # transformers' processors
        torch.manual_seed(0)
        theirs = gen(model, batch, max_new_tokens=8, **kw)
    finally:
        with torch.no_grad():
            model.lang_encoder.lm_head.weight[model.eoc_token_id] /= 50
    assert theirs_ran and torch.equal(ours, theirs)
    least = kw["min_new_tokens"] if "min_new_tokens" in kw else kw["min_length"] - n
    new = ours[:, n:]
    assert model.eoc_token_id not in new[:, :least].flatten().tolist()
    assert (new[:, least] == model.eoc_token_id).any()  # (then eos, made likely)


def test_min_lengths_are_left_to_transformers_where_its_processors_act_otherwise(llama, monkeypatch):
    """A forced eos (run after transformers' min-length processors) or a minimum in the LM's own
    generation config (which the keywords override): transformers' processors, as without ours."""
    from transformers.generation import logits_process

    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    theirs_ran = []
    real = logits_process.MinNewTokensLengthLogitsProcessor.__call__

    def counted(self, input_ids, scores):  # (the processor list reads the signature)
        theirs_ran.append(1)
        return real(self, input_ids, scores)

    monkeypatch.setattr(logits_process.MinNewTokensLengthLogitsProcessor, "__call__", counted)
    out = gen(model, batch, max_new_tokens=4, min_new_tokens=4, forced_eos_token_id=model.eoc_token_id)
    assert theirs_ran and (out[:, -1] == model.eoc_token_id).all()  # the forced eos at the last step
    del theirs_ran[:]
    monkeypatch.setattr(model.lang_encoder.generation_config, "min_length", 3)
    gen(model, batch, max_new_tokens=4, min_new_tokens=2)
    assert theirs_ran


class _HFSuppress:
    def __init__(self, ids):
        from transformers.generation.logits_process import SuppressTokensLogitsProcessor

        self.p = SuppressTokensLogitsProcessor(ids)

    def __call__(self, input_ids, scores):
        return self.p(input_ids, scores)


def test_stop_strings_and_streamer(llama):
    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    one = {k: v[:1] for k, v in batch.items()}
    n = one["input_ids"].shape[1]
    full = gen(model, one, max_new_tokens=8)[0, n:]
    k = next(i for i in range(1, len(full)) if "\ufffd" not in tok.decode([int(full[i])]))
    stop = tok.decode([int(full[k])])
    stopped = gen(model, one, max_new_tokens=8, stop_strings=[stop], tokenizer=tok)[0, n:]
    assert len(stopped) <= k + 1 < len(full) and stopped.tolist() == full[: len(stopped)].tolist()

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            pass

    streamer = Collect()
    out = gen(model, one, max_new_tokens=8, streamer=streamer)
    assert streamer.tokens == out[0].tolist()  # the prompt first, then each new token


@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt"])
def test_score_matches_one_forward_per_candidate(family):
    model, ip, tok = tiny_flamingo(family, seed=4)
    batch = make_batch(model, ip, tok)
    cands = [tok(c, add_special_tokens=False).input_ids for c in ["a red car", "dog", "two small cats .", "no"]]
    scores = model.score(batch["vision_x"], batch["input_ids"], cands, batch["attention_mask"], chunk_size=3)
    for r in range(2):
        ctx = batch["input_ids"][r][batch["attention_mask"][r].bool()].view(1, -1)
        for j, c in enumerate(cands):
            full = torch.cat([ctx, torch.tensor([c])], 1)
            with torch.no_grad():
                lp = model(batch["vision_x"][r : r + 1], full).logits.log_softmax(-1)[0]
            brute = sum(lp[ctx.shape[1] - 1 + k, t] for k, t in enumerate(c))
            assert abs(scores[r, j].item() - brute.item()) < 1e-4
    # No candidate's score depends on the others (OpenFlamingo's reused cache made it so).
    reversed_scores = model.score(batch["vision_x"], batch["input_ids"], cands[::-1], batch["attention_mask"])
    torch.testing.assert_close(reversed_scores.flip(1), scores, atol=1e-5, rtol=0)
    normalized = model.score(batch["vision_x"], batch["input_ids"], cands, batch["attention_mask"], normalize=True)
    lengths = torch.tensor([len(c) for c in cands], dtype=torch.float)
    torch.testing.assert_close(normalized, scores / lengths, atol=1e-5, rtol=0)


def test_forward_continues_a_cache_under_either_name(llama):
    """OpenFlamingo callers pass ``past_key_values=``; transformers 5.24 names it ``cache``. A
    continuation under either name gives the logits of one uncached forward over the whole text,
    also when the continued chunk holds an ``<image>`` the cached prefix did not (its image must be
    encoded though the chunk's own ``<image>`` count is lower than its index)."""
    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    vx, ids, mask = batch["vision_x"][:1], batch["input_ids"][:1], batch["attention_mask"][:1]
    with torch.no_grad():
        full = model(vx, ids, mask).logits
        for name in ("past_key_values", "cache"):
            prefix = model(vx, ids[:, :-2], mask[:, :-2], use_cache=True)
            past = getattr(prefix, "cache", None) or prefix.past_key_values
            rest = model(vx, ids[:, -2:], mask, use_cache=True, **{name: past}).logits
            torch.testing.assert_close(rest, full[:, -2:], atol=1e-5, rtol=0, msg=name)
        with pytest.raises(ValueError, match="not both"):
            model(vx, ids, mask, past_key_values=past, cache=past)


def test_openflamingo_cache_media_is_a_clear_error_naming_the_way_instead(llama):
    """OpenFlamingo's scoring code calls model.cache_media(...) then forward(None, ...): here that is an
    error saying to pass the images with the KV cache (an AttributeError before); uncache_media, its
    cleanup, is harmless."""
    model, ip, tok = llama
    batch = make_batch(model, ip, tok)
    with pytest.raises(NotImplementedError, match="past_key_values"):
        model.cache_media(input_ids=batch["input_ids"], vision_x=batch["vision_x"])
    model.uncache_media()


@pytest.mark.parametrize("immediate", [True, False])
def test_media_masks(immediate):
    """At a cross-attention layer: which image latents each token's output depends on."""
    from flamingo_vlm.modeling.cross_attention import GatedCrossAttentionBlock

    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=32, dim_visual=16, dim_head=8, heads=2, only_attend_immediate_media=immediate)
    torch.nn.init.ones_(block.attn_gate)
    torch.nn.init.zeros_(block.ff_gate)  # look at the attention branch alone
    x = torch.randn(1, 6, 32)
    text_media = torch.tensor([[0, 0, 1, 1, 2, 2]])  # two tokens before any image, then image 1, image 2
    media = torch.randn(1, 2, 4, 16)

    def run(m):
        return block(x, block.attn.image_keys_values(m), text_media, num_media=2) - x

    base = run(media)
    assert (base[0, :2] == 0).all()  # no image yet: exactly zero, in both modes
    other_first = media.clone()
    other_first[0, 0] = torch.randn(4, 16)
    alt = run(other_first)
    assert not torch.allclose(alt[0, 2:4], base[0, 2:4])  # tokens of image 1 see it
    # Tokens after image 2 see only image 2 (immediate) or images 1 and 2 (all previous).
    assert torch.allclose(alt[0, 4:], base[0, 4:]) == immediate
    other_second = media.clone()
    other_second[0, 1] = torch.randn(4, 16)
    torch.testing.assert_close(run(other_second)[0, :4], base[0, :4])  # nobody sees a future image


@pytest.mark.parametrize("immediate", [True, False])
def test_repeated_rows_share_their_image_keys_values(immediate):
    """Rows repeated for beams or candidates (repeat_interleave) attend over their image row's
    keys/values without copies, with the result of attending over repeated copies."""
    from flamingo_vlm.modeling.cross_attention import GatedCrossAttentionBlock

    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=32, dim_visual=16, dim_head=8, heads=2, only_attend_immediate_media=immediate)
    torch.nn.init.ones_(block.attn_gate)
    media = torch.randn(2, 2, 4, 16)  # 2 image rows
    r = 3
    x = torch.randn(2 * r, 5, 32)  # each image row repeated 3 times, rows adjacent
    text_media = torch.tensor([[0, 1, 1, 2, 2], [1, 1, 2, 2, 2], [0, 0, 1, 2, 2]]).repeat(2, 1)
    kv = block.attn.image_keys_values(media)
    shared = block(x, kv, text_media, num_media=2)
    copied = block(x, tuple(t.repeat_interleave(r, 0) for t in kv), text_media, num_media=2)
    torch.testing.assert_close(shared, copied)
    assert not torch.allclose(shared[:r], block(x[:r], block.attn.image_keys_values(media[1:]), text_media[:r], 2))
    with pytest.raises(RuntimeError, match="cannot be matched"):
        block(x[:5], kv, text_media[:5], num_media=2)


def test_new_token_rows_are_the_only_trainable_embedding_rows():
    model, ip, tok = tiny_flamingo("mpt", seed=7)  # tied embeddings: the rows serve input and output
    model.train()
    emb = model.lang_encoder.get_input_embeddings()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("perceiver.") or "gated_cross_attn_layer" in n or n.endswith("new_weight") for n in trainable)
    emb_params = [p for n, p in trainable.items() if n.endswith("new_weight")]
    assert len(emb_params) == 1 and emb_params[0].shape == (2, emb.weight.shape[1])
    before = model.state_dict()["lang_encoder.transformer.wte.weight"].clone()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|>", random_images(1))], padding_side="right",
                                       return_labels=True)
    loss = model(batch["vision_x"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
    loss.backward()
    assert emb.weight.grad is None and emb_params[0].grad is not None
    opt.step()
    state_elems = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    assert state_elems == 2 * sum(p.numel() for p in trainable.values())
    after = model.state_dict()["lang_encoder.transformer.wte.weight"]
    changed = (after != before).any(1).nonzero().flatten().tolist()
    assert changed == sorted([model.eoc_token_id, model.media_token_id])


def test_video_frames_need_frame_embeddings():
    from flamingo_vlm import create_model_and_transforms
    from tiny import tiny_lm, tiny_tokenizer, tiny_vision

    tok = tiny_tokenizer()
    model, ip, tok = create_model_and_transforms(tiny_vision(), None, tiny_lm(vocab_size=len(tok)), tok,
                                                 perceiver_kwargs={"max_num_frames": 4})
    ids = tok("<image> a cat", return_tensors="pt").input_ids
    video = torch.randn(1, 1, 3, 3, 32, 32)
    assert model(video, ids).logits.shape[:2] == ids.shape
    plain, _, _ = tiny_flamingo()
    with pytest.raises(ValueError, match="max_num_frames"):
        plain(video, ids)


def test_processor_errors_name_the_sample(llama):
    model, ip, tok = llama
    proc = FlamingoProcessor(tok, ip)
    with pytest.raises(ValueError, match="sample 1 has 2 <image> marker"):
        proc([("<image>a", random_images(1)), ("<image>a<image>b", random_images(1))])
    # in a list of items an image is an item: a text item that also marks it was counted as a second
    # image and told the user to "put one <image> in the text", the opposite of what to do
    image = random_images(1)[0]
    with pytest.raises(ValueError, match=r"sample 0: text item '<image>Output:' holds <image>; .*take <image> out"):
        proc([[image, "<image>Output:"]])
    assert proc([[image, "Output:"]])["input_ids"].eq(model.media_token_id).sum() == 1
    with pytest.raises(ValueError, match="vision_x must have shape"):
        model(torch.zeros(1, 3, 32, 32), torch.ones(1, 3, dtype=torch.long))
    # an empty prompt (an empty processor sample) failed inside transformers ("cannot reshape a tensor of 0 elements")
    empty = proc([[]])
    assert empty["input_ids"].shape == (1, 0)
    with pytest.raises(ValueError, match=r"at least one token, got shape \(1, 0\): the prompt is empty"):
        model.generate(empty["vision_x"], empty["input_ids"], empty["attention_mask"], max_new_tokens=2)
    batch = proc([("<image>a red car", random_images(1)), ("<image>a<image>b<image>c", random_images(3))],
                 padding_side="right", return_labels=True)
    assert batch["vision_x"].shape[:2] == (2, 3) and batch["vision_x"][0, 1:].abs().sum() == 0
    labels = batch["labels"]
    assert (labels[batch["input_ids"] == model.media_token_id] == -100).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    assert batch["attention_mask"][0, 0] == 1  # right padding


def test_gradient_checkpointing_recomputes_and_matches():
    model, ip, tok = tiny_flamingo("llama", seed=8)
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|>", random_images(1))], padding_side="right",
                                       return_labels=True)
    model.train()

    def grads():
        model.zero_grad()
        model(batch["vision_x"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain = grads()
    model.set_gradient_checkpointing(True)
    assert all(layer.gradient_checkpointing for layer in model.decoder_layers())
    checkpointed = grads()
    model.set_gradient_checkpointing(False)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_media_passthrough_appends_the_normed_input_tokens_after_the_latents(tmp_path):
    from flamingo_vlm import create_model_and_transforms, load_pretrained
    from tiny import tiny_lm, tiny_vision

    plain, ip, tok = tiny_flamingo("llama", seed=3)
    torch.manual_seed(3)
    model, _, _ = create_model_and_transforms(tiny_vision(), None, tiny_lm(vocab_size=len(tok)), tok,
                                              perceiver_kwargs={"media_passthrough": True})
    extra = {k: v for k, v in model.state_dict().items() if k not in plain.state_dict()}
    assert set(extra) == {"perceiver.passthrough_norm.weight", "perceiver.passthrough_norm.bias"}
    model.load_state_dict({**plain.state_dict(), **extra})
    with torch.no_grad():
        model.perceiver.passthrough_norm.weight.normal_()
    model.eval()
    batch = FlamingoProcessor(tok, ip)([("<image>a red car.<|endofchunk|><image>a", random_images(2))])
    with torch.no_grad():
        tokens = model.vision_encoder(batch["vision_x"].flatten(0, 2)).view(1, 2, 1, -1, model.vis_dim)
        media = model.encode_vision_x(batch["vision_x"])
        n = plain.perceiver.latents.shape[0]
        assert media.shape == (1, 2, n + tokens.shape[3], model.vis_dim)
        torch.testing.assert_close(media[:, :, :n], plain.encode_vision_x(batch["vision_x"]))
        torch.testing.assert_close(media[:, :, n:], model.perceiver.passthrough_norm(tokens[:, :, 0]))
        logits = model(batch["vision_x"], batch["input_ids"]).logits
        # The passed-through tokens reach the LM: the same latents alone give other logits.
        alone = model(None, batch["input_ids"], media=media[:, :, :n]).logits
        assert (logits - alone).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "m", tokenizer=tok, image_processor=ip)
    loaded, _, _ = load_pretrained(tmp_path / "m")
    assert loaded.perceiver.passthrough_norm is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch["vision_x"], batch["input_ids"]).logits, logits)


def test_a_left_padded_batch_generated_without_its_mask_does_not_attend_to_the_padding():
    """OpenFlamingo-style scripts that leave out attention_mask got answers that attended to the
    padding (the pad token is often the eos, so transformers infers no mask)."""
    model, ip, tok = tiny_flamingo("llama", seed=4)
    model.eval()
    batch = FlamingoProcessor(tok, ip)([("<image>a red car and", random_images(1)), ("<image>a", random_images(1))])
    assert batch["attention_mask"][1, 0] == 0  # (left-padded)
    kw = dict(max_new_tokens=6, min_new_tokens=6)
    masked = model.generate(batch["vision_x"], batch["input_ids"], batch["attention_mask"], **kw)
    assert torch.equal(model.generate(batch["vision_x"], batch["input_ids"], **kw), masked)
    alone = FlamingoProcessor(tok, ip)([("<image>a", random_images(1))])
    short = model.generate(alone["vision_x"], alone["input_ids"], **kw)[0]
    assert torch.equal(masked[1, -short.shape[0]:], short)


def test_more_image_markers_than_images_is_an_error_in_generate_and_score():
    """A row with three <image> markers and one image generated (the extra markers' text saw the last
    image); fewer markers than image slots is padding and stays allowed."""
    model, ip, tok = tiny_flamingo("llama", seed=4)
    model.eval()
    ids = tok(["<image>a<image>b<image>c"], return_tensors="pt").input_ids
    one = torch.stack([ip(random_images(1)[0])]).unsqueeze(0).unsqueeze(2)  # (1, 1, 1, C, H, W)
    with pytest.raises(ValueError, match=r"row 0 of lang_x has 3 <image> markers but vision_x holds 1 image\(s\) per row"):
        model.generate(one, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="has 3 <image> markers"):
        model.score(one, ids, [[5]])
    with pytest.raises(TypeError, match=r"candidates are token ids, one list per candidate"):  # (a raw TypeError)
        model.score(one, ids, ["a cat"])
    fewer = tok(["<image>a"], return_tensors="pt").input_ids
    three = torch.cat([one, torch.zeros_like(one), torch.zeros_like(one)], dim=1)
    assert model.generate(three, fewer, max_new_tokens=2, min_new_tokens=2).shape[1] == fewer.shape[1] + 2


def test_the_inferred_mask_leaves_a_pad_token_every_row_starts_with_and_scores_see_it_too():
    """A tokenizer whose pad is its bos starts every row with it: that is no padding. score() without a
    mask attended to a left-padded batch's padding, as generate did."""
    model, ip, tok = tiny_flamingo("llama", seed=4)
    model.eval()
    pad = model.pad_token_id
    rows = torch.tensor([[pad, pad, 7, 8], [5, 6, 7, 8]])
    assert model._inferred_mask(rows).tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert model._inferred_mask(torch.tensor([[pad, 7, pad, 8], [pad, 6, 7, 8]])).tolist() == [[1] * 4] * 2
    batch = FlamingoProcessor(tok, ip)([("<image>a red car and", random_images(1)), ("<image>a", random_images(1))])
    candidates = [tok(" blue", add_special_tokens=False).input_ids, tok(" car", add_special_tokens=False).input_ids]
    masked = model.score(batch["vision_x"], batch["input_ids"], candidates, batch["attention_mask"])
    torch.testing.assert_close(model.score(batch["vision_x"], batch["input_ids"], candidates), masked)


def test_wrapper_parts_of_parameter_names_are_dropped():
    from flamingo_vlm.modeling.keys import unwrap_key

    assert unwrap_key("module._orig_mod.perceiver.latents") == "perceiver.latents"
    assert unwrap_key("lang_encoder._orig_mod.model.layers.0.w") == "lang_encoder.model.layers.0.w"  # (a compiled part)
    assert unwrap_key("lang_encoder._fsdp_wrapped_module.model.w") == "lang_encoder.model.w"
    assert unwrap_key("vision_encoder.module.w") == "vision_encoder.module.w"  # (a submodule named "module")
