"""ShapesWorld prompt grammar: six GenEval task types over 6 colours × 3 shapes.

A prompt parses into a :class:`PromptSpec`: the objects it asks for (each a colour or
``None`` for "any colour", and a shape) and, for ``position`` prompts, a spatial relation
between the first and the second object.

Task types and their phrasing (mirroring GenEval, where ``single_object`` and
``two_object`` name classes only and ``colors`` / ``color_attr`` add colours):

=============  ==============================================  =========================
task           example                                         asks for
=============  ==============================================  =========================
single_object  "a circle"                                      one circle, any colour
colors         "a red circle"                                  one red circle
two_object     "a circle and a square"                         one circle + one square
counting       "three green triangles"                         exactly 2–4 of one kind
position       "a red circle to the left of a blue square"     two objects + a relation
color_attr     "a red circle and a blue square"                binding colour to shape
=============  ==============================================  =========================

Every image must contain exactly the requested objects: an extra object is a failure
(and counts as a hallucinated object).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from diffalign.errors import PromptError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 160, 40),
    "blue": (30, 60, 225),
    "yellow": (250, 230, 20),
    "purple": (130, 40, 200),
    "orange": (255, 140, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TASKS: tuple[str, ...] = ("single_object", "colors", "two_object", "counting", "position", "color_attr")

#: Colour–shape combinations never seen in training: prompts naming one are out-of-domain.
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
)


@dataclass(frozen=True)
class ObjectSpec:
    """One requested object. ``color`` is ``None`` when the prompt leaves it free."""

    shape: str
    color: str | None = None

    def phrase(self) -> str:
        return f"{self.color} {self.shape}" if self.color else self.shape


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt.

    objects: requested objects, in prompt order (counting repeats the object N times).
    relation: for ``position`` prompts, how ``objects[0]`` lies relative to ``objects[1]``.
    """

    task: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    text: str = field(default="", compare=False)

    @property
    def combos(self) -> set[tuple[str, str]]:
        return {(o.color, o.shape) for o in self.objects if o.color is not None}

    @property
    def out_of_domain(self) -> bool:
        return bool(self.combos & HELD_OUT_COMBOS)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_prompt(spec: PromptSpec) -> str:
    """The canonical text of a prompt spec (inverse of :func:`parse_prompt`)."""
    o = spec.objects
    if spec.task in ("single_object", "colors"):
        return f"{_article(o[0].phrase())} {o[0].phrase()}"
    if spec.task in ("two_object", "color_attr"):
        return f"{_article(o[0].phrase())} {o[0].phrase()} and {_article(o[1].phrase())} {o[1].phrase()}"
    if spec.task == "counting":
        return f"{NUMBERS[len(o)]} {o[0].color} {PLURALS[o[0].shape]}"
    if spec.task == "position":
        rel = {"left of": "to the left of", "right of": "to the right of"}.get(spec.relation, spec.relation)
        return f"{_article(o[0].phrase())} {o[0].phrase()} {rel} {_article(o[1].phrase())} {o[1].phrase()}"
    raise PromptError(f"unknown task type {spec.task!r}; expected one of {', '.join(TASKS)}")


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJ = rf"(?:an?\s+)?(?:(?P<c{{i}}>{_COLOR})\s+)?(?P<s{{i}}>{_SHAPE})"
_RE_ONE = re.compile(rf"^{_OBJ.format(i=1)}$")
_RE_TWO = re.compile(rf"^{_OBJ.format(i=1)}\s+and\s+{_OBJ.format(i=2)}$")
_RE_POS = re.compile(
    rf"^{_OBJ.format(i=1)}\s+(?P<rel>to the left of|to the right of|above|below)\s+{_OBJ.format(i=2)}$"
)
_RE_COUNT = re.compile(rf"^(?P<n>two|three|four)\s+(?P<c1>{_COLOR})\s+(?P<s1>circles|squares|triangles)$")


def _explain_failure(text: str) -> str:
    words = re.findall(r"[a-z]+", text)
    known = set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(NUMBERS.values()) | {
        "a", "an", "and", "to", "the", "left", "right", "of", "above", "below",
    }
    unknown = [w for w in words if w not in known]
    if unknown:
        w = unknown[0]
        return (
            f"unknown word {w!r} in prompt {text!r}: ShapesWorld knows the colours "
            f"{', '.join(COLORS)} and the shapes {', '.join(SHAPES)}"
        )
    return (
        f"malformed prompt {text!r}: expected e.g. 'a circle', 'a red circle', 'a circle and a square', "
        "'three green triangles', 'a red circle to the left of a blue square' or 'a red circle and a blue square'"
    )


@lru_cache(maxsize=8192)
def parse_prompt(text: str) -> PromptSpec:
    """Parse a ShapesWorld prompt; raises :class:`PromptError` naming the problem."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
    t = " ".join(text.strip().lower().rstrip(".").split())
    if m := _RE_COUNT.match(t):
        n = {v: k for k, v in NUMBERS.items()}[m["n"]]
        shape = m["s1"][:-1]
        return PromptSpec("counting", tuple(ObjectSpec(shape, m["c1"]) for _ in range(n)), text=t)
    if m := _RE_ONE.match(t):
        task = "colors" if m["c1"] else "single_object"
        return PromptSpec(task, (ObjectSpec(m["s1"], m["c1"]),), text=t)
    if m := _RE_POS.match(t):
        rel = m["rel"].replace("to the ", "")
        objs = (ObjectSpec(m["s1"], m["c1"]), ObjectSpec(m["s2"], m["c2"]))
        if None in (m["c1"], m["c2"]):
            raise PromptError(f"position prompt {text!r} must give both objects a colour")
        if objs[0] == objs[1]:
            raise PromptError(f"position prompt {text!r} relates an object to an identical one; use two different objects")
        return PromptSpec("position", objs, rel, text=t)
    if m := _RE_TWO.match(t):
        objs = (ObjectSpec(m["s1"], m["c1"]), ObjectSpec(m["s2"], m["c2"]))
        if (m["c1"] is None) != (m["c2"] is None):
            raise PromptError(f"prompt {text!r} colours one object but not the other; colour both or neither")
        if m["c1"] is None:
            if objs[0].shape == objs[1].shape:
                raise PromptError(f"prompt {text!r} names the same shape twice; use 'two {PLURALS[objs[0].shape]}'")
            return PromptSpec("two_object", objs, text=t)
        if objs[0].shape == objs[1].shape or objs[0].color == objs[1].color:
            raise PromptError(
                f"prompt {text!r}: attribute-binding prompts need two different shapes in two different colours"
            )
        return PromptSpec("color_attr", objs, text=t)
    raise PromptError(_explain_failure(t))


def all_prompts() -> dict[str, list[str]]:
    """Every canonical prompt of the grammar, by task type (deterministic order)."""
    cs = [(c, s) for c in COLORS for s in SHAPES]
    out: dict[str, list[str]] = {t: [] for t in TASKS}
    out["single_object"] = [format_prompt(PromptSpec("single_object", (ObjectSpec(s),))) for s in SHAPES]
    out["colors"] = [format_prompt(PromptSpec("colors", (ObjectSpec(s, c),))) for c, s in cs]
    out["two_object"] = [
        format_prompt(PromptSpec("two_object", (ObjectSpec(a), ObjectSpec(b)))) for a in SHAPES for b in SHAPES if a != b
    ]
    out["counting"] = [
        format_prompt(PromptSpec("counting", tuple(ObjectSpec(s, c) for _ in range(n)))) for n in NUMBERS for c, s in cs
    ]
    for rel in RELATIONS:
        for a in cs:
            for b in cs:
                if a != b:
                    spec = PromptSpec("position", (ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0])), rel)
                    out["position"].append(format_prompt(spec))
    out["color_attr"] = [
        format_prompt(PromptSpec("color_attr", (ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0]))))
        for a in cs
        for b in cs
        if a[0] != b[0] and a[1] != b[1]
    ]
    return out


SPLIT_SEED = 20261122
TEST_FRACTION = 0.2


@lru_cache(maxsize=4)
def prompt_splits(seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> dict[str, dict[str, list[str]]]:
    """Fixed, seeded splits: ``{"train"|"test"|"ood": {task: [prompts]}}``.

    ``ood`` holds every prompt naming a held-out colour–shape combination (never in train or
    test). The rest is split per task type, ``test_fraction`` to test (at least one prompt).
    ``single_object`` and ``two_object`` name no colours and have only 3 and 6 prompts, so they
    appear in both train and test (their test images still differ in seed).
    """
    rng = random.Random(seed)
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}, "ood": {}}
    for task, prompts in all_prompts().items():
        ood = [p for p in prompts if parse_prompt(p).out_of_domain]
        rest = [p for p in prompts if not parse_prompt(p).out_of_domain]
        if task in ("single_object", "two_object"):
            splits["train"][task], splits["test"][task] = list(rest), list(rest)
        else:
            rest = rest[:]
            rng.shuffle(rest)
            n_test = max(1, round(len(rest) * test_fraction))
            splits["test"][task], splits["train"][task] = sorted(rest[:n_test]), sorted(rest[n_test:])
        splits["ood"][task] = ood
    return splits


def eval_prompts(split: str, n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[str]:
    """``n`` prompts from ``split`` balanced over the task types that have prompts there
    (only those in ``tasks`` when given, e.g. ``("position", "color_attr")``).

    Deterministic given ``seed``: task types are cycled in order and prompts are drawn
    round-robin from each task's shuffled list.
    """
    splits = prompt_splits()
    if split not in splits:
        raise PromptError(f"unknown prompt split {split!r}; choose train, test or ood")
    if tasks is not None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown or not tasks:
            raise PromptError(f"unknown task type(s) {unknown or list(tasks)}; choose from {', '.join(TASKS)}")
        empty = [t for t in tasks if not splits[split][t]]
        if empty:
            raise PromptError(f"split {split!r} has no prompts of task type(s) {empty}")
    tasks = [t for t in TASKS if splits[split][t] and (tasks is None or t in tasks)]
    rng = random.Random(seed)
    pools = {t: rng.sample(splits[split][t], len(splits[split][t])) for t in tasks}
    return [pools[tasks[i % len(tasks)]][(i // len(tasks)) % len(pools[tasks[i % len(tasks)]])] for i in range(n)]
