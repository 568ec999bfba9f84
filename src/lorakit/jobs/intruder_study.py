"""``lorakit demo intruders``: the intruder-dimension study of Shuttleworth et al. (2024) on our model.

On one built-in task, train full fine-tuning and LoRA at several ranks (α = 2r, as in the paper's
code; rsLoRA with scale α/√r), each at its own learning rate, to comparable held-out accuracy. For
every run: intruder dimensions over a sweep of ε (:func:`lorakit.analysis.analyze`), held-out exact
match, and forgetting, the change of loss against the base model on other built-in tasks and on plain
English (:mod:`lorakit.analysis.plain_text`). Then every LoRA run's intruders are scaled by λ
(:func:`lorakit.analysis.mitigate_intruders`) and the same is measured again. Stages resume
(:func:`lorakit.jobs.stages.run_stage`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lorakit.analysis.analyze import IntruderSettings, analyze
from lorakit.analysis.curves import line_plot
from lorakit.analysis.mitigation import MITIGATION_LAMBDA, mitigate_intruders
from lorakit.analysis.plain_text import plain_text_examples
from lorakit.analysis.report_files import write_report
from lorakit.config import LoraConfig, TrainConfig
from lorakit.data.encoding import encode, pad_id
from lorakit.data.tasks import get_task
from lorakit.eval.exact_match import evaluate
from lorakit.eval.loss import mean_loss
from lorakit.io.files import save_json
from lorakit.jobs.stages import run_stage
from lorakit.models import DEFAULT_MODEL, load_model


@dataclass(frozen=True)
class StudyRun:
    """One fine-tuning run: LoRA of ``rank`` (α = 2·rank, rsLoRA optional), or full (``rank=None``),
    for the study's steps unless ``steps`` says otherwise."""

    name: str
    lr: float
    rank: int | None = None
    rslora: bool = False
    steps: int | None = None


RUNS = (StudyRun("full", 2e-5), StudyRun("lora-r1", 1e-3, 1), StudyRun("lora-r8", 1e-3, 8),
        StudyRun("lora-r64", 5e-4, 64), StudyRun("rslora-r64", 1e-4, 64, rslora=True),
        StudyRun("lora-r8-long", 1e-3, 8, steps=160))
SWEEP = IntruderSettings(epsilons=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99))


@dataclass(frozen=True)
class IntruderStudy:
    """The study's settings (the defaults are the reported run's)."""

    task: str = "date"
    steps: int = 40
    runs: tuple[StudyRun, ...] = RUNS
    test_n: int = 50
    forgetting_tasks: tuple[str, ...] = ("caps", "units", "add")
    forgetting_n: int = 64
    mitigation: float = MITIGATION_LAMBDA
    mitigation_epsilon: float = 0.99
    """ε of the mitigation: at the paper's 0.5 no run of this size has an intruder to scale."""
    intruders: IntruderSettings = SWEEP


def _train(run: StudyRun, out: Path, study: IntruderStudy, base: str) -> dict:
    from lorakit.jobs.finetune import finetune
    lora = LoraConfig() if run.rank is None else LoraConfig(rank=run.rank, alpha=2 * run.rank,
                                                            targets="all-linear", use_rslora=run.rslora)
    steps = run.steps or study.steps
    config = TrainConfig(steps=steps, batch_size=8, lr=run.lr, log_every=10, full=run.rank is None,
                         keep_freed_memory=True)
    return finetune(f"task:{study.task}", out, base=base, lora=lora, config=config, n=steps * 8,
                    overwrite=True).summary()


def _analysis(path: Path, out: Path, base_model, study: IntruderStudy) -> dict:
    report = analyze(path, base=base_model, intruders=study.intruders)
    write_report(report, out)
    return {"intruders": report["totals"]["intruders"], "norm": report["totals"]["norm"],
            "intruders_by_epsilon": report["totals"]["intruders_by_epsilon"],
            "mean_effective_rank": report["totals"]["mean_effective_rank"],
            "lowest_cosine": min(min(m["max_cosines"]) for m in report["modules"])}


def _load(base: str, path: Path | None):
    from lorakit.jobs.evaluate import model_with_adapter
    if path is not None and (path / "config.json").is_file():  # a full fine-tune
        return load_model(path)
    return model_with_adapter(base, path)


def _measure(base: str, path: Path | None, study: IntruderStudy) -> dict:
    """Held-out exact match on the task; mean loss on the forgetting tasks and on plain text."""
    model, tokenizer = _load(base, path)
    scored = evaluate(model, tokenizer, get_task(study.task).examples("test", study.test_n), progress=True)

    def loss(examples, chat: bool | None = None) -> float:
        encoded = [encode(e, tokenizer, chat=chat, max_length=512) for e in examples]
        return mean_loss(model, encoded, batch_size=16, pad_id=pad_id(tokenizer))

    losses = {task: loss(get_task(task).examples("test", study.forgetting_n)) for task in study.forgetting_tasks}
    return {"exact_match": scored.exact_match, "task_loss": scored.loss,
            "losses": {**losses, "plain text": loss(plain_text_examples(), chat=False)}}


def run_intruder_study(out: str | Path, *, study: IntruderStudy = IntruderStudy(), base: str = DEFAULT_MODEL,
                       report: Callable[[str], Any] = print) -> dict:
    """Run (or resume) the study under ``out``; writes ``results.json``, ``report.md`` and
    ``intruders_vs_epsilon.png`` there and returns the results."""
    out = Path(out)
    base_model = load_model(base)[0]
    base_scores = run_stage(out / "scores" / "base", lambda: _measure(base, None, study), report)
    rows = [{"run": "base", "measured": base_scores}]
    for run in study.runs:
        report(f"{run.name}: train, analyse, measure")
        trained = run_stage(out / run.name, lambda run=run: _train(run, out / run.name, study, base), report)
        variants = [(run.name, out / run.name)]
        if run.rank is not None:
            mitigated = out / f"{run.name}-mitigated"
            run_stage(mitigated, lambda run=run, mitigated=mitigated: mitigate_intruders(
                out / run.name, mitigated, base=base_model, scale=study.mitigation, overwrite=True,
                intruders=replace(study.intruders, epsilon=study.mitigation_epsilon)).summary(), report)
            variants.append((f"{run.name}-mitigated", mitigated))
        for name, path in variants:
            rows.append({"run": name, "of": asdict(run), "train_loss": trained["train_loss"],
                         "analysis": run_stage(out / "analysis" / name,
                                               lambda path=path, name=name: _analysis(path, out / "analysis" / name,
                                                                                      base_model, study), report),
                         "measured": run_stage(out / "scores" / name, lambda path=path: _measure(base, path, study),
                                               report)})
    results = {"study": asdict(study), "base": base, "rows": rows}
    save_json(out / "results.json", results)
    (out / "report.md").write_text(study_table(results))
    line_plot({row["run"]: [e["intruders"] for e in row["analysis"]["intruders_by_epsilon"]] for row in rows[1:]},
              title=f"intruder dimensions (top {study.intruders.top_k} per matrix) after {study.task}",
              path=out / "intruders_vs_epsilon.png", xlabel="ε", ylabel="intruders, all linear layers",
              x=list(study.intruders.epsilons))
    report(study_table(results))
    return results


def study_table(results: dict) -> str:
    """A markdown table: one row per run, accuracy, intruders and forgetting (the change of each probe's
    loss against the base model; the base row holds the base model's own losses)."""
    rows = results["rows"]
    base = rows[0]["measured"]
    probes = list(base["losses"])
    epsilon = results["study"]["intruders"]["epsilon"]
    lines = [f"| run | lr | steps | held-out EM | intruders (ε = {epsilon:g}) | lowest max-cos | ‖ΔW‖_F | " +
             " | ".join(f"Δ loss `{p}`" for p in probes) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(probes)]
    for row in rows:
        measured = row["measured"]
        analysis = row.get("analysis")
        lr = f"{row['of']['lr']:g}" if "of" in row else "–"
        steps = str(row["of"]["steps"] or results["study"]["steps"]) if "of" in row else "–"
        intruders = str(analysis["intruders"]) if analysis else "–"
        norm = f"{analysis['norm']:.2f}" if analysis else "–"
        lowest = f"{analysis['lowest_cosine']:.3f}" if analysis else "–"
        values = [measured["losses"][p] - (0.0 if row["run"] == "base" else base["losses"][p]) for p in probes]
        deltas = [f"{v:.3f}" if row["run"] == "base" else f"{v:+.3f}" for v in values]
        lines.append(f"| {row['run']} | {lr} | {steps} | {measured['exact_match']:.0%} | {intruders} | {lowest} "
                     f"| {norm} | " + " | ".join(deltas) + " |")
    return "\n".join(lines) + "\n"
