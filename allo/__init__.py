"""allo: ALLO alignment with sparse updates that pay off in memory and time.

Data flow, from the command line to the kernels:

    allo.train.cli (allo-train)      -> allo.train.stages (prepare, warmup, select, forget, improve, eval)
    allo.train.loop                  -> allo.losses (DPO, forgetting, improving) -> allo.ops (csrc/ extension)
                                     -> allo.optim.MaskedAdamW                    -> allo_kernels (Triton) / CPU path
    allo.train.stages.select         -> allo.select (exact streaming top-k)       -> allo_kernels (Triton) / CPU path
"""

__version__ = "0.1.0"
