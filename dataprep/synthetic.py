"""The synthetic geometry dataset: easy problems with rendered diagrams, deterministic by seed.

Each problem is a `Prompt` record, the same format as the real dataset: a PNG diagram (triangles,
circles, parallel lines cut by a transversal, intersecting lines, rectangles and squares, with
labelled vertices, lengths and angles), a question with one `<image>`, a small-integer answer, the
visual annotations (the facts the diagram shows, as short sentences) and a worked solution in the
method's format (docs/method.md §3.1) whose think block restates those facts and the computation.

The problems are meant for the tiny CPU model: one-step templates of two kinds. Computed answers
(angle sums, areas, perimeters) are never one of the givens, so only memorising a problem gets it right;
equalities (opposite sides, base angles, vertical and alternate angles, radii) make the answer one of
two or three givens, picked out by a geometric fact (the same rule for every problem of a template). A
short SFT warm start leaves the model right on some problems and wrong on others, so GRPO has signal. Problem `i` depends only on `(seed, i)`, not on how many problems are made.
"""

from __future__ import annotations

import io
import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from core.config import SyntheticDataConfig
from core.records import Prompt

GIVENS_IN_QUESTION = True
"""The question text states the givens that the diagram shows. A tiny random-init model cannot read
digits from pixels, so without this no answer would be learnable on CPU; the visual reward still
checks that the response restates the diagram's facts (the annotations)."""

Point = tuple[float, float]


@dataclass
class Figure:
    """Drawing primitives in figure units (x right, y up); the renderer fits them into the image."""

    segments: list[tuple[Point, Point]] = field(default_factory=list)
    circles: list[tuple[Point, float]] = field(default_factory=list)
    labels: list[tuple[Point, str]] = field(default_factory=list)
    dots: list[Point] = field(default_factory=list)


@dataclass
class Problem:
    """One sampled problem before rendering."""

    question: str
    """The question text (without `<image>`)."""
    answer: int
    facts: tuple[str, ...]
    """What the diagram shows; the visual annotations and the first sentence of the solution."""
    reasoning: str
    """The computation, one sentence, ending in the answer."""
    figure: Figure
    equality: bool = False
    """The answer equals one given by a geometric equality (opposite sides, base angles, vertical or
    alternate angles, radii); the question also states a distractor given that differs from it."""

    def solution(self) -> str:
        """The worked solution in the method's exact format (docs/method.md §3.1)."""
        return (f"<think>\nThe diagram shows {', '.join(self.facts)}.\n{self.reasoning}\n</think>\n"
                f"<answer>\n\\boxed{{{self.answer}}}\n</answer>")


# --------------------------------------------------------------------------------------- geometry
def _unit(v: Point) -> Point:
    n = math.hypot(*v) or 1.0
    return v[0] / n, v[1] / n


def _add(p: Point, v: Point, scale: float = 1.0) -> Point:
    return p[0] + scale * v[0], p[1] + scale * v[1]


def _sub(p: Point, q: Point) -> Point:
    return p[0] - q[0], p[1] - q[1]


def _polar(deg: float, r: float = 1.0) -> Point:
    return r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))


def _centroid(points: list[Point]) -> Point:
    return sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)


def _name_vertices(fig: Figure, named: dict[str, Point], *, centre: Point, dist: float = 0.1) -> None:
    for name, p in named.items():
        fig.labels.append((_add(p, _unit(_sub(p, centre)), dist), name))


def _angle_label(fig: Figure, vertex: Point, p1: Point, p2: Point, text: str, dist: float = 0.2) -> None:
    bisector = _add(_unit(_sub(p1, vertex)), _unit(_sub(p2, vertex)))
    fig.labels.append((_add(vertex, _unit(bisector), dist), text))


def _side_label(fig: Figure, p: Point, q: Point, text: str, *, centre: Point, dist: float = 0.08) -> None:
    mid = _centroid([p, q])
    fig.labels.append((_add(mid, _unit(_sub(mid, centre)), dist), text))


def _polygon(fig: Figure, points: list[Point]) -> None:
    fig.segments += [(points[i], points[(i + 1) % len(points)]) for i in range(len(points))]


def _triangle_from_sides(ab: float, bc: float, ac: float) -> tuple[Point, Point, Point]:
    """A at the origin, B on the x axis, C above it (law of cosines)."""
    x = (ab ** 2 + ac ** 2 - bc ** 2) / (2 * ab)
    return (0.0, 0.0), (ab, 0.0), (x, math.sqrt(max(ac ** 2 - x ** 2, 1e-9)))


# -------------------------------------------------------------------------------------- templates
def _triangle_angle_sum(rng: random.Random) -> Problem:
    a, b = rng.randrange(30, 85, 5), rng.randrange(30, 85, 5)
    c = 180 - a - b
    A, B = (0.0, 0.0), (1.0, 0.0)
    C = _polar(a, math.sin(math.radians(b)) / math.sin(math.radians(a + b)))
    fig = Figure()
    _polygon(fig, [A, B, C])
    _name_vertices(fig, {"A": A, "B": B, "C": C}, centre=_centroid([A, B, C]))
    _angle_label(fig, A, B, C, f"{a}°")
    _angle_label(fig, B, A, C, f"{b}°")
    return Problem(
        question=f"In triangle ABC, angle BAC = {a}° and angle ABC = {b}°. Find angle ACB in degrees.",
        answer=c, facts=(f"angle BAC = {a}°", f"angle ABC = {b}°"), figure=fig,
        reasoning=f"The angles of a triangle add up to 180°, so angle ACB = 180° - {a}° - {b}° = {c}°.")


def _right_triangle(rng: random.Random) -> Problem:
    a = rng.choice([x for x in range(20, 75, 5) if x != 45])
    C, A = (0.0, 0.0), (1.0, 0.0)
    B = (0.0, math.tan(math.radians(a)))
    fig = Figure()
    _polygon(fig, [A, B, C])
    fig.segments += [((0.08, 0.0), (0.08, 0.08)), ((0.0, 0.08), (0.08, 0.08))]  # right-angle mark
    _name_vertices(fig, {"A": A, "B": B, "C": C}, centre=_centroid([A, B, C]))
    _angle_label(fig, A, B, C, f"{a}°", dist=0.25)
    return Problem(
        question=f"In triangle ABC, angle ACB = 90° and angle BAC = {a}°. Find angle ABC in degrees.",
        answer=90 - a, facts=("angle ACB = 90°", f"angle BAC = {a}°"), figure=fig,
        reasoning=f"The angles of a triangle add up to 180°, so angle ABC = 180° - 90° - {a}° = {90 - a}°.")


def _isosceles_figure(a: int) -> tuple[Figure, tuple[Point, Point, Point]]:
    """Triangle ABC with AB = AC (tick marks) and the apex angle BAC = a labelled; (figure, (A, B, C))."""
    half = math.radians(a / 2)
    A, B, C = (0.0, math.cos(half)), (-math.sin(half), 0.0), (math.sin(half), 0.0)
    fig = Figure()
    _polygon(fig, [A, B, C])
    for p in (B, C):  # tick marks for the equal sides
        mid, normal = _centroid([A, p]), _unit((-(A[1] - p[1]), A[0] - p[0]))
        fig.segments.append((_add(mid, normal, -0.04), _add(mid, normal, 0.04)))
    _name_vertices(fig, {"A": A, "B": B, "C": C}, centre=_centroid([A, B, C]))
    _angle_label(fig, A, B, C, f"{a}°", dist=0.28)
    return fig, (A, B, C)


def _isosceles_base_angle(rng: random.Random) -> Problem:
    a = rng.choice([x for x in range(20, 150, 10) if x != 60])
    base = (180 - a) // 2
    fig, _ = _isosceles_figure(a)
    return Problem(
        question=f"In triangle ABC, AB = AC and angle BAC = {a}°. Find angle ABC in degrees.",
        answer=base, facts=("AB = AC", f"angle BAC = {a}°"), figure=fig,
        reasoning=f"Triangle ABC is isosceles, so angle ABC = (180° - {a}°) / 2 = {base}°.")


def _parallel_figure(x: int) -> tuple[Figure, dict[str, Point]]:
    """AB parallel to CD, the transversal EF with angle BEF = x labelled; (figure, named points)."""
    E = (0.0, 1.0)
    F = _add(E, (math.cos(math.radians(x)), -math.sin(math.radians(x))), 1 / math.sin(math.radians(x)))
    left, right = min(E[0], F[0]) - 0.9, max(E[0], F[0]) + 0.9
    A, B, C, D = (left, 1.0), (right, 1.0), (left, 0.0), (right, 0.0)
    down = _unit(_sub(F, E))
    fig = Figure(segments=[(A, B), (C, D), (_add(E, down, -0.35), _add(F, down, 0.35))])
    centre = _centroid([E, F])
    _name_vertices(fig, {"A": A, "B": B, "C": C, "D": D}, centre=centre, dist=0.12)
    _angle_label(fig, E, _add(E, _sub(E, B)), _add(E, _sub(E, F)), "E", dist=0.14)  # opposite the angle
    _angle_label(fig, F, _add(F, _sub(F, C)), _add(F, _sub(F, E)), "F", dist=0.14)
    _angle_label(fig, E, B, F, f"{x}°", dist=0.25)
    return fig, {"A": A, "B": B, "C": C, "D": D, "E": E, "F": F}


def _parallel_lines(rng: random.Random) -> Problem:
    x = rng.choice([v for v in range(35, 150, 5) if v != 90])
    fig, _ = _parallel_figure(x)
    return Problem(
        question=f"AB is parallel to CD, and the line EF crosses them with angle BEF = {x}°. "
                 "Find angle EFD in degrees.",
        answer=180 - x, facts=("AB is parallel to CD", f"angle BEF = {x}°"), figure=fig,
        reasoning=f"Angle BEF and angle EFD are co-interior angles between parallel lines, "
                  f"so angle EFD = 180° - {x}° = {180 - x}°.")


def _crossing_figure(x: int) -> tuple[Figure, dict[str, Point]]:
    """Lines AB and CD crossing at O with angle AOC = x labelled; (figure, named points)."""
    O, A, B = (0.0, 0.0), (-1.0, 0.0), (1.0, 0.0)
    C = _polar(180 - x)
    D = (-C[0], -C[1])
    fig = Figure(segments=[(A, B), (C, D)], dots=[O])
    _name_vertices(fig, {"A": A, "B": B, "C": C, "D": D}, centre=O)
    _angle_label(fig, O, B, D, "O", dist=0.15)
    _angle_label(fig, O, A, C, f"{x}°", dist=0.3)
    return fig, {"O": O, "A": A, "B": B, "C": C, "D": D}


def _straight_angle(rng: random.Random) -> Problem:
    x = rng.choice([v for v in range(30, 155, 5) if v != 90])
    fig, _ = _crossing_figure(x)
    return Problem(
        question=f"The lines AB and CD intersect at O, and angle AOC = {x}°. Find angle BOC in degrees.",
        answer=180 - x, facts=("AB and CD intersect at O", f"angle AOC = {x}°"), figure=fig,
        reasoning=f"Angle AOC and angle BOC lie on the straight line AB, so angle BOC = 180° - {x}° = {180 - x}°.")


def _rectangle_figure(w: int, h: int) -> Figure:
    """Rectangle ABCD with AB = w and BC = h labelled."""
    s = max(w, h)
    A, B, C, D = (0.0, 0.0), (w / s, 0.0), (w / s, h / s), (0.0, h / s)
    fig = Figure()
    _polygon(fig, [A, B, C, D])
    centre = _centroid([A, B, C, D])
    _name_vertices(fig, {"A": A, "B": B, "C": C, "D": D}, centre=centre)
    _side_label(fig, A, B, str(w), centre=centre)
    _side_label(fig, B, C, str(h), centre=centre)
    return fig


def _rectangle(rng: random.Random) -> Problem:
    w, h = rng.sample(range(2, 13), 2)
    fig = _rectangle_figure(w, h)
    facts = ("ABCD is a rectangle", f"AB = {w}", f"BC = {h}")
    if rng.random() < 0.5:
        return Problem(
            question=f"ABCD is a rectangle with AB = {w} and BC = {h}. Find the perimeter of ABCD.",
            answer=2 * (w + h), facts=facts, figure=fig,
            reasoning=f"The perimeter of a rectangle is 2 * (AB + BC) = 2 * ({w} + {h}) = {2 * (w + h)}.")
    return Problem(
        question=f"ABCD is a rectangle with AB = {w} and BC = {h}. Find the area of ABCD.",
        answer=w * h, facts=facts, figure=fig,
        reasoning=f"The area of a rectangle is AB * BC = {w} * {h} = {w * h}.")


def _square(rng: random.Random) -> Problem:
    side = rng.randrange(2, 13)
    A, B, C, D = (0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)
    fig = Figure()
    _polygon(fig, [A, B, C, D])
    centre = (0.5, 0.5)
    _name_vertices(fig, {"A": A, "B": B, "C": C, "D": D}, centre=centre)
    _side_label(fig, A, B, str(side), centre=centre)
    facts = ("ABCD is a square", f"AB = {side}")
    if rng.random() < 0.5:
        return Problem(
            question=f"ABCD is a square with AB = {side}. Find the perimeter of ABCD.",
            answer=4 * side, facts=facts, figure=fig,
            reasoning=f"A square has four equal sides, so the perimeter is 4 * {side} = {4 * side}.")
    return Problem(
        question=f"ABCD is a square with AB = {side}. Find the area of ABCD.",
        answer=side * side, facts=facts, figure=fig,
        reasoning=f"The area of a square is AB * AB = {side} * {side} = {side * side}.")


def _circle_figure() -> Figure:
    """A circle about O with the diameter AB drawn (lengths are labelled by the caller)."""
    O, A, B = (0.0, 0.0), (-1.0, 0.0), (1.0, 0.0)
    fig = Figure(segments=[(A, B)], circles=[(O, 1.0)], dots=[O])
    fig.labels += [((-1.12, 0.0), "A"), ((1.12, 0.0), "B"), ((0.0, -0.12), "O")]
    return fig


def _circle(rng: random.Random) -> Problem:
    r = rng.randrange(2, 16)
    fig = _circle_figure()
    if rng.random() < 0.5:
        fig.labels.append(((-0.5, 0.1), str(r)))
        return Problem(
            question=f"O is the center of the circle, AB passes through O, and OA = {r}. Find AB.",
            answer=2 * r, facts=("O is the center of the circle", "AB is a diameter", f"OA = {r}"),
            figure=fig, reasoning=f"AB is a diameter, so AB = 2 * OA = 2 * {r} = {2 * r}.")
    fig.labels.append(((0.0, 0.1), str(2 * r)))
    return Problem(
        question=f"O is the center of the circle and AB is a diameter with AB = {2 * r}. Find the radius OA.",
        answer=r, facts=("O is the center of the circle", f"AB = {2 * r}", "AB is a diameter"),
        figure=fig, reasoning=f"OA is a radius, so OA = AB / 2 = {2 * r} / 2 = {r}.")


def _triangle_perimeter(rng: random.Random) -> Problem:
    while True:
        ab, bc, ac = (rng.randrange(3, 13) for _ in range(3))
        if ab + bc > ac + 1 and ab + ac > bc + 1 and bc + ac > ab + 1:
            break
    A, B, C = _triangle_from_sides(ab / 12, bc / 12, ac / 12)
    fig = Figure()
    _polygon(fig, [A, B, C])
    centre = _centroid([A, B, C])
    _name_vertices(fig, {"A": A, "B": B, "C": C}, centre=centre)
    for p, q, n in ((A, B, ab), (B, C, bc), (A, C, ac)):
        _side_label(fig, p, q, str(n), centre=centre)
    p = ab + bc + ac
    return Problem(
        question=f"In triangle ABC, AB = {ab}, BC = {bc} and AC = {ac}. Find the perimeter of triangle ABC.",
        answer=p, facts=(f"AB = {ab}", f"BC = {bc}", f"AC = {ac}"), figure=fig,
        reasoning=f"The perimeter of triangle ABC is AB + BC + AC = {ab} + {bc} + {ac} = {p}.")


# One-step equalities: the answer is a given, picked out by a geometric fact; a second given differs from it.
def _rectangle_side(rng: random.Random) -> Problem:
    w, h = rng.sample(range(2, 13), 2)
    ask, value, equal = ("CD", w, "AB") if rng.random() < 0.5 else ("AD", h, "BC")
    return Problem(
        question=f"ABCD is a rectangle with AB = {w} and BC = {h}. Find {ask}.", answer=value, equality=True,
        facts=("ABCD is a rectangle", f"AB = {w}", f"BC = {h}"), figure=_rectangle_figure(w, h),
        reasoning=f"Opposite sides of a rectangle are equal, so {ask} = {equal} = {value}.")


def _isosceles_equal_angles(rng: random.Random) -> Problem:
    a = rng.choice([x for x in range(20, 150, 10) if x != 60])
    base = (180 - a) // 2
    fig, (A, B, C) = _isosceles_figure(a)
    _angle_label(fig, B, A, C, f"{base}°", dist=0.28)
    return Problem(
        question=f"In triangle ABC, AB = AC, angle BAC = {a}° and angle ABC = {base}°. Find angle ACB in degrees.",
        answer=base, equality=True, facts=("AB = AC", f"angle BAC = {a}°", f"angle ABC = {base}°"), figure=fig,
        reasoning=f"Triangle ABC is isosceles with AB = AC, so angle ACB = angle ABC = {base}°.")


def _vertical_angles(rng: random.Random) -> Problem:
    x = rng.choice([v for v in range(30, 155, 5) if v != 90])
    fig, pts = _crossing_figure(x)
    _angle_label(fig, pts["O"], pts["B"], pts["C"], f"{180 - x}°", dist=0.3)
    return Problem(
        question=f"The lines AB and CD intersect at O, angle AOC = {x}° and angle BOC = {180 - x}°. "
                 "Find angle BOD in degrees.",
        answer=x, equality=True, figure=fig,
        facts=("AB and CD intersect at O", f"angle AOC = {x}°", f"angle BOC = {180 - x}°"),
        reasoning=f"Angle BOD and angle AOC are vertical angles, so angle BOD = angle AOC = {x}°.")


def _alternate_angles(rng: random.Random) -> Problem:
    x = rng.choice([v for v in range(35, 150, 5) if v != 90])
    fig, pts = _parallel_figure(x)
    _angle_label(fig, pts["E"], pts["A"], pts["F"], f"{180 - x}°", dist=0.25)
    return Problem(
        question=f"AB is parallel to CD, and the line EF crosses them with angle BEF = {x}° and "
                 f"angle AEF = {180 - x}°. Find angle EFC in degrees.",
        answer=x, equality=True, figure=fig,
        facts=("AB is parallel to CD", f"angle BEF = {x}°", f"angle AEF = {180 - x}°"),
        reasoning=f"Angle EFC and angle BEF are alternate angles between parallel lines, "
                  f"so angle EFC = angle BEF = {x}°.")


def _circle_radii(rng: random.Random) -> Problem:
    r = rng.randrange(2, 16)
    fig = _circle_figure()
    fig.labels += [((-0.5, 0.1), str(r)), ((0.5, -0.1), str(2 * r))]
    return Problem(
        question=f"O is the center of the circle, AB is a diameter with AB = {2 * r}, and OA = {r}. Find OB.",
        answer=r, equality=True, figure=fig, facts=("O is the center of the circle", f"AB = {2 * r}", f"OA = {r}"),
        reasoning=f"OA and OB are radii of the same circle, so OB = OA = {r}.")


TEMPLATES = (_triangle_angle_sum, _right_triangle, _isosceles_base_angle, _parallel_lines, _straight_angle,
             _rectangle, _square, _circle, _triangle_perimeter,
             _rectangle_side, _isosceles_equal_angles, _vertical_angles, _alternate_angles, _circle_radii)


# -------------------------------------------------------------------------------------- rendering
def render(figure: Figure, *, size: int) -> Image.Image:
    """The figure fitted into a white `size` x `size` RGB image, black strokes and labels."""
    xs = [p[0] for s in figure.segments for p in s] + [p[0] for p, _ in figure.labels]
    ys = [p[1] for s in figure.segments for p in s] + [p[1] for p, _ in figure.labels]
    for (cx, cy), r in figure.circles:
        xs += [cx - r, cx + r]
        ys += [cy - r, cy + r]
    margin = size * 0.08
    scale = (size - 2 * margin) / max(max(xs) - min(xs), max(ys) - min(ys), 1e-6)
    ox = margin + ((size - 2 * margin) - scale * (max(xs) - min(xs))) / 2
    oy = margin + ((size - 2 * margin) - scale * (max(ys) - min(ys))) / 2

    def px(p: Point) -> tuple[float, float]:
        return ox + scale * (p[0] - min(xs)), size - (oy + scale * (p[1] - min(ys)))

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    width = max(1, size // 112)
    for p, q in figure.segments:
        draw.line([px(p), px(q)], fill="black", width=width)
    for c, r in figure.circles:
        (x, y), rr = px(c), r * scale
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], outline="black", width=width)
    for d in figure.dots:
        (x, y), rr = px(d), 1.5 * width
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill="black")
    font = ImageFont.load_default(size=max(8, size // 16))
    for p, text in figure.labels:
        draw.text(px(p), text, fill="black", font=font, anchor="mm")
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ public
def sample_problem(*, seed: int, index: int) -> Problem:
    """Problem `index` of the dataset with this seed (independent of the dataset size)."""
    rng = random.Random(f"synthetic-{seed}-{index}")
    template = rng.choice(TEMPLATES)
    while True:  # redraw until copying the wrong given (or any given, for a computed answer) is wrong
        problem = template(rng)
        givens = [int(n) for fact in problem.facts for n in re.findall(r"\d+", fact)]
        if (givens.count(problem.answer) == 1 and len(set(givens)) > 1) if problem.equality \
                else problem.answer not in givens:
            return problem


def make_problems(cfg: SyntheticDataConfig) -> list[Prompt]:
    """`cfg.num_problems` rendered problems as Prompt records, ids `synthetic-<seed>-<index>`."""
    prompts = []
    for index in range(cfg.num_problems):
        problem = sample_problem(seed=cfg.seed, index=index)
        question = problem.question if GIVENS_IN_QUESTION else _ask_only(problem.question)
        prompts.append(Prompt(
            id=f"synthetic-{cfg.seed}-{index}", index=index, problem=f"<image>{question}",
            answer=str(problem.answer), image=_png(render(problem.figure, size=cfg.image_size)),
            annotations=problem.facts, solution=problem.solution()))
    return prompts


def _ask_only(question: str) -> str:
    """The question without its givens: only the last sentence, which asks for the unknown."""
    return re.split(r"(?<=\.) ", question)[-1]


def text_corpus(*, seed: int, num_problems: int) -> list[str]:
    """Question + solution texts of the first problems, without rendering (tokenizer training)."""
    texts = []
    for index in range(num_problems):
        problem = sample_problem(seed=seed, index=index)
        texts.append(f"{problem.question}\n{problem.solution()}")
    return texts
