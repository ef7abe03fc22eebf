"""A serving engine's decode iterations, read back from the tokens it streamed: what each step cost, and at what batch.

llama-server (and any engine that streams every token as its step ends) sends
all the tokens one step made for a request together: the accepted drafts and
the target's own token arrive within a few milliseconds, and the next step's
tokens a whole step later. Over the requests that ran at one time, the arrival
times therefore fall into clusters, one per engine step, and the time from one
cluster to the next is one step's cost, measured at the batch that step had.

This counts the speculating steps directly. The per-request alternative
(``timings.predicted_ms`` / an estimate of its steps, charged to the level's
concurrency) mixes steps of every batch a request lived through: at
concurrency 4 a request's last steps run beside 3, 2 or 1 others, so the
4-row step came out 8 % cheaper than the steps that really had 4 rows
(llama-server, Qwen2.5-Coder 1.5B drafted by 0.5B, one thread: 1.27 s against
1.38 s), and nothing told how many steps had drafted.

A step is kept as a decode step when no request received its first token in it
(that step also processed a prompt, which the simulator charges as prefill)
and none was sent while it ran (the engine may have begun its prompt then).
Each row's verify width is 1 + its draft: min(K, its remaining budget - 1) on
an engine that drafts (llama-server caps the draft there), 1 without.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

JOIN_MS = 15.0  # tokens closer than this (ms) came from the same step; steps here are >= 40 ms apart


@dataclass(frozen=True)
class ServerStep:
    """One engine step seen from the client.

    ms: from the previous step's tokens to this one's (wall, milliseconds).
    rows: requests that received tokens in it. widths: each row's verify width
    (tokens fed to the target). contexts: each row's tokens before the step
    (prompt + generated). decode: True when no prompt was processed in it (see
    the module docstring). tokens: tokens received in it over all rows.
    """

    ms: float
    rows: int
    widths: tuple[int, ...]
    contexts: tuple[int, ...]
    decode: bool
    tokens: int


def server_steps(requests: Sequence[dict[str, Any]], k: int = 0, join_ms: float = JOIN_MS) -> list[ServerStep]:
    """The engine's steps during one closed-loop run, from its requests' streamed token times.

    requests: serve-bench records (``RequestRecord.as_dict``) of one endpoint at one level: ``start_s``
        (s from the run's start), ``ttft_ms``, ``itl_ms`` (one gap per later token, ms), ``input_tokens``,
        ``output_tokens``, ``ok``. Failed requests and those without streamed gaps are left out.
    k: tokens drafted per step (0: speculation off).
    join_ms: arrivals closer than this belong to one step.

    Returns the steps in time order after the first (whose start is not seen). Raises ValueError for k < 0.
    """
    if k < 0:
        raise ValueError(f"server_steps requires k >= 0; got {k}")
    streams = []  # (send time s, [token arrival times s], prompt tokens, output tokens)
    for r in requests:
        gaps = r.get("itl_ms") or []
        if not r.get("ok") or r.get("ttft_ms") is None or len(gaps) != max(0, (r.get("output_tokens") or 0) - 1):
            continue
        t = r["start_s"] + r["ttft_ms"] / 1e3
        times = [t]
        for gap in gaps:
            t += gap / 1e3
            times.append(t)
        streams.append((r["start_s"], times, int(r.get("input_tokens") or 0), len(times)))
    arrivals = sorted(t for _, times, _, _ in streams for t in times)
    clusters: list[float] = []  # each step's last arrival
    for t in arrivals:
        if clusters and (t - clusters[-1]) * 1e3 < join_ms:
            clusters[-1] = t
        else:
            clusters.append(t)
    steps = []
    for previous, end in zip(clusters, clusters[1:]):
        begin = previous + join_ms / 1e3  # the earliest arrival this cluster can hold
        rows, widths, contexts, tokens, decode = 0, [], [], 0, True
        for sent, times, prompt, output in streams:
            got = [i for i, t in enumerate(times) if begin - 1e-9 < t <= end + 1e-9]
            if previous < sent < end:
                decode = False  # sent while the step ran: its prompt may be in it
            if not got:
                continue
            if got[0] == 0:
                decode = False  # a first token: this step processed a prompt
            rows += 1
            tokens += len(got)
            before = got[0]  # tokens this request had before the step
            remaining = output - before  # of its budget (ignore_eos: it makes all of them)
            widths.append(1 + max(0, min(k, remaining - 1)))
            contexts.append(prompt + before)
        if rows:
            steps.append(ServerStep((end - previous) * 1e3, rows, tuple(widths), tuple(contexts), decode, tokens))
    return steps
