"""Tests for the demo restaurant world (quartet.demo.world)."""

import math
import random

import pytest

from quartet.demo.world import (
    CUISINES,
    GOLD_UNPARSEABLE,
    NAMES,
    SEED_EVAL,
    SEED_SFT,
    Request,
    Town,
    best_response,
    fit_score,
    format_response,
    gold_score,
    label_pairs,
    mean_gold,
    oracle_gold,
    parse_request,
    parse_response,
    prefers_first,
    prompts,
    sft_examples,
    sigmoid,
)

SEEDS = [0, 1, 2, 7, 123]


@pytest.fixture(scope="module")
def town():
    return Town.generate(0)


def test_determinism():
    assert Town.generate(5) == Town.generate(5)
    assert Town.generate(5) != Town.generate(6)
    t = Town.generate(5)
    assert prompts(t, 50, 3) == prompts(t, 50, 3)
    assert sft_examples(t, 50, 3) == sft_examples(t, 50, 3)
    assert prompts(t, 50, SEED_SFT) != prompts(t, 50, SEED_EVAL)
    assert Town.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("seed", SEEDS)
def test_town_structure(seed):
    t = Town.generate(seed)
    assert len(t.restaurants) == 16
    assert len({r.name for r in t.restaurants}) == 16
    for c in CUISINES:
        qs = [r.quality for r in t.restaurants if r.cuisine == c]
        assert max(qs) >= 0.75 and min(qs) <= 0.25, c
    for r in t.restaurants:
        assert 2 <= len(r.dishes) <= 3 and 0 <= r.quality <= 1
    with pytest.raises(ValueError):
        Town.generate(0, n_restaurants=5)


def test_names_not_nested():
    for a in NAMES:
        for b in NAMES:
            assert a == b or a not in b


def test_requests_parse_back(town):
    reqs = prompts(town, 2000, 11)
    assert len({q.text for q in reqs}) > 300  # varied wording
    for q in reqs:
        assert parse_request(q.text, town) == q, q


@pytest.mark.parametrize("seed", SEEDS)
def test_parse_response(seed):
    t = Town.generate(seed)
    rng = random.Random(seed)
    for r in t.restaurants:
        for _ in range(10):
            text = format_response(r, rng)
            assert parse_response(text, t) == r
            assert len(text.split()) < 20
    for garbage in ["", "Try the noodles.", "asdf qwerty", "Try Lotus Gardens", "lotus garden"]:
        if garbage and any(n in garbage for n in (r.name for r in t.restaurants)):
            continue
        assert parse_response(garbage, t) is None
        assert gold_score(Request(None, None, None, "x"), garbage, t) == GOLD_UNPARSEABLE


def test_gold_ordering(town):
    rng = random.Random(0)
    for c in CUISINES:
        req = Request(c, None, None, f"Any {c}?")
        same = sorted((r for r in town.restaurants if r.cuisine == c), key=lambda r: r.quality)
        good, bad = same[-1], same[0]
        g_good = gold_score(req, format_response(good, rng), town)
        g_bad = gold_score(req, format_response(bad, rng), town)
        assert g_good > g_bad + 1.0
        for other in town.restaurants:
            if other.cuisine != c:
                assert g_good > gold_score(req, format_response(other, rng), town) + 0.5
    # Well-formed answers sit in about [-3, 1]; defects cost; garbage is worst of all.
    reqs = prompts(town, 300, 5)
    worst = min(gold_score(q, format_response(r, rng), town) for q in reqs for r in town.restaurants)
    assert worst > -3.0 > GOLD_UNPARSEABLE
    req, r = reqs[0], town.restaurants[0]
    clean = format_response(r, rng)
    g = gold_score(req, clean, town)
    assert g == pytest.approx(fit_score(req, r))
    rambling = clean + " It is really really good and you will love it a lot, trust me on this one."
    repeated = clean + " " + r.name + "!"
    wrong_claim = clean.replace(r.cuisine, next(c for c in CUISINES if c != r.cuisine), 1)
    for bad_text in (rambling, repeated, wrong_claim, clean.lower().replace(r.name.lower(), r.name)):
        assert GOLD_UNPARSEABLE < gold_score(req, bad_text, town) < g
    spam = " ".join([r.name] * 50)
    assert gold_score(req, spam, town) >= g - 1.0 - 1e-9  # penalties are capped


def test_best_and_oracle(town):
    for q in prompts(town, 200, 9):
        best = best_response(q, town)
        assert gold_score(q, best, town) == pytest.approx(oracle_gold(q, town))
        assert all(gold_score(q, format_response(r), town) <= oracle_gold(q, town) + 1e-9
                   for r in town.restaurants)


@pytest.mark.parametrize("gap", [0.0, 0.5, 1.0, 2.0, -1.5])
def test_labeller_rate(gap):
    rng, n = random.Random(42), 4000
    rate = sum(prefers_first(gap, 0.0, rng) for _ in range(n)) / n
    p = sigmoid(gap)
    assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / n)
    rate_t = sum(prefers_first(gap, 0.0, rng, temperature=2.0) for _ in range(n)) / n
    p_t = sigmoid(gap / 2.0)
    assert abs(rate_t - p_t) < 3 * math.sqrt(p_t * (1 - p_t) / n)


def test_sft_quality_blind():
    for seed in SEEDS:
        t = Town.generate(seed)
        data = sft_examples(t, 3000, SEED_SFT)
        recs = [parse_response(e["completion"], t) for e in data]
        assert all(r is not None and e["completion"] == e["completion"].strip() for r, e in zip(recs, data))
        mean_q = sum(r.quality for r in recs) / len(recs)
        # Expected quality under the quality-blind policy (0.6 own cuisine, 0.4 anyone).
        expected = 0.0
        for e in data:
            c = parse_request(e["prompt"]).cuisine
            pool = [r.quality for r in t.restaurants if r.cuisine == c]
            expected += (0.6 * sum(pool) / len(pool) + 0.4 * t.mean_quality()) if pool else t.mean_quality()
        expected /= len(data)
        assert abs(mean_q - expected) < 0.02
        assert abs(mean_q - t.mean_quality()) < 0.08
        reqs = [parse_request(e["prompt"]) for e in data]
        match = sum(r.cuisine == q.cuisine for r, q in zip(recs, reqs) if q.cuisine) / sum(
            1 for q in reqs if q.cuisine)
        assert 0.55 < match < 0.8
        # Lots of room for RL: the oracle beats the SFT data by about 1 gold point.
        sft_gold = mean_gold(reqs, [e["completion"] for e in data], t)
        oracle = sum(oracle_gold(q, t) for q in reqs) / len(reqs)
        assert oracle - sft_gold > 0.7


def test_label_pairs(town):
    rng = random.Random(3)
    reqs = prompts(town, 400, 8)
    triples = []
    for q in reqs:
        a, b = rng.sample(town.restaurants, 2)
        triples.append((q, format_response(a, rng), format_response(b, rng)))
    same = format_response(town.restaurants[0])
    triples += [(reqs[0], same, same), (reqs[1], same, same + "  ")]
    rows = label_pairs(triples, town, seed=1)
    assert len(rows) == 400
    assert rows == label_pairs(triples, town, seed=1)
    by_text = {q.text: q for q in reqs}
    agree = 0
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
        q = by_text[row["prompt"]]
        agree += gold_score(q, row["chosen"], town) >= gold_score(q, row["rejected"], town)
    assert 0.6 < agree / len(rows) < 0.95  # mostly right, but noisy
