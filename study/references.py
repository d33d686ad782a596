"""Reference rows for the study's tables: what a model scores without any fine-tuning.

    python study/references.py        # writes study/runs/references.json (make_results.py tables it)

NLU (a new classifier head has no zero-shot meaning): the accuracy of always answering the test split's most
frequent label. NLG: SmolLM2-135M-Instruct as loaded, scored exactly like the fine-tuned runs (the same test
rows, the same choice scoring, the same held-out loss on the gold completion).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run_study  # noqa: E402

OUT = HERE / "runs" / "references.json"


def main():
    from astra_peft.harness.evaluation import evaluate
    from astra_peft.harness.models import load_model
    from astra_peft.harness.tasks import load_task

    out = {"majority": {}, "zero_shot": {}}
    for name in run_study.NLU_TASKS:
        rows = load_task(name).splits["test"][: run_study.NLU["eval_samples"]]
        label, count = Counter(r["label"] for r in rows).most_common(1)[0]
        out["majority"][name] = {"accuracy": count / len(rows), "label": label, "n": len(rows)}
    model, tokenizer = load_model(run_study.NLG["model"], task_kind="generation")
    for name in run_study.NLG_TASKS:
        out["zero_shot"][name] = evaluate(model, tokenizer, load_task(name), "test",
                                          max_length=run_study.NLG["max_length"],
                                          max_samples=run_study.NLG["eval_samples"], progress=False)
        print(name, out["zero_shot"][name], flush=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
