"""Statistics over seeds against values worked by hand (t tables, closed forms)."""

import math

import pytest
from scipy import stats as scipy_stats

from mnist_jax import report, stats


def test_describe_gives_the_t_interval_of_the_mean():
    d = stats.describe([1.0, 2.0, 3.0])
    assert d["n"] == 3 and d["mean"] == 2.0 and d["sd"] == 1.0
    # t(0.975, df 2) = 4.3027 (tables); half-width 4.3027 * 1 / sqrt(3) = 2.4841
    assert d["ci_low"] == pytest.approx(2 - 2.4841, abs=1e-4)
    assert d["ci_high"] == pytest.approx(2 + 2.4841, abs=1e-4)


def test_one_value_has_no_spread_and_no_interval():
    d = stats.describe([0.99])
    assert d["mean"] == 0.99 and d["sd"] is None and d["ci_low"] is None


def test_welch_by_hand():
    # a = 1, 2, 3 and b = 4, 5, 6: difference 3, each variance 1, standard error
    # sqrt(1/3 + 1/3) = 0.8165, t = 3.6742, Welch-Satterthwaite df = 4 (equal n and sd).
    w = stats.welch([1, 2, 3], [4, 5, 6])
    assert w["difference"] == 3.0
    assert w["t"] == pytest.approx(3.6742, abs=1e-4) and w["df"] == pytest.approx(4.0)
    # t(0.975, df 4) = 2.7764: 3 -/+ 2.7764 * 0.8165 = 0.7330 .. 5.2670
    assert w["ci_low"] == pytest.approx(0.7330, abs=1e-4)
    assert w["ci_high"] == pytest.approx(5.2670, abs=1e-4)
    # two-sided p for t = 3.674 on 4 df lies between 0.02 (t = 3.747) and 0.05 (t = 2.776)
    assert 0.02 < w["p_value"] < 0.05
    assert w["p_value"] == pytest.approx(2 * scipy_stats.t.sf(math.sqrt(13.5), 4))
    assert w["cohens_d"] == pytest.approx(3.0)  # difference over sd 1


def test_welch_with_unequal_spreads_uses_satterthwaite_df():
    a, b = [0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 8.0]  # variances 5/3 and 16
    w = stats.welch(a, b)
    va, vb = (5 / 3) / 4, 16 / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert w["df"] == pytest.approx(df) and w["difference"] == pytest.approx(4 - 1.5)


def test_welch_needs_two_values_a_side():
    assert stats.welch([0.99], [0.98, 0.97]) is None


def test_binomial_standard_error():
    # 99% on 10,000 images: sqrt(0.99 * 0.01 / 10000) = 0.000995, a tenth of a point
    assert stats.binomial_se(0.99, 10_000) == pytest.approx(0.000995, abs=1e-6)


def test_power_at_the_minimum_detectable_difference_is_80_percent():
    sd, n = 0.002, 3
    mdd = stats.min_detectable_difference(sd, n)
    assert stats.t_test_power(mdd, sd, n) == pytest.approx(0.8, abs=1e-6)
    # With many seeds the t test approaches the z test: (z_0.975 + z_0.8) * sd * sqrt(2/n)
    # = (1.95996 + 0.84162) * sqrt(2/1000) = 0.12529 for sd 1, n 1000.
    assert stats.min_detectable_difference(1.0, 1000) == pytest.approx(0.12529, rel=2e-3)
    # Few seeds detect only large differences: with 3 seeds, more than 3 sds.
    assert mdd > 3 * sd


def test_seeds_needed_for_half_the_difference():
    sd = 0.002
    mdd = stats.min_detectable_difference(sd, 3)
    n = stats.seeds_needed(mdd / 2, sd)
    assert stats.t_test_power(mdd / 2, sd, n) >= 0.8 > stats.t_test_power(mdd / 2, sd, n - 1)
    assert stats.seeds_needed(mdd * 1.0001, sd) == 3  # power 0.8 exactly at mdd
    # Halving the difference needs up to four times the seeds (fewer from 3 seeds, where the
    # t distribution's heavy tails cost most): 8 here.
    assert 2 * 3 <= n <= 4 * 3
    assert stats.seeds_needed(0.001, 0.0) is None and stats.min_detectable_difference(0.0, 3) is None


def test_power_against_cohens_tables():
    # Cohen (1988), Table 2.4.1 (two-sided, alpha 0.05, power 0.80): d = 0.5 needs 64 per
    # group, d = 0.8 needs 26; Table 2.3.5: n = 20 per group at d = 0.5 has power 0.34.
    assert stats.seeds_needed(0.5, 1.0) == 64
    assert stats.seeds_needed(0.8, 1.0) == 26
    assert stats.t_test_power(0.5, 1.0, 20) == pytest.approx(0.34, abs=0.005)


def _variant(name, values, validation="holdout"):
    metric = "test_accuracy" if validation == "holdout" else "best_val_accuracy"
    return {"name": name, "validation": validation, metric: stats.describe(values)}


def _sentence(a_values, b_values, validation="holdout"):
    return report.compare(_variant("2conv", a_values, validation),
                          _variant("3conv", b_values, validation))["sentence"]


def test_the_sentence_says_worse_with_the_hand_worked_interval():
    # Each side: sd 0.001 (in points 0.1), n 3. Difference -1.00 points, standard error
    # sqrt(0.1^2/3 + 0.1^2/3) = 0.08165, df 4, t(0.975, 4) = 2.7764: -1.00 -/+ 0.2267 =
    # -1.23 .. -0.77; t = -12.25 on 4 df, p = 0.00026.
    assert _sentence([0.990, 0.991, 0.992], [0.980, 0.981, 0.982]) == (
        "Over 3 seeds each, 3conv's test accuracy is 1.00 points lower than 2conv's "
        "(95% CI -1.23 to -0.77; Welch's t-test p = 0.00026): 3conv does worse than 2conv here.")


def test_the_sentence_says_better_and_names_the_metric_of_the_protocol():
    assert _sentence([0.980, 0.981, 0.982], [0.990, 0.991, 0.992], validation="test") == (
        "Over 3 seeds each, 3conv's best validation accuracy (on the test set) is 1.00 points "
        "higher than 2conv's (95% CI +0.77 to +1.23; Welch's t-test p = 0.00026): "
        "3conv does better than 2conv here.")


def test_the_sentence_claims_nothing_when_the_interval_holds_zero():
    # Differences +0.3, -0.3, 0 points around equal means: the interval spans 0.
    text = _sentence([0.990, 0.992, 0.994], [0.993, 0.989, 0.994])
    assert text.startswith("Over 3 seeds each, 3conv's test accuracy is 0.00 points ")
    assert "no difference can be claimed (these seeds detect about " in text


def test_the_sentence_with_one_seed_or_no_spread_makes_no_test():
    # One seed says nothing about the spread between seeds, not even its size.
    assert _sentence([0.99], [0.80]) == (
        "With 1 seed per variant there is no test: 3conv's test accuracy is 19.00 points "
        "lower than 2conv's in this one run, and one run each cannot tell how much of that "
        "another seed would change; run --seeds 3 or more for an interval and a test.")
    # Equal values on each side (their float variances are ~1e-34, not 0): no test either,
    # and no power figures from that rounding noise.
    assert _sentence([0.99] * 3, [0.98] * 3) == (
        "Over 3 seeds each, 3conv's test accuracy is 1.00 points lower than 2conv's, with "
        "no spread between seeds: no test is possible.")
    cmp = report.compare(_variant("2conv", [0.99] * 3), _variant("3conv", [0.98] * 3))
    assert "min_detectable_difference" not in cmp
    assert report.format_statistics({"variants": [], "comparisons": [cmp]}) == (
        "- 3conv - 2conv (test accuracy): -1.00 points, with no spread between seeds: "
        "no interval and no test.")


def test_an_interval_of_two_seeds_is_clipped_to_what_an_accuracy_can_be():
    # Two seeds, 0.95 and 0.99: mean 0.97, sd 0.0283, t(0.975, df 1) = 12.706, half-width
    # 12.706 * 0.0283 / sqrt(2) = 0.254: 0.716 .. 1.224 unclipped, past 100%.
    d = stats.describe([0.95, 0.99], bounds=(0.0, 1.0))
    assert d["ci_low"] == pytest.approx(0.97 - 0.2541, abs=1e-4)
    assert d["ci_high"] == 1.0 and d["clipped"]
    assert "clipped" not in stats.describe([0.95, 0.99]) and "clipped" not in stats.describe(
        [0.90, 0.91, 0.92], bounds=(0.0, 1.0))
    # A difference of accuracies lies in [-1, 1]: its interval is clipped there, and only there.
    w = stats.welch([0.10, 0.90], [0.50, 0.60], bounds=(0.0, 1.0))
    unclipped = stats.welch([0.10, 0.90], [0.50, 0.60])
    assert unclipped["ci_low"] < -1 and unclipped["ci_high"] > 1
    assert (w["ci_low"], w["ci_high"], w["clipped"]) == (-1.0, 1.0, True)
    assert w["p_value"] == unclipped["p_value"]


def _seeds(name, test_accuracies, diverged=()):
    """A summarized variant (the fields the sentence reads): seed i has the test accuracy
    test_accuracies[i], None where it diverged before any improvement; `diverged`: the
    seeds that diverged (with a result: after their best epoch 1)."""
    per_seed = [{"seed": i, "has_result": acc is not None, "test_accuracy": acc,
                 "best_epoch": 1 if acc is not None else None,
                 "diverged_epoch": (2 if acc is not None else 1) if i in diverged else None}
                for i, acc in enumerate(test_accuracies)]
    values = [acc for acc in test_accuracies if acc is not None]
    return {"name": name, "validation": "holdout", "per_seed": per_seed,
            "seeds": [s["seed"] for s in per_seed],
            "without_result": [s["seed"] for s in per_seed if not s["has_result"]],
            "failed": not values, "test_accuracy": stats.describe(values, bounds=(0.0, 1.0))}


def test_seeds_without_a_result_are_left_out_and_said():
    a = _seeds("2conv", [0.990, None, 0.992], diverged=(1,))
    b = _seeds("3conv", [0.980, 0.981, 0.982], diverged=(2,))
    cmp = report.compare(a, b)
    assert cmp["seeds"] == [2, 3] and cmp["welch"]["difference"] == pytest.approx(-0.01)
    assert cmp["sentence"].startswith("Over 2 and 3 seeds with a result, 3conv's test "
                                      "accuracy is 1.00 points lower than 2conv's (95% CI ")
    assert report.divergence_note(a) == ("2conv: 1 of 3 seeds diverged (loss not finite) "
                                         "before any improvement and has no result.")
    assert report.divergence_note(b) == ("3conv: 1 of 3 seeds diverged (loss not finite) "
                                         "after its best epoch, whose result is kept.")
    both = _seeds("3conv", [None, 0.98, None, 0.97], diverged=(0, 1, 2))
    assert report.divergence_note(both) == (
        "3conv: 3 of 4 seeds diverged (loss not finite): 2 before any improvement and have "
        "no result, 1 after its best epoch, whose result is kept.")
    assert report.divergence_note(_seeds("2conv", [0.99, 0.98])) == ""


def test_fewer_than_two_seeds_with_a_result_make_no_test_and_the_sentence_says_why():
    a = _seeds("2conv", [0.990, None, None], diverged=(1, 2))
    b = _seeds("3conv", [0.980, 0.981, 0.982])
    cmp = report.compare(a, b)
    assert cmp["welch"] is None and "min_detectable_difference" not in cmp
    assert cmp["sentence"] == (
        "With 1 and 3 seeds with a result there is no test (the spread between seeds needs "
        "two or more with a result on each side): 3conv's test accuracy is 0.90 points lower "
        "than 2conv's, and one seed cannot tell how much of that another seed would change.")


def test_a_variant_whose_every_seed_diverged_failed_and_is_never_better_or_worse():
    failed = _seeds("2conv", [None, None, None], diverged=(0, 1, 2))
    other = _seeds("3conv", [0.980, 0.981, 0.982])
    assert report.divergence_note(failed) == (
        "2conv failed: all 3 of its seeds diverged (loss not finite) before any improvement, "
        "so it has no result.")
    for a, b in ((failed, other), (other, failed)):
        cmp = report.compare(a, b)
        assert cmp["welch"] is None
        assert cmp["sentence"] == ("3conv is not compared with 2conv, which has no result: "
                                   "neither does better or worse here.")
    assert report.divergence_note(_seeds("w16", [None], diverged=(0,))) == (
        "w16 failed: its seed diverged (loss not finite) before any improvement, so it has "
        "no result.")


def test_summary_md_says_when_an_interval_was_clipped_and_only_then():
    # The clause summary.md puts after "mean ± sd over seeds [95% t-interval]".
    def summary(test_accuracies, val_accuracies, comparison=None):
        return {"variants": [{"test_accuracy": stats.describe(test_accuracies, bounds=(0.0, 1.0)),
                              "best_val_accuracy": stats.describe(val_accuracies,
                                                                  bounds=(0.0, 1.0))}],
                "comparisons": [{"welch": comparison}]}
    assert report._clipped_note(summary([0.90, 0.91, 0.92], [0.90, 0.91, 0.92])) == ""
    for clipped in (summary([0.95, 0.99], [0.90, 0.91, 0.92]),  # the 2-seed interval of issue 14
                    summary([0.90, 0.91, 0.92], [0.95, 0.99]),
                    summary([0.90, 0.91, 0.92], [0.90, 0.91, 0.92],
                            stats.welch([0.10, 0.90], [0.50, 0.60], bounds=(0.0, 1.0)))):
        assert "is clipped there: an accuracy cannot pass them" in report._clipped_note(clipped)
