"""The MaskedAdamW Triton kernel compiles for an H100 (sm_90) even where no GPU is present: the
interpreter tests check what it computes (the interpreter accepts more than the compiler), this checks
that the compiler accepts every variant the wrapper launches."""

import textwrap

from _sm90_compile import compile_in_subprocess

SCRIPT = textwrap.dedent('''
    import itertools
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from allo_kernels.masked_adamw import masked_adamw_kernel, BLOCK

    C = "constexpr"
    sig = {"addr_ptr": "*i64", "scal_ptr": "*fp32", "block_tensor_ptr": "*i32", "block_start_ptr": "*i64",
           "block_element_ptr": "*i64", **{a: "fp32" for a in ("u_one_minus_beta1", "u_beta2", "u_one_minus_beta2",
                                                             "u_step_size", "u_bc2_sqrt", "u_decay", "u_eps")},
           "PARAM_T": C, "GRAD_T": C, "INDEX_T": C, "DENSE": C, "COMPACT_GRAD": C, "HAS_MASTER": C, "UNIFORM": C,
           "ALIGNED": C, "BLOCK": C}
    n = 0
    for (param_t, master), index_t, (dense, compact), uniform, aligned in itertools.product(
            ((tl.float32, False), (tl.bfloat16, True), (tl.float16, True)), (tl.int32, tl.int64),
            ((False, False), (False, True), (True, False)), (True, False), (True, False)):
        grad_t = tl.float32 if compact else param_t
        consts = {"PARAM_T": param_t, "GRAD_T": grad_t, "INDEX_T": index_t, "DENSE": dense, "COMPACT_GRAD": compact,
                  "HAS_MASTER": master, "UNIFORM": uniform, "ALIGNED": aligned, "BLOCK": BLOCK}
        k = triton.compile(ASTSource(fn=masked_adamw_kernel, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32))
        ptx = k.asm["ptx"]
        assert "sqrt" in ptx, consts
        if uniform:  # the scalars are kernel parameters (else loaded from the scalar table)
            assert "ld.param.f32" in ptx or "ld.param.b32" in ptx, consts
        # with the alignment hints (and only with them) whole blocks move in 16-byte accesses: the compact
        # state always, and the weight and gradient of contiguous runs
        vector = ("ld.global.v4" in ptx) and ("st.global.v4" in ptx)
        assert vector == aligned, consts
        if aligned and (param_t, index_t, dense, compact) == (tl.float32, tl.int32, False, False):
            # 8 elements a thread, 2 vectors per operand: contiguous runs' gradient, exp_avg, exp_avg_sq and
            # weight, and the gathers' indices, exp_avg and exp_avg_sq; stored: exp_avg, exp_avg_sq (both
            # paths) and the runs' weight
            assert (ptx.count("ld.global.v4"), ptx.count("st.global.v4")) == (14, 10), consts
        n += 1
    print("compiled", n)
''')


def test_masked_adamw_kernel_compiles_for_sm90():
    proc = compile_in_subprocess(SCRIPT)
    assert proc.returncode == 0 and "compiled 72" in proc.stdout, proc.stderr[-3000:]
