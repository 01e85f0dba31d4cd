"""quartet.scoring.verifiers: finding final answers, comparing numbers and strings, and the 0/1 RLVR rewards."""

from fractions import Fraction

import pytest

from quartet.scoring.verifiers import (
    answer_reward,
    answers_match,
    exact_answer,
    extract_answer,
    final_number_answer,
    format_reward,
    last_number,
    normalize_number,
)

# --- extract_answer -------------------------------------------------------------------------------------------------


def test_boxed_with_nested_braces():
    assert extract_answer(r"So $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces do not end the box
    assert extract_answer(r"\fbox{7}") == "7"


def test_last_boxed_wins_and_unclosed_box_is_skipped():
    assert extract_answer(r"First \boxed{3}, no wait: \boxed{4}") == "4"
    assert extract_answer(r"\boxed{3} and then, truncated, \boxed{4") == "3"
    assert extract_answer(r"\boxed{5} ... the answer is 6") == "5"  # a box beats a text marker wherever it is


def test_text_markers():
    assert extract_answer("Adding them up, the answer is 42.") == "42"
    assert extract_answer("The answer is 3.5. Done.") == "3.5"  # a decimal point is not a sentence end
    assert extract_answer("Work...\n#### 1,234") == "1,234"
    assert extract_answer("**Final Answer:** 7\nThanks!") == "7"
    assert extract_answer("Answer: 4. Checking again... so the answer is") == "4"  # empty last marker skipped
    assert extract_answer("Answer: 4\nActually, the answer is 5") == "5"  # the last marker wins


def test_no_answer():
    assert extract_answer("I am not sure what to do.") is None
    assert extract_answer(r"\boxed{}") is None
    assert extract_answer("Answer:") is None


# --- last_number and normalize_number -------------------------------------------------------------------------------


def test_last_number_negative_decimal_and_formats():
    assert last_number("It fell from 3 to -7.5 degrees") == "-7.5"
    assert last_number("It costs $1,234.50 in total.") == "$1,234.50"
    assert last_number("Up 5% since 2020, now 12%") == "12%"
    assert last_number("5-3") == "3"  # a minus after a number is subtraction, not a sign
    assert last_number("no digits") is None


@pytest.mark.parametrize("a, b", [
    ("2.50", "2.5"), ("1,000", "1000"), (r"\frac{1}{2}", "0.5"), ("3/4", "0.75"), (r"\dfrac{3}{4}", "3/4"),
    ("+3", "3"), ("$3", "3"), ("-$3", "-3"), ("1e3", "1000"), (" 12 ", "12"), ("1 000", "1000"), ("42.", "42"),
])
def test_normalize_number_equal_forms(a, b):
    assert normalize_number(a) is not None
    assert normalize_number(a) == normalize_number(b)


def test_normalize_number_values_and_rejections():
    assert normalize_number("-1,234.50") == Fraction(-2469, 2)
    assert normalize_number("3%") == 3  # percent keeps the number as written
    for text in ["abc", "", "1,5", "3/0", "--3", "5 apples", "1e99999999"]:
        assert normalize_number(text) is None, text


# --- answers_match ----------------------------------------------------------------------------------------------------


def test_numeric_matches():
    assert answers_match("2.50", "2.5")
    assert answers_match("1,000", 1000)
    assert answers_match(r"\frac{1}{2}", 0.5)
    assert answers_match("3/4", "0.75")
    assert answers_match("-7.5", -7.5)
    assert answers_match("0.1", 0.1)  # a float reference: relative tolerance 1e-9
    assert not answers_match("0.333", "1/3")  # string references are exact
    assert not answers_match("2.5", "2.05")
    assert not answers_match(None, "2")


def test_string_answers_case_and_whitespace():
    assert answers_match("  New   York ", "new york")
    assert answers_match(r"$\text{Paris}$.", "paris")
    assert not answers_match("Paris", "London")


# --- reward functions -------------------------------------------------------------------------------------------------


def test_exact_answer_scores_rows():
    responses = [r"so \boxed{4}", "The answer is 1,234.", "Answer: 5", "It is 4 I think", "#### 0.5"]
    answers = ["4", 1234, "4", "4", r"\frac{1}{2}"]
    assert exact_answer(["q"] * 5, responses, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_response_without_answer_scores_zero_and_has_no_format():
    assert exact_answer(["2+2?"], ["I don't know"], answer=["4"]) == [0.0]
    assert format_reward(["2+2?"], ["I don't know"]) == [0.0]


def test_bare_number_only_when_allowed():
    assert exact_answer(["2+2?"], ["2 plus 2 makes 4"], answer=["4"]) == [0.0]
    assert final_number_answer(["2+2?"], ["2 plus 2 makes 4"], answer=["4"]) == [1.0]
    # a marked answer is used even when a later bare number would match
    assert final_number_answer(["2+2?"], ["Answer: 5 (not 4)"], answer=["4"]) == [0.0]


def test_format_reward():
    responses = [r"\boxed{7}", "Work...\nAnswer: 7", "**Final answer:** 7", "Answer:", "the answer is 7", "7"]
    assert format_reward(["q"] * 6, responses) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_unknown_columns_ignored():
    assert exact_answer(["q"], [r"\boxed{3}"], answer=["3"], source=["gsm8k"], level=[2]) == [1.0]
    assert format_reward(["q"], [r"\boxed{3}"], answer=["3"], source=["gsm8k"]) == [1.0]


def test_configurable_column_and_names():
    reward = answer_reward(column="solution")
    assert reward.__name__ == "exact_solution"
    assert exact_answer.__name__ == "exact_answer" and final_number_answer.__name__ == "final_number_answer"
    assert reward(["q"], [r"\boxed{\text{Lotus  Garden}}"], solution=["lotus garden"]) == [1.0]
    with pytest.raises(ValueError, match="'solution'.*\\['answer'\\]"):
        reward(["q"], [r"\boxed{3}"], answer=["3"])


def test_none_reference_is_not_judged():
    scores = exact_answer(["q"] * 3, [r"\boxed{3}", r"\boxed{3}", r"\boxed{3}"], answer=["3", None, float("nan")])
    assert scores == [1.0, None, None]


def test_wrong_lengths_raise_naming_both():
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        exact_answer(["a", "b", "c"], ["x", "y"], answer=["1", "2", "3"])
    with pytest.raises(ValueError, match="2 responses but 1 values in column 'answer'"):
        exact_answer(["a", "b"], ["x", "y"], answer=["1"])
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        format_reward(["a"], ["x", "y"])


def test_many_rows_plain_python():
    n = 10_000
    responses = [rf"Reasoning about {i} items... so \boxed{{{i}}}" for i in range(n)]
    scores = exact_answer(["q"] * n, responses, answer=[str(i) for i in range(n)])
    assert scores == [1.0] * n
