"""What Astra's default initialises on every built-in model (issue 15 §4): per layer type, the eigenvalues of the
output covariance that are numerically degenerate, the fraction of the r selected directions that are degenerate
under each `eigen_selection`, and, for the default (`smallest`, `null_space="keep"`), how many layers get an
all-degenerate selection and how large A = QᵀW starts next to the `largest` selection's A.

    OMP_NUM_THREADS=1 python study/spectrum_report.py   # writes study/spectrum_report.txt and .json

Each model is calibrated as the study's Astra runs calibrate it (harness defaults: 64 training rows of the task
drawn with seed 0, 8 sequences a batch, the study's max_length; the covariance, the library's float64 tolerance):
SmolLM2-135M on `strategyqa` (the task of every NLG ablation, `ablation-null-space` included) with the NLG settings,
MiniLM-L6 on `mr` with the NLU settings, each with all six selections; then, with `smallest` and `largest` only,
on each of the study's other tasks of that model. Every selection initialises a fresh PeftModel of the same base
from one calibration's statistics (`initialize_astra_weights(stats=...)`); A is read from the adapter written.
3–6 minutes on one core.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_study import ABLATION_TASK, NLG, NLG_TASKS, NLU, NLU_TASKS  # noqa: E402  (the study's own settings, not copies)

from astra_peft import AstraConfig, collect_activation_stats, initialize_astra_weights  # noqa: E402
from astra_peft.layers import lora_layers  # noqa: E402
from astra_peft.spectrum import select_eigenvectors  # noqa: E402

SELECTIONS = ["smallest", "lower_quartile", "middle", "upper_quartile", "largest", "random"]
# (model settings, calibration task): the study's NLG ablation task, and the NLU task it tuned and measured on
MODELS = {"smollm2-135m": (NLG, ABLATION_TASK), "minilm-l6": (NLU, "mr")}
# The study's other tasks, calibrated too (the degenerate count of q/o depends on the text), `smallest` and
# `largest` only: what the default initialises there.
OTHER_TASKS = {"smollm2-135m": [t for t in NLG_TASKS if t != ABLATION_TASK],
               "minilm-l6": [t for t in NLU_TASKS if t != "mr"]}
STUDY_FOLDERS = {"smollm2-135m": "nlg-main", "minilm-l6": "nlu-main"}  # where the study's Astra runs are packed
SEED = 0  # the study's seed 0: which training rows calibrate, and `random`'s draw


def layer_type(name: str) -> str:
    """The name inside the block: model.layers.3.self_attn.q_proj → self_attn.q_proj."""
    return re.sub(r"^.*?\.\d+\.", "", name)


def calibrate(model_name: str, settings: dict, task_name: str):
    """The base model, its LoraConfig and its statistics, calibrated as `astra_peft.harness.training` does."""
    from transformers import set_seed

    from astra_peft.harness.encoding import Collator, encode_row, pad_id
    from astra_peft.harness.methods import BuildContext, lora_config
    from astra_peft.harness.models import default_target_modules, load_model
    from astra_peft.harness.tasks import load_task
    from astra_peft.harness.training import _batched, _sample

    task = load_task(task_name)
    set_seed(SEED)
    num_labels = len(task.labels) if task.kind == "classification" else None
    model, tok = load_model(model_name, task_kind=task.kind, num_labels=num_labels)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id(tok)
    # The harness samples the encoded training rows; sampling the rows first picks the same ones.
    rows = _sample(list(task.splits["train"]), 64, SEED)
    features = [encode_row(tok, r, task.kind, settings["max_length"]) for r in rows]
    batches = _batched(features, 8, Collator(pad_id(tok), with_labels=False), "cpu", None, False)
    ctx = BuildContext(model=model, task_kind=task.kind, target_modules=default_target_modules(model),
                       rank=settings["rank"], alpha=settings["alpha"], seed=SEED)
    lcfg = lora_config(ctx)
    stats = collect_activation_stats(model, batches(), lcfg, AstraConfig(show_progress=False))
    tokens = sum(len(f["input_ids"]) for f in features)
    return model, lcfg, stats, tokens


def initialise(base, lcfg, stats, **astra) -> dict:
    """Per layer: the Selection and ‖A‖_F of a fresh PeftModel of `base` initialised with AstraConfig(**astra)."""
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(lcfg))
    report = initialize_astra_weights(peft_model, astra_config=AstraConfig(seed=SEED, show_progress=False, **astra),
                                      stats=stats)
    layers = lora_layers(peft_model, "default")
    out = {l.name: (l.selection, float(layers[l.name].lora_A["default"].weight.detach().double().norm())) for l in report.layers}
    del peft_model
    return out


def float32_sized_degenerate(base, stats, name: str, r: int) -> int:
    """Eigenvalues at or below d·eps(float32)·λ_max: what a float32-sized tolerance would call zero."""
    layer = dict(base.named_modules())[name]
    w, b = layer.weight, layer.bias
    statistic = (stats.output_factors(name, "covariance", w, b) if stats.factored(name)
                 else stats.output_statistic(name, "covariance", w, b))
    rtol = layer.out_features * torch.finfo(torch.float32).eps
    return select_eigenvectors(statistic, r, AstraConfig(null_space_rtol=rtol, eigen_selection="largest"), name)[1].n_degenerate


def measure(model_name: str, task: str | None = None, selections=tuple(SELECTIONS)) -> dict:
    settings, default_task = MODELS[model_name]
    task = task or default_task
    base, lcfg, stats, tokens = calibrate(model_name, settings, task)
    r = settings["rank"]
    runs = {sel: initialise(base, lcfg, stats, eigen_selection=sel) for sel in selections}
    runs["smallest+exclude"] = initialise(base, lcfg, stats, eigen_selection="smallest", null_space="exclude")
    modules = dict(base.named_modules())
    layers = []
    for name, (sel, _) in runs["smallest"].items():
        layer = modules[name]
        layers.append({
            "name": name, "type": layer_type(name), "d_out": layer.out_features, "d_in": layer.in_features,
            "n_degenerate": sel.n_degenerate, "threshold": sel.threshold,
            "n_degenerate_float32_tol": float32_sized_degenerate(base, stats, name, r),
            "w_norm": float(layer.weight.double().norm()),
            "selected_degenerate": {k: v[name][0].n_selected_degenerate for k, v in runs.items()},
            "a_norm": {k: v[name][1] for k, v in runs.items()},
        })
    return {"model": model_name, "task": task, "rank": r, "alpha": settings["alpha"],
            "max_length": settings["max_length"], "calibration_rows": 64, "calibration_tokens": tokens,
            "selections": list(selections), "layers": layers}


def study_run_check(result: dict) -> str:
    """Compare with what the study's own default Astra run (seed 0, same model and task) recorded at its
    initialisation: the layers where `smallest` selected degenerate directions, and how many."""
    import pack_runs

    mine = {l["name"]: l["selected_degenerate"]["smallest"] for l in result["layers"]
            if l["selected_degenerate"]["smallest"]}
    folder = STUDY_FOLDERS[result["model"]]
    for run in pack_runs.collect_runs(folder):
        options = [p for p in run["method"].split(":")[1:] if not p.startswith("lr=")]
        if (run["base_method"], run["model"], run["task"], run["seed"], options) != (
                "astra", result["model"], result["task"], SEED, []):
            continue
        theirs = run["init_report"]["degenerate_layers"]
        said = (f"The study's own `{run['method']}` run (`{folder}`, seed {SEED}) recorded {sum(theirs.values())} "
                f"degenerate directions in {len(theirs)} layers at its initialisation: ")
        if theirs == mine:
            return said + "the same layers and counts as here."
        differ = sorted(set(theirs) | set(mine), key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")])
        return said + "; ".join(f"{n} {theirs.get(n, 0)} there, {mine.get(n, 0)} here"
                                for n in differ if theirs.get(n, 0) != mine.get(n, 0)) + "."
    return f"No default Astra run of the study at seed {SEED} on `{result['task']}` in `{folder}` to compare with."


def _span(values) -> str:
    return f"{min(values)}–{max(values)}" if min(values) != max(values) else f"{min(values)}"


def _median_ratio(group, sel) -> str:
    return f"{statistics.median(l['a_norm'][sel] / l['a_norm']['largest'] for l in group):.2e}"


def tables(result: dict) -> list[str]:
    r, selections = result["rank"], result["selections"]
    groups: dict[str, list] = {}
    for l in result["layers"]:
        groups.setdefault(l["type"], []).append(l)
    groups["all"] = result["layers"]
    out = [f"## {result['model']}: {len(result['layers'])} layers, r = {r}, calibration {result['calibration_rows']} "
           f"`{result['task']}` training rows (seed {SEED}, max_length {result['max_length']}, "
           f"{result['calibration_tokens']} tokens), covariance",
           "",
           "Degenerate eigenvalues per layer (min–max over the blocks; tolerance d·eps(float64)·λ_max, the library's, "
           "and d·eps(float32)·λ_max for comparison), and the fraction of the selected directions (r per layer, "
           "all blocks) that are degenerate, under each `eigen_selection` (`null_space=\"keep\"`):",
           "",
           "| layer type | layers | d_out | d_in | degenerate | at float32 tol | "
           + " | ".join(selections) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(selections)]
    for kind, group in groups.items():
        d_out = _span([l["d_out"] for l in group])
        d_in = _span([l["d_in"] for l in group])
        fractions = [sum(l["selected_degenerate"][s] for l in group) / (r * len(group)) for s in selections]
        out.append(f"| {kind} | {len(group)} | {d_out} | {d_in} | {_span([l['n_degenerate'] for l in group])} | "
                   f"{_span([l['n_degenerate_float32_tol'] for l in group])} | "
                   + " | ".join(f"{f:.3f}" for f in fractions) + " |")
    chosen = sum(l["selected_degenerate"]["smallest"] for l in result["layers"])
    out += ["",
            f"The default (`smallest`) selects {chosen} degenerate directions of {r * len(result['layers'])}. Per layer "
            "type: the layers whose r selected directions are all / partly degenerate, and ‖A‖_F relative to the "
            "`largest` selection's ‖A‖_F (A = QᵀW as written to lora_A; median over the layers, and the largest "
            "ratio) with `null_space=\"keep\"` (the default), the median with `\"exclude\"`, and the `largest` "
            "selection's ‖A‖_F / ‖W‖_F (median):",
            "",
            "| layer type | all r degenerate | some degenerate | ‖A‖ / ‖A_largest‖ keep | keep, max "
            "| ‖A‖ / ‖A_largest‖ exclude | ‖A_largest‖ / ‖W‖ |",
            "|---|---|---|---|---|---|---|"]
    for kind, group in groups.items():
        full = sum(l["selected_degenerate"]["smallest"] == r for l in group)
        part = sum(0 < l["selected_degenerate"]["smallest"] < r for l in group)
        top = statistics.median(l["a_norm"]["largest"] / l["w_norm"] for l in group)
        worst = max(l["a_norm"]["smallest"] / l["a_norm"]["largest"] for l in group)
        out.append(f"| {kind} | {full} of {len(group)} | {part} of {len(group)} | {_median_ratio(group, 'smallest')} | "
                   f"{worst:.2e} | {_median_ratio(group, 'smallest+exclude')} | {top:.3f} |")
    # Degenerate need not mean A = 0: only W's left null space (d_out > d_in) gives QᵀW = 0. A direction the
    # calibration's inputs never vary along has zero output variance while W still maps the inputs' mean into it.
    odd = [l for l in result["layers"] if l["selected_degenerate"]["smallest"] == r and l["d_out"] <= l["d_in"]]
    if odd:
        out += ["", "All r selected directions degenerate in a layer with d_out ≤ d_in (no structural zeros): "
                + "; ".join(f"{l['name']} ({l['n_degenerate']} degenerate eigenvalues, ‖A‖ / ‖A_largest‖ "
                            f"{l['a_norm']['smallest'] / l['a_norm']['largest']:.2e})" for l in odd) + "."]
    wide = [l for l in result["layers"] if l["d_out"] > l["d_in"]]
    if wide:
        def ratio(l):
            return l["a_norm"]["smallest"] / l["a_norm"]["largest"]

        exact = [ratio(l) for l in wide if l["n_degenerate"] == l["d_out"] - l["d_in"]]
        more = [ratio(l) for l in wide if l["n_degenerate"] > l["d_out"] - l["d_in"]]
        line = (f"Layers with d_out > d_in: {len(exact)} of {len(wide)} have exactly d_out − d_in degenerate "
                f"eigenvalues (W's left null space)" + (f", ‖A‖ / ‖A_largest‖ at most {max(exact):.2e}" if exact else ""))
        if more:
            span = f"{min(more):.2e}–{max(more):.2e}" if len(more) > 1 else f"{more[0]:.2e}"
            line += (f"; {len(more)} {'has' if len(more) == 1 else 'have'} more (a direction degenerate through the "
                     f"data as well), ‖A‖ / ‖A_largest‖ {span}")
        out += ["", line + "."]
    return out + ["", study_run_check(result)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "spectrum_report"), help="writes OUT.txt and OUT.json")
    args = parser.parse_args()
    from astra_peft.harness.models import BUILTIN_MODELS

    if set(MODELS) != set(BUILTIN_MODELS):  # a new built-in model needs its study settings here, not a silent skip
        raise SystemExit(f"MODELS covers {sorted(MODELS)}, the built-in models are {sorted(BUILTIN_MODELS)}")
    torch.set_num_threads(1)  # one summation order: the counts near the tolerance do not move between machines' threads
    results = [measure(name) for name in MODELS]
    results += [measure(name, task, ("smallest", "largest")) for name, tasks in OTHER_TASKS.items() for task in tasks]
    lines = []
    for result in results:
        lines += tables(result) + [""]
    text = "\n".join(lines).rstrip() + "\n"
    print(text, end="")
    Path(args.out + ".txt").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
