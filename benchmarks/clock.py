"""The training loops' step clock: training wall time without compilation.

A training loop dispatches steps asynchronously and blocks only where it must
(the end of an epoch, the end of the run). A step that compiled a program is
different: its time is mostly compilation. That is the first step, and, for a
method of several static programs (the host driver of the reuse and
selection engines), the first use of each program. :class:`StepClock` runs
each step, notices from a compilation counter whether it compiled, and if so
blocks, times it apart and leaves it out of the training time. Both the
vision/MLP loop (:mod:`benchmarks.train`) and the fine-tuning loop
(:mod:`benchmarks.finetune`) use it, and record the same fields
(:meth:`StepClock.fields`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax


class StepClock:
  """Times training steps, setting apart those that compiled a program.

  Args:
    compilations: returns how many programs have been compiled so far (a
      jitted function's cache size, a driver's counter, the length of a list
      of programs); a step after which it changed compiled one.

  Use :meth:`start` before a stretch of steps, :meth:`step` for each and
  :meth:`stop` (which blocks on its arguments) after it; time outside a
  start/stop stretch, such as evaluation, is not counted.
  """

  def __init__(self, compilations: Callable[[], int]):
    self._compilations = compilations
    self._known = int(compilations())
    self._t0: Optional[float] = None
    self.train_s = 0.0
    self.steps = 0
    self.first_step_s: Optional[float] = None
    self.compile_steps = 0
    self.compile_steps_s = 0.0

  def start(self) -> None:
    """Starts a timed stretch of steps."""
    self._t0 = time.perf_counter()

  def step(self, fn: Callable[..., Any], *args: Any) -> Any:
    """Runs one step ``fn(*args)`` and returns its outputs. If it compiled a
    program (always so for the first step), it is blocked on and timed apart:
    the first step in :attr:`first_step_s`, later ones in
    :attr:`compile_steps` and :attr:`compile_steps_s`."""
    if self._t0 is None:
      raise RuntimeError("StepClock.step outside start()/stop()")
    ts = time.perf_counter()
    out = fn(*args)
    count = int(self._compilations())
    if self.first_step_s is None or count != self._known:
      jax.block_until_ready(out)
      dt = time.perf_counter() - ts
      if self.first_step_s is None:
        self.first_step_s = dt
      else:
        self.compile_steps += 1
        self.compile_steps_s += dt
      self._t0 += dt
      self._known = count
    self.steps += 1
    return out

  def stop(self, *outputs: Any) -> float:
    """Blocks on ``outputs``, ends the stretch and returns the training time
    so far (seconds)."""
    if self._t0 is None:
      raise RuntimeError("StepClock.stop without start()")
    jax.block_until_ready(outputs)
    self.train_s += time.perf_counter() - self._t0
    self._t0 = None
    return self.train_s

  def fields(self) -> dict[str, Any]:
    """The recorded fields: ``train_time_s``, ``first_step_s``,
    ``compile_steps``, ``compile_steps_s`` and ``compilations``."""
    return {"train_time_s": self.train_s, "first_step_s": self.first_step_s,
            "compile_steps": self.compile_steps,
            "compile_steps_s": self.compile_steps_s,
            "compilations": int(self._compilations())}
