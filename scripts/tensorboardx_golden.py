#!/usr/bin/env python3
"""A small golden TensorBoard event file written by tensorboardX, the writer PyTorch users know.

Writes tests/data/tensorboard/events.out.tfevents.golden, which tests/tensorboard.rs reads with
its own reader and compares, record by record, with the structure of the events lorasft writes:
the same tags lorasft uses (scalars as `simple_value`, the config as the text plugin's DT_STRING
tensor). Needs only (no torch):

    python3 -m venv /tmp/venv-tb && /tmp/venv-tb/bin/pip install tensorboardX==2.6.5
    /tmp/venv-tb/bin/python scripts/tensorboardx_golden.py

The values are fixed, and so are the wall times passed as `walltime`, so a rerun writes the same
records but the first (tensorboardX stamps its `file_version` event with the current time); the
file is copied to a fixed name.
"""
import glob
import os
import shutil
import tempfile

from tensorboardX import SummaryWriter

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tensorboard")
NAME = "events.out.tfevents.golden"

# Values exactly representable in f32, so the test can compare them exactly.
TRAIN = [
    (1, 2.5, 0.00390625, 1.25, 1024.0),
    (5, 1.75, 0.01, 0.5, 2048.0),
    (10, 1.125, 0.0078125, 0.375, 4096.0),
]
EVAL = [(0, 3.0), (10, 1.5)]
CONFIG = '[run]\nname = "golden"\nseed = 0\n'


def main():
    with tempfile.TemporaryDirectory() as tmp:
        w = SummaryWriter(logdir=tmp)
        t = 1_700_000_000.0
        w.add_text("config", CONFIG, 0, walltime=t)
        for step, v in EVAL[:1]:
            w.add_scalar("eval/loss", v, step, walltime=t)
        for step, loss, lr, gn, tps in TRAIN:
            t += 1.0
            w.add_scalar("train/loss", loss, step, walltime=t)
            w.add_scalar("train/learning_rate", lr, step, walltime=t)
            w.add_scalar("train/grad_norm", gn, step, walltime=t)
            w.add_scalar("train/tokens_per_s", tps, step, walltime=t)
        for step, v in EVAL[1:]:
            w.add_scalar("eval/loss", v, step, walltime=t)
        w.close()
        (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        os.makedirs(OUT, exist_ok=True)
        shutil.copyfile(path, os.path.join(OUT, NAME))
    print(os.path.join(OUT, NAME), os.path.getsize(os.path.join(OUT, NAME)), "bytes")


if __name__ == "__main__":
    main()
