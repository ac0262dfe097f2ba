"""``differentiable``: learn per-position mixing logits over blocks plus skip, then discretise.

The soft computation order of Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963): at each
of L positions a softmax (temperature annealed) over the K frozen blocks and skip. Two
relaxations, as objects:

- :class:`MixOutputs`: ``h <- sum_k w_k block_k(h) + w_skip h`` (soft layer ordering, K
  forwards per position);
- :class:`MixWeights`: ``h <- (1 - w_skip) block(h; sum_k w_k theta_k) + w_skip h``, one
  forward per position through ``torch.func.functional_call`` (blocks share parameter
  shapes; float buffers such as BatchNorm statistics are mixed alike).

With ``relaxation="gumbel"`` each step samples one choice per position (Gumbel single-path
straight-through, as in GDAS): only the chosen block runs for :class:`MixOutputs`.

The loss reads a trainable linear head on the pooled features for ``probe``, the source head
for ``head`` (cross-entropy) and for the unsupervised objectives (minus infomax, or the mean
prediction entropy). The argmax order is re-scored by the engine and recorded as a trial like
any other; further trials sample the learned distribution. The learned logits are kept in
the study (user attribute ``differentiable``), so a resumed search does not train again.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from torch import nn
from torch.func import functional_call

from ..order import SKIP, Order
from ._base import SearchContext, Searcher, SearchError, register_searcher

__all__ = ["DifferentiableSearcher", "MixOutputs", "MixWeights"]

log = logging.getLogger("ordersearch")


class MixOutputs:
    """Mix block outputs: K forwards per position (one for single-path)."""

    name = "outputs"

    def __call__(self, bank: Any, h: torch.Tensor, w: torch.Tensor, position: int, single: int | None) -> torch.Tensor:
        k_blocks = bank.n_blocks
        if single is not None:  # straight-through: value 1, gradient to w[single]
            gate = 1 - w[single].detach() + w[single]
            return gate * (h if single >= k_blocks else bank.block_at(single, position)(h))
        out = h * w[k_blocks] if len(w) > k_blocks else torch.zeros_like(h)
        for k in range(k_blocks):
            out = out + w[k] * bank.block_at(k, position)(h)
        return out


class MixWeights:
    """Mix block parameters: one forward per position."""

    name = "weights"

    def __call__(self, bank: Any, h: torch.Tensor, w: torch.Tensor, position: int, single: int | None) -> torch.Tensor:
        k_blocks = bank.n_blocks
        if single is not None:
            w = torch.nn.functional.one_hot(torch.tensor(single), len(w)).to(w) - w.detach() + w
        wb = w[:k_blocks]
        states = [dict(b.named_parameters()) | dict(b.named_buffers()) for b in bank.blocks]
        params = dict(bank.blocks[0].named_parameters())
        mass = wb.sum()
        share = wb / mass.clamp_min(1e-12)
        mixed = {}
        for name, t in states[0].items():
            if torch.is_floating_point(t):
                coef = share if name in params else share.detach()  # buffers take no gradient
                mixed[name] = sum(coef[k] * states[k][name] for k in range(k_blocks))
            else:
                mixed[name] = t
        out = functional_call(bank.blocks[0], mixed, (h,))
        if len(w) > k_blocks:
            out = mass * out + w[k_blocks] * h
        return out


_MIXINGS = {"outputs": MixOutputs, "weights": MixWeights}


@dataclass(frozen=True)
class DifferentiableSearcher(Searcher):
    """Gradient search over soft orders, discretised and re-scored by the engine.

    Args:
        steps: Optimisation steps.
        lr: Adam learning rate of the logits.
        head_lr: Learning rate of the linear head (``probe``).
        mixing: ``"outputs"`` or ``"weights"`` (or a mixing object).
        relaxation: ``"softmax"`` or ``"gumbel"`` (single-path straight-through).
        temperature: Softmax temperature at the first and last step (annealed geometrically).
        batch_images: Images per step.
        sample_temperature: Temperature of the learned distribution that trials after the
            argmax are sampled from.

    Example:
        >>> DifferentiableSearcher(steps=10, mixing="weights").mixing
        'weights'
    """

    name = "differentiable"
    steps: int = 150
    lr: float = 0.1
    head_lr: float = 0.01
    mixing: Any = "outputs"
    relaxation: str = "softmax"
    temperature: tuple[float, float] = (1.0, 0.05)
    batch_images: int = 64
    sample_temperature: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.mixing, str) and self.mixing not in _MIXINGS:
            raise SearchError(f"mixing must be one of {', '.join(_MIXINGS)}, got {self.mixing!r}")
        if self.relaxation not in ("softmax", "gumbel"):
            raise SearchError(f"relaxation must be 'softmax' or 'gumbel', got {self.relaxation!r}")
        if self.steps < 1 or min(self.temperature) <= 0:
            raise SearchError("differentiable search needs steps >= 1 and positive temperatures")

    # --- training ---------------------------------------------------------------------------
    def prepare(self, ctx: SearchContext) -> None:
        assert ctx.study is not None
        if "differentiable" in ctx.study.user_attrs:
            return
        if ctx.encoding.n_positions == 0:
            raise SearchError("the space has no free positions to learn")
        logits, history = self.train(ctx)
        weights = torch.softmax(logits / self.temperature[1], -1)
        ctx.study.set_user_attr("differentiable", {
            "logits": logits.tolist(),
            "weights": weights.tolist(),
            "choices": list(ctx.encoding.choices),
            "loss": history,
            "config": self.config(),
        })

    def train(self, ctx: SearchContext) -> tuple[torch.Tensor, list[float]]:
        """Optimise the mixing logits; returns them (L, choices) and the loss history."""
        engine = ctx.engine
        bank, evalset, objective = engine.bank, engine.evalset, engine.objective
        device = getattr(engine, "device", torch.device("cpu"))
        mixing = _MIXINGS[self.mixing]() if isinstance(self.mixing, str) else self.mixing
        gen = torch.Generator().manual_seed(ctx.seed if ctx.seed is not None else random.randrange(2**31))
        n_pos, n_choices = ctx.encoding.n_positions, len(ctx.encoding.choices)
        logits = (1e-3 * torch.randn(n_pos, n_choices, generator=gen)).to(device).requires_grad_(True)
        labelled = objective.needs_labels
        idx = evalset.train_idx if labelled else torch.arange(len(evalset))
        if labelled and evalset.y is None:
            raise SearchError(f"objective {objective.name!r} needs labels")
        with torch.inference_mode():  # the stem and pinned prefix are fixed: run them once
            h0 = torch.cat([bank.run_blocks(bank.stem(evalset.x[s:s + 256].to(device)), ctx.space.prefix)
                            for s in range(0, len(evalset), 256)])
        h0 = h0.clone()
        params: list[dict[str, Any]] = [{"params": [logits], "lr": self.lr}]
        head: nn.Module | None = None
        if objective.output == "features":
            with torch.no_grad():
                dim = bank.features(h0[:2]).flatten(1).shape[1]
            n_classes = int(evalset.y.max()) + 1 if evalset.y is not None else 0
            if not labelled or n_classes < 2:
                raise SearchError(f"objective {objective.name!r} reads features; the differentiable searcher "
                                  "trains a linear head for it and needs labels")
            head = nn.Linear(dim, n_classes).to(device)
            nn.init.zeros_(head.weight)  # seeded by construction (softmax regression is convex)
            nn.init.zeros_(head.bias)
            params.append({"params": head.parameters(), "lr": self.head_lr})
        opt = torch.optim.Adam(params)
        t0, t1 = self.temperature
        history: list[float] = []
        skipped = 0
        n_blocks = bank.n_blocks
        for step in range(self.steps):
            temp = t0 * (t1 / t0) ** (step / max(self.steps - 1, 1))
            pick = idx[torch.randint(len(idx), (min(self.batch_images, len(idx)),), generator=gen)]
            h = h0[pick.to(h0.device)]
            z = logits
            if self.relaxation == "gumbel":
                u = torch.rand(logits.shape, generator=gen).to(device)
                z = z - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))  # + Gumbel(0, 1) noise
            w = torch.softmax(z / temp, -1)  # (L, choices)
            for p in range(n_pos):
                single = int(w[p].argmax()) if self.relaxation == "gumbel" else None
                if single is not None and ctx.encoding.choices[single] == SKIP:
                    single = n_blocks
                h = mixing(bank, h, w[p], len(ctx.space.prefix) + p, single)
            loss = self._loss(bank, objective, head, h, evalset.y[pick] if labelled else None)
            if not torch.isfinite(loss):  # a sampled path can overflow: skip the step
                skipped += 1
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
        if not history:
            raise SearchError(f"differentiable search: the loss was not finite at any of {self.steps} steps")
        if skipped:
            log.warning("differentiable: %d of %d steps had a non-finite loss and were skipped", skipped, self.steps)
        log.info("differentiable: %d steps, loss %.4f -> %.4f", self.steps, history[0], history[-1])
        keep = max(1, len(history) // 100)
        return logits.detach().cpu(), history[::keep]

    @staticmethod
    def _loss(bank: Any, objective: Any, head: nn.Module | None, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if head is not None:
            assert y is not None
            return nn.functional.cross_entropy(head(bank.features(h).flatten(1)), y.to(h.device))
        logits = bank.head(h)
        if y is not None:
            return nn.functional.cross_entropy(logits, y.to(logits.device))
        logp = torch.log_softmax(logits, 1)
        cond = -(logp.exp() * logp).sum(1).mean()
        if objective.name == "entropy":
            return cond
        pm = logp.exp().mean(0)
        marg = -(pm * pm.clamp_min(1e-12).log()).sum()
        return -(marg - getattr(objective, "weight", 1.0) * cond)

    # --- proposing --------------------------------------------------------------------------
    def ask(self, ctx: SearchContext, n: int) -> list[tuple[optuna.Trial, Order]]:
        assert ctx.study is not None
        info = ctx.study.user_attrs["differentiable"]
        choices = info["choices"]
        logits = torch.tensor(info["logits"])
        seen = ctx.seen()
        enc = ctx.encoding
        argmax = enc.decode({name: choices[int(i)] for name, i in zip(enc.names, logits.argmax(-1))})
        out = []
        if argmax not in seen:
            out.append(ctx.ask_order(argmax, differentiable="argmax"))
            seen.add(argmax)
        probs = torch.softmax(logits / self.sample_temperature, -1).tolist()
        rng = ctx.rng("differentiable", len(seen))
        for _ in range(100 * n):
            if len(out) >= n:
                break
            o = enc.decode({name: rng.choices(choices, weights=p)[0] for name, p in zip(enc.names, probs)})
            if o not in seen:
                seen.add(o)
                out.append(ctx.ask_order(o, differentiable="sample"))
        return out


register_searcher("differentiable", DifferentiableSearcher)
