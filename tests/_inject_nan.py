"""Test-only fault injection for generator.train: rank 0's loss is NaN on the first micro-batch of the given steps
(1-based). By monkeypatching, never through a production config field or environment variable.

    python tests/_inject_nan.py 3,5 --config configs/generator/tiny.yaml ...   # then generator.train's arguments
    accelerate launch ... tests/_inject_nan.py 3 ...  /  torchrun ... tests/_inject_nan.py 3 ...
In-process: `patch({3, 4}, monkeypatch.setattr)`.
"""
import sys

import generator.train as gtrain


def patch(steps, setattr=setattr) -> None:
    steps = {int(s) for s in steps}
    real_step, real_forward = gtrain.train_step, gtrain.LossModule.forward
    pending = {"nan": False}

    def train_step(run, batches):
        pending["nan"] = run.step + 1 in steps and run.acc.process_index == 0
        return real_step(run, batches)

    def forward(self, codes, labels):
        loss, group_losses = real_forward(self, codes, labels)
        if pending["nan"]:
            pending["nan"] = False
            loss = loss * float("nan")
        return loss, group_losses

    setattr(gtrain, "train_step", train_step)
    setattr(gtrain.LossModule, "forward", forward)


if __name__ == "__main__":
    patch(sys.argv[1].split(","))
    sys.exit(gtrain.main(sys.argv[2:]))
