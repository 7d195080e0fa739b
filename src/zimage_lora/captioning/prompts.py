"""What the captioner asks for, and how a model's answer becomes a caption (pure functions, no model).

The modes follow the guide (shared/000_35ed398331e6b49b.txt, 5.2-5.3): captions are literal and consistent, saying
what is in the picture; for a style the scene is described normally and the style itself is not over-described, so
the LoRA learns "render anything in this style" rather than a style that only one keyword calls up. The trigger is
optional; when given it goes first, as ``[trigger]`` (replaced by the job's trigger word when training) or as the
word itself.

``clean_caption`` turns an answer into the caption that is written: preambles such as "The image shows" go,
``tags`` answers become one comma-separated line, ``--max-words`` is applied, the trigger is put first. Refusals
("I'm sorry", "I cannot") and empty answers give no caption but a problem, which the run reports by file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODES = ("character", "style", "object", "tags")
TRIGGER_STYLES = ("placeholder", "word")
PLACEHOLDER = "[trigger]"

# The instructions an instruction-following model (Qwen3-VL) gets, one per mode. Plain text: change them here.
INSTRUCTIONS = {
    "character": (
        "Write a caption of this picture for training a text-to-image model. Describe literally what is visible, in "
        "one to three plain sentences: the person or character (apparent age, hair, face, build), their pose and "
        "expression, their clothing and accessories, what they hold or do, the setting and background, the "
        "lighting, and the framing (close-up, half-body or full-body). Use simple words and call the same things by "
        "the same names. Do not name the person, do not guess feelings or a story, and do not describe the art "
        "style or the picture's quality."
    ),
    "style": (
        "Write a caption of this picture for training a text-to-image model on its style. Describe the scene "
        "normally, in one to three plain sentences: the subjects and what they do, the objects, the setting, the "
        "composition and the lighting. Do not describe the style itself: leave out the medium, the technique, the "
        "brushwork, the colour palette and any artist's name."
    ),
    "object": (
        "Write a caption of this picture for training a text-to-image model. Describe literally what is visible, in "
        "one to three plain sentences: the main object (what it is, its shape, material, colours and parts), where "
        "it is and what is around it, the lighting and the camera angle. Use simple words and call the same things "
        "by the same names. Do not describe the art style or the picture's quality."
    ),
    "tags": (
        "List what is visible in this picture as short tags for training a text-to-image model, most important "
        "first: the subject and its features, clothing, pose, objects, setting, lighting and framing. Lowercase tags "
        "of one to three words, separated by commas: no sentences, no numbering."
    ),
}
PROSE_ENDING = " Answer with the caption alone, without a preamble such as 'The image shows'."
TAGS_ENDING = " Answer with the tags alone."


def instruction(mode: str, prompt: str | None = None, max_words: int | None = None) -> str:
    """The text an instruction-following captioner gets: the mode's instruction, or ``prompt`` in its place; with
    ``max_words`` a sentence asking for that many words at most (the answer is also cut there)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    text = prompt.strip() if prompt else INSTRUCTIONS[mode] + (TAGS_ENDING if mode == "tags" else PROSE_ENDING)
    if max_words:
        text += f" Use at most {max_words} words."
    return text


def trigger_text(trigger: str | None, style: str) -> str | None:
    """What goes first in each caption: ``[trigger]`` (the job's trigger word replaces it) or the word itself."""
    if not trigger:
        return None
    if style not in TRIGGER_STYLES:
        raise ValueError(f"unknown trigger style {style!r}")
    return PLACEHOLDER if style == "placeholder" else trigger.strip()


# --- from an answer to a caption ----------------------------------------------------------------------------------
_THINKING = re.compile(r"<think>.*?</think>", re.S)  # a "Thinking" model's reasoning, never part of the caption
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry\b|i(?:'?m| am) (?:unable|not able)|"
    r"i (?:can ?not|can'?t|won'?t|will not|do not feel comfortable)|as an ai\b|unfortunately,? i\b)",
    re.I,
)
_LABEL = re.compile(r"^(?:caption|description|tags)\s*:\s*", re.I)
_PICTURE = r"(?:image|picture|photo(?:graph)?|illustration|artwork|painting|drawing|render(?:ing)?|scene|shot)"
_PREAMBLES = (
    re.compile(r"^here(?:'s| is) (?:a |an |the )?(?:caption|description|list of tags)[^:\n]*:\s*", re.I),
    re.compile(
        rf"^(?:the|this) {_PICTURE} (?:shows|depicts|features|displays|presents|portrays|captures|contains|"
        r"illustrates|showcases|is of|is(?= (?:a|an|the)\b))\s*:?\s*",
        re.I,
    ),
    re.compile(rf"^(?:in|within) (?:the|this) {_PICTURE}\s*,?\s*(?:we (?:can )?see\s*)?", re.I),
    re.compile(rf"^this is (?:a |an )?{_PICTURE} of\s*", re.I),
)
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")


@dataclass(frozen=True)
class Cleaned:
    caption: str | None  # None when nothing may be written
    problem: str | None = None


def clean_caption(answer: str, mode: str, trigger: str | None = None, max_words: int | None = None) -> Cleaned:
    """The caption to write for a model's ``answer`` (deterministic: the same answer gives the same caption).

    ``trigger`` is the text to put first (``trigger_text``); the words of ``max_words`` do not count it.
    """
    text = _THINKING.sub("", answer).replace("**", "").replace("__", "").replace("`", "").strip()
    if not text:
        return Cleaned(None, "the model gave an empty answer")
    if _REFUSAL.match(text.replace("\u2019", "'")):
        return Cleaned(None, f"the model refused: {_shorten(text)}")
    text = _strip_quotes(_LABEL.sub("", text))
    if mode == "tags":
        text = _tags(text, max_words)
    else:
        text = _prose(text, max_words)
    if not re.search(r"[^\W_]", text):  # no letter or digit: nothing to train on
        return Cleaned(None, f"the model gave no caption: {_shorten(answer)}")
    if trigger:
        said = re.match(rf"{re.escape(trigger)}(?!\w)", text, re.I)  # the model wrote it already: not twice
        if said:
            text = text[said.end() :].lstrip(" ,;:")
        text = f"{trigger}, {text}" if text else trigger
    elif mode != "tags":
        text = text[0].upper() + text[1:]
    return Cleaned(text)


def _prose(text: str, max_words: int | None) -> str:
    lines = [_BULLET.sub("", line).strip() for line in text.splitlines()]
    text = " ".join(line for line in lines if line)
    before = None
    while before != text:  # "In this picture, the image shows ..." loses both
        before = text
        for preamble in _PREAMBLES:
            text = _strip_quotes(preamble.sub("", text, count=1))
    words = text.split()
    if max_words and len(words) > max_words:
        cut = " ".join(words[:max_words])
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", cut)]
        if ends and len(cut[: ends[-1]].split()) * 2 >= max_words:  # a whole sentence keeps at least half the words
            cut = cut[: ends[-1]]
        text = cut.rstrip(" ,;:-")
    return " ".join(text.split())


def _tags(text: str, max_words: int | None) -> str:
    tags: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line)
        for tag in re.split(r"[,;]", line):
            tag = " ".join(tag.strip(" .\t\"'").split())
            if tag and tag.lower() not in (t.lower() for t in tags):
                tags.append(tag)
    if max_words:
        kept, words = [], 0
        for tag in tags:
            words += len(tag.split())
            if words > max_words:
                break
            kept.append(tag)
        if tags and not kept:  # a first tag longer than the cap: its first words
            kept = [" ".join(tags[0].split()[:max_words])]
        tags = kept
    return ", ".join(tags)


def _strip_quotes(text: str) -> str:
    text = text.strip()
    if len(text) > 1 and text[0] in "\"'\u201c" and text[-1] in "\"'\u201d":
        text = text[1:-1].strip()
    return text


def _shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return f"'{text}'" if len(text) <= limit else f"'{text[: limit - 3]}...'"
