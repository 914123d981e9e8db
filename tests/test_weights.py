import math
import warnings

import numpy as np
import pytest

from dataflex.schedule import WeightSchedule
from dataflex.weights import apply_floor, entropy, validate_weights

NAMES = ["code", "math", "wiki"]


def test_valid_weights_pass_through():
    with pytest.warns(UserWarning, match=r"no weight for domain\(s\) \['wiki'\]: they get weight 0"):
        assert validate_weights({"code": 0.5, "math": 0.5}, NAMES).tolist() == [0.5, 0.5, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every domain named, a 0 among them: on purpose, no warning
        assert validate_weights({"code": 0.5, "math": 0.5, "wiki": 0}, NAMES).tolist() == [0.5, 0.5, 0.0]
    assert np.allclose(validate_weights([0.2, 0.3, 0.5], NAMES), [0.2, 0.3, 0.5])
    # domain names are the labels' text, so integer labels take integer keys; keys that read alike are refused
    assert validate_weights({0: 0.8, 1: 0.2, 2: 0.0}, ["0", "1", "2"]).tolist() == [0.8, 0.2, 0.0]
    with pytest.raises(ValueError, match=r"domain names 0 \(int\) and '0' \(str\) both read as '0'"):
        validate_weights({0: 0.5, "0": 0.5}, ["0", "1"])


@pytest.mark.parametrize(
    "weights,match",
    [
        ({"code": 0.5, "poetry": 0.5}, r"unknown domain name\(s\) \['poetry'\]; valid domains are"),
        ([0.5, -0.1, 0.6], r"negative values \{'math': -0.1\}"),
        ([0.5, float("nan"), 0.5], r"non-finite values \{'math': nan\}"),
        ([0.5, float("inf"), 0.5], "non-finite"),
        ([20, 30, 50], r"must sum to 1 .* got sum 100"),
        ([0.0, 0.0, 0.0], "at least one positive"),
        ([0.5, 0.5], "has 2 entries but there are 3 domains"),
    ],
)
def test_bad_weights_name_the_bad_value(weights, match):
    with pytest.raises(ValueError, match=match):
        validate_weights(weights, NAMES)


def test_floor_keeps_order_and_sums_to_one():
    w = apply_floor(np.array([1.0, 0.0, 0.0]), 0.01)
    assert w.min() >= 0.01 - 1e-12 and math.isclose(w.sum(), 1.0)
    assert w[0] > w[1]
    w = apply_floor(np.array([np.nan, np.inf, -1.0]), 0.05)  # garbage in: uniform, still valid
    assert np.allclose(w, 1 / 3)
    with pytest.raises(ValueError, match="floor=0.5 is too large for 3 domains"):
        apply_floor(np.ones(3) / 3, 0.5)


def test_entropy():
    assert math.isclose(entropy(np.ones(4) / 4), math.log(4))
    assert entropy(np.array([1.0, 0.0])) == 0.0 and str(entropy(np.array([1.0, 0.0]))) == "0.0"  # not -0.0 in logs


def test_schedule_lookup_and_state_roundtrip():
    s = WeightSchedule(NAMES, [1 / 3] * 3)
    s.add(10, [0.2, 0.3, 0.5])
    s.add(25, [0.6, 0.2, 0.2])
    assert s.weights_at(9).tolist() == [1 / 3] * 3
    assert s.weights_at(10).tolist() == [0.2, 0.3, 0.5]
    assert s.weights_at(10_000).tolist() == [0.6, 0.2, 0.2]
    assert s.next_change_after(10) == 25
    with pytest.raises(ValueError, match="strictly increasing"):
        s.add(25, [0.6, 0.2, 0.2])
    t = WeightSchedule(NAMES, [1 / 3] * 3)
    t.load_state_dict(s.state_dict())
    assert [(a, w.tolist()) for a, w in t.events] == [(a, w.tolist()) for a, w in s.events]
    with pytest.raises(ValueError, match="saved for domains"):
        WeightSchedule(["x", "y", "z"], [1 / 3] * 3).load_state_dict(s.state_dict())


def test_encode_domains_errors_and_order():
    from dataflex.domains import encode_domains

    ids, names = encode_domains(["b", "a", "b"])
    assert names == ["a", "b"] and ids.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"domain\(s\) \['c'\] have no examples"):
        encode_domains(["a", "b"], domain_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels \['z'\] are not among domain_names"):
        encode_domains(["a", "z"], domain_names=["a"])
    with pytest.raises(ValueError, match="no examples"):
        encode_domains([])


def test_a_list_of_weights_over_numeric_domain_names_is_refused_for_one_by_name():
    """dataflex's domain order is the sorted text of the names: for labels 0..11 that is '0', '1', '10', '11',
    '2', ..., so a list written in numeric order gave its weights to other domains without a word."""
    from dataflex.policies import Piecewise, Static

    names = sorted(str(i) for i in range(12))
    meant = [0.0] * 12
    meant[2] = 1.0  # all on domain 2, in numeric order
    assert names[int(np.argmax(validate_weights(meant, names)))] == "10"  # what a list silently meant
    for policy in (Static(meant), Piecewise([(0, meant)], update_every=1)):
        with pytest.raises(ValueError, match=r"weights.* are a list, .*'0', '1', '10'.*Give the weights by name"):
            policy.bind(names, np.ones(12))
            policy.initial_weights()
    by_name = Static({n: float(n == "2") for n in names})
    by_name.bind(names, np.ones(12))
    assert names[int(np.argmax(by_name.initial_weights()))] == "2"
    for plain in (["a", "b"], ["1", "2"], ["01", "02", "10"]):  # text order is the order meant: lists as before
        policy = Static([1.0 / len(plain)] * len(plain))
        policy.bind(plain, np.ones(len(plain)))
        np.testing.assert_allclose(policy.initial_weights(), 1.0 / len(plain))
