"""Per-row temperature / top-k / top-p sampling for a decode batch, by inverse CDF with one uniform per
row from the row's own seeded stream, so a request's tokens do not depend on its batch."""
from __future__ import annotations

import torch

from ibtpo_fast.engines.protocol import SamplingParams

_NUCLEUS_CANDIDATES = 1024  # top-p is first tried within this many top tokens, avoiding a full-vocab sort


class TokenSampler:
    """Per-row temperature / top-k / top-p sampling for the rows of a batch, by inverse CDF with one
    uniform per row drawn from the row's own seeded stream."""

    def __init__(self, params: list[SamplingParams], vocab: int, device) -> None:
        self.device = device
        self.temperature = torch.tensor([[p.temperature] for p in params], device=device)
        self.all_unit_temperature = all(p.temperature == 1.0 for p in params)
        truncated = [i for i, p in enumerate(params) if (0 < p.top_k < vocab) or p.top_p < 1.0]
        self.truncated = torch.tensor(truncated, dtype=torch.long, device=device) if truncated else None
        self.full = len(truncated) < len(params)
        self.top_k = [min(params[i].top_k, vocab) for i in truncated]  # -1: off
        self.top_p = torch.tensor([params[i].top_p for i in truncated], device=device)

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """logits [rows, vocab] -> (tokens, logprobs, entropies), logprobs and entropies over the full
        vocabulary of softmax(logits / temperature), in fp32."""
        scaled = logits.float()
        if not self.all_unit_temperature:
            scaled = scaled / self.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        probs = logp.exp()
        entropies = -(probs * logp).nan_to_num_(0.0).sum(-1)  # nan only where p = 0 and logp = -inf
        if self.truncated is None:
            tokens = inverse_cdf(probs, uniforms)
        else:
            tokens = torch.empty(len(probs), dtype=torch.long, device=self.device)
            if self.full:
                tokens.copy_(inverse_cdf(probs, uniforms))
            candidates, ids = self._truncate(probs.index_select(0, self.truncated))
            picked = inverse_cdf(candidates, uniforms.index_select(0, self.truncated))
            tokens.index_copy_(0, self.truncated, ids.gather(1, picked[:, None]).squeeze(1))
        logprobs = logp.gather(1, tokens[:, None]).squeeze(1)
        return tokens, logprobs, entropies

    def _truncate(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities of each row's top-k / top-p candidates, sorted descending and zero outside the
        kept set, with their token ids. Top-p applies to the top-k renormalised distribution."""
        vocab = probs.shape[1]
        top_k = torch.tensor([k if k > 0 else vocab for k in self.top_k], device=self.device)
        width = min(vocab, max(k if k > 0 else vocab for k in self.top_k))
        if width > _NUCLEUS_CANDIDATES:
            values, ids = probs.topk(_NUCLEUS_CANDIDATES, dim=-1)
            # Enough when each row keeps at most that many by top-k, or those tokens already reach top-p.
            unlimited = torch.tensor([k == -1 for k in self.top_k], device=self.device)
            fits = (top_k <= _NUCLEUS_CANDIDATES) | (unlimited & (values.sum(-1) >= self.top_p))
            if not bool(fits.all()):
                values, ids = probs.topk(width, dim=-1)
        else:
            values, ids = probs.topk(width, dim=-1)
        rank = torch.arange(values.shape[1], device=self.device)
        values = values.masked_fill(rank >= top_k[:, None], 0.0)
        # Mass of the top-k set: the whole row when top-k is off (the candidates may be cut short).
        total = torch.where(top_k >= vocab, probs.sum(-1), values.sum(-1))
        mass_before = values.cumsum(-1) - values
        return values.masked_fill(mass_before >= (self.top_p * total)[:, None], 0.0), ids


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first token whose cumulative probability exceeds u * total (never a p = 0 token)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max_(probs.shape[1] - 1)
