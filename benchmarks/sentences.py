"""Two sentence grammars written for this project: one for training text, one for evaluation text.

The grammars share no filler word and no template, so a model fine-tuned on ``TRAIN`` sentences cannot score on
``EVALUATION`` sentences by reproducing memorised phrases: the training text talks about a home (objects, rooms,
relatives; past-tense statements), the evaluation text about travel, places and work (questions, requests,
conditionals). Only the function words in ``FUNCTION_WORDS`` occur in both.

Words are everyday English with one usual spelling and no common homophone, so a reference transcript is the only
reasonable way to write what is spoken. Numbers are spelled out; upstream's English normaliser maps them to digits
on both sides of a comparison.
"""

import random
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Set, Tuple

_SLOT = re.compile(r"\{(\w+)\}")
# "a" before a vowel sound; the word lists avoid words where spelling and sound disagree ("hour", "useful").
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


#: The only words both grammars may produce.
FUNCTION_WORDS = frozenset({"a", "after", "before", "in", "it", "of", "on", "the", "this", "we"})


@dataclass(frozen=True)
class Grammar:
    """Templates with ``{slot}`` markers and the words each slot takes. Slots ending in a digit reuse the list of
    the slot without it (``{adjective2}`` draws from ``adjective``), so one sentence can hold two different words."""

    name: str
    templates: Tuple[str, ...]
    slots: Dict[str, Tuple[str, ...]]

    def vocabulary(self) -> Set[str]:
        """Every lower-cased word the slot lists can put into a sentence."""
        return {word.lower() for words in self.slots.values() for phrase in words for word in phrase.split()}

    def template_words(self) -> Set[str]:
        """Lower-cased words written into the templates themselves."""
        return {w.lower() for t in self.templates for w in re.findall(r"[A-Za-z']+", _SLOT.sub(" ", t))}

    def sentence(self, rng: random.Random) -> str:
        template = rng.choice(self.templates)
        used: Dict[str, str] = {}

        def fill(match: "re.Match[str]") -> str:
            slot = match.group(1)
            words = self.slots[slot.rstrip("0123456789")]
            choice = rng.choice(words)
            while choice in used.values() and len(words) > 1:
                choice = rng.choice(words)
            used[slot] = choice
            return choice

        text = _ARTICLE.sub(lambda m: m.group(1) + "n ", _SLOT.sub(fill, template))
        return text[0].upper() + text[1:]


def sentences(grammar: Grammar, count: int, seed: int, exclude: Sequence[str] = ()) -> List[str]:
    """``count`` distinct sentences of ``grammar``, none in ``exclude``, determined by ``seed``.

    Raises ValueError when the grammar cannot supply that many distinct sentences in a reasonable number of draws.
    """
    rng = random.Random(f"{grammar.name}:{seed}")
    seen = set(exclude)
    result: List[str] = []
    draws = 0
    while len(result) < count:
        draws += 1
        if draws > 50 * count + 1000:
            raise ValueError(f"grammar {grammar.name!r} gave only {len(result)} distinct sentences, {count} asked for")
        text = grammar.sentence(rng)
        if text not in seen:
            seen.add(text)
            result.append(text)
    return result


# ---- training text: a home, its objects and the people living there; statements in the past tense -------------
TRAIN = Grammar(
    name="home",
    templates=(
        "My {relative} {handled} the {texture} {object} {when}.",
        "We {handled} {few} {objects} and left them in the {room}.",
        "The {object} in the {room} was {texture} and {texture2}.",
        "{When_start}, my {relative} {handled} a {texture} {object}.",
        "I found the {texture} {object} {beside} the {object2} in the {room}.",
        "Our {relative} kept {few} {texture} {objects} in the {room}.",
        "The {texture} {object} fell {beside} the {object2} {when}.",
        "Someone {handled} my {object} and hid it in the {room}.",
    ),
    slots={
        "relative": (
            "sister",
            "brother",
            "uncle",
            "cousin",
            "father",
            "mother",
            "grandfather",
            "grandmother",
            "roommate",
            "neighbor",
            "nephew",
            "niece",
            "husband",
            "wife",
            "daughter",
        ),
        "handled": (
            "carried",
            "washed",
            "painted",
            "dropped",
            "fixed",
            "folded",
            "lifted",
            "polished",
            "moved",
            "wrapped",
            "repaired",
            "pushed",
            "opened",
            "filled",
            "emptied",
            "borrowed",
            "stacked",
            "dried",
            "dusted",
            "sold",
        ),
        "texture": (
            "small",
            "heavy",
            "wooden",
            "bright",
            "empty",
            "broken",
            "warm",
            "yellow",
            "narrow",
            "dusty",
            "soft",
            "tiny",
            "plastic",
            "square",
            "crooked",
            "shiny",
            "muddy",
            "striped",
            "purple",
            "copper",
            "silver",
            "sticky",
            "velvet",
            "orange",
            "cracked",
        ),
        "object": (
            "kettle",
            "basket",
            "lamp",
            "blanket",
            "ladder",
            "bucket",
            "spoon",
            "towel",
            "mirror",
            "drawer",
            "pillow",
            "candle",
            "teapot",
            "hammer",
            "broom",
            "jacket",
            "bottle",
            "carpet",
            "sofa",
            "shelf",
            "plate",
            "notebook",
            "umbrella",
            "envelope",
            "ribbon",
            "cushion",
            "toaster",
            "saucepan",
        ),
        "objects": (
            "cups",
            "forks",
            "boxes",
            "jars",
            "napkins",
            "bowls",
            "socks",
            "buttons",
            "mugs",
            "spoons",
            "towels",
            "candles",
            "pencils",
            "shirts",
            "pans",
            "keys",
        ),
        "room": (
            "kitchen",
            "garden",
            "garage",
            "hallway",
            "attic",
            "cellar",
            "balcony",
            "bedroom",
            "porch",
            "pantry",
            "bathroom",
            "shed",
            "backyard",
            "laundry room",
            "dining room",
            "closet",
        ),
        "when": (
            "yesterday",
            "last night",
            "this morning",
            "on Sunday",
            "after lunch",
            "before dinner",
            "last weekend",
            "on Tuesday evening",
            "an hour ago",
            "after breakfast",
        ),
        "When_start": (
            "Yesterday",
            "Last night",
            "This morning",
            "On Sunday",
            "After lunch",
            "Before dinner",
            "Last weekend",
            "On Tuesday evening",
        ),
        "few": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
        "beside": ("under", "behind", "beside", "near", "on top of", "inside"),
    },
)

# ---- evaluation text: travel, places and work; questions, requests and conditionals in the present and future ---
EVALUATION = Grammar(
    name="travel",
    templates=(
        "Could you {act} the {quality} {site} {later}?",
        "Why did the {worker} {act} the {site} so {manner}?",
        "If the {site} is {quality}, the {worker} will {act} it {later}.",
        "Nobody expected the {quality} {site} to be so {quality2}.",
        "How many {things} can we fit on the {vehicle}?",
        "Please ask the {worker} where the {quality} {site} is.",
        "The {worker} wants to {act} a {quality} {site} {later}.",
        "Did you hear that {many} {things} came by {vehicle}?",
        "Let us {act} the {site} before the {worker} returns.",
    ),
    slots={
        "act": (
            "visit",
            "photograph",
            "cross",
            "explore",
            "measure",
            "describe",
            "reach",
            "inspect",
            "protect",
            "locate",
            "study",
            "sketch",
            "approach",
            "climb",
            "guard",
            "survey",
            "map",
            "film",
        ),
        "quality": (
            "ancient",
            "crowded",
            "frozen",
            "distant",
            "famous",
            "enormous",
            "peaceful",
            "noisy",
            "expensive",
            "modern",
            "rural",
            "coastal",
            "wild",
            "northern",
            "southern",
            "busy",
            "cheap",
            "strange",
            "dangerous",
            "calm",
            "hidden",
            "historic",
            "remote",
            "popular",
            "icy",
        ),
        "site": (
            "bridge",
            "river",
            "mountain",
            "tower",
            "museum",
            "airport",
            "tunnel",
            "village",
            "fortress",
            "forest",
            "castle",
            "highway",
            "market",
            "island",
            "glacier",
            "volcano",
            "stadium",
            "library",
            "desert",
            "valley",
            "waterfall",
            "lighthouse",
            "factory",
            "temple",
            "station",
            "cathedral",
        ),
        "worker": (
            "pilot",
            "engineer",
            "farmer",
            "captain",
            "reporter",
            "scientist",
            "student",
            "mayor",
            "driver",
            "dentist",
            "manager",
            "doctor",
            "soldier",
            "professor",
            "architect",
            "lawyer",
            "officer",
        ),
        "manner": (
            "quickly",
            "slowly",
            "rarely",
            "often",
            "loudly",
            "suddenly",
            "carefully",
            "eagerly",
            "calmly",
            "badly",
            "politely",
            "early",
        ),
        "later": (
            "next summer",
            "tomorrow",
            "before sunset",
            "during the storm",
            "after the festival",
            "by Friday",
            "in the winter",
            "next month",
            "at midnight",
            "this afternoon",
            "on Monday",
        ),
        "things": (
            "passengers",
            "bicycles",
            "tickets",
            "maps",
            "lanterns",
            "tents",
            "boats",
            "cameras",
            "suitcases",
            "trucks",
            "visitors",
            "letters",
            "engines",
            "horses",
            "sheep",
        ),
        "vehicle": ("ferry", "bus", "plane", "ship", "truck", "wagon", "helicopter", "taxi", "train", "boat"),
        "many": ("fifteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "seventeen"),
    },
)
