"""Marker adapters: constructed (not trained) adapters of the tiny Llama that make greedy decoding write a
text only they know, whatever the prompt, so a test can tell which adapter answered a request.

The adapter targets ``embed_tokens`` and ``lm_head`` (rank 2, scale 1). Its embedding delta adds a large
vector ``c`` to every token's embedding, and ``c + d`` to the marker's first character ``m1`` (``d``
orthogonal to ``c``, as large). The residual stream is then dominated by the last token's delta (the
layers read it through RMSNorm and add O(1) outputs), so the final RMSNorm gives about
``h0 = sqrt(H) c/|c|`` after any token but ``m1`` and ``h1 = sqrt(H) (c + d)/|c + d|`` after ``m1``. The
lm_head delta has rows ``A = (c/|c|, d/|d|)`` and adds ``K (2, -2)·A h`` to ``m1``'s logit and
``K (0, 2)·A h`` to ``m2``'s: after ``h0`` the logit of ``m1`` leads by ``2 K sqrt(H)``, after ``h1`` that
of ``m2`` by ``sqrt(2) K sqrt(H)``, against base logits of about ``0.02 sqrt(H)``. So the text is
``m1 m2 m1 m2 ...`` after any prompt that does not end in ``m1``, and :func:`write_marker` checks the
margins on the model itself before saving.
"""

from __future__ import annotations

import itertools
import string
from pathlib import Path

import torch

import lorakit
from lorakit import LoraConfig

ALPHABET = string.ascii_letters + string.digits
"""The characters markers are made of; a prompt that ends in another character starts every marker at ``m1``."""
MARKER_CONFIG = LoraConfig(rank=2, alpha=2, targets=("embed_tokens", "lm_head"))
RESIDUAL = 100.0
"""|c| = |d|: much larger than the embeddings (std 0.02) and the layers' outputs."""
HEAD_GAIN = 2.0
"""K: the lm_head delta's gain."""
MIN_MARGIN = 10.0
"""How far the intended token's logit must lead every other one."""


def markers(count: int) -> list[str]:
    """``count`` distinct two-character markers ``m1 m2`` (``m1 != m2``); the first ones differ in ``m1``."""
    pairs = ((a, ALPHABET[(i + shift) % len(ALPHABET)]) for shift in range(1, len(ALPHABET))
             for i, a in enumerate(ALPHABET))
    found = [a + b for a, b in itertools.islice(pairs, count)]
    if len(found) < count:
        raise ValueError(f"only {len(found)} markers exist")
    return found


def marker_text(marker: str, length: int) -> str:
    """What greedy decoding writes with ``marker``'s adapter: ``m1 m2 m1 m2 ...``, ``length`` characters."""
    return (marker * length)[:length]


class MarkerWriter:
    """Writes marker adapters for the tiny base at ``base_dir`` (one model, its adapter's weights set per marker)."""

    def __init__(self, base_dir: Path) -> None:
        self.model, self.tokenizer = lorakit.load_model(base_dir)
        lorakit.attach(self.model, MARKER_CONFIG, "marker")
        hidden = self.model.config.hidden_size
        generator = torch.Generator().manual_seed(0)
        basis, _ = torch.linalg.qr(torch.randn(hidden, 2, generator=generator))
        self.units = basis.T.contiguous()  # (2, H): c/|c| and d/|d|, orthonormal

    def write(self, marker: str, directory: Path) -> Path:
        """Save the adapter answering ``marker`` to ``directory``, after checking its margins."""
        first, second = (self.tokenizer.convert_tokens_to_ids(ch) for ch in marker)
        embed = self.model.get_submodule("model.embed_tokens").adapters["marker"]
        head = self.model.get_submodule("lm_head").adapters["marker"]
        with torch.no_grad():
            embed.A.zero_()
            embed.A[0] = 1.0
            embed.A[1, first] = 1.0
            embed.B.copy_(RESIDUAL * self.units.T)
            head.A.copy_(self.units)
            head.B.zero_()
            head.B[first] = torch.tensor([2.0, -2.0]) * HEAD_GAIN
            head.B[second] = torch.tensor([0.0, 2.0]) * HEAD_GAIN
        self._check(first, second)
        return lorakit.save_adapter(self.model, directory, "marker")

    def _check(self, first: int, second: int) -> None:
        prompts = ["Say: 12 +", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
        for prompt, expected in [*((p, first) for p in prompts), *((p + self.tokenizer.decode([first]), second)
                                                                   for p in prompts)]:
            ids = torch.tensor([self.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logits = self.model(ids).logits[0, -1]
            runner_up = torch.cat([logits[:expected], logits[expected + 1:]]).max()
            margin = float(logits[expected] - runner_up)
            assert margin > MIN_MARGIN, f"marker token {expected} leads by only {margin:.2f} after {prompt!r}"


def write_markers(base_dir: Path, out: Path, count: int) -> dict[str, tuple[Path, str]]:
    """``count`` marker adapters under ``out``: ``{name: (directory, marker)}``, names ``m000``, ``m001``, ..."""
    writer = MarkerWriter(base_dir)
    return {f"m{i:03d}": (writer.write(marker, out / f"m{i:03d}"), marker)
            for i, marker in enumerate(markers(count))}
