"""Directories a server can serve, on the tiny Llama saved as a base directory: plain adapters that change the
output, and an X-LoRA, a MixLoRA and a MeteoRA mixture over some of them (random routers/classifiers)."""

from __future__ import annotations

from pathlib import Path

import torch

import lorakit
from lorakit.mixtures.meteora import MeteoraModel, save_meteora
from lorakit.mixtures.mixlora import MixLoraConfig, attach_mixlora, save_mixlora
from lorakit.mixtures.xlora import XLoraModel, save_xlora

from .chat_tokenizer import char_tokenizer
from .tiny_models import perturb, tiny_llama

TARGETS = ("q_proj", "v_proj", "down_proj")


def save_base(directory: Path) -> Path:
    """The tiny Llama and the character tokenizer as a model directory."""
    tiny_llama().save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def save_adapters(base: Path | str, out: Path, names: list[str], *, std: float = 0.5) -> dict[str, Path]:
    """One perturbed rank-4 adapter per name (each its own seed), saved under ``out / name``."""
    model, _ = lorakit.load_model(base)
    paths = {}
    for seed, name in enumerate(names):
        lorakit.attach(model, lorakit.LoraConfig(rank=4, alpha=8, targets=TARGETS), name, activate=False)
        perturb(model, name, seed=seed, std=std)
        paths[name] = lorakit.save_adapter(model, out / name, name)
    return paths


def save_mixtures(base: Path | str, out: Path, experts: dict[str, Path],
                  kinds: tuple[str, ...] = ("xlora", "meteora", "mixlora")) -> dict[str, Path]:
    """Of ``kinds``: an X-LoRA and a MeteoRA mixture over ``experts``, and a MixLoRA model, under ``out``."""
    model, _ = lorakit.load_model(base)
    for name, path in experts.items():
        lorakit.load_adapter(model, path, name, activate=False)
    paths = {}
    if "xlora" in kinds:
        torch.manual_seed(7)
        xmodel = XLoraModel(model, list(experts))
        with torch.no_grad():
            for parameter in xmodel.classifier.parameters():
                parameter.normal_(0, 0.5)
        paths["xlora"] = save_xlora(xmodel, out / "xlora", experts)
    if "meteora" in kinds:
        meteora = MeteoraModel(model, list(experts))
        with torch.no_grad():
            for gate in meteora.gates.values():
                gate.weight.normal_(0, 1.0)
        paths["meteora"] = save_meteora(meteora, out / "meteora", adapter_paths=experts)
    if "mixlora" in kinds:
        paths["mixlora"] = _save_mixlora(base, out / "mixlora")
    return paths


def _save_mixlora(base: Path | str, directory: Path) -> Path:
    """A MixLoRA model of three experts (top 2) with perturbed adapters and random routers."""
    model, _ = lorakit.load_model(base)
    config = MixLoraConfig(num_experts=3, top_k=2, rank=4, alpha=8, dropout=0.0)
    ffns = attach_mixlora(model, config)
    for seed, name in enumerate(["attention"] + [f"expert{i}" for i in range(config.num_experts)]):
        perturb(model, name, seed=10 + seed, std=0.5)
    with torch.no_grad():
        for index, ffn in enumerate(ffns):
            ffn.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(100 + index))
    return save_mixlora(model, directory)
