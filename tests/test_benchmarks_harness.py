"""benchmarks/_harness.py's arithmetic, with a fake clock and a fake process memory so every number is exact.

Every figure the project reports (RESULTS.md, benchmarks/results/*.json) goes through these functions: a
median taken over the wrong calls, a peak that misses a temporary, an inverted ratio or a JSON row that
loses a field would corrupt them silently. The real-timer and real-RSS behaviour is covered by
tests/test_benchmarks_audit.py; here only what the harness computes from what it reads."""

import json
import math
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import _harness as H  # noqa: E402


class FakeClock:
    """``time`` for the harness: ``perf_counter`` only moves when a fake call says how long it took."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    @staticmethod
    def strftime(fmt):
        return "2000-01-01"


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(H, "time", types.SimpleNamespace(perf_counter=c.perf_counter, strftime=c.strftime))
    # no page faults: the CPU warm-up is exactly `warmup` rounds (tests/test_benchmarks_audit.py has the real ones)
    monkeypatch.setattr(H, "_thread_page_faults", lambda: 0)
    return c


def timed(clock, durations_ms):
    """A function whose n-th call takes ``durations_ms[n]`` on the fake clock; ``.calls`` counts them."""
    def fn():
        clock.now += durations_ms[fn.calls] / 1e3
        fn.calls += 1

    fn.calls = 0
    return fn


def test_median_of_an_even_count_and_p20_p80_exclude_the_warmup(clock):
    # warm-up calls take 1000 ms: counted with the timed ones, they would move every statistic
    fn = timed(clock, [1000.0, 1000.0] + [4.0, 1.0, 3.0, 2.0])
    out = H.time_fn(fn, device="cpu", warmup=2, repeats=4)
    assert fn.calls == 6
    assert out["repeats"] == 4
    assert out["median_ms"] == pytest.approx(2.5, rel=1e-9)  # mean of the middle two, not the upper one
    # p20/p80 interpolated linearly in the sorted times [1, 2, 3, 4]: at positions 0.2 x 3 = 0.6 and 0.8 x 3 = 2.4
    assert out["p20_ms"] == pytest.approx(1.6, rel=1e-9)
    assert out["p80_ms"] == pytest.approx(3.4, rel=1e-9)


def test_p20_p80_of_ten_repeats(clock):
    times = [10.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0]
    out = H.time_fn(timed(clock, [500.0] + times), device="cpu", warmup=1, repeats=10)
    assert out["median_ms"] == pytest.approx(5.5, rel=1e-9)
    assert out["p20_ms"] == pytest.approx(2.8, rel=1e-9)  # sorted[1.8]: 2 + 0.8 x (3 - 2)
    assert out["p80_ms"] == pytest.approx(8.2, rel=1e-9)  # sorted[7.2]: 8 + 0.2 x (9 - 8)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 20])
def test_p20_p80_are_the_standard_inclusive_quantiles(clock, n):
    # element int(f * n) read high: of 5 repeats its p80 was the slowest one
    import random
    import statistics

    rng = random.Random(n)
    times = [rng.uniform(1.0, 9.0) for _ in range(n)]
    out = H.time_fn(timed(clock, [0.0] + times), device="cpu", warmup=1, repeats=n)
    want = statistics.quantiles(times, n=5, method="inclusive") if n > 1 else [times[0]] * 4
    assert (out["p20_ms"], out["p80_ms"]) == (pytest.approx(want[0], rel=1e-9), pytest.approx(want[3], rel=1e-9))
    if n == 5:
        assert out["p80_ms"] < max(times) and out["p20_ms"] > min(times)


def test_interleaved_times_go_to_their_own_function(clock):
    # a takes 1 ms, b 7 ms (order A B, B A, ...): each name's statistics are its own calls' only
    a = timed(clock, [100.0] + [1.0] * 3)
    b = timed(clock, [100.0] + [7.0] * 3)
    out = H.time_interleaved({"a": a, "b": b}, device="cpu", warmup=1, repeats=3)
    assert (a.calls, b.calls) == (4, 4)
    assert {k: (v["median_ms"], v["p20_ms"], v["p80_ms"], v["repeats"]) for k, v in out.items()} == {
        "a": (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0), 3),
        "b": (pytest.approx(7.0), pytest.approx(7.0), pytest.approx(7.0), 3)}


class FakeMemory:
    """The process's VmRSS / VmHWM in KiB, as /proc reports them; ``reset()`` is clear_refs' "5"."""

    def __init__(self, rss_kib):
        self.rss = self.hwm = rss_kib
        self.resets = 0

    def alloc(self, kib):
        self.rss += kib
        self.hwm = max(self.hwm, self.rss)

    def read(self, field):
        return {"VmRSS": self.rss, "VmHWM": self.hwm}[field]

    def open(self, path, mode="r"):
        assert path == "/proc/self/clear_refs" and "w" in mode, path
        mem = self

        class Refs:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def write(self, text):
                assert text == "5"
                mem.hwm = mem.rss
                mem.resets += 1

        return Refs()


@pytest.fixture
def memory(monkeypatch):
    mem = FakeMemory(rss_kib=50_000)
    monkeypatch.setattr(H, "cpu_peak_supported", lambda: True)
    monkeypatch.setattr(H, "_read_status_kib", mem.read)
    monkeypatch.setattr(H, "open", mem.open, raising=False)  # module global: shadows the builtin in _harness
    monkeypatch.setattr(H, "_timed_since_measured", [False])
    return mem


def allocating(mem, temporary_kib, result_kib):
    """A call that allocates a temporary, frees it, and returns a result that stays allocated until dropped."""
    class Result:
        def __del__(self):
            mem.rss -= result_kib

    def fn():
        fn.calls += 1
        mem.alloc(temporary_kib)
        mem.rss -= temporary_kib
        mem.alloc(result_kib)
        return Result()

    fn.calls = 0
    return fn


def test_peak_bytes_is_the_high_water_mark_of_the_call_above_what_was_live(memory):
    fn = allocating(memory, temporary_kib=3000, result_kib=200)
    # the temporary is gone when the call returns: only the high-water mark of the call sees it
    assert H.peak_bytes(fn, device="cpu") == 3000 * 1024
    assert memory.rss == 50_000  # the result was dropped
    assert fn.calls == 1 and memory.resets == 1
    # a result larger than the temporary is the peak
    assert H.peak_bytes(allocating(memory, temporary_kib=10, result_kib=700), device="cpu") == 700 * 1024
    assert memory.rss == 50_000


def test_peak_bytes_right_after_timing_settles_with_one_unmeasured_call(memory, clock):
    # the first call after timed ones still finds blocks they left: peak_bytes calls fn once, unmeasured,
    # then resets the high-water mark and measures the next call (and only then)
    fn = allocating(memory, temporary_kib=3000, result_kib=200)
    H.time_fn(fn, device="cpu", warmup=1, repeats=3)  # on the fake clock every call takes 0 ms
    assert fn.calls == 4
    first_settling = {"done": False}

    def settling():
        out = fn()
        if not first_settling["done"]:  # the settling call leaves 5000 KiB behind in the heap, as timed
            first_settling["done"] = True  # calls' leftover blocks would
            memory.alloc(5000)
            memory.rss -= 5000
        return out

    assert H.peak_bytes(settling, device="cpu") == 3000 * 1024
    assert fn.calls == 6  # the settling call, then the measured one
    assert H.peak_bytes(fn, device="cpu") == 3000 * 1024
    assert fn.calls == 7  # no timing in between: measured at once


def test_measure_row_has_timing_peak_and_extra_fields(memory, clock):
    fn = allocating(memory, temporary_kib=1000, result_kib=24)
    durations = [50.0] + [3.0, 1.0, 2.0]
    clocked = timed(clock, durations)

    def call():
        clocked()
        return fn()

    durations += [0.0] * 5  # the settling and measured calls of peak_bytes
    row = H.measure("case A", "allo", call, device="cpu", warmup=1, repeats=3, max_rel_err=1e-6, note="x")
    assert clocked.calls == 6
    assert row == {"case": "case A", "impl": "allo", "device": "cpu", "median_ms": pytest.approx(2.0),
                   "p20_ms": pytest.approx(1.4), "p80_ms": pytest.approx(2.6), "repeats": 3,
                   "peak_bytes": 1000 * 1024, "max_rel_err": 1e-6, "note": "x"}
    no_memory = H.measure("case A", "allo", lambda: None, device="cpu", warmup=0, repeats=1, memory=False, k=1)
    assert "peak_bytes" not in no_memory and no_memory["k"] == 1 and no_memory["repeats"] == 1


def _rows():
    return [
        {"case": "c1", "impl": "torch", "median_ms": 10.0, "p20_ms": 9.0, "p80_ms": 11.0, "peak_bytes": 4000},
        {"case": "c1", "impl": "allo", "median_ms": 2.5, "p20_ms": 2.0, "p80_ms": 3.0, "peak_bytes": 1000,
         "max_rel_err": float("nan")},
        {"case": "c2", "impl": "allo", "median_ms": 5.0, "p20_ms": 4.0, "p80_ms": 6.0, "peak_bytes": None},
        {"case": "c3", "impl": "torch", "median_ms": 4.0, "p20_ms": 4.0, "p80_ms": 4.0, "peak_bytes": None},
        {"case": "c3", "impl": "allo", "median_ms": 8.0, "p20_ms": 8.0, "p80_ms": 8.0, "peak_bytes": 123,
         "max_rel_err": 2e-7},
    ]


def test_report_ratios_are_baseline_time_over_impl_and_impl_peak_over_baseline(clock, capsys):
    rows = H.report(_rows(), baseline="torch", extra_columns=["max_rel_err"])
    by = {(r["case"], r["impl"]): r for r in rows}
    assert by["c1", "allo"]["speedup_vs_baseline"] == 4.0  # 10 ms / 2.5 ms: 4x faster
    assert by["c1", "allo"]["mem_ratio_vs_baseline"] == 0.25  # 1000 B / 4000 B
    assert by["c1", "torch"]["speedup_vs_baseline"] == 1.0 and by["c1", "torch"]["mem_ratio_vs_baseline"] == 1.0
    assert by["c3", "allo"]["speedup_vs_baseline"] == 0.5  # slower than the baseline: below 1
    assert by["c3", "allo"]["mem_ratio_vs_baseline"] is None  # the baseline's peak was not measured
    assert by["c2", "allo"]["speedup_vs_baseline"] is None  # no baseline in this case
    assert all(r["baseline"] == "torch" for r in rows)
    table = capsys.readouterr().out.splitlines()
    line = next(line for line in table if line.split()[:2] == ["c1", "allo"])
    assert line.split()[2:] == ["2.500", "2.000-3.000", "1.00", "KB", "nan", "4.00", "0.250"]


def test_json_keeps_every_row_and_field_strictly(clock, tmp_path, capsys):
    path = tmp_path / "out.json"
    rows = H.report(_rows(), baseline="torch", json_path=str(path))
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = json.loads(text)
    assert len(written) == len(rows) == 5
    assert not os.path.exists(str(path) + ".tmp")
    for want, got in zip(_rows(), written):
        for key, value in want.items():  # every field the script gave, non-finite floats as null
            assert key in got, (key, got)
            if isinstance(value, float) and not math.isfinite(value):
                assert got[key] is None
            else:
                assert got[key] == value, key
        assert {"baseline", "speedup_vs_baseline", "mem_ratio_vs_baseline", "env"} <= set(got)
        assert got["env"]["date"] == "2000-01-01"
    assert [r["speedup_vs_baseline"] for r in written] == [1.0, 4.0, None, 1.0, 0.5]
    assert "wrote 5 rows" in capsys.readouterr().out


def test_write_json_turns_non_finite_floats_into_null_at_any_depth(tmp_path):
    path = tmp_path / "x.json"
    H.write_json(str(path), [{"a": float("inf"), "b": [1.0, float("-inf"), {"c": float("nan")}], "d": (2, 3.5)}])
    assert json.loads(path.read_text()) == [{"a": None, "b": [1.0, None, {"c": None}], "d": [2, 3.5]}]


@pytest.mark.parametrize("argv, quick", [([], False), (["--quick"], True)])
def test_parse_args_quick_json_repeats_warmup(monkeypatch, argv, quick):
    monkeypatch.setattr(sys, "argv", ["bench_x.py", *argv, "--json", "f.json", "--device", "cpu", "--repeats", "7",
                                      "--warmup", "2"])
    args = H.parse_args("x", lambda p: p.add_argument("--ratio", type=float, default=0.1))
    assert (args.quick, args.json, args.device, args.repeats, args.warmup, args.ratio) == (
        quick, "f.json", "cpu", 7, 2, 0.1)
    monkeypatch.setattr(sys, "argv", ["bench_x.py"])
    args = H.parse_args("x")
    assert (args.quick, args.json, args.repeats, args.warmup) == (False, None, None, None)


@pytest.mark.parametrize("where, says", [("missing/out.json", "does not exist"), ("a_dir", "is a directory")])
def test_parse_args_refuses_a_json_path_that_cannot_be_written(monkeypatch, tmp_path, capsys, where, says):
    # found before the run, not by report() after it (which lost the whole run to a raw traceback)
    (tmp_path / "a_dir").mkdir()
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--device", "cpu", "--json", str(tmp_path / where)])
    with pytest.raises(SystemExit) as exc:
        H.parse_args("x")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--json {tmp_path / where}: " in err and says in err, err
    assert os.listdir(tmp_path) == ["a_dir"]


def test_write_json_leaves_no_tmp_file_when_the_write_fails(tmp_path):
    target = tmp_path / "a_dir"
    target.mkdir()
    with pytest.raises(OSError):
        H.write_json(str(target), [{"a": 1}])
    assert sorted(os.listdir(tmp_path)) == ["a_dir"] and os.listdir(target) == []


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_parse_args_refuses_any_cuda_device_without_a_gpu(monkeypatch, capsys, device):
    # compared by type: "cuda:0" once went past the check (it compared the string with "cuda")
    monkeypatch.setattr(H.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_x.py", "--device", device])
    with pytest.raises(SystemExit) as exc:
        H.parse_args("x")
    assert exc.value.code == 2
    assert f"--device {device}, but torch sees no CUDA device" in capsys.readouterr().err


def test_parse_args_makes_the_cuda_device_asked_for_the_current_one(monkeypatch):
    # the CUDA timing events, synchronize() and memory counters read the current device: --device cuda:1
    # ran the benchmark on cuda:1 and timed and measured cuda:0
    chosen = []
    monkeypatch.setattr(H.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(H.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(H.torch.cuda, "set_device", chosen.append)
    for device in ("cuda:1", "cuda", "cpu"):
        monkeypatch.setattr(sys, "argv", ["bench_x.py", "--device", device])
        assert H.parse_args("x").device == device
    assert chosen == [H.torch.device("cuda:1")]


def test_argument_types_refuse_counts_and_ratios_out_of_range():
    import argparse

    assert H.int_at_least(1)("3") == 3 and H.int_at_least(0)("0") == 0
    for parse, text in ((H.int_at_least(1), "0"), (H.int_at_least(0), "-1"), (H.int_at_least(1), "2.5"),
                        (H.ratio, "0"), (H.ratio, "1.01"), (H.ratio, "nan"), (H.ratio, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert H.ratio("1") == 1.0 and H.ratio("1e-3") == 1e-3


def test_report_formats_bytes_by_column_name_and_shows_no_made_up_spread(clock, capsys):
    # a count above 10,000 read as bytes ("12.35 KB"), and a row without p20/p80 (bench_alignment's summaries)
    # showed a spread of 0.000-0.000
    rows = [{"case": "c", "impl": "a", "median_ms": 2.0, "unselected_changed": 12345, "state": 12345,
             "resident_bytes": 2_000_000, "extra": 500, "exact": True}]
    H.report(rows, baseline="a", extra_columns=["unselected_changed", "state", "resident_bytes", "extra", "exact"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:2] == ["c", "a"])
    assert line.split()[2:] == ["2.000", "-", "-", "12345", "12.35", "KB", "2.00", "MB", "500", "B", "True", "1.00",
                                "-"]
