"""The radix-selection Triton kernels compile for an H100 (sm_90) even where no GPU is present: the
interpreter tests check what they compute, this checks that the compiler accepts them."""

import textwrap

from _sm90_compile import compile_in_subprocess

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from allo_kernels import radix_select as R

    C = "constexpr"
    common = {"IS_DIFF": C, "KEY32": C, "X_BF16": C, "Y_BF16": C, "BLOCK": C}
    for key32, dt, diff in ((True, "*fp32", False), (False, "*bf16", False), (True, "*bf16", True)):
        flags = {"IS_DIFF": diff, "KEY32": key32, "X_BF16": dt == "*bf16", "Y_BF16": dt == "*bf16", "BLOCK": 1024}
        kernels = (
            (R._radix_hist_kernel, {"x_ptr": dt, "y_ptr": dt, "n": "i64", "hist_ptr": "*i64", "prefix": "i32",
                                    "LOW": C, "REPLICAS": C, **common}, {"LOW": key32, "REPLICAS": 16}),
            (R._radix_write_kernel, {"x_ptr": dt, "y_ptr": dt, "n": "i64", "out_ptr": "*u8", "key_hi": "i32",
                                     "key_ex": "i32", "HAS_HI": C, "HI_TIES": C, "HAS_EX": C, "EX_TIES": C, **common},
             {"HAS_HI": True, "HI_TIES": False, "HAS_EX": True, "EX_TIES": True}),
            (R._radix_count_eq_kernel, {"x_ptr": dt, "y_ptr": dt, "n": "i64", "key_eq": "i32", "count_ptr": "*i64",
                                        **common}, {}),
        )
        for fn, sig, extra in kernels:
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={**flags, **extra}),
                               target=GPUTarget("cuda", 90, 32))
            assert "atom" in k.asm["ptx"] or fn is R._radix_write_kernel, fn.__name__
    print("compiled")
''')


def test_kernels_compile_for_sm90():
    proc = compile_in_subprocess(SCRIPT)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
