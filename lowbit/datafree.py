"""Stage 2's data: token sequences the float model writes itself (METHODS.md 6.1, LLM-QAT style).

Each sequence is ``[BOS]`` (when the tokenizer has one), a first token drawn uniformly from the
non-special vocabulary (a fixed first token would make every greedy prefix the same),
``greedy_prefix`` greedy tokens, then sampling with ``temperature`` / ``top_k`` / ``top_p`` up to
``seq_len`` tokens. Token ids are stored, never text (decoding and re-encoding is lossy).

Reproducibility. Every random number of sequence ``i`` comes from its own generator, seeded with a
hash of ``(seed, i)``: one uniform number per position drives that position (the first token by
indexing the pool, later tokens by inverting the CDF of the filtered distribution). Sequences of a
batch never share random numbers, so the ids do not depend on the batch size, on which batch a
sequence lands in, or on interruptions. (They are equal across batch sizes as long as the backend
computes a row the same way in any batch, as CPU kernels do; GPU kernels may differ in the last
bits, which can very rarely flip a token.)

EOS. Generation does **not** stop at EOS: like LLM-QAT's concatenated training blocks, a sequence
just goes on (the model usually starts a new text), so every row has ``seq_len`` ids and every
position is a valid distillation target. Nothing is cut or masked, hence no ``lengths``;
``meta.json`` counts the sequences that contain an EOS and the share of tokens after the first one.

Folder layout (``out_dir``):

* ``shard-00000.safetensors`` ...: sequences ``[k*shard_size, (k+1)*shard_size)``; tensors ``ids``
  int32 ``(n, seq_len)`` and, with ``topk_logits=K > 0``, the teacher's top-K logits per position
  from one full forward pass over the finished sequences (what a KD trainer's teacher sees):
  ``topk_values`` fp16 ``(n, seq_len, K)``, ``topk_indices`` int32 ``(n, seq_len, K)`` and the
  log-sum-exp over the whole output vocabulary, ``logsumexp`` fp32 ``(n, seq_len)``, so
  ``topk_values - logsumexp`` are the teacher's log-probabilities of those K tokens. Each shard is
  written to a temporary file and renamed into place.
* ``meta.json``: settings, model fingerprint, counts, per-shard sha256, diversity statistics,
  the speed of each call and :func:`lowbit.results.run_metadata`. It is rewritten (atomically)
  after every shard, so a re-run with the same settings continues after the last complete shard
  (a short last shard is completed, not regenerated). Asking for fewer sequences than the folder
  holds generates nothing.

Multiple processes (``torchrun --nproc_per_node N -m lowbit gen-data ...``, :mod:`lowbit.distributed`): each
process generates a contiguous share of every shard's missing rows (and their top-K logits); rank 0 gathers
them and writes the shard and ``meta.json`` (the others write nothing), so the folder is the single-process one
(the same ids; the same files on CPU) and resumes in the same way, with any number of processes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .sampling import filter_logits
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "lowbit-datafree-1"
META = "meta.json"
_LOGIT_BUDGET = 1 << 27  # logits elements per teacher forward (512 MiB of fp32)

# settings a resumed run must share with the folder (everything that changes the ids or the tensors)
_SETTINGS = ("format", "seq_len", "shard_size", "temperature", "top_p", "top_k", "greedy_prefix", "seed",
             "topk_logits", "vocab_size", "model_vocab_size", "bos_id", "first_token_pool", "model_fingerprint")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def sequence_seed(seed: int, index: int) -> int:
    """The generator seed of sequence ``index`` (a hash: no two (seed, index) pairs collide in practice)."""
    h = hashlib.blake2b(f"lowbit-datafree:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _uniforms(indices: Sequence[int], seed: int, length: int) -> Tensor:
    """``(len(indices), length)`` float64 uniforms in [0, 1), row i from sequence ``indices[i]``'s own generator."""
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(sequence_seed(seed, i)), dtype=torch.float64)
            for i in indices]
    return torch.stack(rows)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes): the same weights give the same hash."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ----------------------------------------------------------------------------------- generation
def _sample_rows(logits: Tensor, u: Tensor, temperature: float, top_p: float, top_k: int) -> Tensor:
    """One token per row by inverting the CDF of the filtered distribution at the row's uniform ``u``."""
    z = filter_logits(logits / temperature, top_p, top_k)
    cdf = torch.softmax(z.double(), -1).cumsum(-1)
    target = (u.to(cdf.device) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]  # zero-probability ids are never chosen
    return idx.clamp_max(logits.shape[-1] - 1)


@torch.inference_mode()
def generate_batch(model: nn.Module, indices: Sequence[int], seq_len: int, *, seed: int, pool: Tensor,
                   bos_id: int | None, vocab: int, greedy_prefix: int = 3, temperature: float = 1.0,
                   top_p: float = 1.0, top_k: int = 50, on_step=None) -> Tensor:
    """``(len(indices), seq_len)`` ids of the sequences with these global indices (CPU, int64)."""
    n = len(indices)
    u = _uniforms(indices, seed, seq_len)
    device = next(model.parameters()).device
    p0 = 1 if bos_id is None else 2  # positions before the first generated token: [BOS,] first
    first = pool[(u[:, p0 - 1] * len(pool)).long().clamp_max(len(pool) - 1)]
    seq = first[:, None] if bos_id is None else torch.stack([torch.full((n,), bos_id), first], 1)
    seq = seq.to(device)
    out = model(seq, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1, :vocab].float()
    if on_step:
        on_step(n * p0)
    cols = [seq]
    pos = p0
    while pos < seq_len:
        if pos - p0 < greedy_prefix or temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = _sample_rows(logits, u[:, pos], temperature, top_p, top_k)
        cols.append(nxt[:, None])
        pos += 1
        if on_step:
            on_step(n)
        if pos < seq_len:
            out = model(nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :vocab].float()
    return torch.cat(cols, 1).cpu()


@torch.inference_mode()
def teacher_topk(model: nn.Module, ids: Tensor, k: int) -> dict[str, Tensor]:
    """Top-``k`` logits of one full forward pass over ``ids`` (all of the model's output vocabulary),
    with the log-sum-exp per position; rows are processed in chunks that bound the logits' memory."""
    device = next(model.parameters()).device
    n, length = ids.shape
    v_model = int(model.config.vocab_size)
    step = max(1, _LOGIT_BUDGET // max(1, length * v_model))
    vals, idx, lse = [], [], []
    for s in range(0, n, step):
        logits = model(ids[s:s + step].to(device), use_cache=False).logits.float()
        top = logits.topk(k, dim=-1)
        vals.append(top.values.half().cpu())
        idx.append(top.indices.int().cpu())
        lse.append(logits.logsumexp(-1).cpu())
    return {"topk_values": torch.cat(vals), "topk_indices": torch.cat(idx), "logsumexp": torch.cat(lse)}


def _validate(model: nn.Module, n_sequences: int, seq_len: int, batch_size: int, shard_size: int, temperature: float,
              top_p: float, top_k: int, greedy_prefix: int, topk_logits: int, p0: int) -> None:
    from .models import max_context

    checks = [(n_sequences >= 1, f"n_sequences must be at least 1, got {n_sequences}"),
              (seq_len > p0, f"seq_len must be more than {p0} (BOS and the random first token), got {seq_len}"),
              (seq_len <= max_context(model),
               f"seq_len={seq_len} exceeds the model's context of {max_context(model)} tokens; lower it"),
              (batch_size >= 1, f"batch_size must be at least 1, got {batch_size}"),
              (shard_size >= 1, f"shard_size must be at least 1, got {shard_size}"),
              (temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
              (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
              (top_k >= 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
              (greedy_prefix >= 0, f"greedy_prefix must be >= 0, got {greedy_prefix}"),
              (0 <= topk_logits <= int(model.config.vocab_size),
               f"topk_logits must be in [0, {model.config.vocab_size}] (0 = no logits), got {topk_logits}")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _short(v) -> str:
    return v[:12] if isinstance(v, str) and len(v) == 64 else repr(v)


def _check_settings(out: Path, old: dict, new: dict) -> None:
    diff = [f"{k}: {_short(old.get(k))} there, {_short(new[k])} now" for k in _SETTINGS if old.get(k) != new[k]]
    if diff:
        raise ValueError(f"{out} holds data generated with other settings ({'; '.join(diff)}); use a new folder "
                         "or the original settings")


def _read_meta(out: Path) -> dict | None:
    p = out / META
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e.msg}); use a new folder") from None
    if meta.get("settings", {}).get("format") != FORMAT:
        raise ValueError(f"{p} is not a lowbit gen-data folder (format {meta.get('settings', {}).get('format')!r}); "
                         "use a new folder")
    return meta


def _load_shard(out: Path, entry: dict) -> dict[str, Tensor]:
    """The tensors of one shard after checking its sha256 (one-line ValueError when it does not match)."""
    from safetensors.torch import load

    p = out / entry["file"]
    if not p.is_file():
        raise ValueError(f"{p} is missing; re-run gen-data with the same settings to regenerate it")
    raw = p.read_bytes()
    if _sha256_bytes(raw) != entry["sha256"]:
        raise ValueError(f"{p}: sha256 checksum mismatch (file corrupt or modified); re-run gen-data with the same "
                         "settings to regenerate it")
    return load(raw)


def _write_shard(out: Path, k: int, start: int, tensors: dict[str, Tensor]) -> dict:
    from safetensors.torch import save

    raw = save({name: t.contiguous() for name, t in tensors.items()},
               metadata={"format": FORMAT, "start": str(start)})
    name = shard_name(k)
    tmp = out / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    return {"file": name, "start": start, "n": int(tensors["ids"].shape[0]), "sha256": _sha256_bytes(raw),
            "bytes": len(raw)}


def _ids_only(out: Path, shards: list[dict]) -> Tensor:
    from safetensors import safe_open

    parts = []
    for e in shards:
        with safe_open(str(out / e["file"]), framework="pt") as f:
            parts.append(f.get_tensor("ids").long())
    return torch.cat(parts)


def eos_stats(ids: Tensor, eos_id: int | None, start: int) -> dict:
    """Sequences with an EOS at or after position ``start`` and the share of tokens after the first one."""
    if eos_id is None:
        return {"eos_id": None}
    gen = ids[:, start:]
    hit = gen == eos_id
    has = hit.any(1)
    first = torch.where(has, hit.int().argmax(1), torch.full_like(has, gen.shape[1], dtype=torch.long))
    after = (gen.shape[1] - 1 - first).clamp_min(0).sum()  # tokens strictly after the first EOS
    return {"eos_id": eos_id, "sequences_with_eos": int(has.sum()),
            "tokens_after_first_eos_share": float(after) / max(1, gen.numel()),
            "policy": "generation continues past EOS; nothing is cut or masked"}


def generate_dataset(model: nn.Module, tok: Tokenizer, out_dir: str | Path, *, n_sequences: int, seq_len: int,
                     batch_size: int = 16, shard_size: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                     top_k: int = 50, greedy_prefix: int = 3, seed: int = 0, topk_logits: int = 0,
                     progress: bool = True, model_name: str | None = None) -> dict:
    """Generate (or continue) ``n_sequences`` sequences of ``seq_len`` ids into ``out_dir``; see the module
    docstring for the method and the layout. Returns the ``meta.json`` record."""
    from .results import run_metadata, write_json

    bos_id = tok.bos_id
    p0 = 1 if bos_id is None else 2
    _validate(model, n_sequences, seq_len, batch_size, shard_size, temperature, top_p, top_k, greedy_prefix,
              topk_logits, p0)
    vocab = min(int(tok.vocab_size), int(model.config.vocab_size))
    pool_list = sorted(set(range(vocab)) - set(tok.special_ids()))
    if not pool_list:
        raise ValueError("the tokenizer has no non-special token ids to start sequences with")
    pool = torch.tensor(pool_list)
    settings = {"format": FORMAT, "seq_len": seq_len, "shard_size": shard_size, "temperature": float(temperature),
                "top_p": float(top_p), "top_k": top_k, "greedy_prefix": greedy_prefix, "seed": seed,
                "topk_logits": topk_logits, "vocab_size": vocab, "model_vocab_size": int(model.config.vocab_size),
                "bos_id": bos_id, "eos_id": tok.eos_id,
                "first_token_pool": hashlib.sha256(json.dumps(pool_list).encode()).hexdigest(),
                "first_token_pool_size": len(pool_list), "model_fingerprint": model_fingerprint(model)}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    meta = _read_meta(out) if out.is_dir() else None
    if meta is None and out.is_dir() and any(out.glob("shard-*.safetensors")):
        raise ValueError(f"{out} holds shards but no {META}; use a new folder")
    if meta is not None:
        _check_settings(out, meta["settings"], settings)
    else:
        meta = {"settings": settings, "shards": [], "calls": []}
    meta["model"] = model_name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    meta["tokenizer"] = getattr(tok, "name", type(tok).__name__)
    meta["settings"] = settings
    out.mkdir(parents=True, exist_ok=True)

    # which rows each shard must hold, which of them exist already (checked against meta.json)
    shards: list[dict] = list(meta["shards"])
    total_have = sum(e["n"] for e in shards)
    target = max(n_sequences, total_have)
    plan = []  # (k, start, end, existing entry or None)
    for k, start in enumerate(range(0, target, shard_size)):
        end = min(start + shard_size, target)
        entry = shards[k] if k < len(shards) else None
        if entry is not None:
            f = out / entry["file"]
            if not (f.is_file() and _sha256_bytes(f.read_bytes()) == entry["sha256"]):
                log.warning("%s does not match %s (interrupted or modified): regenerating it", entry["file"], META)
                entry = None
        if entry is None or entry["n"] < end - start:
            plan.append((k, start, end, entry))
    todo_rows = sum(end - start - (e["n"] if e else 0) for _, start, end, e in plan)
    if n_sequences < total_have:
        log.info("%s already holds %d sequences (>= %d asked): nothing to generate", out, total_have, n_sequences)

    device = next(model.parameters()).device
    main = distributed.is_main()  # several processes: each generates its share of every shard, rank 0 writes
    mine = [distributed.share(end - start - (e["n"] if e else 0)) for _, start, end, e in plan]
    t0 = time.time()
    bar = tqdm(total=sum(map(len, mine)) * seq_len, desc="gen-data", unit="tok", unit_scale=True,
               disable=not (progress and main))
    for (k, start, end, entry), rows in zip(plan, mine):
        have = _load_shard(out, entry) if entry and main else {}
        first_new = start + (entry["n"] if entry else 0)
        parts = {name: [t] for name, t in have.items()}
        new: dict[str, list[Tensor]] = {}
        for b in range(first_new + rows.start, first_new + rows.stop, batch_size):
            idx = list(range(b, min(b + batch_size, first_new + rows.stop)))
            ids = generate_batch(model, idx, seq_len, seed=seed, pool=pool, bos_id=bos_id, vocab=vocab,
                                 greedy_prefix=greedy_prefix, temperature=temperature, top_p=top_p, top_k=top_k,
                                 on_step=bar.update)
            new.setdefault("ids", []).append(ids.int())
            if topk_logits:
                for name, t in teacher_topk(model, ids, topk_logits).items():
                    new.setdefault(name, []).append(t)
        for name, empty in _empty_rows(seq_len, topk_logits).items():  # the same names, in order, on every rank
            parts.setdefault(name, []).append(distributed.all_gather_cat(torch.cat(new.get(name, [empty]))))
        if not main:
            continue
        entry = _write_shard(out, k, start, {name: torch.cat(ts) for name, ts in parts.items()})
        shards[k:k + 1] = [entry]
        meta["shards"] = shards
        meta["n_sequences"] = sum(e["n"] for e in shards)
        meta["n_tokens"] = meta["n_sequences"] * seq_len
        write_json(out / META, meta)  # after the shard: a crash in between only costs that shard
    bar.close()
    distributed.barrier()  # every process has planned (read the folder) before rank 0 rewrites meta.json
    if not main:  # rank 0 finishes meta.json; the others return its record
        return distributed.broadcast_object(None)
    wall = time.time() - t0
    made = todo_rows * seq_len
    meta["calls"] = list(meta.get("calls", [])) + [{
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": str(device), "batch_size": batch_size,
        "processes": distributed.world_size(),
        "sequences_generated": todo_rows, "tokens_generated": made, "wall_s": round(wall, 3),
        "tokens_per_s": round(made / wall, 1) if wall > 0 and made else None}]
    meta["n_sequences"] = sum(e["n"] for e in shards)
    meta["n_tokens"] = meta["n_sequences"] * seq_len
    all_ids = _ids_only(out, shards)
    meta["diversity"] = diversity_stats(all_ids)
    meta["eos"] = eos_stats(all_ids, tok.eos_id, p0)
    meta["run_metadata"] = run_metadata()
    write_json(out / META, meta)
    return distributed.broadcast_object(meta)


def _empty_rows(seq_len: int, topk_logits: int) -> dict[str, Tensor]:
    """Zero rows of every tensor a shard holds (dtype and trailing shape), in the order shards are built."""
    out = {"ids": torch.zeros(0, seq_len, dtype=torch.int32)}
    if topk_logits:
        out |= {"topk_values": torch.zeros(0, seq_len, topk_logits, dtype=torch.float16),
                "topk_indices": torch.zeros(0, seq_len, topk_logits, dtype=torch.int32),
                "logsumexp": torch.zeros(0, seq_len, dtype=torch.float32)}
    return out


# -------------------------------------------------------------------------------------- loading
@dataclass
class GeneratedData:
    """A generated data set in memory: ``ids`` ``(N, L)`` int64 and, when generated with ``topk_logits``,
    ``topk_values`` fp16 / ``topk_indices`` int32 ``(N, L, K)`` and ``logsumexp`` fp32 ``(N, L)``."""

    ids: Tensor
    meta: dict = field(default_factory=dict)
    topk_values: Tensor | None = None
    topk_indices: Tensor | None = None
    logsumexp: Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def has_logits(self) -> bool:
        return self.topk_values is not None

    def tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in (("ids", self.ids), ("topk_values", self.topk_values),
                                  ("topk_indices", self.topk_indices), ("logsumexp", self.logsumexp)) if v is not None}


def load_dataset(out_dir: str | Path, dedup: bool = False) -> GeneratedData:
    """Load a ``generate_dataset`` folder, checking every shard's sha256 against ``meta.json``.
    ``dedup=True`` drops exactly repeated sequences (the first occurrence stays)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"generated data folder not found: {out}")
    meta = _read_meta(out)
    if meta is None or not meta.get("shards"):
        raise ValueError(f"{out} holds no generated data ({META} missing or without shards)")
    parts: dict[str, list[Tensor]] = {}
    seq_len = meta["settings"]["seq_len"]
    for e in meta["shards"]:
        t = _load_shard(out, e)
        if t["ids"].shape != (e["n"], seq_len):
            raise ValueError(f"{out / e['file']}: ids of shape {tuple(t['ids'].shape)}, expected ({e['n']}, {seq_len})")
        for name, v in t.items():
            parts.setdefault(name, []).append(v)
    data = GeneratedData(ids=torch.cat(parts.pop("ids")).long(), meta=meta,
                         **{name: torch.cat(v) for name, v in parts.items()})
    if dedup:
        _, inverse = torch.unique(data.ids, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(data), dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(len(data)), reduce="amin")
        keep = first.sort().values
        for name, v in data.tensors().items():
            setattr(data, name, v[keep])
    return data


def batches(data: GeneratedData, batch_size: int, seed: int = 0, drop_last: bool = False) -> Iterator[dict]:
    """Shuffled mini-batches (one pass), the order fixed by ``seed`` (pass e.g. ``seed + epoch`` per epoch).
    Each batch is a dict with ``ids`` (int64) and, when present, ``topk_values``, ``topk_indices`` (int64,
    ready for ``gather``) and ``logsumexp``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    tensors = data.tensors()
    for s in range(0, len(data), batch_size):
        sel = order[s:s + batch_size]
        if drop_last and len(sel) < batch_size:
            return
        b = {name: v[sel] for name, v in tensors.items()}
        if "topk_indices" in b:
            b["topk_indices"] = b["topk_indices"].long()
        yield b


# ------------------------------------------------------------------------------------ diversity
def _ngram_keys(grams: Tensor) -> Tensor:
    """One exact int64 key per n-gram row when ``base**n`` fits, else rows are left as they are."""
    base = int(grams.max()) + 1 if grams.numel() else 1
    n = grams.shape[1]
    if base ** n >= 2 ** 63:
        return grams
    key = torch.zeros(grams.shape[0], dtype=torch.long)
    for j in range(n):
        key = key * base + grams[:, j]
    return key


def diversity_stats(ids: Tensor, n: Sequence[int] = (1, 2, 3, 4), prefix: int = 8) -> dict:
    """Diversity of a ``(N, L)`` id tensor (n-grams never cross sequences):

    * ``distinct_<n>``: unique n-grams / all n-grams (``None`` when ``L < n``);
    * ``duplicate_sequences``: sequences equal to an earlier one (``N`` minus the unique rows);
    * ``prefix<prefix>_repeat_share``: share of sequences whose first ``prefix`` ids repeat an earlier
      sequence's (``1 - unique prefixes / N``);
    * ``mean_longest_run``: mean over sequences of the longest run of one repeated id;
    * ``sequences``, ``tokens``.
    """
    ids = torch.as_tensor(ids).long()
    if ids.dim() != 2:
        raise ValueError(f"diversity_stats expects (N, L) ids, got shape {tuple(ids.shape)}")
    N, L = ids.shape
    out: dict = {"sequences": N, "tokens": N * L}
    for k in n:
        if L < k or N == 0:
            out[f"distinct_{k}"] = None
            continue
        keys = _ngram_keys(ids.unfold(1, k, 1).reshape(-1, k))
        uniq = torch.unique(keys, dim=0) if keys.dim() == 2 else torch.unique(keys)
        out[f"distinct_{k}"] = uniq.shape[0] / keys.shape[0]
    if N == 0 or L == 0:
        return out | {"duplicate_sequences": 0, f"prefix{prefix}_repeat_share": 0.0, "mean_longest_run": 0.0}
    out["duplicate_sequences"] = N - torch.unique(ids, dim=0).shape[0]
    out[f"prefix{prefix}_repeat_share"] = (N - torch.unique(ids[:, :prefix], dim=0).shape[0]) / N
    run_id = torch.cat([torch.zeros(N, 1, dtype=torch.long), (ids[:, 1:] != ids[:, :-1]).long().cumsum(1)], 1)
    counts = torch.bincount((run_id + torch.arange(N)[:, None] * L).reshape(-1), minlength=N * L).view(N, L)
    out["mean_longest_run"] = float(counts.max(1).values.double().mean())
    return out


def format_stats(stats: dict) -> str:
    """One line per statistic, for the CLI."""
    def fmt(v):
        if v is None:
            return "n/a"
        return f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)

    return "\n".join(f"  {k:<24} {fmt(v)}" for k, v in stats.items())
