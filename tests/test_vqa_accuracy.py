"""The VQAv2 accuracy (vlm_jax/evaluation/vqa.py) on hand-made cases with known answers."""
import pytest

from vlm_jax.evaluation.vqa import normalize_answer, vqa_accuracy, vqa_scores


def test_leave_one_out_average_of_min_count_over_three():
    humans = ["2"] * 3 + ["3"] * 7
    # "2": the 3 subsets without a "2" voter see 2 matches (2/3), the 7 others see 3 (1)
    assert vqa_accuracy("2", humans) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("3", humans) == pytest.approx(1.0)
    assert vqa_accuracy("4", humans) == 0.0
    one = ["cat"] + ["dog"] * 9                      # a single voter: 1/3 in 9 subsets, 0 in 1
    assert vqa_accuracy("cat", one) == pytest.approx(9 * (1 / 3) / 10)


def test_normalisation_numbers_articles_punctuation_contractions():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The Dog") == "dog"
    assert normalize_answer("an apple!") == "apple"
    assert normalize_answer("1,000") == "1000"                # digit-comma-digit: commas deleted
    assert normalize_answer("red-white") == "red white"       # punctuation inside a word -> space
    assert normalize_answer("yes , sir") == "yes sir"         # touching a space -> deleted
    assert normalize_answer("3.5") == "3.5"                   # a period before a digit stays
    assert normalize_answer("dont") == "don't" and normalize_answer("shouldntve") == "shouldn't've"
    assert normalize_answer("im") == "im"                     # the official map's I-forms never match
    assert normalize_answer("  none\t") == "0"


def test_normalisation_applies_when_humans_disagree():
    humans = ["dog"] * 5 + ["puppy"] * 5
    assert vqa_accuracy("The dog.", humans) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    humans = ["don't"] * 2 + ["no"] * 8
    assert vqa_accuracy("dont", humans) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


def test_identical_human_answers_are_only_whitespace_normalised_as_officially():
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0                      # the official script's behaviour
    assert vqa_accuracy("Yes", ["yes"] * 10, always_normalize=True) == 1.0


def test_single_reference_answer_counts_as_ten_humans():
    assert vqa_accuracy("circle", ["circle"]) == 1.0
    assert vqa_accuracy("square", ["circle"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_scores_per_question_and_answer_type_and_missing_predictions():
    questions = {
        1: {"answers": ["yes"] * 10, "question_type": "is there", "answer_type": "yes/no"},
        2: {"answers": ["2"] * 3 + ["3"] * 7, "question_type": "how many", "answer_type": "number"},
        3: {"answers": ["red"] * 10, "question_type": "what color", "answer_type": "other"},
    }
    s = vqa_scores({1: "yes", 2: "2"}, questions)
    assert s["accuracy"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert s["accuracy/how many"] == pytest.approx(0.9) and s["accuracy/what color"] == 0.0
    assert s["accuracy_answer_type/yes/no"] == 1.0
    assert s["num_questions"] == 3 and s["num_missing"] == 1
