"""The ALLO stages. Each writes into ``<output_dir>/<stage>/`` and finishes by writing ``DONE``
(atomically, last), so ``run`` can skip completed stages and a killed run resumes where it stopped.

    prepare  built-in task: SFT the tiny model; sample responses, judge them by the final answer,
             pair every correct with every wrong one (<= max_pairs_per_problem), negatives
    warmup   full-parameter DPO from the SFT model (reference: the SFT model)
    select   importance scores (|theta_warmup - theta_0| or gradient) -> forget and improve masks
    forget   token-weighted NPO on the negatives, forget mask only (reference: the SFT model)
    improve  DPO on key tokens, improve mask only, from the forget model (reference: itself)
    eval     held-out reward accuracy / margins (reference: the SFT model) and answer accuracy
             after every stage; the report table and plots

Under FSDP2 every stage runs on the shards (only the built-in task's SFT training stays on the main
process): only the main process loads a model whole, one at a time, on its CPU, and broadcasts it
into the shards; every rank computes reference log-probs (and eval's log-probs and answers, prepare's
samples) on its share of the examples with the sharded model, scores and selects its own rows, and
holds only the selected indices in its rows.

Each stage is a module of this package (``prepare``, ``warmup``, ``select``, ``forget``, ``improve``,
``eval``) with one ``stage_<name>(ctx)`` entry point; ``common`` holds what they share and ``masked``
how a masked stage starts. ``STAGE_FUNCS`` maps stage names to entry points, in pipeline order.
"""

from .common import Context, done_info, finished_at, is_done, mark_done, uses_builtin_data
from .eval import stage_eval
from .forget import stage_forget
from .improve import stage_improve
from .prepare import build_pairs, stage_prepare
from .select import stage_select
from .warmup import stage_warmup

STAGE_FUNCS = {"prepare": stage_prepare, "warmup": stage_warmup, "select": stage_select, "forget": stage_forget,
               "improve": stage_improve, "eval": stage_eval}

__all__ = ["STAGE_FUNCS", "Context", "build_pairs", "done_info", "finished_at", "is_done", "mark_done", "uses_builtin_data",
           "stage_prepare", "stage_warmup", "stage_select", "stage_forget", "stage_improve", "stage_eval"]
