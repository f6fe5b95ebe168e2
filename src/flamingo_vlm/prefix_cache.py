"""Few-shot prefix cache: prompts that start with the same demonstrations reuse their LM keys/values
and image latents instead of computing them again.

A prompt's tokens are cut into blocks of ``block_size`` tokens. Block ``j``'s key is a hash chained
over everything that decides its keys/values: the previous block's key, its token ids and the hash
of each image its ``<image>`` tokens stand for; the chain starts from the model (this model object,
its dtype and device, its quantization, the autocast state). So two prompts share exactly the blocks up to the first
token or image where they differ, wherever that falls (mid-chunk, right after an ``<image>`` whose
image differs); a block holds the keys/values of its tokens for every LM layer. Image latents
(:meth:`Flamingo.encode_images`) are kept by the image's hash too, when the model encodes images
independently of their place (:attr:`Flamingo.images_encode_independently`).

One LRU store holds both, bounded by bytes (``max_bytes``): least recently used entries go first.

A batch of left-padded rows: each row reuses its longest cached run of blocks (at least one token
of every prompt is always computed, for the first new token's logits). The reused positions must be
the same for every row of one LM call, so the call continues a KV cache of ``C = L - S`` positions
(``L`` the padded length, ``S`` the longest uncached tail): each row places the last of its cached
tokens that fit there, after zeros under its padding. Rows stay left-padded (no padding in the
middle, which ALiBi models would see). A row with nothing cached makes ``C`` small, even zero: the
batch then runs as if uncached, with the same result. Afterwards every new full block of every
prompt is stored. Rows that are not left-padded, speculative decoding, a KV cache of the caller's, and
LMs whose cache is not transformers' plain ``DynamicCache`` (sliding windows, static caches) run
without the cache (counted as ``bypassed``).

Results are the uncached ones: the reused keys/values are what the same model computes for those
positions (up to float rounding of different batch shapes: the few uncached tokens of a prompt run
on the decode kernels, which sum in another order than the prefill's GEMM; in bf16 on a CPU whose
bf16 is emulated, where the prefill runs as fp32 GEMMs, that rounding is bf16's, and a greedy
near-tie can go the other way). Weights changed in place (training)
make entries stale: :meth:`PrefixCache.clear` then.

Used by the server (``flamingo-vlm serve --prefix-cache-mb``) and the evaluation
(``EvalConfig.prefix_cache_mb``, ``--prefix-cache-mb``) through :meth:`PrefixCache.generate` and
:meth:`PrefixCache.score`, which take :meth:`Flamingo.generate`'s and :meth:`Flamingo.score`'s
arguments; :meth:`PrefixCache.wrap` gives a model whose ``generate``/``score`` go through the cache.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import uuid
import weakref
from typing import Any, Callable

import torch

__all__ = ["DEFAULT_BLOCK_SIZE", "PrefixCache", "PrefixCachedModel"]

#: Small blocks let a repeated prompt reuse all but its last few tokens (the query's ``<image>`` among
#: them would make the rest run over every image's keys/values); ~1 ms of bookkeeping per 1000 tokens.
DEFAULT_BLOCK_SIZE = 4


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def image_hash(pixels: torch.Tensor) -> str:
    """A key for one image's pixels (its shape, dtype and bytes)."""
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


class PrefixCache:
    """LRU store (by bytes) of prompt-prefix keys/values and image latents; see the module docstring."""

    def __init__(self, max_bytes: int = 256 * 2**20, block_size: int = DEFAULT_BLOCK_SIZE):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 (0 disables the cache), got {max_bytes}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.max_bytes, self.block_size = int(max_bytes), int(block_size)
        self._store: collections.OrderedDict[Any, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.bytes = 0
        self.stats = collections.Counter()

    # -- the store --------------------------------------------------------------------------------
    def _get(self, key):
        with self._lock:
            hit = self._store.get(key)
            if hit is None:
                return None
            self._store.move_to_end(key)
            return hit[0]

    def _has(self, key) -> bool:
        with self._lock:
            return key in self._store

    def _put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                return
            self._store[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, n) = self._store.popitem(last=False)
                self.bytes -= n
                self.stats["evictions"] += 1

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
            self.bytes = 0

    def snapshot(self) -> dict[str, int]:
        """Counters: rows looked up, rows that reused a prefix, prompt and reused tokens, images
        reused, calls bypassed, evictions; and the entries and bytes held now."""
        with self._lock:
            out = {k: int(self.stats[k]) for k in ("rows", "hits", "prompt_tokens", "reused_tokens",
                                                     "images_reused", "bypassed", "evictions")}
            out.update(entries=len(self._store), bytes=self.bytes, max_bytes=self.max_bytes)
        return out

    # -- keys -------------------------------------------------------------------------------------
    def _root(self, model) -> bytes:
        """What the whole chain depends on besides tokens and images: this model object (weights),
        its dtype and device, its quantization (``quantize_model`` changes the weights in place, and a
        cache used before it gave the full-precision keys/values), and autocast (the evaluation's amp_bf16)."""
        from .modeling.quantize import quantization_of

        token = self._models.get(model)
        if token is None:
            token = self._models[model] = uuid.uuid4().hex
        param = next(model.lang_encoder.parameters())
        device = param.device.type
        autocast = torch.is_autocast_enabled(device)
        amp = torch.get_autocast_dtype(device) if autocast else None
        quantized = quantization_of(model)
        return hashlib.sha256(f"{token}|{param.dtype}|{param.device}|{amp}|{quantized}|{self.block_size}".encode()).digest()

    def _block_keys(self, root: bytes, ids: list[int], keys: list[str | None], media_id: int) -> list[bytes]:
        """Chained keys of the full blocks of ``ids[:-1]`` (the last token is always computed)."""
        out, h, used, b = [], root, 0, self.block_size
        for j in range((len(ids) - 1) // b):
            block = ids[j * b : (j + 1) * b]
            m = block.count(media_id)
            images = keys[used : used + m]
            used += m
            if len(images) < m or any(k is None for k in images):
                break  # an image without a key (or none at all): nothing from here on can be shared
            h = hashlib.sha256(h + torch.tensor(block, dtype=torch.int64).numpy().tobytes()
                               + "|".join(images).encode()).digest()
            out.append(h)
        return out

    def cached_tokens(self, model, ids: list[int], image_keys: list[str | None]) -> int:
        """How many leading tokens of the prompt ``ids`` (one row, unpadded; its images' keys in
        order) the cache holds keys/values for now (without touching the LRU order)."""
        if self.max_bytes == 0:
            return 0
        n = 0
        for h in self._block_keys(self._root(model), list(ids), list(image_keys), model.media_token_id):
            if not self._has(("kv", h)):
                break
            n += self.block_size
        return n

    # -- the calls ----------------------------------------------------------------------------------
    def wrap(self, model) -> "PrefixCachedModel":
        return PrefixCachedModel(model, self)

    @torch.no_grad()
    def generate(self, model, vision_x, lang_x, attention_mask=None, *, media=None, image_keys=None,
                 keep_generated: Callable[[], list[bool]] | None = None, **generate_kwargs) -> torch.Tensor:
        """:meth:`Flamingo.generate` through the cache. ``image_keys``: per row, a key of each of
        its images in order (e.g. a hash of the file's bytes); hashed from the pixels if not given.
        ``keep_generated``: called after the call, which rows' generated tokens to store as well (as
        if they were part of the prompt), for a call that will continue from them (the server's paused
        generations); each such row must have generated up to the end of the output."""
        if (self.max_bytes == 0 or generate_kwargs.get("prompt_lookup_num_tokens") is not None
                or generate_kwargs.get("assistant_model") is not None or generate_kwargs.get("use_cache") is False
                or any(generate_kwargs.get(k) is not None for k in ("cache", "past_key_values"))):
            self.stats["bypassed"] += 1
            return model.generate(vision_x, lang_x, attention_mask, media=media, **generate_kwargs)
        gc = model.lang_encoder.generation_config
        expand = max(generate_kwargs.get("num_beams") or gc.num_beams or 1,
                     generate_kwargs.get("num_return_sequences") or gc.num_return_sequences or 1)
        prepared = self._prepare(model, vision_x, lang_x, attention_mask, media, image_keys)
        if prepared is None:
            return model.generate(vision_x, lang_x, attention_mask, media=media, **generate_kwargs)
        cache, cond_kwargs, attention_mask, after = prepared
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        out = model.generate(lang_x=lang_x, attention_mask=attention_mask, **cond_kwargs,
                             **{_cache_name(model): cache}, **generate_kwargs)
        keep = keep_generated() if keep_generated is not None and expand == 1 else None
        after(cache, expand, None if keep is None else [out[b, lang_x.shape[1]:].tolist() if k else [] for b, k in
                                                        enumerate(keep)])
        return out

    @torch.no_grad()
    def score(self, model, vision_x, lang_x, candidates, attention_mask=None, *, media=None, image_keys=None,
              **score_kwargs) -> torch.Tensor:
        """:meth:`Flamingo.score` through the cache (the context's prefix reused)."""
        prepared = None if self.max_bytes == 0 else self._prepare(model, vision_x, lang_x, attention_mask, media,
                                                                  image_keys)
        if prepared is None:
            if self.max_bytes == 0:
                self.stats["bypassed"] += 1
            return model.score(vision_x, lang_x, candidates, attention_mask, media=media, **score_kwargs)
        cache, cond_kwargs, attention_mask, after = prepared
        out = model.score(lang_x=lang_x, candidates=candidates, attention_mask=attention_mask, cache=cache,
                          **cond_kwargs, **score_kwargs)
        after(cache, 1)
        return out

    # -- how a batch reuses the cache ---------------------------------------------------------------
    def _prepare(self, model, vision_x, lang_x, attention_mask, media, image_keys):
        """(KV cache holding the reused positions, conditioning kwargs, attention mask, a function that
        stores the new blocks after the call), or None when this batch cannot use the cache."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if attention_mask is None:
            attention_mask = torch.ones_like(lang_x)
        rows, length = lang_x.shape
        mask = attention_mask.bool()
        starts = []
        for b in range(rows):
            start = int(mask[b].long().argmax()) if bool(mask[b].any()) else length
            if start == length or not bool(mask[b, start:].all()):
                self.stats["bypassed"] += 1  # not left padding (or an empty row): run uncached
                return None
            starts.append(start)
        config = model.lang_encoder.config
        empty = DynamicCache(config=config)
        if any(type(layer) is not DynamicLayer for layer in empty.layers):
            self.stats["bypassed"] += 1  # sliding-window / hybrid caches: not block-reusable
            return None
        media_id = model.media_token_id
        id_rows = [lang_x[b, starts[b]:].tolist() for b in range(rows)]
        n_images = [ids.count(media_id) for ids in id_rows]
        if image_keys is None:
            if vision_x is None:
                image_keys = [[None] * n for n in n_images]  # media given without keys: text-only reuse
            else:
                image_keys = [[image_hash(vision_x[b, t]) for t in range(min(n, vision_x.shape[1]))]
                              for b, n in enumerate(n_images)]
        image_keys = [list(k) for k in image_keys]
        root = self._root(model)
        chains = [self._block_keys(root, ids, keys, media_id) for ids, keys in zip(id_rows, image_keys)]
        found = []
        for chain in chains:
            blocks = []
            for h in chain:
                kv = self._get(("kv", h))
                if kv is None:
                    break
                blocks.append(kv)
            found.append(blocks)
        # Every row continues a cache of C positions: C = L - (longest uncached tail).
        tails = [len(ids) - len(blocks) * self.block_size for ids, blocks in zip(id_rows, found)]
        past = length - max(tails)
        use = [len(ids) - max(tails) for ids in id_rows]  # cached tokens each row places (<= its blocks)
        if past <= 0 or all(u <= 0 for u in use):
            past, cache = 0, empty
        else:
            layers = []
            like = next(blocks for blocks in found if blocks)[0]
            for layer, (k0, v0) in enumerate(like):
                k = k0.new_zeros(rows, k0.shape[0], past, k0.shape[-1])  # blocks are (heads, block, dim)
                v = v0.new_zeros(rows, v0.shape[0], past, v0.shape[-1])
                for b, (blocks, u) in enumerate(zip(found, use)):
                    if u > 0:
                        k[b, :, past - u :] = torch.cat([blk[layer][0] for blk in blocks], dim=1)[:, :u]
                        v[b, :, past - u :] = torch.cat([blk[layer][1] for blk in blocks], dim=1)[:, :u]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers, config=config)
        reused = sum(max(u, 0) for u in use) if past else 0
        self.stats["rows"] += rows
        self.stats["hits"] += sum(1 for u in use if u > 0) if past else 0
        self.stats["prompt_tokens"] += sum(len(ids) for ids in id_rows)
        self.stats["reused_tokens"] += reused
        cond_kwargs = self._conditioning(model, vision_x, media, image_keys, n_images)

        def after(cache, expand: int, generated: list[list[int]] | None = None) -> None:
            """Store the new full blocks of each row's prompt (and of ``generated[b]`` after it)."""
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            for b, (chain, blocks) in enumerate(zip(chains, found)):
                row = b * expand
                if generated is not None and generated[b]:  # (the cache holds all but the last token's)
                    chain = self._block_keys(root, id_rows[b] + generated[b], image_keys[b], media_id)
                for j in range(len(blocks), len(chain)):
                    if self._has(("kv", chain[j])):
                        continue
                    s = starts[b] + j * self.block_size
                    e = s + self.block_size
                    block = tuple((k[row, :, s:e].clone(), v[row, :, s:e].clone()) for k, v in kv)
                    self._put(("kv", chain[j]), block, sum(_nbytes(k) + _nbytes(v) for k, v in block))

        return cache, cond_kwargs, attention_mask, after

    def _conditioning(self, model, vision_x, media, image_keys, n_images) -> dict[str, Any]:
        """``media=`` from cached and newly encoded image latents when the model encodes images one
        by one; otherwise what was given."""
        if media is not None or vision_x is None or not getattr(model, "images_encode_independently", False):
            return {"vision_x": vision_x, "media": media}
        root = self._root(model).hex()
        latents: dict[tuple[int, int], torch.Tensor] = {}
        todo = []
        for b, keys in enumerate(image_keys):
            for t, key in enumerate(keys[: vision_x.shape[1]]):
                hit = self._get(("img", root, key)) if key is not None else None
                if hit is not None:
                    latents[b, t] = hit
                    self.stats["images_reused"] += 1
                else:
                    todo.append((b, t))
        if todo:
            enc = model.encode_images(torch.stack([vision_x[b, t] for b, t in todo]))
            for (b, t), lat in zip(todo, enc):
                latents[b, t] = lat
                key = image_keys[b][t]
                if key is not None:
                    self._put(("img", root, key), lat, _nbytes(lat))
        if not latents:
            return {"vision_x": vision_x, "media": None}
        like = next(iter(latents.values()))
        out = like.new_zeros(vision_x.shape[0], vision_x.shape[1], *like.shape)
        for (b, t), lat in latents.items():
            out[b, t] = lat
        return {"vision_x": None, "media": out}


def _cache_name(model) -> str:
    return getattr(model, "_cache_kwarg", "past_key_values")


class PrefixCachedModel:
    """A Flamingo whose ``generate`` and ``score`` go through a :class:`PrefixCache`; everything else
    is the model's (what the evaluation's tasks are handed)."""

    def __init__(self, model, cache: PrefixCache):
        self.model, self.prefix_cache = model, cache

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, vision_x, lang_x, attention_mask=None, **kwargs):
        return self.prefix_cache.generate(self.model, vision_x, lang_x, attention_mask, **kwargs)

    def score(self, vision_x, lang_x, candidates, attention_mask=None, **kwargs):
        return self.prefix_cache.score(self.model, vision_x, lang_x, candidates, attention_mask, **kwargs)
