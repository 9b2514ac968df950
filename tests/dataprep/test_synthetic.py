"""dataprep.synthetic: deterministic, well-formed, learnable geometry problems."""

import io
import re

import pytest
from math_verify import parse, verify
from PIL import Image

from core.config import SyntheticDataConfig
from dataprep.synthetic import (
    GIVENS_IN_QUESTION,
    TEMPLATES,
    make_problems,
    sample_problem,
    text_corpus,
)

FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>$", re.DOTALL)  # docs/method.md §3.1


@pytest.fixture(scope="module")
def problems():
    return make_problems(SyntheticDataConfig(num_problems=300, seed=0, image_size=112))


def test_deterministic_by_seed_and_independent_of_the_count():
    cfg = SyntheticDataConfig(num_problems=6, seed=3, image_size=64)
    first = make_problems(cfg)
    assert make_problems(cfg) == first
    assert make_problems(cfg.model_copy(update={"num_problems": 4})) == first[:4]
    assert [p.id for p in first] == [f"synthetic-3-{i}" for i in range(6)] and [p.index for p in first] == list(range(6))
    other = make_problems(cfg.model_copy(update={"seed": 4}))
    assert [p.problem for p in other] != [p.problem for p in first]


def test_every_solution_has_the_format_and_the_right_boxed_answer(problems):
    for p in problems:
        assert FORMAT.fullmatch(p.solution), p.solution
        answer_block = p.solution.split("<answer>\n")[1]
        assert re.findall(r"\\boxed\{(.+?)\}", p.solution) == re.findall(r"\\boxed\{(.+?)\}", answer_block) == [p.answer]


def test_math_verify_credits_the_solutions(problems):
    # the accuracy reward (docs/method.md §3.2) parses the whole formatted response against the raw ground truth
    assert all(verify(parse(p.answer), parse(p.solution)) for p in problems[:40])


def test_answers_are_small_integers_and_copying_the_wrong_given_is_wrong(problems):
    kinds = set()
    for index, p in enumerate(problems):
        answer = int(p.answer)
        assert 0 < answer < 200
        givens = [int(n) for a in p.annotations for n in re.findall(r"\d+", a)]
        if sample_problem(seed=0, index=index).equality:  # the answer is one given; another one differs
            assert givens.count(answer) == 1 and len(set(givens)) > 1, p.problem
        else:  # computed: no given is the answer
            assert answer not in givens, p.problem
        kinds.add(sample_problem(seed=0, index=index).equality)
    assert kinds == {True, False}


def test_annotations_are_the_facts_restated_in_the_think_block(problems):
    for p in problems:
        think = p.solution.split("</think>")[0]
        assert 2 <= len(p.annotations) <= 3
        assert all(fact in think for fact in p.annotations), (p.annotations, think)


def test_problem_has_one_image_and_states_the_givens(problems):
    assert GIVENS_IN_QUESTION
    for p in problems:
        assert p.problem.count("<image>") == 1 and p.problem.startswith("<image>")
        numbers_in_question = set(re.findall(r"\d+", p.problem))
        assert all(set(re.findall(r"\d+", a)) <= numbers_in_question for a in p.annotations), p.problem


def test_images_decode_to_the_configured_size_with_a_drawing(problems):
    for p in problems[:20]:
        image = Image.open(io.BytesIO(p.image))
        assert image.format == "PNG" and image.size == (112, 112) and image.mode == "RGB"
        dark = sum(1 for v in image.convert("L").getdata() if v < 128)
        assert 100 < dark < 112 * 112 // 4  # strokes and labels, not a blank or filled canvas


def test_all_templates_occur(problems):
    shapes = {re.sub(r"\d+", "N", p.problem) for p in problems}
    assert len(shapes) == len(TEMPLATES) + 4  # rectangle (twice), square and circle ask one of two things


def test_text_corpus_matches_the_problems(problems):
    corpus = text_corpus(seed=0, num_problems=5)
    assert corpus == [f"{p.problem.removeprefix('<image>')}\n{p.solution}" for p in problems[:5]]


def test_without_givens_in_the_question_only_the_ask_remains(monkeypatch):
    import dataprep.synthetic as synthetic

    monkeypatch.setattr(synthetic, "GIVENS_IN_QUESTION", False)
    for p in make_problems(SyntheticDataConfig(num_problems=30, image_size=56)):
        assert p.problem.startswith("<image>Find ") and not re.search(r"\d", p.problem), p.problem
