"""How many connections the pool should have: a pure decision object, no I/O, no clock.

:class:`GrowthPolicy` is fed one :class:`Sample` per scaling interval by
:class:`~qbsync.source.pool.ConnectionPool` and answers with a :class:`Decision` (add *n*,
retire *n*, or hold) and the reason, which the pool logs and counts. It does not know how a
connection is opened (dialled, or dialled back by the destination): the pool does that, so the
policy is the same whatever the connection factory.

The policy is TCP slow start applied to connections:

* **Grow fast.** When every open connection was the bottleneck during an interval (a piece
  waiting on it for the destination's credit or for the socket), the path has room the
  connections do not use. The pool doubles (adds as many as it has, up to
  ``--max-connections``) and judges the step once the new connections are up: mean throughput
  over :attr:`GrowthPolicy.judge_intervals` whole intervals after, against before (or after
  one whole interval, if that one already shows at least half the expected gain).
* **Keep what pays.** A step that raised throughput by at least ``min_gain`` is kept. If the
  gain was less than half of what the added connections would carry at the old per-connection
  rate, the path is nearly full: further steps add one connection at a time (congestion
  avoidance). A step below ``min_gain`` is undone (the connections it added are retired) and
  no step is tried for a cooldown that doubles with each failed step (up to
  ``max_cooldown``): on loopback or a LAN, where one connection already saturates, the pool
  tries once, gives up quickly, and tries less and less often.
* **Shrink on idle.** Connections above ``--min-connections`` are retired one per interval
  after ``idle_after`` seconds without traffic; the next transfer starts growing anew.

Judging needs work to judge by: if the connections were no longer the bottleneck when the
step is judged (the work ran out, or the end of a transfer fell into the judging window) the
step is kept without a verdict (reason ``no_demand``) and the idle rule takes it back later.
"""

from __future__ import annotations

import enum

import attrs


class Action(enum.Enum):
    HOLD = "hold"
    ADD = "up"
    RETIRE = "down"


@attrs.frozen
class Sample:
    """What the pool saw during one scaling interval."""

    throughput: float  # payload bytes per second acknowledged over the interval
    slots: int  # connections open or connecting, not retiring
    connected: int  # of those, open
    saturated: bool  # every open connection was the bottleneck most of the interval
    demand: bool  # pieces were waiting (in the queue or on a connection) at the end


@attrs.frozen
class Decision:
    action: Action
    count: int = 0
    reason: str = ""
    gain: float | None = None  # relative throughput change of the step judged (if any)


HOLD = Decision(Action.HOLD)


@attrs.define
class _Step:
    added: int  # connections this step added
    target: int  # slots after the step
    before: float  # mean throughput before the step
    before_n: int  # connections before the step
    age: int = 0  # intervals since the step
    ready_at: int | None = None  # age at which every added connection was open


@attrs.define
class GrowthPolicy:
    """See the module docstring. Times are in seconds of the caller's clock."""

    min_connections: int
    max_connections: int
    judge_intervals: int = 2
    min_gain: float = 0.10
    cooldown: float = 30.0
    max_cooldown: float = 600.0
    idle_after: float = 60.0
    trial_max: int = 12  # intervals a step's connections get to come up before it is judged
    _history: list[float] = attrs.field(factory=list)
    _saturated_run: int = 0
    _step: _Step | None = None
    _doubling: bool = True
    _cooldown_until: float = float("-inf")
    _failed_steps: int = 0
    _last_traffic: float | None = None

    @property
    def doubling(self) -> bool:
        """True while steps double the connections (False: one at a time)."""
        return self._doubling

    def step(self, now: float, s: Sample) -> Decision:
        """One interval's verdict. The caller carries it out (add or retire the newest
        ``count`` connections) before the next call."""
        self._history = [*self._history[-(2 * self.judge_intervals) :], s.throughput]
        self._saturated_run = self._saturated_run + 1 if s.saturated else 0
        if self._last_traffic is None or s.throughput > 0 or s.demand:
            self._last_traffic = now
        if self._step is not None:
            verdict = self._judge(now, s)
            if verdict is not None:
                return verdict
            if self._step is not None:
                return HOLD
        if self.max_connections <= self.min_connections:
            return HOLD
        # A step needs a baseline: in the first interval of a long-RTT transfer pieces wait
        # on every connection before the first ack is back (throughput 0), and a step judged
        # against 0 could not show a gain.
        if (
            self._saturated_run >= 1
            and s.throughput > 0
            and s.slots < self.max_connections
            and now >= self._cooldown_until
        ):
            n = s.slots if self._doubling else 1
            n = max(1, min(n, self.max_connections - s.slots))
            recent = self._history[-min(self._saturated_run, self.judge_intervals) :]
            self._step = _Step(
                added=n,
                target=s.slots + n,
                before=sum(recent) / len(recent),
                before_n=max(1, s.connected),
            )
            return Decision(Action.ADD, n, "saturated" if self._doubling else "saturated_additive")
        if now - self._last_traffic > self.idle_after and s.slots > self.min_connections:
            # A new transfer after an idle spell may see another path: start from scratch.
            self._doubling = True
            self._failed_steps = 0
            self._cooldown_until = float("-inf")
            return Decision(Action.RETIRE, 1, "idle")
        return HOLD

    def _judge(self, now: float, s: Sample) -> Decision | None:
        step = self._step
        assert step is not None
        step.age += 1
        if step.ready_at is None and s.connected >= step.target:
            step.ready_at = step.age
        # The interval in which the last one connected is not a fair sample: judge on the
        # judge_intervals whole intervals after it (or give up waiting after trial_max).
        # A step that plainly pays (the first whole interval already gained at least half of
        # the added connections' share) is kept at once, so the next doubling comes an
        # interval sooner: a few-GiB transfer is over in seconds on a fast long path.
        expected = step.added / step.before_n  # the gain if each new one carried as much
        whole = 0 if step.ready_at is None else step.age - step.ready_at
        early = (
            whole >= 1
            and step.before > 0
            and (self._history[-1] - step.before) / step.before >= expected / 2
        )
        if not early and step.age < self.trial_max and whole < self.judge_intervals:
            return None
        self._step = None
        span = 1 if early else self.judge_intervals
        after = sum(self._history[-span:]) / span
        gain = (after - step.before) / step.before if step.before > 0 else 0.0
        if not s.saturated:
            # The connections are no longer the bottleneck (the work ran out, or its tail is
            # in this window): a drop in throughput says nothing about the step. No verdict;
            # the idle rule takes the connections back if they stay unused.
            return Decision(Action.HOLD, 0, "no_demand", gain)
        if gain < self.min_gain:
            self._doubling = False
            self._failed_steps += 1
            wait = min(self.max_cooldown, self.cooldown * 2 ** (self._failed_steps - 1))
            self._cooldown_until = now + wait
            return Decision(Action.RETIRE, step.added, "no_gain", gain)
        self._failed_steps = 0
        if gain < expected / 2:
            self._doubling = False
        return Decision(Action.HOLD, 0, "kept", gain)
