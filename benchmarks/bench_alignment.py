"""Does ALLO beat DPO here? A miniature, honest reproduction of the paper's comparison (issue 6).

For each built-in task and seed, one base run makes the SFT model, the preference pairs and the
full-parameter warm-up (the neuron scores come from it); every method then starts from that same
SFT model and data (``reuse_from``) and is scored by held-out answer accuracy (greedy decoding,
judged by the final answer):

    SFT                        the starting model
    DPO all                    DPO on every parameter
    DPO top/bottom/random 10%  DPO on 10% of the elements: the top or bottom by warm-up change, or random
    ALLO                       select, forget (token-level NPO), improve (DPO on key tokens)
    ALLO -forget / -key tokens / -selection   the ablations

Every DPO-style method trains with the improve stage's learning rate and step count, so they differ
only in what they update and on which tokens. Mean and standard deviation over seeds go to a markdown
table and a PNG bar chart under benchmarks/results/ (``--json FILE`` for the rows). Everything is
reproducible from the seeds.

    python benchmarks/bench_alignment.py            # 2 tasks x 3 seeds (about 30 min on 2 CPU cores)
    python benchmarks/bench_alignment.py --quick    # smaller model and data, 2 seeds, 1 task (smoke test)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

METHODS = {
    "DPO all": dict(selection="none", skip_forget=True, key_tokens=False),
    "DPO top 10%": dict(selection="top", improve_ratio=0.1, skip_forget=True, key_tokens=False),
    "DPO bottom 10%": dict(selection="bottom", improve_ratio=0.1, skip_forget=True, key_tokens=False),
    "DPO random 10%": dict(selection="random", improve_ratio=0.1, skip_forget=True, key_tokens=False),
    "ALLO": dict(),
    "ALLO -forget": dict(skip_forget=True),
    "ALLO -key tokens": dict(key_tokens=False),
    "ALLO -selection": dict(selection="none"),
}

# --quick: a smaller model and fewer problems, for CI's smoke test (the numbers mean little).
QUICK = dict(num_sft_problems=800, sft_steps=120, num_train_problems=80, num_eval_problems=60, num_samples=6,
             model_hidden_size=64)


def _add_arguments(parser):
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; --quick: 2)")
    parser.add_argument("--tasks", default=None, help="comma-separated built-in tasks (default arithmetic,compare; "
                        "--quick: arithmetic)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--results_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="where the table, chart and runs go")
    parser.add_argument("--keep_runs", action="store_true", help="keep every run's output folder")


def _run(config: dict) -> tuple[dict, float]:
    from allo.train import pipeline

    t0 = time.time()
    results = pipeline.run(config)
    return results, time.time() - t0


def main():
    args = _harness.parse_args(__doc__.splitlines()[0], _add_arguments)
    seeds = list(range(1, 1 + (args.seeds or (2 if args.quick else 3))))
    tasks = (args.tasks or ("arithmetic" if args.quick else "arithmetic,compare")).split(",")
    methods = list(METHODS) if not args.methods else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    runs_dir = os.path.join(args.results_dir, "alignment_runs" + ("_quick" if args.quick else ""))
    common = dict(disable_tqdm=True, report_to="jsonl", **(QUICK if args.quick else {}))

    acc: dict[tuple[str, str], list[float]] = {}
    secs: dict[tuple[str, str], list[float]] = {}
    t_start = time.time()
    for task in tasks:
        for seed in seeds:
            base = os.path.join(runs_dir, task, f"seed{seed}", "base")
            results, t = _run(dict(common, task=task, seed=seed, output_dir=base,
                                   stages="prepare,warmup,eval", eval_models="sft"))
            acc.setdefault((task, "SFT"), []).append(results["sft"]["eval_answer_accuracy"])
            secs.setdefault((task, "SFT"), []).append(t)
            for method in methods:
                out = os.path.join(runs_dir, task, f"seed{seed}", method.replace(" ", "_").replace("%", "pct"))
                results, t = _run(dict(common, **METHODS[method], task=task, seed=seed, output_dir=out,
                                       reuse_from=base, stages="all", eval_models="improve"))
                acc.setdefault((task, method), []).append(results["improve"]["eval_answer_accuracy"])
                secs.setdefault((task, method), []).append(t)
                print(f"[{time.time() - t_start:6.0f} s] {task} seed {seed} {method}: "
                      f"accuracy {acc[(task, method)][-1]:.3f} ({t:.0f} s)", flush=True)
    if not args.keep_runs:
        shutil.rmtree(runs_dir, ignore_errors=True)

    rows = []
    for (task, method), values in acc.items():
        rows.append({"case": task, "impl": method, "median_ms": statistics.median(secs[(task, method)]) * 1e3,
                     "accuracy_mean": statistics.mean(values),
                     "accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "accuracies": values, "seeds": seeds})
    _harness.report(rows, baseline="DPO all", json_path=args.json, title="held-out answer accuracy (median_ms: "
                    "wall time of the method's own stages)", extra_columns=["accuracy_mean", "accuracy_std"])
    _write_table_and_chart(rows, tasks, ["SFT", *methods], args, time.time() - t_start)


def _write_table_and_chart(rows, tasks, methods, args, seconds):
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, "alignment" + ("_quick" if args.quick else ""))
    by = {(r["case"], r["impl"]): r for r in rows}
    env = _harness.environment()
    lines = [f"Held-out answer accuracy, mean ± std over seeds {rows[0]['seeds']} "
             f"({'--quick, ' if args.quick else ''}{env['date']}, torch {env['torch']}, {env['cpus']} CPUs, "
             f"{seconds / 60:.1f} min in all).", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        cells = []
        for t in tasks:
            r = by.get((t, m))
            cells.append("-" if r is None else f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    _atomic_write(stem + ".md", "\n".join(lines) + "\n")
    _atomic_write(stem + ".json", json.dumps(rows, indent=1, default=str))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods) * len(tasks)), 4))
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        xs = [j + i * width for j in range(len(methods))]
        means = [by[(t, m)]["accuracy_mean"] if (t, m) in by else 0 for m in methods]
        stds = [by[(t, m)]["accuracy_std"] if (t, m) in by else 0 for m in methods]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=t)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("held-out answer accuracy")
    ax.legend()
    fig.tight_layout()
    tmp = stem + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, stem + ".png")
    print(f"  wrote {stem}.md, {stem}.json and {stem}.png")


def _atomic_write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
