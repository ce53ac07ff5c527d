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
            if key32 and not diff:  # every integer argument 1: a constant to the JIT (see the blocked kernels)
                ones = {a: 1 for a, t in sig.items() if t in ("i32", "i64")}
                triton.compile(ASTSource(fn=fn, signature={**sig, **{a: C for a in ones}},
                                         constexprs={**flags, **extra, **ones}), target=GPUTarget("cuda", 90, 32))

    # the blocked variant: every (digit width, pass kind) the wrappers launch, per dtype group
    import itertools
    import triton.language as tl
    from allo_kernels import radix_blocked as B
    from allo_kernels import radix_window as W

    tab = {"table_ptr": "*i64", "tile_tensor_ptr": "*i32"}
    n = ones_n = 0
    for key32, dt, ydt, diff in ((True, tl.float32, tl.float32, False), (False, tl.bfloat16, tl.bfloat16, False),
                                 (False, tl.float16, tl.float16, False), (True, tl.bfloat16, tl.float32, True),
                                 (True, tl.float16, tl.float16, False)):
        flags = {"X_T": dt, "Y_T": ydt, "IS_DIFF": diff, "KEY32": key32, "X_BF16": dt == tl.bfloat16,
                 "Y_BF16": ydt == tl.bfloat16, "TILE": B.TILE, "BLOCK": B.BLOCK, "ALIGNED": True}
        bits = B.digits(key32)
        hist_sig = {**tab, "hist_ptr": "*i64", "bad_ptr": "*i64", "prefix0": "i32", "prefix1": "i32", "edge": "i32",
                    **{c: C for c in list(flags) + ["SHIFT", "BITS", "FIRST", "TWO", "POSITIVE", "PER_TENSOR"]}}
        variants = [(B._blocked_hist_kernel, hist_sig,
                     {"SHIFT": sum(bits[lv + 1:]), "BITS": bits[lv], "FIRST": lv == 0, "TWO": two, "POSITIVE": False,
                      "PER_TENSOR": per})
                    for lv in range(len(bits)) for two, per in ((False, False), (True, lv == len(bits) - 1))]
        # prefix passes after a window pass: any digit width <= 6 at any shift, prefixes above zero
        variants.append((B._blocked_hist_kernel, hist_sig, {"SHIFT": 6, "BITS": 6 if key32 else 4, "FIRST": False,
                                                            "TWO": True, "POSITIVE": True, "PER_TENSOR": True}))
        window_sig = {**tab, "hist_ptr": "*i64", "counts_ptr": "*i64", "lows_ptr": "*i64", "low0": "i32", "low1": "i32",
                      "shift": "i32", "edge": "i32",
                      **{c: C for c in list(flags) + ["BITS", "TWO", "PER_TENSOR", "POSITIVE", "SHIFTED", "PER_TILE",
                                                      "LOWS_ON_DEVICE"]}}
        variants += [(W._blocked_window_kernel, window_sig, {"BITS": b, "TWO": two, "PER_TENSOR": two, "POSITIVE": pos,
                                                             "SHIFTED": b > 0 and not two, "PER_TILE": False,
                                                             "LOWS_ON_DEVICE": False})
                     for b in (W.WINDOW_BITS[key32], W.REGISTER_BITS, 0) for two in (False, True)
                     for pos in (False, True)]
        if not key32:  # the search finished on the device (16-bit keys): per-tile counts (windows from the host,
            # or from the sample on the device: register-counted, above zero), the ranked write
            variants += [(W._blocked_window_kernel, window_sig, {"BITS": b, "TWO": two, "PER_TENSOR": False,
                                                                 "POSITIVE": pos, "SHIFTED": False, "PER_TILE": True,
                                                                 "LOWS_ON_DEVICE": False})
                         for b in (W.WINDOW_BITS[key32], W.REGISTER_BITS, 0) for two in (False, True)
                         for pos in (False, True)]
            # (and with the windows from the sample on the device, above zero: the default path's variants)
            variants += [(W._blocked_window_kernel, window_sig, {"BITS": W.REGISTER_BITS, "TWO": two, "PER_TENSOR": False,
                                                                 "POSITIVE": True, "SHIFTED": False, "PER_TILE": True,
                                                                 "LOWS_ON_DEVICE": True})
                         for two in (False, True)]
            ranked_sig = {**tab, "ties_ptr": "*i64", "bounds_ptr": "*i64",
                          **{c: C for c in list(flags) + ["HAS_HI", "HAS_EX", "POSITIVE", "CUT_TILES"]}}
            variants += [(B._blocked_write_ranked_kernel, ranked_sig, {"HAS_HI": True, "HAS_EX": ex, "POSITIVE": pos,
                                                                       "CUT_TILES": cut})
                         for ex in (False, True) for pos in (False, True) for cut in (False, True)]
        sample_sig = {**tab, "hist_ptr": "*i64", "high0": "i32", "high1": "i32", "seed": "i64",
                      **{c: C for c in list(flags) + ["LOW", "SAMPLES"]}}
        variants += [(W._blocked_sample_kernel, sample_sig, {"LOW": low, "SAMPLES": W.SAMPLES})
                     for low in ((False, True) if key32 else (False,))]
        variants.append((B._blocked_count_kernel, {**tab, "counts_ptr": "*i64", "key0": "i32", "key1": "i32",
                                                   **{c: C for c in flags}}, {}))
        write_sig = {**tab, "prefix_ptr": "*i64", "key_hi": "i32", "key_ex": "i32",
                     **{c: C for c in list(flags) + ["HAS_HI", "HAS_EX", "CUT", "POSITIVE"]}}
        variants += [(B._blocked_write_kernel, write_sig, {"HAS_HI": True, "HAS_EX": ex, "CUT": cut, "POSITIVE": pos})
                     for ex in (False, True) for cut in (False, True) for pos in (False, True)]
        # unaligned launches (views into larger tensors) only for one dtype group: the code is the same
        alignments = (True, False) if dt == tl.bfloat16 and not diff else (True,)
        for (fn, sig, extra), aligned in itertools.product(variants, alignments):
            block = B.hist_block(extra["BITS"]) if "BITS" in extra else B.BLOCK
            k = triton.compile(ASTSource(fn=fn, signature={**sig, "ALIGNED": C},
                                         constexprs={**flags, **extra, "ALIGNED": aligned, "BLOCK": block}),
                               target=GPUTarget("cuda", 90, 32))
            ptx = k.asm["ptx"]
            if fn is B._blocked_hist_kernel or (fn is W._blocked_window_kernel and extra["BITS"] > W.REGISTER_BITS):
                # block-local: shared-memory atomics per element, global atomics only per bin (none when
                # each tile writes its own row)
                assert "atom.relaxed.sys.shared" in ptx or "atom.shared" in ptx, extra
                assert ("atom.global" in ptx) != extra.get("PER_TILE", False), extra
            if fn is W._blocked_window_kernel and extra["BITS"] <= W.REGISTER_BITS:
                # one-key windows and windows of up to 2**REGISTER_BITS bins: counted in registers, no
                # histogram in the loop
                assert "atom.shared" not in ptx and "atom.relaxed.sys.shared" not in ptx, extra
            if fn is not W._blocked_sample_kernel:  # (the sample gathers single keys)
                # aligned launches read the scores with 16-byte vector loads (else 2- or 4-byte ones)
                assert ("ld.global.v4" in ptx) == aligned, (fn.__name__, extra, aligned)
            n += 1
        if dt == tl.bfloat16 and not diff:
            # each kernel once more with every integer argument equal to 1, which the JIT passes as a constant
            # (specialization), not as a typed scalar: code that only works on a typed scalar (a method call
            # like .to()) fails there, and only on a GPU (radix_boundary's kernels did, for k == 1)
            seen = set()
            for fn, sig, extra in variants:
                if fn in seen:
                    continue
                seen.add(fn)
                ones = {a: 1 for a, t in sig.items() if t in ("i32", "i64")}
                if not ones:  # (the ranked write takes its scalars from the device)
                    continue
                block = B.hist_block(extra["BITS"]) if "BITS" in extra else B.BLOCK
                triton.compile(ASTSource(fn=fn, signature={**sig, **{a: C for a in ones}, "ALIGNED": C},
                                         constexprs={**flags, **extra, **ones, "ALIGNED": True, "BLOCK": block}),
                               target=GPUTarget("cuda", 90, 32))
                ones_n += 1
    print("compiled", n, "and", ones_n, "with ones")
''')


def test_kernels_compile_for_sm90():
    from allo_kernels import radix_blocked as B

    proc = compile_in_subprocess(SCRIPT)
    # every variant the script builds: per dtype group, 2 histogram kernels per digit and one more prefix pass,
    # 12 window kernels, the sample kernel (twice for 32-bit keys: high and low halves), the count kernel and 8
    # write kernels, and for 16-bit keys 14 per-tile window kernels and 8 ranked write kernels; the bf16
    # group twice (aligned and not); groups with 32-bit keys: 4, with 16-bit keys: 2
    per_group = {key32: 2 * len(B.digits(key32)) + 23 + key32 + (0 if key32 else 22) for key32 in (True, False)}
    expected = 3 * per_group[True] + 2 * per_group[False] + per_group[False]
    assert proc.returncode == 0 and f"compiled {expected} and 5 with ones" in proc.stdout, \
        proc.stderr[-3000:] + proc.stdout[-500:]


BOUNDARY_SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from allo_kernels import radix_boundary as RBd

    C = "constexpr"

    def compiled(fn, sig, cx, ones):
        # ones: every integer argument 1, which the JIT passes as a constant (specialization), not as a typed
        # scalar: k.to(...) compiled for the latter and failed for the former (k == 1; seen only on the H100)
        consts = {a: 1 for a, t in sig.items() if t in ("i32", "i64")} if ones else {}
        triton.compile(ASTSource(fn=fn, signature={**sig, **{a: C for a in consts}}, constexprs={**cx, **consts}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        return 1

    n = 0
    for two in (False, True):
        for ones in (False, True):
            cx = {"SAMPLES": 16, "OFFSET": 3, "TWO": two, "NBINS": RBd.SAMPLE_BINS, "BLOCK": 4096}
            n += compiled(RBd._lows_kernel, {"hist_ptr": "*i64", "out_ptr": "*i64", "k0": "i64", "k1": "i64",
                                             **{c: C for c in cx}}, cx, ones)
        for bits in (0, 3, 5):
            cols = 2 * ((1 << bits) + 1) + 1
            cp = triton.next_power_of_2(cols)
            for on_device in (False, True):
                for ones in (False, True) if bits == 3 else (False,):
                    cx = {"C": cols, "CP": cp, "BINS": 1 << bits, "TWO": two, "LOWS_ON_DEVICE": on_device,
                          "CHECK_POSITIVE": on_device, "TIE_ROWS": 4096}
                    sig = {"tiles_ptr": "*i32", "counts_ptr": "*i64", "ntiles": "i32", "lows_ptr": "*i64",
                           "low0": "i32", "low1": "i32", "base0": "i32", "base1": "i32", "k0": "i32", "k1": "i32",
                           "bounds_ptr": "*i64", "ties_ptr": "*i64", "flags_ptr": "*i64", **{c: C for c in cx}}
                    n += compiled(RBd._boundaries_kernel, sig, cx, ones)
    print("compiled", n)
''')


def test_boundary_kernels_compile_for_sm90():
    proc = compile_in_subprocess(BOUNDARY_SCRIPT)
    assert proc.returncode == 0 and "compiled 20" in proc.stdout, proc.stderr[-3000:] + proc.stdout[-500:]
