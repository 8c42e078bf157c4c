"""Tests for linking.answers: reading "which deal?" answers (single, multi, awkward)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from linking.answers import Candidate, read_answer, read_answers

ANN = [Candidate(11, "Renewal 2027"), Candidate(12, "Upsell seats")]
THREE = [Candidate(11, "Renewal 2027"), Candidate(12, "Upsell seats"),
         Candidate(40, "Upsell licences")]


@pytest.mark.parametrize("text", [
    "2", "#2", "2.", "deal 2", "Deal #2", "２", "＃２", "(2)", "no. 2", "2番", "２番です。",
    "option 2!", "  2  ", "upsell", "Upsell Seats", "SEATS", "upsell seats please",
    "id 12", "ID: 12", "12",
])
def test_answers_meaning_upsell(text: str) -> None:
    a = read_answer(text, ANN)
    assert (a.kind, a.deal_id) == ("deal", 12), a


@pytest.mark.parametrize("text", ["0", "０", "none", "None.", "no deal", "なし", "無し",
                                  "該当なし", "nothing"])
def test_answers_meaning_no_deal(text: str) -> None:
    a = read_answer(text, ANN)
    assert a.kind == "none" and a.deal_id is None and a.decided


def test_choice_number_wins_over_a_deal_id() -> None:
    # Deal 1 is not a choice here, but "1" is the first choice: the question asks for numbers.
    cands = [Candidate(7, "Alpha"), Candidate(1, "Beta")]
    assert read_answer("1", cands).deal_id == 7
    assert read_answer("id 1", cands).deal_id == 1


@pytest.mark.parametrize("text,why", [
    ("3", "3 is not a choice (the choices are 0 to 2)"),
    ("id 99", "deal id 99 is not one of the choices"),
    ("the big one", "neither a choice number nor part of a deal title"),
    ("e", "neither a choice number"),  # too short to be a part of a title
    ("", "no text"),
])
def test_unclear_answers_say_why(text: str, why: str) -> None:
    a = read_answer(text, ANN)
    assert a.kind == "unclear" and not a.decided and why in a.why


def test_ambiguous_title_lists_matches() -> None:
    a = read_answer("upsell", THREE)
    assert a.kind == "ambiguous" and a.matches == (12, 40)
    assert "'Upsell seats'" in a.why and "'Upsell licences'" in a.why
    assert read_answer("upsell seats", THREE).deal_id == 12  # an exact title decides


def test_single_question_first_line_when_a_signoff_survives() -> None:
    got = read_answers("2\nThanks a lot", [ANN]).by_item[1]
    assert (got.kind, got.deal_id) == ("deal", 12)
    assert read_answers("1: 2", [ANN]).by_item[1].deal_id == 12


def test_multi_answers_on_one_line_and_per_line() -> None:
    items = [ANN, ANN, THREE]
    for text in ("1: 2, 2: 0, 3: licences", "1: 2\n2: none\n3: 3", "1=2; 2: なし、3: #3",
                 "１：２\n２：０\n３：licences", "2\n0\nlicences"):
        got = read_answers(text, items)
        assert not got.problems, (text, got.problems)
        assert [(a.kind, a.deal_id) for _, a in sorted(got.by_item.items())] == [
            ("deal", 12), ("none", None), ("deal", 40)], text


def test_multi_answers_problems() -> None:
    got = read_answers("1: 2, 5: 1, 1: 0", [ANN, ANN])
    assert got.by_item[1].deal_id == 12 and 2 not in got.by_item
    assert any("no email 5" in p for p in got.problems)
    assert any("answered twice" in p for p in got.problems)
    bare = read_answers("2", [ANN, ANN])
    assert not bare.by_item and "lists 2 emails" in bare.problems[0]
    assert read_answers("", [ANN, ANN]).problems == [
        "the reply has no text above the quoted question"]


@given(st.text(max_size=300))
def test_never_raises_and_decides_only_known_deals(text: str) -> None:
    got = read_answers(text, [ANN, THREE])
    for number, a in got.by_item.items():
        assert number in (1, 2)
        if a.kind == "deal":
            assert a.deal_id in {c.deal_id for c in (ANN, THREE)[number - 1]}
