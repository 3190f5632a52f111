"""Entity spans from per-word tags, and entity-level precision / recall / F1, as seqeval scores them.

Tags are "O" or PREFIX-TYPE with the IOB2 prefixes B (begins) and I (inside), plus E (ends) and S (single word) of
IOBES. `spans` reads a sequence the way seqeval's default (conlleval) mode does: an I- tag after O or after another
type starts an entity, B- and S- always start one. `EntityCounts` adds up what seqeval's micro-averaged scores divide:
predicted entities, true entities and exact matches (same type, same first and last word).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

PREFIXES = ("B", "I", "E", "S")


def tag_error(tag: str) -> Optional[str]:
    """Why `tag` is not one of the tags this scheme reads (None when it is)."""
    if tag == "O":
        return None
    prefix, _, kind = tag.partition("-")
    if prefix in PREFIXES and kind:
        return None
    return f"tag {tag!r} is not O or B-/I-/E-/S- followed by an entity type (IOB2 or IOBES, e.g. B-PER, I-PER)"


def _split(tag: str) -> tuple[str, str]:
    return ("O", "") if tag == "O" else (tag[0], tag[2:])


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in one sentence's tags, in order (seqeval's `get_entities`)."""
    found = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):  # the trailing O closes an entity at the end
        prefix, kind = _split(tag)
        if _ends(prev_tag, prefix, prev_type, kind):
            found.append((prev_type, begin, i - 1))
        if _starts(prev_tag, prefix, prev_type, kind):
            begin = i
        prev_tag, prev_type = prefix, kind
    return found


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    """Whether the entity of the previous word ends before this word."""
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != kind


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    """Whether an entity starts at this word."""
    if tag in ("B", "S"):
        return True
    if tag in ("I", "E") and prev in ("E", "S", "O"):
        return True
    return tag != "O" and prev_type != kind


@dataclass
class EntityCounts:
    """Entity counts over sentences, summed: exact matches over predicted (precision) and over true (recall)."""

    predicted: int = 0
    true: int = 0
    correct: int = 0

    def add(self, true_tags: Sequence[str], predicted_tags: Sequence[str]) -> None:
        truth, guess = set(spans(true_tags)), set(spans(predicted_tags))
        self.true += len(truth)
        self.predicted += len(guess)
        self.correct += len(truth & guess)

    def scores(self) -> dict[str, float]:
        """Micro-averaged precision, recall and F1 (0 where there is nothing to divide by, as seqeval reports)."""
        precision = self.correct / self.predicted if self.predicted else 0.0
        recall = self.correct / self.true if self.true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(true: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Precision, recall and F1 of the entities of `predicted` against `true`, sentence by sentence."""
    counts = EntityCounts()
    for truth, guess in zip(true, predicted, strict=True):
        counts.add(truth, guess)
    return counts.scores()
