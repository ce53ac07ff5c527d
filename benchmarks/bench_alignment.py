"""Does ALLO beat DPO here? A miniature, honest reproduction of the paper's comparison (issue 6).

For each built-in task and seed, one base run makes the SFT model, the preference pairs and the
full-parameter warm-up (the neuron scores and ALLO's forgetting token weights come from it), and
scores the SFT model. Every method then starts from that same SFT model and data (``reuse_from``)
and is scored by held-out answer accuracy (greedy decoding, judged by the final answer); only the
model a method produces is evaluated (``eval_models``):

    SFT                        the starting model
    DPO all                    DPO on every parameter
    DPO top/bottom/random 10%  DPO on 10% of the elements: the top or bottom by warm-up change, or random
    ALLO                       select, forget (token-level NPO, 3% of elements), improve (DPO on key
                               tokens, 10% of elements)
    ALLO -forget / -key tokens / -selection   the ablations

Fairness: every DPO-style stage (the DPO rows and ALLO's improve stage) trains one epoch over the
same pairs (same steps, same batches, same seed) at the same learning rate, ``--lr`` (default
5e-5, see DEFAULT_LR), so the methods differ only in which elements they update and on which
tokens; ALLO's forgetting stage uses ``--forget_lr``. MaskedAdamW moves every selected element by
at most about ``lr`` per step whatever the mask, so one learning rate gives every method the same
per-element step; a method that updates fewer elements changes the model less, and that is part of
what the paper claims helps.

Mean and standard deviation over seeds go to a markdown table and a PNG bar chart under
benchmarks/results/ (``--json FILE`` for the rows). Everything is reproducible from the seeds.

    python benchmarks/bench_alignment.py            # 2 tasks x 3 seeds (about 25 min on 2 CPU cores)
    python benchmarks/bench_alignment.py --quick    # tiny model and data, 1 task, 1 seed, 5 methods (smoke test, < 1 min)
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

# The learning rate of every DPO-style stage. On the built-in 0.26M-parameter model, full-parameter
# DPO at 2.5e-4 (the pipeline's old improve default) cut arithmetic answer accuracy from 0.31 to
# 0.07, at 5e-5 to 0.23, at 1e-5 to 0.28 (seed 0); held-out reward accuracy stayed ~0.53 at every
# rate. 5e-5 is the largest rate at which the preference stages move the model measurably without
# wrecking it (see the README's results section for the sweep).
DEFAULT_LR = 5e-5
DEFAULT_FORGET_LR = 2.5e-5

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
# Methods whose select and forget stages are exactly ALLO's (same masks, same forgetting): they
# link ALLO's folders instead of redoing them when ALLO ran first for the same task and seed.
SHARES_ALLO_FORGET = {"ALLO -key tokens"}

# --quick: a smaller model, fewer problems and SFT steps, for CI's smoke test (the numbers mean little).
QUICK = dict(num_sft_problems=600, sft_steps=100, num_train_problems=60, num_eval_problems=20, num_samples=6,
             model_hidden_size=48, max_new_tokens=32)
# --quick: one seed and the methods that differ in code path (bottom and random 10% are top 10%'s path with
# another selection, -forget ALLO's without a stage), unless --seeds / --methods say otherwise: under a
# minute on 2 cores (every method over 3 seeds took 188 s in CI, 2026-11-27)
QUICK_SEEDS = 1
QUICK_METHODS = ("DPO all", "DPO top 10%", "ALLO", "ALLO -key tokens", "ALLO -selection")


def _add_arguments(parser):
    parser.add_argument("--seeds", type=_harness.int_at_least(1), default=None, help=f"seeds per method (default 3; --quick: {QUICK_SEEDS})")
    parser.add_argument("--tasks", default=None, help="comma-separated built-in tasks (default arithmetic,compare; "
                        "--quick: arithmetic)")
    # argparse %-formats help text: the "%" of "DPO top 10%" is written "%%"
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of: " + ", ".join(METHODS).replace("%", "%%"))
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"learning rate of every DPO-style stage, ALLO's improve stage included (default {DEFAULT_LR})")
    parser.add_argument("--forget_lr", type=float, default=DEFAULT_FORGET_LR,
                        help=f"ALLO's forgetting-stage learning rate (default {DEFAULT_FORGET_LR})")
    parser.add_argument("--results_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="where the table and chart go")
    parser.add_argument("--runs_dir", default=None, help="where the runs go (default: a temporary folder, deleted at the end)")
    parser.add_argument("--keep_runs", action="store_true", help="keep every run's output folder")
    parser.add_argument("--jobs", type=_harness.int_at_least(1), default=None, help="tasks run in parallel processes (default: one per task)")


def _run(config: dict) -> tuple[dict, float]:
    from allo.train import pipeline

    t0 = time.time()
    results = pipeline.run(config)
    return results, time.time() - t0


def _dirname(method: str) -> str:
    return method.replace(" ", "_").replace("%", "pct").replace("-", "no_")


def method_config(method: str, *, common: dict, task: str, seed: int, base: str, out: str, allo_dir: str | None,
                  lr: float, forget_lr: float) -> dict:
    """The pipeline config of one method: its switches on top of the shared ones, starting from
    ``base`` (prepare + warm-up), or from ``allo_dir`` (+ select + forget) where it shares those."""
    cfg = dict(common, **METHODS[method], task=task, seed=seed, output_dir=out, learning_rate=lr,
               improve_learning_rate=lr, forget_learning_rate=forget_lr, stages="select,forget,improve,eval",
               eval_models="improve", reuse_from=base, reuse_stages="prepare,warmup")
    if method in SHARES_ALLO_FORGET and allo_dir is not None:
        cfg.update(reuse_from=allo_dir, reuse_stages="prepare,warmup,select,forget")
    return cfg


def main():
    args = _harness.parse_args(__doc__.splitlines()[0], _add_arguments)
    import tempfile

    seeds = list(range(1, 1 + (args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 3))))
    tasks = (args.tasks or ("arithmetic" if args.quick else "arithmetic,compare")).split(",")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else \
        list(QUICK_METHODS if args.quick else METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="allo_alignment_")
    common = dict(disable_tqdm=True, report_to="jsonl", **(QUICK if args.quick else {}))

    t_start = time.time()
    jobs = max(1, min(args.jobs or len(tasks), len(tasks)))
    try:
        if jobs == 1:
            per_task = [run_task(task, seeds, methods, common, runs_dir, args.lr, args.forget_lr, t_start) for task in tasks]
        else:
            # one process per task: the runs are single-threaded (allo.train uses half the cores), so
            # two tasks on two cores take the time of one
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                per_task = list(pool.map(run_task, tasks, [seeds] * len(tasks), [methods] * len(tasks),
                                         [common] * len(tasks), [runs_dir] * len(tasks), [args.lr] * len(tasks),
                                         [args.forget_lr] * len(tasks), [t_start] * len(tasks)))
    finally:
        if not args.keep_runs:
            shutil.rmtree(runs_dir, ignore_errors=True)
    stats = {k: v for d in per_task for k, v in d.items()}

    rows = [summary_row(task, method, s, seeds) for (task, method), s in stats.items()]
    _harness.report(rows, baseline="DPO all", json_path=args.json,
                    title="held-out answer accuracy (median_ms: wall time of the method's own stages; SFT: prepare + "
                          "warm-up)", extra_columns=["accuracy_mean", "accuracy_std", "reward_accuracy_mean"])
    write_table_and_chart(rows, tasks, ["SFT", *methods], args, time.time() - t_start)


def run_task(task, seeds, methods, common, runs_dir, lr, forget_lr, t_start) -> dict:
    """Every seed and method of one task; returns {(task, method): {metric: [one value per seed]}}."""
    stats: dict[tuple[str, str], dict[str, list[float]]] = {}

    def record(method, res, seconds):
        s = stats.setdefault((task, method), {"answer": [], "reward_acc": [], "margin": [], "chosen": [], "secs": []})
        s["answer"].append(res["eval_answer_accuracy"])
        s["reward_acc"].append(res.get("eval_rewards/accuracies", float("nan")))
        s["margin"].append(res.get("eval_rewards/margins", float("nan")))
        s["chosen"].append(res.get("eval_rewards/chosen", float("nan")))
        s["secs"].append(seconds)

    for seed in seeds:
        base = os.path.join(runs_dir, task, f"seed{seed}", "base")
        res, t = _run(dict(common, task=task, seed=seed, output_dir=base, learning_rate=lr,
                           stages="prepare,warmup,eval", eval_models="sft"))
        # the SFT model is the reward reference itself: its reward accuracy is not a measurement
        record("SFT", {"eval_answer_accuracy": res["sft"]["eval_answer_accuracy"]}, t)
        print(f"[{time.time() - t_start:6.0f} s] {task} seed {seed} SFT: accuracy "
              f"{res['sft']['eval_answer_accuracy']:.3f} (prepare + warm-up {t:.0f} s)", flush=True)
        allo_dir = None
        for method in methods:
            out = os.path.join(runs_dir, task, f"seed{seed}", _dirname(method))
            cfg = method_config(method, common=common, task=task, seed=seed, base=base, out=out,
                                allo_dir=allo_dir, lr=lr, forget_lr=forget_lr)
            res, t = _run(cfg)
            if method == "ALLO":
                allo_dir = out
            record(method, res["improve"], t)
            print(f"[{time.time() - t_start:6.0f} s] {task} seed {seed} {method}: accuracy "
                  f"{res['improve']['eval_answer_accuracy']:.3f}, reward accuracy "
                  f"{res['improve'].get('eval_rewards/accuracies', float('nan')):.3f} ({t:.0f} s)", flush=True)
    return stats


def _mean_std(values):
    values = [v for v in values if v == v]  # NaN: a metric the model has none of (SFT's reward accuracy)
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_row(task: str, method: str, s: dict, seeds: list[int]) -> dict:
    acc_mean, acc_std = _mean_std(s["answer"])
    rew_mean, rew_std = _mean_std(s["reward_acc"])
    margin_mean, _ = _mean_std(s["margin"])
    chosen_mean, _ = _mean_std(s["chosen"])
    return {"case": task, "impl": method, "median_ms": statistics.median(s["secs"]) * 1e3,
            "accuracy_mean": acc_mean, "accuracy_std": acc_std, "accuracies": s["answer"],
            "reward_accuracy_mean": rew_mean, "reward_accuracy_std": rew_std, "reward_margin_mean": margin_mean,
            "reward_chosen_mean": chosen_mean, "seeds": seeds}


def format_table(rows: list[dict], tasks: list[str], methods: list[str]) -> list[str]:
    by = {(r["case"], r["impl"]): r for r in rows}
    head = ["method"] + [f"{t}: answer acc" for t in tasks] + [f"{t}: reward acc" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * (len(head) - 1)]
    for m in methods:
        cells = []
        for key in ("accuracy", "reward_accuracy"):
            for t in tasks:
                r = by.get((t, m))
                if r is None or r[f"{key}_mean"] != r[f"{key}_mean"]:
                    cells.append("-")
                else:
                    cells.append(f"{r[f'{key}_mean']:.3f} ± {r[f'{key}_std']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def write_table_and_chart(rows, tasks, methods, args, seconds):
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, "alignment" + ("_quick" if args.quick else ""))
    env = _harness.environment()
    lines = [f"# Alignment benchmark{' (--quick smoke test: tiny model, numbers mean little)' if args.quick else ''}",
             "", f"Held-out answer accuracy (greedy) and held-out reward accuracy (vs the SFT model), mean ± std "
             f"over seeds {rows[0]['seeds']}; every DPO-style stage at lr {args.lr:g}, forgetting at "
             f"{args.forget_lr:g}, one epoch. {env['date']}, torch {env['torch']}, {env['cpus']} CPUs, "
             f"{seconds / 60:.1f} min in all. Command: `python benchmarks/bench_alignment.py"
             f"{' --quick' if args.quick else ''}`.", "", *format_table(rows, tasks, methods)]
    _atomic_write(stem + ".md", "\n".join(lines) + "\n")
    _harness.write_json(stem + ".json", rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["case"], r["impl"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(methods) * len(tasks)), 4.2))
    width = 0.8 / len(tasks)
    for i, t in enumerate(tasks):
        xs = [j + i * width for j in range(len(methods))]
        means = [by[(t, m)]["accuracy_mean"] if (t, m) in by else 0 for m in methods]
        stds = [by[(t, m)]["accuracy_std"] if (t, m) in by else 0 for m in methods]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=t)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("held-out answer accuracy")
    ax.set_title(f"mean ± std over {len(rows[0]['seeds'])} seeds{' (--quick)' if args.quick else ''}")
    ax.legend()
    fig.tight_layout()
    tmp = stem + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, stem + ".png")
    print(f"  wrote {stem}.md, {stem}.json and {stem}.png")


def _atomic_write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
