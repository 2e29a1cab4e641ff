"""When sites arrive and when the merger publishes: the timeline of an asynchronous consortium.

Every site starts fine-tuning at time 0 from version 0 (the base) and needs `speeds[i]` time units per
fine-tune (its relative slowness: data size, hardware, queue). When it finishes it *arrives*: its vector goes
into the merger's buffer, and it starts again at once from the newest version published by then. The merger
publishes version N+1 onto version N whenever the buffer holds `buffer` vectors (FedBuff, Nguyen et al.,
AISTATS 2022), and once more at the end for what is left in it. A site arrives at most `rounds` times.

Arrivals at the same time are taken in site order, and every site finishing at time t restarts after every
arrival and publication at t: a version published at t is the one a site starting at t trains from. No site
ever waits for another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taskvec.errors import ConfigError, check_range

SPEED_RANGE = (1.0, 4.0)  # the default: relative time per fine-tune drawn uniformly from this range
MAX_ARRIVALS = 10_000  # fine-tuning runs of one simulation; the timeline is planned in memory up front


@dataclass(frozen=True)
class Arrival:
    """A site's `round`-th fine-tune (from 0), trained on version `base_version` from `start` to `end`."""

    site: int
    round: int
    start: float
    end: float
    base_version: int


@dataclass(frozen=True)
class Publication:
    """Version `version` merged at `time` onto version `version - 1` from the vectors of `arrivals` (indices
    into `Schedule.arrivals`)."""

    version: int
    time: float
    arrivals: tuple[int, ...]


@dataclass(frozen=True)
class Schedule:
    speeds: tuple[float, ...]
    rounds: int
    buffer: int
    arrivals: tuple[Arrival, ...]  # in arrival order
    versions: tuple[Publication, ...]  # versions 1..N in order

    def events(self) -> list[Arrival | Publication]:
        """Arrivals and publications in the order they happen (a publication right after its last arrival)."""
        last = {p.arrivals[-1]: p for p in self.versions}
        out: list[Arrival | Publication] = []
        for i, a in enumerate(self.arrivals):
            out.append(a)
            if i in last:
                out.append(last[i])
        return out


def default_speeds(sites: int, seed: int) -> list[float]:
    """Relative time per fine-tune for each site, uniform in `SPEED_RANGE`, from `seed`."""
    rng = np.random.default_rng([seed, 0x5EED])
    return [round(float(s), 3) for s in rng.uniform(*SPEED_RANGE, size=sites)]


def plan_schedule(speeds: list[float], rounds: int, buffer: int) -> Schedule:
    """The timeline of `len(speeds)` sites arriving `rounds` times each, merged every `buffer` arrivals."""
    if not speeds:
        raise ConfigError("speeds must name one relative time per site, got none", field="speeds", got=speeds)
    for s in speeds:
        check_range("speeds", s, low=0)
    for name, v in (("rounds", rounds), ("buffer", buffer)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}", field=name, expected=">= 1", got=v)
    if rounds * len(speeds) > MAX_ARRIVALS:
        raise ConfigError(f"rounds must keep the arrivals (rounds × sites: {rounds} × {len(speeds)}) at most "
                          f"{MAX_ARRIVALS:,}, each a fine-tuning run", field="rounds", got=rounds)
    running = {site: (0.0, 0) for site in range(len(speeds))}  # site -> (start, base version)
    done = dict.fromkeys(running, 0)
    arrivals: list[Arrival] = []
    versions: list[Publication] = []
    pending: list[int] = []
    while running:
        t = min(start + speeds[s] for s, (start, _) in running.items())
        finishing = sorted(s for s, (start, _) in running.items() if start + speeds[s] == t)
        for s in finishing:
            start, base = running.pop(s)
            arrivals.append(Arrival(s, done[s], start, t, base))
            done[s] += 1
            pending.append(len(arrivals) - 1)
            if len(pending) == buffer:
                versions.append(Publication(len(versions) + 1, t, tuple(pending)))
                pending = []
        for s in finishing:
            if done[s] < rounds:
                running[s] = (t, len(versions))
    if pending:  # the last, partial buffer: every arrival counts
        versions.append(Publication(len(versions) + 1, arrivals[-1].end, tuple(pending)))
    return Schedule(tuple(speeds), rounds, buffer, tuple(arrivals), tuple(versions))
