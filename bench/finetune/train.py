"""Training loops for the general model and its domain fine-tune (qwen3_torch.Qwen3, CPU).

Documents are packed the way pretraining packs them: one stream of `<|endoftext|> doc` pieces in a
seeded random order, cut into windows of seq + 1 tokens. Held-out loss scores each document alone
after `<|endoftext|>`, over the document's own tokens, which is what `xprec fidelity --heldout`
computes in the engine.
"""
import math
import sys
import time

import torch

from qwen3_torch import ENDOFTEXT


class Stream:
    """Random windows of seq + 1 tokens from the packed documents."""

    def __init__(self, docs, seed):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(docs), generator=g).tolist()
        toks = []
        for i in order:
            toks.append(ENDOFTEXT)
            toks.extend(docs[i])
        self.toks = torch.tensor(toks, dtype=torch.long)
        self.g = g

    def batch(self, n, seq):
        if len(self.toks) < seq + 1:
            raise SystemExit(f"train: the corpus holds {len(self.toks)} tokens, fewer than a window ({seq + 1})")
        start = torch.randint(0, len(self.toks) - seq, (n,), generator=self.g)
        w = torch.stack([self.toks[s:s + seq + 1] for s in start.tolist()])
        return w[:, :-1], w[:, 1:]


def lr_at(step, steps, peak, warmup, floor):
    """Linear warm-up, then cosine decay to floor."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


def train(model, docs, params, *, steps, batch, seq, lr, warmup, min_lr, weight_decay, seed, label):
    """AdamW on params (a list) for `steps` steps; returns the per-step training losses."""
    stream = Stream(docs, seed)
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    losses, t0 = [], time.time()
    model.train()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, lr, warmup, min_lr)
        x, y = stream.batch(batch, seq)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            recent = sum(losses[-10:]) / len(losses[-10:])
            print(f"  {label}: step {step + 1}/{steps}  loss {recent:.3f}  "
                  f"{batch * seq * (step + 1) / el:.0f} tok/s  {el:.0f} s elapsed, ~{eta:.0f} s left",
                  file=sys.stderr, flush=True)
    model.eval()
    return losses


@torch.no_grad()
def heldout_loss(model, docs, batch=16):
    """Mean next-token cross-entropy in nats per token over the documents, each scored alone
    after <|endoftext|> (every token of the document counts once)."""
    total, count = 0.0, 0
    for i in range(0, len(docs), batch):
        chunk = docs[i:i + batch]
        T = max(len(d) for d in chunk)
        x = torch.full((len(chunk), T), ENDOFTEXT, dtype=torch.long)
        y = torch.full((len(chunk), T), ENDOFTEXT, dtype=torch.long)
        w = torch.zeros((len(chunk), T))
        for j, d in enumerate(chunk):
            seq = [ENDOFTEXT] + d
            x[j, :len(d)] = torch.tensor(seq[:-1])
            y[j, :len(d)] = torch.tensor(seq[1:])
            w[j, :len(d)] = 1
        n = w.sum().item()
        total += model.loss(x, y, w).item() * n
        count += n
    return total / count
