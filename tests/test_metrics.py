"""The metric lines the scripts print are read back by the regexes SageMaker gets."""
import math
import re

import pytest

from scripts import metrics


def _epoch_line(**over):
    values = dict(train_loss=1.25, train_acc=0.5, valid_loss=0.75, valid_acc=0.625, lr=3e-4)
    values.update(over)
    return metrics.format_epoch(2, 8, 12.34, **values)


def test_every_definition_compiles_and_fits_sagemaker_limits():
    names = [d["Name"] for d in metrics.METRIC_DEFINITIONS]
    assert len(names) == len(set(names))
    for d in metrics.METRIC_DEFINITIONS:
        re.compile(d["Regex"])
        assert 1 <= len(d["Name"]) <= 255 and 1 <= len(d["Regex"]) <= 500


def test_epoch_line_round_trips_every_field():
    found = metrics.final_metrics(_epoch_line())
    assert found == {"epoch:train_loss": 1.25, "epoch:train_acc": 0.5, "epoch:valid_loss": 0.75,
                     "epoch:valid_acc": 0.625, "epoch:lr": 3e-4}


def test_summary_lines_do_not_match_each_other():
    log = "\n".join([
        metrics.format_summary("average validation loss", 0.5),
        metrics.format_summary("validation accuracy", 0.75),
        metrics.format_summary("average test loss", 0.625),
        metrics.format_summary("test accuracy", 0.875),
        metrics.format_summary("test top5 accuracy", 1.0),
    ])
    parsed = metrics.parse_metrics(log)
    assert parsed["average validation loss"] == [0.5]
    assert parsed["validation accuracy"] == [0.75]
    assert parsed["average test loss"] == [0.625]
    assert parsed["test accuracy"] == [0.875]
    assert parsed["test top5 accuracy"] == [1.0]


def test_final_value_is_the_last_one_like_sagemaker():
    log = "\n".join(_epoch_line(valid_loss=v) for v in (0.9, 0.7, 0.8))
    assert metrics.parse_metrics(log)["epoch:valid_loss"] == [0.9, 0.7, 0.8]
    assert metrics.final_metrics(log)["epoch:valid_loss"] == 0.8


def test_exponents_and_nan_parse():
    log = _epoch_line(lr=1.5e-07, train_loss=float("nan"))
    parsed = metrics.parse_metrics(log)
    assert parsed["epoch:lr"] == [1.5e-07]
    assert math.isnan(parsed["epoch:train_loss"][0])
    assert "epoch:train_loss" not in metrics.final_metrics(log)


def test_lines_with_a_log_prefix_still_match():
    # torchrun / CloudWatch prefix lines with rank tags; SageMaker's regex search must still find them.
    line = "[1,0]<stdout>:" + metrics.format_summary("test accuracy", 0.5)
    assert metrics.final_metrics(line)["test accuracy"] == 0.5


def test_bad_lines_are_refused():
    with pytest.raises(ValueError, match="lr"):
        metrics.format_epoch(1, 2, 1.0, train_loss=1, train_acc=1, valid_loss=1, valid_acc=1)
    with pytest.raises(ValueError, match="unknown summary metric"):
        metrics.format_summary("accuracy", 1.0)


def test_progress_and_summary_lines_are_read_with_this_module_s_regexes():
    """The local executor and tuner draw progress with epoch_progress / summary_name, not regexes of their own."""
    assert metrics.epoch_progress(_epoch_line()) == (2, 8, _epoch_line().split(" ", 2)[2])
    assert metrics.epoch_progress("epochs 2/8") is None
    for name in metrics.SUMMARY_FIELDS:
        assert metrics.summary_name(metrics.format_summary(name, 0.5)) == name
    assert metrics.summary_name("test accuracy is great") is None
