"""``lorakit merge`` of an adapter trained on a quantized base, never silently lossy.

Folding ``s B A`` into quantized codes cannot be exact, so the user picks what to merge into (``--into``):

    dequantized   W = dequantize(Q) + s B A      a full-precision model computing what the unmerged one does
    requantized   Q' = quantize(dequantize(Q) + s B A)   an ``nf-model`` as small as the base; rounding changes it
    original      W = W0 + s B A                 the full-precision weights Q was made from; the adapter learned
                                                 against Q, so this changes it too

Every merge measures its error against the unmerged model (the adapter on the quantized base it was trained and
evaluated with) on a fixed English probe text: the largest and mean absolute logit difference and the share of
positions whose most likely next token agrees. ``original`` also measures the base's own quantization error (W0
against Q, no adapter): the gap the adapter was trained across. ``requantized`` adds each layer's weight and
update errors and the share of codes that changed (:mod:`lorakit.quant.requantize`), and a warning when rounding
erased most of the update (small updates on a 4-bit grid mostly do). The report is printed and written to
``merge_report.json`` in the output directory.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.activation import disabled
from lorakit.core.merge import merge_and_unload
from lorakit.errors import ConfigError
from lorakit.io.adapter_kind import DEFAULT_NAME
from lorakit.io.adapters import CONFIG_FILE, load_adapter
from lorakit.io.files import json_writer, load_json, write_atomically
from lorakit.models import load_model
from lorakit.quant.dequantize import dequantize_bases, dequantize_linears, dequantized_copies
from lorakit.quant.nf_model_dir import save_nf_model
from lorakit.quant.quantized_adapter import QUANTIZED_ADAPTER_KIND
from lorakit.quant.requantize import requantize
from lorakit.train.output import save_model

INTO = ("dequantized", "requantized", "original")
REPORT_FILE = "merge_report.json"
ERASED = 0.5
"""A median update error at or above this means requantizing lost most of the update: the report warns."""
PROBE_TEXT = ("The committee met on a cold morning in early spring. After a short discussion of the budget, the "
              "chair asked each member to describe the progress of their project, and the secretary wrote down "
              "the dates, the names of the people responsible and the questions that were still open.")


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()  # (1, T, V)


def compare(found: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far logits ``found`` are from ``reference`` (both (1, T, V))."""
    difference = (found - reference).abs()
    agree = (found.argmax(-1) == reference.argmax(-1)).float().mean()
    return {"max_abs_logit_difference": float(difference.max()), "mean_abs_logit_difference": float(difference.mean()),
            "top1_agreement": float(agree)}


def _summary(errors: dict[str, Any]) -> dict[str, Any]:
    """The requantization errors of every layer, and their median and largest values."""
    per_layer = {name: {"weight_error": e.weight, "update_error": e.update, "codes_changed": e.codes_changed}
                 for name, e in errors.items()}
    summary: dict[str, Any] = {"layers": len(errors)}
    for field in ("weight_error", "update_error", "codes_changed"):
        values = [entry[field] for entry in per_layer.values()]
        summary.update({f"median_{field}": statistics.median(values), f"max_{field}": max(values)})
    return {**summary, "per_layer": per_layer}


def merge_quantized(model: nn.Module, tokenizer: Any, adapter: Path, kind: str, out: Path, into: str,
                    base: str | None) -> dict[str, Any]:
    """Merge the adapter ``model`` carries (loaded from ``adapter``, of directory ``kind``, on its quantized base)
    as ``into`` says, write the result and its report to ``out`` and return the report."""
    if into not in INTO:
        raise ConfigError(f"--into is {into!r}; choose one of {', '.join(INTO)}")
    if into == "original" and kind == QUANTIZED_ADAPTER_KIND:
        raise ConfigError(f"{adapter} is an LQ-LoRA / LoftQ adapter: it starts at W - Q, so on the original W it "
                          "would count that difference twice; merge it --into dequantized or requantized")
    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids.to(device)  # (1, T)
    copies = dequantized_copies(model) if into != "original" else None  # before any forward: see dequantized_copies
    reference = _logits(model, ids)
    report: dict[str, Any] = {"adapter": str(adapter), "into": into, "probe_tokens": ids.shape[1]}
    if into == "original":
        with disabled(model):
            quantized_base = _logits(model, ids)
        recorded = base or load_json(adapter / CONFIG_FILE).get("base_model_name_or_path")
        original, _ = load_model(recorded)
        report["base_quantization_error"] = compare(quantized_base, _logits(original, ids))
        load_adapter(original, adapter, DEFAULT_NAME)
        merged = merge_and_unload(original)
    else:
        originals = dequantize_bases(model, copies)
        merged = merge_and_unload(model)
        if into == "requantized":
            report["requantization"] = summary = _summary(requantize(merged, originals))
            if summary["median_update_error"] >= ERASED:
                report["warning"] = (f"requantizing rounded most of the adapter away (median update error "
                                     f"{summary['median_update_error']:.2f}, {summary['median_codes_changed']:.2%} "
                                     "of the codes changed in the median layer): the result is close to the base; "
                                     "keep the adapter separate or merge --into dequantized")
        else:
            dequantize_linears(merged, copies)
    report["vs_unmerged"] = compare(_logits(merged, ids), reference)
    origin = f"merge of {adapter} into its {into} base"
    if into == "requantized":
        save_nf_model(merged, tokenizer, out, origin=origin)
    else:
        save_model(merged, tokenizer, out, origin=origin)
    write_atomically(out / REPORT_FILE, json_writer(report))
    return report
