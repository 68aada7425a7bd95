"""Stage 0: train a small Llama-style language model from scratch, reproducibly, on the CPU.

Recipe (llama2.c-style TinyStories pretraining):

* Data: a text file of stories separated by lines containing ``<|endoftext|>``; text after the last
  separator is an unfinished story and is dropped. The *last* ``heldout_frac`` of the stories is
  held out. Each story is tokenized as ``[BOS] + encode(story)`` and all are concatenated.
* Batches: ``batch_size`` random windows of ``seq_len + 1`` tokens from the training ids, drawn by a
  ``torch.Generator`` seeded with ``seed * 1_000_003 + step``: the batch of a step never depends on
  what ran before, so a resumed run sees exactly the batches of an uninterrupted one.
* Model: ``transformers.LlamaForCausalLM`` (stories260K architecture by default), initialised
  after ``torch.manual_seed(seed)``, or loaded from ``init_from``.
* Optimiser: AdamW (no weight decay on 1-D parameters: norms, biases), linear warmup to ``lr``
  then cosine decay to ``min_lr`` at ``steps``; gradient clipping at ``grad_clip``.
* Checkpoints in ``out``: ``model.safetensors`` + ``config.json`` (``save_pretrained``),
  ``tokenizer.model`` (a loadable model folder) and ``state.pt`` (optimizer state, step, losses,
  readable with ``torch.load(weights_only=True)``). All files are written atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.tokenizer import SPTokenizer, Tokenizer

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"
STATE = "state.pt"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (defaults: the stories260K architecture)."""

    data: str | Path
    tokenizer: str | Path
    out: str | Path
    # model (vocab size comes from the tokenizer)
    dim: int = 64
    n_layers: int = 5
    n_heads: int = 8
    n_kv_heads: int = 4
    hidden_dim: int = 172
    max_seq_len: int = 512
    tie_embeddings: bool = True
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    # optimisation
    seq_len: int = 256
    batch_size: int = 32
    steps: int = 2000
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int = 200
    eval_windows: int = 50
    save_every: int = 200
    seed: int = 0
    heldout_frac: float = 0.1
    init_from: str | Path | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps; for tests/time-boxing


# Fields that change the training trajectory: a resume must agree on them.
_TRAJECTORY_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len",
                      "tie_embeddings", "rms_eps", "rope_theta", "seq_len", "batch_size", "steps", "lr",
                      "min_lr", "warmup", "weight_decay", "betas", "grad_clip", "seed", "heldout_frac")


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON/weights_only-friendly view of the config (paths as str, tuples as lists)."""
    d = dataclasses.asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------- data

def load_stories(path: str | Path) -> list[str]:
    """Stories of a TinyStories-style file: chunks ended by a line containing ``<|endoftext|>``.

    Text after the last separator (an unfinished story) is dropped; stories are stripped and
    empty ones skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training text not found: {path} (pass a TinyStories-style .txt file)")
    stories: list[str] = []
    cur: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split(EOT)
            for part in parts[:-1]:  # text before a marker on its line still belongs to the story
                story = ("".join(cur) + part).strip()
                if story:
                    stories.append(story)
                cur = []
            if len(parts) == 1 or parts[-1].strip():
                cur.append(parts[-1])
    if not stories:
        raise ValueError(f"{path.name}: no story ended by a '{EOT}' line; separate stories with such lines")
    if "".join(cur).strip():
        log.info("%s: dropped the unfinished last story (%d chars)", path.name, len("".join(cur)))
    return stories


def split_stories(stories: list[str], heldout_frac: float) -> tuple[list[str], list[str]]:
    """Split into (train, heldout): the LAST ``round(len * heldout_frac)`` stories (at least one
    when ``heldout_frac > 0``) are held out."""
    if not 0 <= heldout_frac < 1:
        raise ValueError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
    n_held = int(round(len(stories) * heldout_frac))
    if heldout_frac > 0:
        n_held = max(1, n_held)
    if n_held >= len(stories):
        raise ValueError(f"only {len(stories)} stories: too few to hold out {heldout_frac:.0%}; use more text")
    return stories[:len(stories) - n_held], stories[len(stories) - n_held:]


def stories_to_ids(stories: list[str], tok: Tokenizer) -> torch.Tensor:
    """Concatenate ``[BOS] + encode(story)`` for each story (llama2.c's pretokenization) as int64."""
    ids: list[int] = []
    for s in stories:
        ids.extend(tok.encode(s, add_bos=True))
    return torch.tensor(ids, dtype=torch.long)


def get_batch(ids: torch.Tensor, seq_len: int, batch_size: int, seed: int,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets ``(batch, seq_len)`` for ``step``; depends only on (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - seq_len, (batch_size,), generator=g)
    win = ids[starts[:, None] + torch.arange(seq_len + 1)]
    return win[:, :-1], win[:, 1:]


# ----------------------------------------------------------------------------------- model/eval

def build_model(cfg: TrainConfig, vocab_size: int) -> LlamaForCausalLM:
    """A freshly initialised model (``torch.manual_seed(cfg.seed)``) or the ``init_from`` weights."""
    if cfg.init_from is not None:
        model = LlamaForCausalLM.from_pretrained(str(cfg.init_from), dtype=torch.float32)
        if model.config.vocab_size != vocab_size:
            raise ValueError(f"init_from {cfg.init_from} has vocab {model.config.vocab_size} but the "
                             f"tokenizer has {vocab_size}; pass the matching tokenizer")
        return model
    if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}: n_heads must "
                         "divide dim and n_kv_heads must divide n_heads")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.dim // cfg.n_heads, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_eps,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int,
                       max_windows: int | None = None) -> float:
    """exp(mean over non-overlapping ``seq_len`` windows of the window's mean next-token NLL).

    Uses the first ``max_windows`` windows when given; shorter-than-``seq_len`` ids give one window.
    """
    n = len(ids) // seq_len
    if n == 0:
        if len(ids) < 2:
            raise ValueError(f"held-out text has {len(ids)} tokens: need at least 2")
        wins = ids[None, :]
    else:
        if max_windows is not None:
            n = min(n, max_windows)
        wins = ids[:n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nlls = []
    try:
        for b in range(0, len(wins), 16):
            x = wins[b:b + 16].to(device)
            logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            nlls.append(nll.mean(dim=1).cpu())
    finally:
        model.train(was_training)
    return math.exp(torch.cat(nlls).double().mean().item())


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup`` steps to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.betas))


# ---------------------------------------------------------------------------------- checkpoints

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


from .results import run_metadata  # noqa: E402


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_hf():
    """Silence transformers' own save/load progress bars (they would break our training bar)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_checkpoint(out: Path, model: LlamaForCausalLM, opt: torch.optim.Optimizer, state: dict) -> None:
    """Write weights then ``state.pt``, each file via a temp name and ``os.replace``.

    ``state.pt`` records the sha256 of the weights it belongs to, so a crash between the two
    replacements is detected at resume instead of silently mixing steps.
    """
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"non-finite weights ({bad[0]}) at step {state['step']}; not saving: try a lower --lr")
    with tempfile.TemporaryDirectory(dir=out, prefix=".ckpt-") as tmp, _quiet_hf():
        model.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)
    state = dict(state, optimizer=opt.state_dict(), weights_sha256=_sha256(out / WEIGHTS))
    tmp_state = out / (STATE + ".tmp")
    torch.save(state, tmp_state)
    os.replace(tmp_state, out / STATE)


# ------------------------------------------------------------------------------------- training

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) the run in ``cfg.out``; see the module docstring for the recipe.

    Returns ``{"losses", "heldout_ppl", "steps", "wall_s", "tokens_seen"}`` where ``steps`` is the
    number of optimisation steps done so far and ``wall_s`` the training time summed over resumes.
    """
    meta = run_metadata()  # the code that runs is the code imported now
    out = Path(cfg.out)
    has_ckpt = (out / STATE).is_file()
    if has_ckpt and not resume:
        raise FileExistsError(f"{out} already holds a training run ({STATE}); pass --resume to continue it "
                              "or choose another --out")
    if not has_ckpt and (out / WEIGHTS).is_file() and not resume:
        raise FileExistsError(f"{out} already holds {WEIGHTS}; choose another --out")
    if cfg.steps <= 0 or cfg.seq_len <= 0 or cfg.batch_size <= 0:
        raise ValueError(f"steps, seq_len and batch_size must be positive (got {cfg.steps}, {cfg.seq_len}, "
                         f"{cfg.batch_size})")
    if cfg.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds max_seq_len={cfg.max_seq_len}; lower --seq-len")

    tok = SPTokenizer(cfg.tokenizer)
    train_st, held_st = split_stories(load_stories(cfg.data), cfg.heldout_frac)
    train_ids = stories_to_ids(train_st, tok)
    held_ids = stories_to_ids(held_st, tok) if held_st else train_ids[-cfg.seq_len * cfg.eval_windows:]
    if len(train_ids) <= cfg.seq_len:
        raise ValueError(f"{Path(cfg.data).name}: only {len(train_ids)} training tokens, need more than "
                         f"seq_len={cfg.seq_len}; use more text or a shorter --seq-len")
    log.info("data: %d train stories (%d tokens), %d held-out stories (%d tokens)",
             len(train_st), len(train_ids), len(held_st), len(held_ids))

    out.mkdir(parents=True, exist_ok=True)
    if has_ckpt:
        state = torch.load(out / STATE, weights_only=True)
        saved = state.get("config", {})
        diff = [k for k in _TRAJECTORY_FIELDS if k in saved and saved[k] != _config_dict(cfg)[k]]
        if diff:
            raise ValueError(f"cannot resume {out}: config differs from the checkpoint in {', '.join(diff)}; "
                             "use the original settings or another --out")
        if state.get("weights_sha256") != _sha256(out / WEIGHTS):
            raise RuntimeError(f"{out}: {WEIGHTS} does not match {STATE} (interrupted while saving?); "
                               "start again with another --out")
        with _quiet_hf():
            model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        opt = make_optimizer(model, cfg)
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        losses = [float(x) for x in state["losses"]]
        evals = [list(e) for e in state.get("evals", [])]
        wall_before = float(state.get("wall_s", 0.0))
        log.info("resuming %s at step %d", out, start)
    else:
        if resume:
            log.info("no checkpoint in %s: starting fresh", out)
        model = build_model(cfg, tok.vocab_size)
        opt = make_optimizer(model, cfg)
        start, losses, evals, wall_before = 0, [], [], 0.0
    if Path(cfg.tokenizer).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(cfg.tokenizer, out / "tokenizer.model")
    model.train()

    end = cfg.steps if cfg.stop_after is None else max(start, min(cfg.steps, cfg.stop_after))
    t0 = time.perf_counter()

    def snapshot(step: int) -> dict:
        return {"step": step, "losses": list(losses), "evals": [list(e) for e in evals],
                "wall_s": wall_before + time.perf_counter() - t0, "config": _config_dict(cfg)}

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    step = start
    try:
        for step in range(start, end):
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = get_batch(train_ids, cfg.seq_len, cfg.batch_size, cfg.seed, step)
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at step {step}; try a lower --lr (now {cfg.lr:g})")
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not torch.isfinite(gnorm):
                raise RuntimeError(f"gradient norm is {gnorm.item()} at step {step}; try a lower --lr "
                                   f"(now {cfg.lr:g})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            done = step + 1
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            if cfg.eval_every > 0 and done % cfg.eval_every == 0 and done < cfg.steps:
                ppl = heldout_perplexity(model, held_ids, cfg.seq_len, cfg.eval_windows)
                evals.append([done, ppl])
                log.info("step %d: loss %.4f, held-out ppl %.3f", done, losses[-1], ppl)
            if (cfg.save_every > 0 and done % cfg.save_every == 0) or done == end:
                _save_checkpoint(out, model, opt, snapshot(done))
        step = end
    finally:
        if bar is not None:
            bar.close()
    if start == end and not has_ckpt:  # nothing to train (stop_after=0): still leave a loadable folder
        _save_checkpoint(out, model, opt, snapshot(end))

    heldout_ppl = heldout_perplexity(model, held_ids, cfg.seq_len, cfg.eval_windows)
    wall_s = wall_before + time.perf_counter() - t0
    result = {"losses": losses, "heldout_ppl": heldout_ppl, "steps": step, "wall_s": wall_s,
              "tokens_seen": step * cfg.batch_size * cfg.seq_len}
    if step == cfg.steps and (not evals or evals[-1][0] != step):
        evals.append([step, heldout_ppl])
    _atomic_json({"config": _config_dict(cfg), "seed": cfg.seed, "losses": losses, "evals": evals,
                  "heldout_ppl": heldout_ppl, "heldout_windows": cfg.eval_windows, "steps": step,
                  "finished": step == cfg.steps, "tokens_seen": result["tokens_seen"], "wall_s": wall_s,
                  **meta},
                 out / "train_log.json")
    log.info("stopped at step %d/%d: held-out ppl %.3f, %.1f s", step, cfg.steps, heldout_ppl, wall_s)
    return result
