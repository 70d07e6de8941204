"""The non-finite-step guard: a step whose loss or gradient is not finite is skipped (the caller does not apply it)
and counted; `max_in_row` of them in a row stop the run with a message naming the steps and the last checkpoint."""
from __future__ import annotations


class NonFiniteStop(RuntimeError):
    pass


class NonFiniteGuard:
    def __init__(self, max_in_row: int, log=print):
        self.max_in_row, self.log = max_in_row, log
        self.skipped_steps, self.in_row = 0, 0

    def record(self, finite: bool, step: int, detail: str = "", last_checkpoint=None) -> None:
        """After step `step` (1-based). Raises NonFiniteStop at `max_in_row` non-finite steps in a row."""
        if finite:
            self.in_row = 0
            return
        self.skipped_steps += 1
        self.in_row += 1
        self.log(f"step {step}: non-finite loss/gradients{f' ({detail})' if detail else ''}, update skipped "
                 f"({self.in_row} in a row, {self.skipped_steps} in total)")
        if self.in_row >= self.max_in_row:
            raise NonFiniteStop(
                f"stopping: {self.in_row} non-finite steps in a row (max_nonfinite={self.max_in_row}) at steps "
                f"{step - self.in_row + 1}..{step}. The weights are untouched since the last finite step; last "
                f"checkpoint: {last_checkpoint or 'none'}. Lower lr, enable warmup_steps, use precision=fp32, or "
                f"check the data.")

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "nonfinite_in_row": self.in_row}

    def load_state_dict(self, d: dict) -> None:
        self.skipped_steps, self.in_row = int(d["skipped_steps"]), int(d["nonfinite_in_row"])
