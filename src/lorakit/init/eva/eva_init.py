"""EVA: LoRA initialised from the principal directions of each layer's inputs, with ranks redistributed.

Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation" (arXiv 2410.07170); PEFT's ``peft.tuners.lora.eva`` is the reference implementation.
For a target layer ``l`` with inputs ``x`` (d_in) and configured rank ``r_l``:

1. an incremental PCA of the centred inputs over batches (forward passes only) yields the top
   ``k_l = round(rho r_l)`` components ``V_l`` (k_l x d_in) and their explained-variance ratios;
2. the budget ``R = sum_l r_l`` is redistributed: the ``R`` largest ratios over all layers are kept
   and layer ``l`` gets ``r'_l`` = how many of its own were kept (:mod:`lorakit.init.eva.ranks`);
3. the adapter gets ``A_l = V_l[:r'_l]`` (optionally whitened: row ``i`` divided by ``sqrt(S_i)``)
   and ``B_l = 0``, so the model is unchanged at step 0; ``r'_l = 0`` means no adapter on ``l``, and
   ``alpha_l = alpha r'_l / r_l`` keeps each layer's scale ``alpha_l / r'_l = alpha / r_l``.

The PCA of a layer stops once its first ``r'_l`` components have converged: each has cosine similarity
``>= tau`` with itself one batch earlier. Layers that receive the same input (q/k/v) share one PCA.
Two explicit steps, values not hidden attributes::

    estimate = estimate_eva(model, batches, config)      # on the plain model
    lorakit.attach(model, eva_config(config, estimate), "default")
    init_eva(model, estimate, "default")
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.config import LoraConfig
from lorakit.core.activation import disabled
from lorakit.core.inject import find_targets
from lorakit.core.kinds import LinearKind, kind_of
from lorakit.core.layer import LoraLayer
from lorakit.core.modes import eval_mode
from lorakit.core.state import model_state
from lorakit.errors import AdapterError, ConfigError, DataError, StateError, TargetError
from lorakit.init.eva.estimate import EvaEstimate, EvaModule
from lorakit.init.eva.incremental_pca import IncrementalPCA
from lorakit.init.eva.inputs import gathered_inputs, input_groups, select_tokens, taps, token_mask
from lorakit.init.eva.ranks import redistribute
from lorakit.parallel.process_group import current_ranks

Batch = Mapping[str, torch.Tensor]


@torch.no_grad()
def estimate_eva(model: nn.Module, batches: Iterable[Batch], config: LoraConfig, *, rho: float = 2.0,
                 tau: float = 0.99, use_label_mask: bool = True, max_batches: int | None = None,
                 progress: bool = True) -> EvaEstimate:
    """Run ``batches`` through ``model`` until every target layer's components converge (or the batches
    run out, or ``max_batches`` were used) and return the redistributed ranks and components.

    ``batches`` are dicts of model inputs (``input_ids``, ``attention_mask`` or ``position_ids``,
    optionally ``labels``, which are not passed to the model); the first one also serves to find layers
    with identical inputs. Tokens with ``attention_mask == 0`` and, with ``use_label_mask``, with
    ``labels == -100`` (same position) are ignored. ``rho >= 1`` bounds each layer's rank at
    ``round(rho r_l)`` (``rho = 1``: no redistribution). Layers that had not converged when the batches
    ran out are listed in ``EvaEstimate.not_converged``; ``max_batches`` bounds the incremental steps
    (one more forward pass, on the first batch, groups the layers). The train/eval mode is restored afterwards;
    adapters already attached are disabled while it runs."""
    _check_settings(rho, tau, max_batches)
    names = find_targets(model, config)
    base_ranks = {name: config.rank_for(name) for name in names}
    widths = {name: _input_width(model, name, base_ranks[name]) for name in names}
    ks = {name: min(round(rho * base_ranks[name]), widths[name]) for name in names}
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise DataError("EVA needs at least one batch of model inputs; got none")
    device = next(model.parameters()).device
    with _as_base_model(model):
        groups = input_groups(model, names, lambda: _forward(model, first, device))
        search = _Search(groups, ks, widths, tau, budget=sum(base_ranks.values()))
        search.run(model, chain([first], iterator), device, use_label_mask, max_batches, progress)
    return search.result(base_ranks, rho)


def _check_settings(rho: float, tau: float, max_batches: int | None) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 1:
        raise ConfigError(f"rho={rho!r} is invalid: a finite number >= 1 is required (1: no rank redistribution)")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise ConfigError(f"tau={tau!r} is invalid: a cosine-similarity threshold in (0, 1] is required")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ConfigError(f"max_batches={max_batches!r} is invalid: a positive integer or None is required")


def _input_width(model: nn.Module, name: str, rank: int) -> int:
    """``d_in`` of target ``name``; EVA initialises Linear and Conv1D layers of rank <= d_in only."""
    module = model.get_submodule(name)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    kind = kind_of(base, name)
    if not isinstance(kind, LinearKind):
        raise TargetError(f"EVA initialises Linear and Conv1D layers only; module {name!r} is an "
                          f"{type(base).__name__}: leave it out of the targets")
    width = kind.shapes(base, 1)[0][1]
    if rank > width:
        raise ConfigError(f"rank {rank} of module {name!r} exceeds its input width {width}: EVA's rows of A are "
                          "orthonormal directions of the input, so at most that many")
    return width


@contextmanager
def _as_base_model(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and any attached adapters disabled, both restored afterwards."""
    with eval_mode(model), (disabled(model) if getattr(model, "lorakit_state", None) is not None
                            else nullcontext()):
        yield


def _forward(model: nn.Module, batch: Batch, device: torch.device) -> None:
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False  # packed rows: attention follows position_ids (lorakit.data.packing)
    model(**inputs)


class _Search:
    """The incremental PCAs (one per group of identical inputs), their convergence and the ranks."""

    def __init__(self, groups: dict[str, str], ks: dict[str, int], widths: dict[str, int], tau: float, *,
                 budget: int) -> None:
        self.groups, self.ks, self.widths, self.tau, self.budget = groups, ks, widths, tau, budget
        self.members: dict[str, list[str]] = {}
        for name, head in groups.items():
            self.members.setdefault(head, []).append(name)
        sizes = {head: max(ks[n] for n in names) for head, names in self.members.items()}
        self.pcas = {head: IncrementalPCA(size) for head, size in sizes.items()}
        self.settled = {head: torch.zeros(size, dtype=torch.bool) for head, size in sizes.items()}
        self.ranks = dict(ks)  # before the first redistribution every component counts (PEFT's start)
        self.batches = 0

    def converged(self, head: str) -> bool:
        """Whether the components the group's members currently need have all settled."""
        need = max(self.ranks[n] for n in self.members[head])
        return bool(self.settled[head][:need].all())

    def pending(self) -> list[str]:
        """The groups whose components have not all settled yet."""
        return [head for head in self.pcas if not self.converged(head)]

    def done(self, max_batches: int | None) -> bool:
        """Whether every group converged or ``max_batches`` batches were folded in."""
        return (max_batches is not None and self.batches >= max_batches) or not self.pending()

    def run(self, model: nn.Module, batches: Iterable[Batch], device: torch.device, use_label_mask: bool,
            max_batches: int | None, progress: bool) -> None:
        """Fold the batches' layer inputs into the PCAs, a batch at a time, until :meth:`done` or the batches run
        out. Under torch.distributed each rank runs the forward passes of its own batches (``Ranks.share``: batches
        ``r, r + N, ...``) and every rank folds the N batches of a step in rank order: the one-process order,
        convergence checked and ranks redistributed after each batch as one process does."""
        distributed = current_ranks().distributed
        bar = tqdm(total=max_batches, disable=not progress, desc="eva", unit="batch")
        iterator = iter(batches)
        try:
            while not self.done(max_batches):
                # Under several ranks a settled group can fall back to pending within a step (the ranks move after
                # each batch), so every group's inputs are taken; alone, only the pending groups'.
                tapped = list(self.pcas) if distributed else self.pending()
                batch = next(iterator, None)  # never pulled once done
                inputs = None if batch is None else self._inputs(model, batch, tapped, device, use_label_mask)
                step = gathered_inputs(inputs, {head: self.widths[head] for head in tapped}, device)
                if all(rank_inputs is None for rank_inputs in step):
                    break
                for rank_inputs in step:
                    if rank_inputs is None or self.done(max_batches):
                        continue
                    self._fold(rank_inputs)
                    bar.update(1)
                    bar.set_postfix(converged=f"{len(self.pcas) - len(self.pending())}/{len(self.pcas)}")
        finally:
            bar.close()

    @staticmethod
    def _inputs(model: nn.Module, batch: Batch, heads: list[str], device: torch.device,
                use_label_mask: bool) -> dict[str, torch.Tensor]:
        """The selected rows (n, d) of each group's input in one forward pass of ``batch`` (all of a module's
        calls in that pass together)."""
        mask = token_mask(batch, use_label_mask)
        rows: dict[str, list[torch.Tensor]] = {head: [] for head in heads}
        with taps(model, heads, lambda head, x: rows[head].append(select_tokens(x, mask, head).float())):
            _forward(model, batch, device)
        return {head: torch.cat(parts) for head, parts in rows.items()}

    def _fold(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """One batch: an incremental step of every pending group, then the ranks redistributed."""
        for head in self.pending():
            self._fit(head, inputs[head])
        self.batches += 1
        if all(pca.components is not None for pca in self.pcas.values()):
            self.ranks = redistribute({n: self.pcas[h].explained_variance_ratio[:self.ks[n]]
                                       for n, h in self.groups.items()}, self.budget)

    def _fit(self, head: str, rows: torch.Tensor) -> None:
        """One incremental step on the rows (n, d); a batch with fewer rows than components is skipped."""
        pca = self.pcas[head]
        if rows.shape[0] < pca.n_components:
            return
        previous = pca.components
        pca.partial_fit(rows)
        if previous is not None:
            self.settled[head] = (F.cosine_similarity(pca.components, previous, dim=1) >= self.tau).cpu()

    def result(self, base_ranks: dict[str, int], rho: float) -> EvaEstimate:
        unfitted = [head for head, pca in self.pcas.items() if pca.components is None]
        if unfitted:
            raise DataError(f"no batch had {self.pcas[unfitted[0]].n_components} or more selected tokens for module "
                            f"{unfitted[0]!r}; use longer or more batches, a smaller rank or rho, or check the "
                            "attention and label masks")
        modules = {}
        for name, head in self.groups.items():
            pca, rank = self.pcas[head], self.ranks[name]
            modules[name] = EvaModule(
                components=pca.components[:rank].cpu().clone(),  # own storage: safetensors refuses shared tensors
                singular_values=pca.singular_values[:rank].cpu().clone(),
                explained_variance_ratio=pca.explained_variance_ratio[:self.ks[name]].cpu().clone(),
                base_rank=base_ranks[name], converged=bool(self.settled[head][:rank].all()), group=head)
        return EvaEstimate(modules, batches=self.batches, rho=float(rho), tau=float(self.tau))


def eva_config(config: LoraConfig, estimate: EvaEstimate, *, adjust_scaling_factors: bool = True) -> LoraConfig:
    """``config`` with EVA's ranks: ``lorakit.attach(model, eva_config(config, estimate), name)`` creates
    adapters of rank ``r'_l`` (and with ``adjust_scaling_factors``, alpha ``alpha_l = alpha r'_l / r_l``).

    The returned ``rank_pattern`` / ``alpha_pattern`` hold one exact key per module that differs from
    ``rank`` / ``alpha`` (``"^" + re.escape(name)``; they replace the old patterns, which the estimate
    already applied), and modules with ``r'_l = 0`` join ``exclude``. Saved adapters carry these
    patterns, so PEFT and lorakit reload them with the same shapes."""
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    dropped = []
    for name, module in estimate.modules.items():
        if config.rank_for(name) != module.base_rank:
            raise ConfigError(f"the EVA estimate was made with rank {module.base_rank} for module {name!r}, but "
                              f"this config gives it rank {config.rank_for(name)}; pass the config the estimate used")
        if module.rank == 0:
            dropped.append(name)
            continue
        alpha = config.alpha_for(name) * (module.rank / module.base_rank if adjust_scaling_factors else 1)
        key = "^" + re.escape(name)
        if module.rank != config.rank:
            rank_pattern[key] = module.rank
        if alpha != config.alpha:
            alpha_pattern[key] = alpha
    return replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   exclude=_excluding(config.exclude, dropped))


def _excluding(exclude: str | tuple[str, ...] | list[str] | None, names: list[str]):
    """``exclude`` widened by the full module names ``names``, in the same form (regex or names)."""
    if not names:
        return exclude
    if exclude is None:
        return tuple(names)
    if isinstance(exclude, str):
        return "|".join([f"(?:{exclude})", *(re.escape(name) for name in names)])
    return (*exclude, *names)


@torch.no_grad()
def init_eva(model: nn.Module, estimate: EvaEstimate, name: str = "default", *, whiten: bool = False) -> None:
    """Set adapter ``name`` (attached with :func:`eva_config`) to EVA's values: ``A_l`` = the top ``r'_l``
    components of the estimate (whitened: row ``i`` divided by ``sqrt(S_i)``), ``B_l = 0``.

    Everything is checked before anything changes: every module of the adapter must be in the estimate
    with the adapter's rank, and every module the estimate gives a rank must be in the adapter."""
    modules = model_state(model).require(name).modules
    missing = [m for m in modules if m not in estimate.modules]
    if missing:
        raise AdapterError(f"module {missing[0]!r} of adapter {name!r} is missing from the EVA estimate; "
                           "attach with eva_config(config, estimate) for the config the estimate was made with")
    absent = [m for m, entry in estimate.modules.items() if entry.rank > 0 and m not in modules]
    if absent:
        raise AdapterError(f"the EVA estimate gives module {absent[0]!r} rank {estimate.modules[absent[0]].rank}, "
                           f"but adapter {name!r} does not wrap it; attach with eva_config(config, estimate)")
    layers = {m: model.get_submodule(m) for m in modules}
    for module_name, layer in layers.items():
        A, entry = layer.adapters[name].A, estimate.modules[module_name]
        if tuple(A.shape) != tuple(entry.components.shape):
            raise AdapterError(f"adapter {name!r} has A of shape {tuple(A.shape)} on module {module_name!r}, but "
                               f"the EVA estimate has {tuple(entry.components.shape)}; attach with eva_config(...)")
        if name in layer.merged:
            raise StateError(f"adapter {name!r} is merged into module {module_name!r}; unmerge it before init_eva")
    for module_name, layer in layers.items():
        adapter, entry = layer.adapters[name], estimate.modules[module_name]
        rows = entry.components
        if whiten:  # a direction without variance (S = 0) stays a unit row
            S = entry.singular_values
            rows = rows * torch.where(S > 0, S.clamp_min(torch.finfo(S.dtype).tiny).rsqrt(), 1.0)[:, None]
        adapter.A.copy_(rows.to(adapter.A))
        adapter.B.zero_()
