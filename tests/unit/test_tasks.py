"""The synthetic addition task: solutions, held-out split, noisy corpus, JSONL loading."""

from __future__ import annotations

import random

import pytest

from tasks.data_files import load_rows
from tasks.synthetic import AdditionTask, make_dataset, parse_addition
from tasks.templates import R1_ZERO, render_prompt
from rewards.basic import exact_answer
from rewards.format import r1zero_format

pytestmark = pytest.mark.unit


def test_reference_solution_is_correct_and_well_formed():
    t = AdditionTask()
    # 47+85: 7+5=12 (carry 1), 4+8+1=13 → 132
    text = t.solution(47, 85)
    assert text == " <think> 7+5=12 , 4+8+1=13 </think> <answer> 132 </answer>"
    assert exact_answer(text, "132").score == 1.0
    assert r1zero_format(text).score == 1.0


def test_split_is_disjoint_and_deterministic(tmp_path):
    paths = make_dataset("addition", tmp_path, test_share=0.1, seed=3)
    train = {r.prompt for r in load_rows(paths["train"])}
    test = {r.prompt for r in load_rows(paths["test"])}
    assert not train & test
    assert len(train) + len(test) == 90 * 90
    assert 0.07 < len(test) / (len(train) + len(test)) < 0.13
    again = make_dataset("addition", tmp_path / "again", test_share=0.1, seed=3)
    assert again["test"].read_text() == paths["test"].read_text()
    for row in load_rows(paths["test"])[:50]:
        a, b = parse_addition(row.prompt)
        assert int(row.answer) == a + b


def test_noisy_corpus_has_the_requested_error_rates():
    t, rng = AdditionTask(), random.Random(0)
    n, wrong, broken = 4000, 0, 0
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        text = t.noisy_response(a, b, rng, answer_noise=0.5, format_noise=0.2)
        broken += r1zero_format(text).score == 0.0
        wrong += r1zero_format(text).score == 1.0 and exact_answer(text, str(a + b)).score == 0.0
    assert abs(broken / n - 0.2) < 0.03
    assert abs(wrong / (n - broken) - 0.5) < 0.04


def test_load_rows_errors_name_the_fix(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match="set data.prompt_key"):
        load_rows(p)
    assert load_rows(p, prompt_key="question")[0].prompt == "q"
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: not valid JSON"):
        load_rows(p)


def test_r1zero_template_is_table_1():
    text = render_prompt("What is 2+2", "r1zero")
    assert text.startswith("A conversation between User and Assistant.")
    assert text.endswith("User: What is 2+2. Assistant:")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in R1_ZERO
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        render_prompt("q", "chat")
