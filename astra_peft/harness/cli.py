"""`astra`: fine-tune, compare and report, offline. Thin: parses arguments and calls the harness modules.

    astra finetune --model smollm2-135m --task social-iqa --method astra --output runs/one
    astra compare  --model minilm-l6 --tasks mr,nli --methods astra,astra:eigen_selection=largest,lora,dora:lr=2e-4 \
                   --seeds 0,1,2 --output runs/cmp
    astra analyze  runs/one
    astra demo
    astra models | astra tasks | astra methods

Nothing heavy is imported at module level: torch, transformers and PEFT are imported inside the command
functions that need them, so `--help`, `models`, `tasks` and `methods` answer in well under a second
(tests/test_cli_startup.py checks `sys.modules`). Keep it that way when adding a command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import typing
from pathlib import Path

METHOD_HELP = (
    "Method spec METHOD[:KEY=VALUE]..., e.g. astra, astra:eigen_selection=largest, dora:lr=2e-4, "
    "corda:corda_method=kpm. KEY is lr/rank/alpha (this method only), calibration_samples/calibration_data, or "
    "a field of the method's config (see `astra methods`). The spec names the run in tables and plots."
)
# The paper's Appendix F (Tables 7 and 8), as starting points; any flag given explicitly wins. Batches of 128
# are reached by accumulation so that they fit a CPU.
PRESETS = {
    "paper-nlu": dict(rank=8, alpha=16.0, lr=1e-4, batch_size=32, grad_accum=4, max_length=128, epochs=1.0,
                      warmup=0.03, weight_decay=0.0, scheduler="cosine", optim="adamw_torch", dtype="float32"),
    "paper-nlg": dict(rank=128, alpha=128.0, lr=2e-5, batch_size=8, grad_accum=16, max_length=512, epochs=1.0,
                      warmup=0.03, weight_decay=0.0, scheduler="cosine", optim="adamw_torch", dtype="bfloat16"),
}
# FinetuneConfig fields that subcommands set themselves rather than through the shared flags.
_OWN = {"model", "output", "task", "data", "eval_data", "method"}


def _field_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _add_config_flags(parser: argparse.ArgumentParser, skip=()) -> None:
    """One flag per FinetuneConfig field, with the field's help: the dataclass stays the single source of truth."""
    from .run_config import FinetuneConfig  # light: no torch (training.py, which re-exports it, is not)

    hints = typing.get_type_hints(FinetuneConfig)
    group = parser.add_argument_group("training")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="The paper's hyperparameters (Appendix F: NLU Table 7, NLG Table 8); flags override.")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in _OWN or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                               help=f"Do not: {help_text[0].lower()}{help_text[1:]}")
            continue
        if f.name == "target_modules":
            group.add_argument(flag, type=lambda s: [m for m in s.split(",") if m], default=None,
                               help=help_text + " Comma-separated.")
            continue
        group.add_argument(flag, type=kind if kind in (int, float) else str, default=None,
                           help=f"{help_text} (default: {f.default})")


def _add_data_flags(parser: argparse.ArgumentParser, many_tasks: bool = False) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", required=True, help="Built-in model (see `astra models`) or a local directory.")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="Built-in task (see `astra tasks`) or a .jsonl path.")
    if many_tasks:
        which.add_argument("--tasks", help="Several tasks, comma-separated: one table column each.")
    which.add_argument("--data", help="A task as JSONL rows {text,label} or {prompt,completion[,choices,answer]}.")
    group.add_argument("--eval-data", help="With --data: a JSONL test split (else dev and test are carved from it).")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--threads and --no-progress for the commands that do not take the training flags (which include both)."""
    from .run_config import FinetuneConfig

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(FinetuneConfig)}
    parser.add_argument("--threads", type=int, help=helps["threads"])
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Do not show progress bars.")


def _add_astra_flags(parser: argparse.ArgumentParser) -> None:
    # Choices and help come from AstraConfig's Literal aliases (astra_peft/config.py, no torch): written once.
    from ..config import EIGEN_SELECTIONS, STATISTICS, AstraConfig

    def one_of(name: str, choices) -> str:
        default = AstraConfig.__dataclass_fields__[name].default
        return ", ".join(f"{c} (default)" if c == default else c for c in choices)

    group = parser.add_argument_group("method options (shorthands for spec keys; a spec's own keys win)")
    group.add_argument("--eigen-selection", choices=EIGEN_SELECTIONS, metavar="SELECTION",
                       help="Astra: " + one_of("eigen_selection", EIGEN_SELECTIONS) + ".")
    group.add_argument("--statistic", choices=STATISTICS, metavar="STATISTIC",
                       help="Astra: " + one_of("statistic", STATISTICS) + ".")
    group.add_argument("--corda-method", choices=["ipm", "kpm"], help="CorDA: ipm (default) or kpm.")


def _config(args, **own):
    from .run_config import FinetuneConfig

    values = dict(PRESETS.get(getattr(args, "preset", None), {}))
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
                   if f.name not in _OWN and getattr(args, f.name, None) is not None})
    return FinetuneConfig(**{**values, **own})


def _with_shorthands(spec, args):
    return spec.with_defaults(eigen_selection=getattr(args, "eigen_selection", None),
                              statistic=getattr(args, "statistic", None),
                              corda_method=getattr(args, "corda_method", None))


def _start(args, command: str) -> int:
    """The start of every command that computes: quiet the libraries, then choose the thread count (--threads,
    else $OMP_NUM_THREADS, else the cores not busy), apply it to torch and to child processes, and print it: on
    a busy CPU a run's speed depends on it more than on anything else. Returns the thread count."""
    from .quiet import quiet_libraries
    from .threads import apply_threads, choose_threads

    quiet_libraries(getattr(args, "progress", True))
    choice = choose_threads(getattr(args, "threads", None))
    apply_threads(choice.threads)
    print(f"astra {command}: {choice.describe()}", flush=True)
    return choice.threads


# Order in which a run's phases happen; "initialization" is writing the initial adapter, calibration excluded.
PHASES = ("calibration", "initialization", "training", "evaluation")


def _time_lines(seconds: dict, cpu_seconds: float | None = None) -> list[str]:
    shown = [f"{k} {seconds[k]:.1f}s" for k in PHASES if k in seconds]
    shown += [f"{k} {v:.1f}s" for k, v in seconds.items() if k not in PHASES]
    lines = ["  wall time: " + ", ".join(shown) + "  (initialization excludes calibration)"]
    if cpu_seconds is not None:
        lines.append(f"  CPU time of this process: {cpu_seconds:.1f}s")
    return lines


# ------------------------------------------------------------------------------------------- commands


def cmd_finetune(args) -> int:
    from .specs import parse_method_spec
    from .training import run_finetune

    threads = _start(args, "finetune")
    spec = _with_shorthands(parse_method_spec(args.method), args)
    cfg = _config(args, model=args.model, task=args.task, data=args.data, eval_data=args.eval_data,
                  method=spec, output=args.output, threads=threads)
    cpu_start = time.process_time()
    summary = run_finetune(cfg, force=args.force)
    print(f"\nrun: {cfg.output}")
    for split, metrics in summary["final"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")
        size = f" ({metrics['n']} rows)" if "n" in metrics else ""
        print(f"  {split}{size}: {shown}")
    print(f"  trainable parameters: {summary['trainable_parameters']:,}")
    if summary.get("forgetting") is not None:  # --forgetting-data (harness/forgetting.py), as compare's table has it
        print(f"  forgetting ({summary['forgetting_texts']} held-out {summary['forgetting_data']} texts, "
              f"{summary['forgetting_tokens']:,} tokens): loss before {summary['forget_loss_before']:.4f}, after "
              f"{summary['forget_loss_after']:.4f}, forgetting (after − before) {summary['forgetting']:+.4f}")
    degenerate = (summary.get("init_report") or {}).get("degenerate_layers")
    if degenerate is not None:
        print(f"  degenerate layers (too few distinct directions; see the run's init report): {len(degenerate)}")
    for line in _time_lines(summary["seconds"], time.process_time() - cpu_start):
        print(line)
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare
    from .specs import parse_method_list

    threads = _start(args, "compare")
    specs = [_with_shorthands(s, args) for s in parse_method_list(args.methods)]
    from .validation import parse_seeds

    seeds = parse_seeds(args.seeds)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    cfg = _config(args, model=args.model, task=args.task or (tasks[0] if tasks else None), data=args.data,
                  eval_data=args.eval_data, method=specs[0], output=args.output, threads=threads)
    n_runs = len(specs) * len(seeds) * (len(tasks) if tasks else 1)
    def count(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    print(f"astra compare: {count(n_runs, 'run')} ({count(len(specs), 'method')} × {count(len(seeds), 'seed')}"
          + (f" × {count(len(tasks), 'task')}" if tasks else "") + f") of {cfg.model} → {args.output}; "
          "finished runs are skipped, and an ETA follows each run.", flush=True)
    paths = run_compare(cfg, specs, seeds, tasks=tasks, output=args.output)
    print("\n" + Path(paths["summary_md"]).read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_analyze(args) -> int:
    import json

    from .run_analysis import analyze_run
    from .report import effective_rank_table, write_effective_rank
    from .rundir import AnalysisDir, RunDir

    _start(args, "analyze")
    from .validation import check_count

    check_count("--samples", args.samples)  # before the analysis folder is claimed: a refusal writes nothing
    out = AnalysisDir(args.output or RunDir(args.run).file(RunDir.ANALYSIS))
    out.check_writable()  # a file, or report files astra did not make there: refused before the work
    out.check_report_files()
    before, after = analyze_run(args.run, split=args.split, samples=args.samples, progress=args.progress)
    rows = effective_rank_table(before, after)
    # Title with what was analysed (model, task, method), not the run's path; the row count is what the
    # effective ranks were measured on, which may be fewer than --samples on a small split.
    title = "Effective rank"
    config_path = RunDir(args.run).file(RunDir.CONFIG)
    if config_path.is_file():
        run_cfg = json.loads(config_path.read_text())
        what = [str(run_cfg.get(k)) for k in ("model", "task_name", "method") if run_cfg.get(k)]
        title += ": " + " · ".join(Path(w).name if "/" in w else w for w in what)
    n_rows = None
    if config_path.is_file():
        size = run_cfg.get("splits", {}).get(args.split, {}).get("size")
        n_rows = min(args.samples, size) if isinstance(size, int) else None
    if n_rows is not None:
        title += f" ({n_rows} {args.split} rows)"
        print(f"astra analyze: effective rank measured on {n_rows} rows of the {args.split} split")
    out.claim_folder()  # made (or marked) only now that there is something to write
    out.check_report_files()
    paths = write_effective_rank(rows, out.path, title=title)
    out.record_report_files()
    print(Path(paths["md"]).read_text())
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_demo(args) -> int:
    from .compare import DEMO, demo_config, demo_estimate, run_compare

    import dataclasses

    from .models import BUILTIN_MODELS, cache_dir

    start, cpu_start = time.perf_counter(), time.process_time()
    threads = _start(args, "demo")
    cfg, methods, seeds = demo_config(args.output, max_steps=args.max_steps, task=args.task)
    cfg = dataclasses.replace(cfg, threads=threads, progress=args.progress)
    methods = args.methods or methods
    n_methods = len([m for m in methods.split(",") if m.strip()])
    cached = (cache_dir() / "models" / BUILTIN_MODELS[DEMO["model"]].name / "config.json").is_file()
    print(f"astra demo: {DEMO['model']} on {cfg.task}, methods {methods}, {cfg.max_steps} steps each, adapting "
          f"{','.join(cfg.target_modules) if cfg.target_modules else 'every linear layer of the blocks'} → {args.output}")
    fetch = "" if cached else f"fetch and convert {DEMO['model']} into {cache_dir()} (once), "
    print(f"astra demo: plan: {fetch}{n_methods * len(seeds)} runs of {cfg.max_steps} steps, then one evaluation "
          f"each. {demo_estimate()}", flush=True)
    paths = run_compare(cfg, methods, seeds, output=args.output)
    print("\n" + Path(paths["summary_md"]).read_text())
    print(f"plots: {paths['loss_png']}  {paths['grad_norm_png']}")
    print(f"table: {paths['summary_md']}  {paths['summary_csv']}")
    print(f"demo wall time: {time.perf_counter() - start:.0f}s, CPU time of this process: "
          f"{time.process_time() - cpu_start:.0f}s")
    return 0


def cmd_models(args) -> int:
    from .models import BUILTIN_MODELS, cache_dir

    for spec in BUILTIN_MODELS.values():
        cached = (cache_dir() / "models" / spec.name / "config.json").is_file()
        print(f"{spec.name:<14} {spec.kind:<10} {'cached ' if cached else 'fetch  '} {spec.description}")
    print(f"\ncache: {cache_dir()} (set ASTRA_PEFT_CACHE to move it). Any local model directory works too.")
    return 0


def cmd_tasks(args) -> int:
    from .tasks import BUILTIN_CORPORA, BUILTIN_TASKS

    for spec in BUILTIN_TASKS.values():
        print(f"{spec.name:<14} {spec.kind:<15} {spec.description}")
    for name, description in BUILTIN_CORPORA.items():
        print(f"{name:<14} {'text corpus':<15} {description}")
    print("\nOr --data FILE.jsonl with rows {text,label} or {prompt,completion[,choices,answer]}.")
    return 0


def cmd_methods(args) -> int:
    from .method_catalog import CATALOG  # the registry's listing without importing torch/PEFT; tested equal

    for method in CATALOG:
        data = {"activations": "data", "gradients": "data+grad"}.get(method.data, "")
        print(f"{method.name:<8} {data:<10} {method.help}")
        print(f"{'':<19} options: {', '.join(method.options())}")
    return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astra", description="Fine-tune, compare and report on Astra and LoRA baselines, offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("finetune", help="Fine-tune one model with one method; writes a run directory.")
    _add_data_flags(p)
    p.add_argument("--method", default="astra", help=METHOD_HELP)
    _add_astra_flags(p)
    p.add_argument("--output", required=True, help="Run directory.")
    p.add_argument("--restart", "--force", dest="force", action="store_true",
                   help="Start the run afresh, even if it is finished or was made with other settings. Removes only "
                        "the files astra made in --output; a folder astra did not make is never touched.")
    _add_config_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="Many methods × seeds (× tasks) in one directory, with table and plots.")
    _add_data_flags(p, many_tasks=True)
    p.add_argument("--methods", required=True, help="Comma-separated method specs. " + METHOD_HELP)
    p.add_argument("--seeds", default="0", help="Comma-separated seeds (default: 0).")
    _add_astra_flags(p)
    p.add_argument("--output", required=True, help="Comparison directory; finished runs in it are skipped.")
    _add_config_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("analyze", help="Effective rank (Eq. 9) of each layer type before/after fine-tuning.")
    p.add_argument("run", help="A finished run directory.")
    p.add_argument("--split", default="dev", help="Split whose rows are fed through the model (default: dev).")
    p.add_argument("--samples", type=int, default=64, help="Rows to use (default: 64).")
    p.add_argument("--output", help="Where to write the table and chart (default: RUN/analysis).")
    _add_run_flags(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="SmolLM2-135M: astra vs lora vs pissa, briefly; prints the table and plots.")
    p.add_argument("--output", default="runs/demo", help="Comparison directory (default: runs/demo).")
    p.add_argument("--max-steps", type=int, help="Training steps per method.")
    p.add_argument("--methods", help="Override the methods (comma-separated specs).")
    p.add_argument("--task", help="Override the task.")
    _add_run_flags(p)
    p.set_defaults(func=cmd_demo)

    for name, func, text in (("models", cmd_models, "List built-in models."),
                             ("tasks", cmd_tasks, "List built-in tasks and calibration corpora."),
                             ("methods", cmd_methods, "List methods and their spec options.")):
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .quiet import prepare_output  # light; must run before anything imports tqdm or transformers

    prepare_output(getattr(args, "progress", True))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nastra: interrupted. Finished runs are kept; the interrupted one resumes from its last checkpoint "
              "when you run the same command again.", file=sys.stderr)
        return 130
    except Exception as err:  # one of two answers: a one-line `astra: error:` (exit 2), or a bug said to be one
        from .validation import describe_error

        if os.environ.get("ASTRA_DEBUG"):
            raise
        code, message = describe_error(err)
        if code != 2:
            import traceback

            traceback.print_exc()
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
