"""Resumable training checkpoints, with no pickle anywhere.

A checkpoint is a directory ``checkpoints/step-N`` written atomically (built beside, then renamed):
``trainable.safetensors`` (every trainable parameter by name), ``optimizer.safetensors`` (the
optimizer's tensor state, keys ``state.<param index>.<name>``), ``rng.safetensors`` (torch's
generator states), ``components.safetensors`` (the training components' ``state_dict``, keys
``<component index>.<name>``, when any component has state) and ``state.json`` (step, data position,
optimizer hyper-parameters and scalars, Python's random state, the training config, the number of ranks).
Restoring all of it makes a resumed run continue exactly as an uninterrupted one would.

A distributed run's checkpoint is rank 0's (the ranks hold the same parameters and optimizer state) with every
rank's torch generator (``torch.rank<r>`` in ``rng.safetensors``), and every rank resumes from it. Resuming with
another number of ranks is refused unless the step keeps the same micro-batches (``grad_accum x ranks``, at the
same ``batch_size``), which then come in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.data.batching import Position
from lorakit.errors import FormatError
from lorakit.io.files import load_json, load_tensors
from lorakit.methods.component import TrainingComponent
from lorakit.models.atomic import build_atomically
from lorakit.parallel.process_group import LONE, Ranks
from lorakit.train.sharding import full_tensor, shaped_like

CHECKPOINTS = "checkpoints"
COMPONENTS_FILE = "components.safetensors"
_PREFIX = "step-"


@dataclass(frozen=True)
class Resumption:
    """Where a checkpointed run stands: optimizer steps done, and the next micro-batch."""

    step: int
    data: Position


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state as whole tensors (sharded ones gathered) and JSON scalars; an entry that is itself a
    dict (bitsandbytes keeps its quantization state so) is stored one level down, as ``key/inner``."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        flat = {f"{key}/{inner}": v for key, value in entries.items() if isinstance(value, dict)
                for inner, v in value.items()}
        flat.update({key: value for key, value in entries.items() if not isinstance(value, dict)})
        for key, value in flat.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = full_tensor(value.detach()).cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's indices

    def put(index: str, name: str, value: Any) -> None:
        entries = state.setdefault(int(index), {})
        outer, nested, inner = name.partition("/")
        if nested:
            entries.setdefault(outer, {})[inner] = value
        else:
            entries[name] = value

    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        parameter = parameters[int(index)]
        put(index, name, shaped_like(value, parameter) if value.shape == parameter.shape else value)
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        put(index, name, value)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(rank_states: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if len(rank_states) > 1:
        tensors.update({f"torch.rank{rank}": state for rank, state in enumerate(rank_states)})
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    return tensors


def save_checkpoint(run_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, where: Resumption,
                    config: Any, keep: int, components: Sequence[TrainingComponent] = (),
                    rank_states: Sequence[torch.Tensor] = ()) -> Path | None:
    """Write the checkpoint for ``where`` under ``run_dir/checkpoints`` and keep the newest ``keep``;
    ``rank_states``: every rank's torch generator state, in a distributed run. With a sharded model every rank
    calls it, to gather the tensors; those that do not write pass ``run_dir=None`` (and get None back)."""
    component_state = {f"{index}.{key}": value.detach().cpu().contiguous()
                       for index, component in enumerate(components) for key, value in component.state_dict().items()}
    trainable = {n: full_tensor(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    optimizer_tensors, optimizer_meta = _optimizer_parts(optimizer)
    if run_dir is None:
        return None
    target = run_dir / CHECKPOINTS / f"{_PREFIX}{where.step}"
    python_state = random.getstate()
    meta = {"step": where.step, "data": dataclasses.asdict(where.data), "optimizer": optimizer_meta,
            "python_random": [python_state[0], list(python_state[1]), python_state[2]],
            "config": dataclasses.asdict(config), "ranks": max(1, len(rank_states))}

    def build(directory: Path) -> None:
        save_file(trainable, str(directory / "trainable.safetensors"))
        save_file(optimizer_tensors, str(directory / "optimizer.safetensors"))
        save_file(_rng_tensors(rank_states), str(directory / "rng.safetensors"))
        if component_state:
            save_file(component_state, str(directory / COMPONENTS_FILE))
        (directory / "state.json").write_text(json.dumps(meta, indent=1))

    build_atomically(target, build)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest checkpoint of the run directory ``path``."""
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FormatError(f"{path}: neither a checkpoint nor a run directory holding checkpoints")
    return found[-1]


# Settings that only say how often to report or save, or how the model is laid out: they may change on resume.
_FREE_ON_RESUME = {"eval_every", "save_every", "keep_checkpoints", "log_every", "fsdp"}


def _check_same_run(saved: dict[str, Any], config: Any, checkpoint: Path, saved_ranks: int, ranks: int) -> None:
    current = dataclasses.asdict(config)
    if saved_ranks != ranks:
        step = saved.get("grad_accum", 1) * saved_ranks
        if current.get("grad_accum", 1) * ranks != step:
            raise FormatError(
                f"{checkpoint}: the run trained on {saved_ranks} rank(s) with grad_accum={saved.get('grad_accum', 1)}, "
                f"{step} micro-batches of {saved.get('batch_size')} per step; on {ranks} rank(s) that global batch "
                + (f"needs grad_accum={step // ranks} (resume with --grad-accum {step // ranks})" if step % ranks == 0
                   else f"is not a whole grad_accum: resume on a number of ranks that divides {step}")
                + "; otherwise the resumed steps would train on other batches than the run's")
        current = {**current, "grad_accum": saved.get("grad_accum", 1)}
    changed = sorted(k for k in current if k not in _FREE_ON_RESUME and saved.get(k) != current[k])
    if changed:
        key = changed[0]
        raise FormatError(f"{checkpoint}: the run was started with {key}={saved.get(key)!r}, not {current[key]!r}; "
                          "a resumed run must keep the settings that shape it"
                          + (f" (also differs: {', '.join(changed[1:])})" if len(changed) > 1 else ""))


def _restore_components(checkpoint: Path, components: Sequence[TrainingComponent]) -> None:
    """Hand each component its saved state (a checkpoint written before components had state has none)."""
    path = checkpoint / COMPONENTS_FILE
    saved = load_tensors(path) if path.is_file() else {}
    for index, component in enumerate(components):
        prefix = f"{index}."
        component.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})


def load_checkpoint(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Any,
                    components: Sequence[TrainingComponent] = (), ranks: Ranks = LONE) -> Resumption:
    """Restore parameters, optimizer, components and random states (this rank's, where the checkpoint has every
    rank's) from ``checkpoint``; return where it stood.

    ``config`` must agree with the run's saved one except in how often it logs, evaluates and saves, and in
    ``grad_accum`` where the number of ranks changed and the global batch did not (module docstring)."""
    meta = load_json(checkpoint / "state.json")
    _check_same_run(meta.get("config", {}), config, checkpoint, meta.get("ranks", 1), ranks.world)
    trainable = load_tensors(checkpoint / "trainable.safetensors")
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(parameters):
        missing = sorted(set(parameters) - set(trainable)) or sorted(set(trainable) - set(parameters))
        raise FormatError(f"{checkpoint}: its trainable parameters do not match the model's (first: {missing[0]!r})")
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.shape != trainable[name].shape:
                raise FormatError(f"{checkpoint}: tensor {name!r} has shape {tuple(trainable[name].shape)}, "
                                  f"the model needs {tuple(parameter.shape)}")
            parameter.copy_(shaped_like(trainable[name], parameter))
    _restore_optimizer(optimizer, load_tensors(checkpoint / "optimizer.safetensors"), meta["optimizer"])
    _restore_components(checkpoint, components)
    rng = load_tensors(checkpoint / "rng.safetensors")
    torch.set_rng_state(rng.get(f"torch.rank{ranks.rank}", rng["torch"]))
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return Resumption(meta["step"], Position(**meta["data"]))
