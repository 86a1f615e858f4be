import csv
import json

from hybridopt.training.metrics import MetricsLogger


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_resume_drops_rows_after_the_checkpoint_and_keeps_the_rest(tmp_path):
    path = tmp_path / "metrics.csv"
    m = MetricsLogger(path)
    for step in range(1, 7):
        m.log("step", {"step": step, "epoch": 1 + (step - 1) // 3, "loss": 1.0 / step})
        if step % 3 == 0:
            m.log("epoch", {"epoch": step // 3, "step": step, "loss": 0.5})
    m.close()
    m = MetricsLogger(path, resume_step=4)  # checkpoint at step 4; steps 5-6 were never checkpointed
    m.log("step", {"step": 5, "epoch": 2, "loss": 0.2})
    m.close()
    steps = _rows(tmp_path / "metrics_steps.csv")
    assert [int(r["step"]) for r in steps] == [1, 2, 3, 4, 5]
    assert float(steps[-1]["loss"]) == 0.2
    assert [int(r["epoch"]) for r in _rows(path)] == [1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in records] == [
        ("step", 1), ("step", 2), ("step", 3), ("epoch", 3), ("step", 4), ("step", 5)]
