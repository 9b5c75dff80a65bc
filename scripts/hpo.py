"""One hyperparameter-tuning trial: train_lib's loop, nothing more.

  python hpo.py --lr 0.006 --batch-size 64 --test-batch-size 512 --epochs 8

Prints an epoch line per epoch and the summary lines (metrics.py) that the tuner's
MetricDefinitions read; the objective is "average validation loss" by default, printed after
every epoch for the weights kept so far (SageMaker's automatic early stopping reads it per
epoch), so its last value, the final metric, is the kept weights' validation loss.
The pipeline gives trials no test channel (the search never sees the test split);
given one, a trial reports the test lines too. Writes the same model dir as
train_model.py: a trial's model is deployable too.
"""
import sys

import train_lib

if __name__ == "__main__":
    sys.exit(train_lib.main(sys.argv[1:], prog="hpo.py", require_test=False))
