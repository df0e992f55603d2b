import numpy as np
import pytest

from jaxft.data.mixture import Mixture, format_rates_table, realised_rates, shuffled_repeat, temperature_rates


def test_temperature_one_is_proportional():
    np.testing.assert_allclose(temperature_rates([100, 300, 600], 1.0), [0.1, 0.3, 0.6])


def test_temperature_five_formula():
    sizes = np.array([1_000_000, 50_000, 2_000])
    expected = sizes ** 0.2 / (sizes ** 0.2).sum()
    np.testing.assert_allclose(temperature_rates(sizes, 5.0), expected, rtol=1e-12)


def test_large_temperature_is_nearly_uniform_and_small_is_stable():
    np.testing.assert_allclose(temperature_rates([10, 1e6, 1e9], 1e6), [1 / 3] * 3, atol=1e-4)
    np.testing.assert_allclose(temperature_rates([10, 20], 1e-3), [0, 1], atol=1e-12)  # no overflow


@pytest.mark.parametrize("sizes,t", [([1, 0], 1.0), ([1, -2], 1.0), ([1, 2], 0.0), ([1, 2], -1.0), ([], 1.0)])
def test_validation(sizes, t):
    with pytest.raises(ValueError):
        temperature_rates(sizes, t)


def test_realised_rates_match_targets_and_every_substream():
    rates = temperature_rates([5000, 500, 50, 5], 2.0)
    m = Mixture([shuffled_repeat(list(range(n)), i) for i, n in enumerate([5000, 500, 50, 5])], rates, seed=3)
    np.testing.assert_allclose(realised_rates(m, 20000), rates, atol=0.006)
    # a batch slot (every 8th index) sees the same mixture, not one source
    np.testing.assert_allclose(realised_rates(m, 20000, start=5, step=8), rates, atol=0.01)
    # whole blocks match to within one example per smaller source
    k = m.block_size * 3
    np.testing.assert_allclose(realised_rates(m, k)[1:] * k, rates[1:] * k, atol=1.0)
    assert abs(realised_rates(m, k)[0] * k - rates[0] * k) <= len(rates)  # the largest takes the rest


def test_mixture_is_deterministic_and_sources_cycle_through_epochs():
    sizes = [7, 3]
    mk = lambda seed: Mixture([shuffled_repeat([(s, i) for i in range(n)], 10 + s)  # noqa: E731
                               for s, n in enumerate(sizes)], [0.5, 0.5], seed=seed)
    a, b, c = mk(0), mk(0), mk(1)
    first = [a[i] for i in range(200)]
    assert first == [b[i] for i in range(200)] and first != [c[i] for i in range(200)]
    for s, n in enumerate(sizes):
        drawn = [x for src, x in first if src == s]
        assert all(x[0] == s for x in drawn)
        for e in range(len(drawn) // n):  # every epoch is a permutation of the source
            assert sorted(drawn[e * n:(e + 1) * n]) == [(s, i) for i in range(n)]
        assert drawn[:n] != drawn[n:2 * n]  # reshuffled each epoch


def test_format_rates_table():
    table = format_rates_table(["en-de", "en-yo"], [1000, 20], [0.75, 0.25], [0.7498, 0.2502])
    lines = table.splitlines()
    assert lines[0].split() == ["direction", "examples", "target", "realised"]
    assert lines[3].split() == ["en-yo", "20", "0.2500", "0.2502"]
