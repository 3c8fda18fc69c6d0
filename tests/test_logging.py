import sys
import types

import pytest

from smallgpt.errors import UserError
from smallgpt.train.logging import MetricsLogger, WandbRun, read_metrics


def test_tensorboard_backend_writes_the_scalars(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log("train", iter=0, loss=3.5, lr=1e-3)
    logger.log("train", iter=10, loss=2.5, lr=1e-3)
    logger.log("eval", iter=10, val_loss=2.75)
    logger.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 3.5), (10, 2.5)]
    assert [e.value for e in acc.Scalars("eval/val_loss")] == [2.75]
    assert [r["event"] for r in read_metrics(tmp_path)] == ["train", "train", "eval"]


def test_wandb_backend_gets_config_scalars_and_finish(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.log = lambda values, step: calls.append(("log", values, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path, wandb_run=WandbRun("p", "r", {"log": {"wandb_log": True}}))
    logger.log("eval", iter=5, val_loss=2.0, note="text is not a scalar")
    logger.close()
    (kind, init), log, finish = calls
    assert kind == "init" and init["project"] == "p" and init["name"] == "r"
    assert init["config"]["log"]["wandb_log"] is True and init["dir"] == str(tmp_path)
    assert log == ("log", {"eval/val_loss": 2.0}, 5) and finish == ("finish",)


@pytest.mark.parametrize(
    "package, backend", [("tensorboard", {"tensorboard": True}), ("wandb", {"wandb_run": WandbRun("p", "r")})]
)
def test_an_absent_backend_package_is_one_clear_line(tmp_path, monkeypatch, package, backend):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(UserError, match=f"pip install {package}") as error:
        MetricsLogger(tmp_path, **backend)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "metrics.jsonl").exists()
