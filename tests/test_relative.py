"""Aggregation into the sets of SPEC section 4: hand-built records with known answers, and
properties (the sets partition L_cc, R and R_NOT; percentages stay in [0, 100])."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.engine.result import CERTIFIED, NOT_REFUTED, REFUTED, STATUSES, UNKNOWN
from verifier.run.records import InputRecord, Outcome
from verifier.run.relative import aggregate


def out(status: str, **kw) -> Outcome:
    """An outcome with a plausible route for its status."""
    route = {CERTIFIED: "bounds", REFUTED: "attack", UNKNOWN: "budget", NOT_REFUTED: "mcts"}
    return Outcome(status, route[status], **kw)


def sample_records() -> list[InputRecord]:
    """Seven inputs, two quantized models (int8, sim4); every set is known (see the test)."""
    return [
        # 0: float certified; int8 certified (R_Q^FP); sim4 refuted as 5 (R^FP)
        InputRecord(
            0,
            0,
            0,
            out(CERTIFIED),
            {"int8": out(CERTIFIED), "sim4": out(REFUTED, coeffs=[1, 0, -2], adv_label=5)},
            {"int8": 0, "sim4": 0},
        ),
        # 1: float certified; int8 unknown; sim4 certified
        InputRecord(
            1,
            1,
            1,
            out(CERTIFIED),
            {"int8": out(UNKNOWN), "sim4": out(CERTIFIED)},
            {"int8": 1, "sim4": 1},
        ),
        # 2: float refuted as 7; transfers to int8 (R^0), not to sim4 (R_Q)
        InputRecord(
            2,
            1,
            1,
            out(REFUTED, coeffs=[0, 3, 0], adv_label=7),
            {
                "int8": out(
                    UNKNOWN, transfer=True, transfer_label=7, ep_replayed=4, ep_transferred=3
                ),
                "sim4": out(
                    UNKNOWN, transfer=False, transfer_label=1, ep_replayed=4, ep_transferred=1
                ),
            },
            {"int8": 1, "sim4": 1},
        ),
        # 3: float unknown
        InputRecord(3, 2, 2, out(UNKNOWN), {}, {"int8": 2, "sim4": 2}),
        # 4: misclassified by the float model (L_ic); int8 gets it right, sim4 agrees with float
        InputRecord(4, 2, 0, None, {}, {"int8": 2, "sim4": 0}),
        # 5: MCTS mode: float not-refuted; int8 misclassifies no IP point, sim4 two of them
        InputRecord(
            5,
            0,
            0,
            out(NOT_REFUTED, ip_replayed=10),
            {
                "int8": out(NOT_REFUTED, ip_replayed=10),
                "sim4": out(NOT_REFUTED, ip_replayed=10, ip_misclassified=2, adv_label=3),
            },
            {"int8": 0, "sim4": 0},
        ),
        # 6: float refuted as 0; transfer to int8 undecided; transfers to sim4 as 8
        InputRecord(
            6,
            2,
            2,
            out(REFUTED, coeffs=[2, 2, 2], adv_label=0),
            {"int8": out(UNKNOWN), "sim4": out(UNKNOWN, transfer=True, transfer_label=8)},
            {"int8": 2, "sim4": 1},
        ),
    ]


def test_float_sets_and_shares():
    agg = aggregate(sample_records()).to_dict()["float"]
    assert agg["sets"] == {
        "L_cc": [0, 1, 2, 3, 5, 6],
        "L_ic": [4],
        "R": [0, 1, 5],
        "R_NOT": [2, 6],
        "float_unknown": [3],
    }
    o = agg["overall"]
    assert (o["inputs"], o["l_cc"], o["l_ic"], o["r"], o["r_not"], o["unknown"]) == (
        7,
        6,
        1,
        3,
        2,
        1,
    )
    assert o["accuracy"] == pytest.approx(600 / 7)
    assert o["robust"] == pytest.approx(50.0)
    assert o["effective"] == pytest.approx(100 / 3)
    assert o["unknown_share"] == pytest.approx(100 / 6)


def test_quantized_sets_and_percentages():
    agg = aggregate(sample_records()).to_dict()["quantized"]
    assert list(agg) == ["int8", "sim4"]
    int8, sim4 = agg["int8"], agg["sim4"]
    assert int8["sets"] == {
        "R_Q^FP": [0, 5],
        "R^FP": [],
        "R_unknown": [1],
        "R_Q": [],
        "R^0": [2],
        "R_NOT_unknown": [6],
    }
    assert sim4["sets"] == {
        "R_Q^FP": [1],
        "R^FP": [0, 5],
        "R_unknown": [],
        "R_Q": [2],
        "R^0": [6],
        "R_NOT_unknown": [],
    }
    o = int8["overall"]
    assert o["relative_robustness"] == pytest.approx(200 / 3)
    assert o["adversarial_transfer"] == pytest.approx(50.0)
    assert o["ep_transfer"] == pytest.approx(75.0)
    assert o["undecided"] == 3 and o["unknown_share"] == pytest.approx(50.0)
    assert o["accuracy"] == pytest.approx(100.0)
    assert o["agreement"] == pytest.approx(600 / 7)
    o = sim4["overall"]
    assert o["relative_robustness"] == pytest.approx(100 / 3)
    assert o["adversarial_transfer"] == pytest.approx(50.0)
    assert o["ep_transfer"] == pytest.approx(25.0)
    assert o["unknown_share"] == pytest.approx(100 / 6)
    assert o["accuracy"] == pytest.approx(500 / 7)
    assert o["agreement"] == pytest.approx(600 / 7)


def test_per_label_counts():
    agg = aggregate(sample_records()).to_dict()
    fl = agg["float"]["per_label"]
    assert list(fl) == ["0", "1", "2"]
    assert (fl["2"]["inputs"], fl["2"]["l_ic"], fl["2"]["unknown"], fl["2"]["r_not"]) == (
        3,
        1,
        1,
        1,
    )
    assert fl["2"]["effective"] == pytest.approx(50.0)
    int8, sim4 = agg["quantized"]["int8"]["per_label"], agg["quantized"]["sim4"]["per_label"]
    assert int8["0"]["relative_robustness"] == pytest.approx(100.0)
    assert sim4["0"]["relative_robustness"] == pytest.approx(0.0)
    assert int8["1"]["relative_robustness"] == pytest.approx(0.0)  # one input, unknown
    assert int8["2"]["relative_robustness"] is None  # no input of label 2 in R
    assert sim4["2"]["adversarial_transfer"] == pytest.approx(100.0)


def test_label_matrices():
    agg = aggregate(sample_records()).to_dict()

    def pairs(matrix):
        labels = matrix["labels"]
        return {
            (labels[i], labels[j]): n
            for i, row in enumerate(matrix["counts"])
            for j, n in enumerate(row)
            if n
        }

    assert pairs(agg["float"]["matrix"]) == {(1, 7): 1, (2, 0): 1}
    assert pairs(agg["quantized"]["int8"]["matrix"]) == {(1, 7): 1}
    assert pairs(agg["quantized"]["sim4"]["matrix"]) == {(0, 5): 1, (0, 3): 1, (2, 8): 1}


def test_exact_mode_not_refuted_quantized_is_unknown():
    rec = InputRecord(0, 3, 3, out(CERTIFIED), {"q": out(NOT_REFUTED)}, {"q": 3})
    agg = aggregate([rec]).to_dict()["quantized"]["q"]
    assert agg["sets"]["R_unknown"] == [0] and agg["sets"]["R_Q^FP"] == []


def test_zero_denominators():
    only_wrong = [InputRecord(0, 1, 2, None, {}, {"q": 1})]
    agg = aggregate(only_wrong).to_dict()
    assert agg["float"]["overall"]["accuracy"] == 0.0
    assert agg["float"]["overall"]["robust"] is None
    q = agg["quantized"]["q"]["overall"]
    assert q["relative_robustness"] is None and q["adversarial_transfer"] is None
    assert q["ep_transfer"] is None and q["unknown_share"] is None
    assert q["accuracy"] == 100.0
    empty = aggregate([], models=["q"]).to_dict()
    assert empty["float"]["overall"]["accuracy"] is None
    assert empty["quantized"]["q"]["overall"]["relative_robustness"] is None


# -- properties -----------------------------------------------------------------------------

labels = st.integers(0, 3)
maybe_label = st.none() | labels


@st.composite
def outcomes(draw):
    replayed = draw(st.integers(0, 5))
    return Outcome(
        draw(st.sampled_from(STATUSES)),
        "attack",
        adv_label=draw(maybe_label),
        transfer=draw(st.none() | st.booleans()),
        transfer_label=draw(maybe_label),
        ip_replayed=replayed,
        ip_misclassified=draw(st.integers(0, replayed)),
        ep_replayed=replayed,
        ep_transferred=draw(st.integers(0, replayed)),
    )


@st.composite
def record_lists(draw):
    n = draw(st.integers(0, 12))
    recs = []
    for i in range(n):
        recs.append(
            InputRecord(
                i,
                draw(labels),
                draw(labels),
                draw(st.none() | outcomes()),
                draw(st.dictionaries(st.sampled_from(["q", "r"]), outcomes(), max_size=2)),
                draw(st.dictionaries(st.sampled_from(["q", "r"]), labels, max_size=2)),
            )
        )
    return recs


def walk_percentages(d):
    """Every value of a percentage field in a nested aggregate dict."""
    pct_keys = {
        "accuracy",
        "robust",
        "effective",
        "unknown_share",
        "relative_robustness",
        "adversarial_transfer",
        "ep_transfer",
        "r_unknown_share",
        "r_not_unknown_share",
        "agreement",
    }
    for k, v in d.items():
        if isinstance(v, dict):
            yield from walk_percentages(v)
        elif k in pct_keys:
            yield v


@settings(max_examples=80, deadline=None)
@given(record_lists())
def test_sets_partition_and_percentages_bounded(recs):
    agg = aggregate(recs, models=["q", "r"]).to_dict()
    fsets = agg["float"]["sets"]
    correct = {r.index for r in recs if r.pred == r.label}
    r, r_not, unk = set(fsets["R"]), set(fsets["R_NOT"]), set(fsets["float_unknown"])
    assert not (r & r_not) and not (r & unk) and not (r_not & unk)
    assert r | r_not | unk == correct == set(fsets["L_cc"])
    assert set(fsets["L_ic"]) == {x.index for x in recs} - correct
    for m in agg["quantized"].values():
        s = {k: set(v) for k, v in m["sets"].items()}
        assert s["R_Q^FP"] | s["R^FP"] | s["R_unknown"] == r
        assert len(s["R_Q^FP"]) + len(s["R^FP"]) + len(s["R_unknown"]) == len(r)
        assert s["R_Q"] | s["R^0"] | s["R_NOT_unknown"] == r_not
        assert len(s["R_Q"]) + len(s["R^0"]) + len(s["R_NOT_unknown"]) == len(r_not)
        o = m["overall"]
        assert o["rq_fp"] + o["r_fp"] + o["r_unknown"] == o["r"] == len(r)
        per_label_r = sum(v["r"] for v in m["per_label"].values())
        assert per_label_r == len(r)
    for v in walk_percentages(agg):
        assert v is None or 0.0 <= v <= 100.0
