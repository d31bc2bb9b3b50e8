"""Overall progress of a benchmark: run k of N, elapsed time, ETA.

The ETA counts training steps only, at the post-compilation step times
measured so far: a run's first step (which compiles, ``first_step_s`` in
``benchmarks/train.py``) is timed apart and left out, and so are the
evaluations and the cost measurement after each task. A (task, method) not
run yet is estimated by the mean step time of the methods already run on
its task; runs of a task none of whose runs have finished are counted apart
(the ETA is then a lower bound, marked ``>=``). The rest of each run's wall
time (compilation, evaluations, the final gradient norm and Hessian
eigenvalue) is estimated the same way and shown apart, ``(+h:mm:ss
compile/eval)``: on short runs it dominates.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Sequence, TextIO


def _hms(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
  """Prints ``run k of N (task/method/seed s), elapsed, ETA`` per run.

  Attributes:
    plan: the runs in order, ``(task, method, seed)``.
    enabled: print anything at all.
  """

  def __init__(self, plan: Sequence[tuple[str, str, int]], *,
               enabled: bool = True, stream: Optional[TextIO] = None,
               clock=time.perf_counter):
    self.plan = list(plan)
    self.enabled = enabled
    self._stream = stream
    self._clock = clock
    self._t0 = clock()
    self._steps: dict[str, int] = {}  # steps of one run, per task
    self._step_s: dict[tuple[str, str], list[float]] = {}
    self._other_s: dict[tuple[str, str], list[float]] = {}
    self._started: Optional[float] = None
    self._next = 0
    if enabled:
      self._print(f"{len(self.plan)} training runs; ETA from post-compile "
                  "step times (compilation, evaluation and cost timing not "
                  "counted)")

  def _print(self, line: str) -> None:
    print(line, file=self._stream or sys.stderr, flush=True)

  def set_steps(self, task: str, steps: int) -> None:
    """The number of training steps of each run of ``task``."""
    self._steps[task] = int(steps)

  @staticmethod
  def _estimate(table, task: str, method: str) -> Optional[float]:
    mine = table.get((task, method))
    if mine:
      return sum(mine) / len(mine)
    same_task = [sum(v) / len(v) for (t, _), v in table.items()
                 if t == task and v]
    return sum(same_task) / len(same_task) if same_task else None

  def step_time(self, task: str, method: str) -> Optional[float]:
    """Estimated post-compile seconds per step of ``method`` on ``task``."""
    return self._estimate(self._step_s, task, method)

  def eta(self, start: int) -> tuple[float, int]:
    """Seconds of training steps left from run ``start`` (0-based) on, and
    the number of those runs with no estimate yet."""
    total, unknown = 0.0, 0
    for task, method, _ in self.plan[start:]:
      s, n = self.step_time(task, method), self._steps.get(task)
      if s is None or n is None:
        unknown += 1
      else:
        total += s * n
    return total, unknown

  def other_time(self, start: int) -> float:
    """Estimated seconds outside the timed steps (compilation, evaluation)
    of the runs from ``start`` on that have an estimate."""
    return sum(self._estimate(self._other_s, t, m) or 0.0
               for t, m, _ in self.plan[start:])

  def line(self, k: int) -> str:
    """The progress line shown before run ``k`` (0-based)."""
    task, method, seed = self.plan[k]
    eta, unknown = self.eta(k)
    if unknown == len(self.plan) - k:
      eta_text = "ETA ? (no step timed on this task yet)"
    elif unknown:
      eta_text = (f"ETA >= {_hms(eta)} (+{unknown} runs of tasks not timed "
                  "yet)")
    else:
      eta_text = f"ETA {_hms(eta)}"
    other = self.other_time(k)
    if other and unknown < len(self.plan) - k:
      eta_text += f" (+{_hms(other)} compile/eval)"
    return (f"run {k + 1} of {len(self.plan)} ({task}/{method}/seed {seed}),"
            f" elapsed {_hms(self._clock() - self._t0)}, {eta_text}")

  def start(self, k: Optional[int] = None) -> None:
    """Announces run ``k`` (default: the one after the last finished)."""
    if k is not None:
      self._next = k
    self._started = self._clock()
    if self.enabled:
      self._print(self.line(self._next))

  def finish(self, record: dict[str, Any], task: str,
             steps: Optional[int] = None) -> None:
    """Records a finished run: its post-compile time per step.

    Args:
      record: ``benchmarks.train.train``'s result (``train_time_s`` excludes
        the first step, which compiles).
      task: the run's task name.
      steps: its training steps (default: those given by ``set_steps``).
    """
    steps = steps if steps is not None else self._steps.get(task)
    key = (task, record["method"])
    if steps and steps > 1 and record.get("train_time_s") is not None:
      self._step_s.setdefault(key, []).append(
          record["train_time_s"] / (steps - 1))
      if self._started is not None:
        self._other_s.setdefault(key, []).append(max(
            0.0, self._clock() - self._started - record["train_time_s"]))
    self._started = None
    self._next += 1

  def note(self, text: str) -> None:
    """A line between runs (e.g. the cost timing after a task's runs)."""
    if self.enabled:
      self._print(f"{text}, elapsed {_hms(self._clock() - self._t0)}")

  def done(self) -> None:
    if self.enabled:
      self._print(f"{len(self.plan)} runs done, elapsed "
                  f"{_hms(self._clock() - self._t0)}")
