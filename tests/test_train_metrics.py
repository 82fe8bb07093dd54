"""Metrics: ETA timing, duration format, what the logger writes (and that non-logging ranks write nothing)."""

import io
import json
import math

from hope_scale.train.metrics import MetricsLogger, StepTimer, format_duration


def test_step_timer_ignores_warmup_step_once_others_exist():
    t = StepTimer(window=3)
    assert math.isnan(t.eta(5))
    t.add(10.0)  # first step: slow warm-up
    assert t.eta(2) == 20.0
    for s in (1.0, 2.0, 3.0, 4.0):
        t.add(s)
    assert t.mean == 3.0  # window of the last 3, warm-up excluded
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(float("nan")) == "?"


def test_logger_writes_line_jsonl_and_events(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path / "tb", enabled=True, max_steps=10, flops_per_token=6e6, peak_flops_total=1e12,
                        devices=2, stream=out)
    log.log_step(1, 4096, 5.5, 1e-3, 2.0, step_tokens=4096, seconds=2.0, memory={"layer0/eta": 0.1}, write=True)
    log.log_step(2, 8192, 5.0, 1e-3, 1.5, step_tokens=4096, seconds=1.0, memory=None, write=False)
    log.log_eval(2, 4.0, batches=3)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    first = lines[0]
    assert first["train/loss"] == 5.5 and first["perf/tokens_per_sec"] == 2048.0
    assert first["perf/tokens_per_sec_per_device"] == 1024.0
    assert abs(first["perf/mfu"] - 6e6 * 2048 / 1e12) < 1e-12
    assert first["hope/layer0/eta"] == 0.1 and first["progress/tokens"] == 4096
    assert lines[1]["eval/loss"] == 4.0 and abs(lines[1]["eval/perplexity"] - math.exp(4.0)) < 1e-9
    text = out.getvalue()
    assert "step      1/10 | loss 5.5000" in text and "ETA" in text and "val loss 4.0000" in text
    assert "step      2/10" not in text  # not a logging step
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_disabled_logger_writes_nothing(tmp_path):
    out = io.StringIO()
    log = MetricsLogger(tmp_path / "tb", enabled=False, max_steps=10, flops_per_token=1.0, peak_flops_total=1.0,
                        devices=1, stream=out)
    log.log_step(1, 1, 1.0, 1.0, 1.0, step_tokens=1, seconds=1.0, memory=None, write=True)
    log.log_eval(1, 1.0, 1)
    log.close()
    assert out.getvalue() == "" and not (tmp_path / "tb").exists()


def test_mfu_only_against_a_declared_peak_and_never_above_100_percent(tmp_path):
    out = io.StringIO()
    undeclared = MetricsLogger(tmp_path / "a", enabled=True, max_steps=10, flops_per_token=6e6,
                               peak_flops_total=None, devices=2, stream=out)
    undeclared.log_step(1, 4096, 5.5, 1e-3, 2.0, step_tokens=4096, seconds=2.0, memory=None, write=True)
    undeclared.close()
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text())
    assert "perf/mfu" not in row and row["perf/flops_per_sec_per_device"] == 6e6 * 2048 / 2
    assert "MFU" not in out.getvalue() and "6.14 GFLOP/s/device" in out.getvalue()
    out = io.StringIO()
    too_low = MetricsLogger(tmp_path / "b", enabled=True, max_steps=10, flops_per_token=6e6,
                            peak_flops_total=1e9, devices=2, stream=out)  # declared 0.5e9 per device, achieved 6.1e9
    for step in (1, 2):
        too_low.log_step(step, 4096, 5.5, 1e-3, 2.0, step_tokens=4096, seconds=2.0, memory=None, write=True)
    too_low.close()
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all("perf/mfu" not in r for r in rows)
    text = out.getvalue()
    assert text.count("exceeds the declared peak") == 1 and "MFU" not in text.replace("MFU is not reported", "")
